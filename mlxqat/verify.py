"""Check an exported model directory against its sha256 manifest.

    python -m mlxqat.verify mlx-dir/

Exit status 0 and ``OK <n> files`` when every file listed in ``mlxqat.json``
is present and unchanged; exit status 2 and the problem on stderr otherwise.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ._callable import callable_module
from .io import IntegrityError, verify


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlxqat.verify",
        description="Check every file of a model directory against the sha256 in its mlxqat.json.",
    )
    parser.add_argument("directory", help="a directory written by mlxqat.save or python -m mlxqat.export")
    args = parser.parse_args(argv)
    try:
        manifest = verify(args.directory)
    except (IntegrityError, FileNotFoundError) as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 2
    print(f"OK {len(manifest.get('files', {}))} files")
    return 0


# `import mlxqat.verify` rebinds the package attribute `mlxqat.verify` (the function) to
# this module; make the module callable so `mlxqat.verify(path)` keeps working.
callable_module(__name__, verify)

if __name__ == "__main__":
    sys.exit(main())
