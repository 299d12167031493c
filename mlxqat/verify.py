"""``python -m mlxqat.verify``: runs the manifest check, :func:`mlxqat.cli.verify_main`.

Only an entry point: ``mlxqat.verify`` is the check itself (:func:`mlxqat.storage.load.verify`).
"""

if __name__ == "__main__":
    import sys

    from .cli import verify_main

    sys.exit(verify_main())
