"""``python -m mlxqat.train``: runs the QAT job, :func:`mlxqat.training.job.main`.

Only an entry point: ``mlxqat.train`` is the training loop
(:func:`mlxqat.training.loop.train`) and the job is :mod:`mlxqat.training.job`.
"""

if __name__ == "__main__":
    import sys

    from .training.job import main

    sys.exit(main())
