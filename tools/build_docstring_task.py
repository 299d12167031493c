"""Build a fine-tuning task from text no one here wrote: CPython standard-library functions -> the first line of
their docstring, written as mlx-lm's data layout (train.jsonl, valid.jsonl, test.jsonl).

    python tools/build_docstring_task.py --out .data/docstrings                      # chat messages (SmolLM2-Instruct)
    python tools/build_docstring_task.py --out .data/docstrings-pc --format completions   # prompt/completion (base models)

Each example is one function of the running Python's standard library with its docstring removed (the prompt)
and the first line of that docstring (the completion). Functions are split by their module with
:func:`mlxqat.stdlib_data.split_of` (the standard-library corpus's own rule, by a hash of the file's path), so
train, valid and test never share a module. Selection is deterministic: every function whose code and summary
fit the length limits, then an evenly spread subset up to the counts asked for.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import textwrap
from pathlib import Path

import numpy as np

from mlxqat.data import spread
from mlxqat.stdlib_data import read_source, stdlib_files, stdlib_root

SPLIT_NAMES = {"train": "train", "validation": "valid", "test": "test"}  # stdlib split -> mlx-lm file name
INSTRUCTION = "Write the one-line summary (the first line of its docstring) of this Python function:"


def summary_line(doc: str) -> str:
    return doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""


def functions(path: Path, max_chars: int):
    """``(code without its docstring, first docstring line)`` of each function in ``path`` that fits."""
    source = read_source(path)
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return
    lines = source.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
            continue
        doc = ast.get_docstring(node, clean=True)
        first = summary_line(doc)
        if not (20 <= len(first) <= 120) or not first[0].isupper() or "\t" in first:
            continue
        expr = node.body[0]
        body = lines[node.lineno - 1 : expr.lineno - 1] + lines[expr.end_lineno : node.end_lineno]
        code = textwrap.dedent("\n".join(body)).strip("\n")
        if 80 <= len(code) <= max_chars and '"""' not in code and "'''" not in code:
            yield code, first


def example(code: str, summary: str, fmt: str) -> dict:
    prompt = f"{INSTRUCTION}\n\n```python\n{code}\n```"
    if fmt == "chat":
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": summary}]}
    return {"prompt": prompt + "\nSummary:", "completion": " " + summary}


def build(out: Path, fmt: str, counts: dict, max_chars: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, name in SPLIT_NAMES.items():
        found = [(code, first) for path in stdlib_files(split) for code, first in functions(path, max_chars)]
        chosen = [found[i] for i in spread(np.arange(len(found)), counts[name])]
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for code, first in chosen:
                f.write(json.dumps(example(code, first, fmt)) + "\n")
        modules = {p.relative_to(stdlib_root()).as_posix() for p in stdlib_files(split)}
        written[name] = {"examples": len(chosen), "candidates": len(found), "modules": len(modules)}
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="output directory (train/valid/test.jsonl)")
    p.add_argument("--format", choices=["chat", "completions"], default="chat",
                   help="chat messages (instruction-tuned models) or prompt/completion pairs (base models)")
    p.add_argument("--train", type=int, default=600, help="training examples (at most)")
    p.add_argument("--valid", type=int, default=60, help="validation examples (at most)")
    p.add_argument("--test", type=int, default=60, help="test examples (at most)")
    p.add_argument("--max-chars", type=int, default=500, help="longest function code kept, in characters")
    a = p.parse_args(argv)
    written = build(a.out, a.format, {"train": a.train, "valid": a.valid, "test": a.test}, a.max_chars)
    print(json.dumps({"python": sys.version.split()[0], "stdlib": str(stdlib_root()), **written}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
