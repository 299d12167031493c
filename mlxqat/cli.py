"""The ``mlxqat`` command: one entry point for every ``python -m mlxqat.X`` command.

    mlxqat train --recipe int4 --out qat-int4/
    mlxqat export qat-int4/ --format gguf --out model.gguf
    mlxqat verify qat-int4/
    mlxqat generate --model qat-int4/ --prompt "def fibonacci(n):"
    mlxqat profile --model qat-int4/ --baseline-model base/

``mlxqat SUBCOMMAND --help`` shows the flags of each; they are the flags of
``python -m mlxqat.SUBCOMMAND``.
"""

from __future__ import annotations

import importlib
import sys
from typing import List, Optional

from ._cli import command

# subcommand -> (module, one-line description)
COMMANDS = {
    "train": ("mlxqat.train", "quantization-aware training, from a model directory to a quantized one"),
    "export": ("mlxqat.export", "export to GGUF, an mlx-lm directory, or unquantized weights"),
    "verify": ("mlxqat.verify", "check a model directory against its sha256 manifest"),
    "generate": ("mlxqat.generate", "generate text; print tokens/s and peak memory"),
    "profile": ("mlxqat.profile", "prefill/decode speed, latency and memory: full precision vs int4 kernels"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: mlxqat COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "`mlxqat COMMAND --help` lists the options of a command."]
    return "\n".join(lines)


@command()
def main(argv: Optional[List[str]] = None) -> int:
    """Dispatch ``argv[0]`` to the ``main(argv)`` of its module; return the exit status.

    Every failure, in the dispatcher or in a command, ends as :func:`mlxqat._cli.run_main`
    says: one ``error:`` line and status 2 for bad input, 130 for Ctrl-C, 1 for a bug.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name in ("-V", "--version"):
        from . import __version__

        print(f"mlxqat {__version__}")
        return 0
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; use one of {', '.join(COMMANDS)}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    sys.argv[0] = f"mlxqat {name}"
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
