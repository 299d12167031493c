"""The ``mlxqat`` command: one entry point for every ``python -m mlxqat.X`` command.

    mlxqat train --recipe int4 --out qat-int4/
    mlxqat finetune --model int4-model/ --data data/ --out tuned/
    mlxqat export qat-int4/ --format gguf --out model.gguf
    mlxqat imatrix --model base/ --out imatrix.gguf
    mlxqat verify qat-int4/
    mlxqat generate --model qat-int4/ --prompt "def fibonacci(n):"
    mlxqat profile --model qat-int4/ --baseline-model base/

``mlxqat SUBCOMMAND --help`` shows the flags of each; they are the flags of
``python -m mlxqat.SUBCOMMAND``.

The ``verify`` command lives here too (:func:`verify_main`): it is a few lines
over :func:`mlxqat.storage.load.verify`, which is also ``mlxqat.verify``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import List, Optional

from ._cli import command, run_main
from ._version import __version__
from .storage.destinations import recover_interrupted, write_manifest
from .storage.load import check_config, verify
from .storage.manifest import MANIFEST, Manifest

# subcommand -> ("module:function" of its main(argv), one-line description)
COMMANDS = {
    "train": ("mlxqat.training.job:main", "quantization-aware training, from a model directory to a quantized one"),
    "finetune": ("mlxqat.training.finetune:main",
                 "fine-tune a quantized model on your own data, saved in the same quantized format"),
    "export": ("mlxqat.export:main", "export to GGUF, an mlx-lm directory, or unquantized weights"),
    "imatrix": ("mlxqat.gguf.imatrix:main", "an importance matrix for importance-weighted GGUF quantization"),
    "verify": ("mlxqat.cli:verify_main", "check a model directory against its sha256 manifest"),
    "generate": ("mlxqat.generate:main", "generate text; print tokens/s and peak memory"),
    "profile": ("mlxqat.profile:main", "prefill/decode speed, latency and memory: full precision vs int4 kernels"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: mlxqat COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "`mlxqat COMMAND --help` lists the options of a command."]
    return "\n".join(lines)


@command()
def main(argv: Optional[List[str]] = None) -> int:
    """Dispatch ``argv[0]`` to the ``main(argv)`` of its command; return the exit status.

    Every failure, in the dispatcher or in a command, ends as :func:`mlxqat._cli.run_main`
    says: one ``error:`` line and status 2 for bad input, 130 for Ctrl-C, 1 for a bug.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name in ("-V", "--version"):
        print(f"mlxqat {__version__}")
        return 0
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; use one of {', '.join(COMMANDS)}\n\n{usage()}", file=sys.stderr)
        return 2
    module, function = COMMANDS[name][0].split(":")
    sys.argv[0] = f"mlxqat {name}"
    return int(getattr(importlib.import_module(module), function)(rest) or 0)


# ---------------------------------------------------------------------------
# mlxqat verify
# ---------------------------------------------------------------------------


def add_manifest(directory) -> dict:
    """Write (or rewrite) ``mlxqat.json`` in ``directory`` for its files as they are now.

    For a model directory you trust (e.g. one made by ``mlx_lm.convert``): from
    then on, ``load`` and ``verify`` refuse any change to it. An existing
    manifest's recipe, training summary and metrics are kept when it is still
    readable.

    Returns:
        The manifest written.

    Raises:
        FileNotFoundError / ValueError: not a model directory (no valid config.json).
    """

    directory = Path(directory)
    recover_interrupted(directory)  # a replacement killed between its renames: restored, as verify does
    check_config(directory)
    info = {}
    if os.path.lexists(directory / MANIFEST):
        try:
            info = Manifest.read(directory).info
        except ValueError:
            info = {}
    return write_manifest(directory, info)


def verify_main(argv: Optional[List[str]] = None) -> int:
    """``python -m mlxqat.verify DIR`` (``OK <n> files``, status 0) or ``--write DIR``; status 2 and the
    problem on stderr when a file listed in ``mlxqat.json`` is missing or changed, or another is there."""

    parser = argparse.ArgumentParser(
        prog="python -m mlxqat.verify",
        description="Check every file of a model directory against the sha256 in its mlxqat.json.",
    )
    parser.add_argument("directory", help="a directory written by mlxqat.save or python -m mlxqat.export")
    parser.add_argument("--write", action="store_true",
                        help="write mlxqat.json for the directory's files as they are (for a directory you trust)")
    args = parser.parse_args(argv)

    def run() -> int:
        manifest = add_manifest(args.directory) if args.write else verify(args.directory)
        print(f"{'wrote' if args.write else 'OK'} {len(manifest['files'])} files"
              + (f" into {Path(args.directory) / MANIFEST}" if args.write else ""))
        return 0

    return run_main(run)


if __name__ == "__main__":
    sys.exit(main())
