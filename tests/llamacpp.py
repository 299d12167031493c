"""llama.cpp as the reference for GGUF tests (:mod:`mlxqat.llamacpp`: its server in-process through
the xllamacpp package, asked directly and over its loopback HTTP address). Tests skip when
xllamacpp is missing.

``TEXTS`` and :func:`documents` are the texts that llama.cpp and the model's own tokenizer must
split alike."""

from __future__ import annotations

import random

import pytest


def LlamaCpp(path, n_ctx: int = 256):
    """:class:`mlxqat.llamacpp.LlamaCpp`; the test skips where xllamacpp is missing."""
    pytest.importorskip("xllamacpp")
    from mlxqat.llamacpp import LlamaCpp as Server

    return Server(path, n_ctx)


TEXTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "don't it's we'll THEY'RE I'M",
    "x=1;y=22;z=333;w=4444 3.14159 1234567",
    "héllo wörld — naïve café ✓ 日本語 😀👍🏽",
    "   leading spaces and trailing   ",
    "\ttabs\tand\n\n\nnewlines\r\n",
    "<|endoftext|>The quick brown fox<|endoftext|>",
    "                                fifty-ish spaces",
    "", " ", "\n", "0000", "a" * 80,
]
_WORDS = ("the of and to in is model token llama gemma quantization café naïve 東京 Москва 12 345 6789 "
          "x_y fooBar don't I'll <|im_end|> def return self.x == ==== ---- (n - 1) [0x41]").split()
_SEPS = [" ", "  ", "   ", "\n", "\t", ", ", ". ", "\n\n", "    ", "", " " * 40, "\n    ", "\n" * 7, "\t\t"]


def documents(n: int, seed: int = 0) -> list:
    """``n`` varied strings: words, code, numbers, Unicode, long runs of spaces, tabs and newlines."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 12)):
            w = rng.choice(_WORDS)
            r = rng.random()
            w = w.upper() if r < 0.15 else str(rng.randint(0, 10 ** rng.randint(1, 9))) if r < 0.25 else (
                chr(rng.choice([0x4E00, 0x3042, 0x0410, 0x00E9, 0x1F600, 0x05D0]) + rng.randint(0, 40))
                if r < 0.3 else w)
            parts += [w, rng.choice(_SEPS)]
        out.append("".join(parts))
    return out
