"""``python -m mlxqat.train``: runs the QAT job, :func:`mlxqat.job.main`.

Only an entry point: ``mlxqat.train`` is the training loop
(:func:`mlxqat.trainer.train`) and the job is :mod:`mlxqat.job`.
"""

if __name__ == "__main__":
    import sys

    from mlxqat.job import main

    sys.exit(main())
