"""``python -m mlxqat.finetune``: runs the fine-tuning job, :func:`mlxqat.training.finetune.main`.

Only an entry point: ``mlxqat.finetune`` is the function (:func:`mlxqat.training.finetune.finetune`).
"""

if __name__ == "__main__":
    import sys

    from .training.finetune import main

    sys.exit(main())
