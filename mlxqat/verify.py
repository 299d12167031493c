"""Check a model directory against its sha256 manifest, or add one to a directory you trust.

    python -m mlxqat.verify mlx-dir/            # OK <n> files, or what changed
    python -m mlxqat.verify --write mlx-dir/    # write mlxqat.json for the files as they are

Exit status 0 and ``OK <n> files`` when every file listed in ``mlxqat.json``
is present and unchanged and nothing else is there; exit status 2 and the
problem on stderr otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

from ._callable import callable_module
from ._cli import run_main
from .io import MANIFEST, Manifest, check_config, verify


def write(directory) -> dict:
    """Write (or rewrite) ``mlxqat.json`` in ``directory`` for its files as they are now.

    For a model directory you trust (e.g. one made by ``mlx_lm.convert``): from
    then on, ``load`` and ``verify`` refuse any change to it. An existing
    manifest's recipe, training summary and metrics are kept when it is still
    readable.

    Raises:
        FileNotFoundError / ValueError: not a model directory (no valid config.json).
    """
    directory = Path(directory)
    check_config(directory)
    info = {}
    if os.path.lexists(directory / MANIFEST):
        try:
            info = Manifest.read(directory).info
        except ValueError:
            info = {}
    return Manifest.for_files(directory, info).write(directory)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlxqat.verify",
        description="Check every file of a model directory against the sha256 in its mlxqat.json.",
    )
    parser.add_argument("directory", help="a directory written by mlxqat.save or python -m mlxqat.export")
    parser.add_argument("--write", action="store_true",
                        help="write mlxqat.json for the directory's files as they are (for a directory you trust)")
    args = parser.parse_args(argv)

    def run() -> int:
        manifest = write(args.directory) if args.write else verify(args.directory)
        print(f"{'wrote' if args.write else 'OK'} {len(manifest['files'])} files"
              + (f" into {Path(args.directory) / MANIFEST}" if args.write else ""))
        return 0

    return run_main(run)


# `import mlxqat.verify` rebinds the package attribute `mlxqat.verify` (the function) to
# this module; make the module callable so `mlxqat.verify(path)` keeps working.
callable_module(__name__, verify)

if __name__ == "__main__":
    sys.exit(main())
