"""The CPython standard library as a corpus, and the embedded reference model.

Every machine that runs Python has its standard library source, so it is the
corpus of the project's reference model (``tools/build_reference_model.py``
trains it; ``mlxqat/assets/stdlib-llama`` ships it) and the default data of
``python -m mlxqat.train``.

The corpus is the ``*.py`` files under ``sysconfig.get_paths()["stdlib"]``,
without tests, IDLE, installed packages and generated files. Each file goes to
one split by a hash of its relative path (:func:`split_of`, the only place the
rule lives), so the split does not depend on file order, file content or on
which other files exist.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
import tokenize
from pathlib import Path
from typing import List, Optional, Union

SPLITS = ("train", "validation", "test")
# Percent of files per split, in SPLITS order.
SPLIT_PERCENT = (90, 5, 5)
# End-of-text token the tokenizer knows as a special token; joins files.
EOS_TOKEN = "<|endoftext|>"
# Directory names (at any depth) whose files are not part of the corpus: tests,
# IDLE, third-party packages, build artifacts, and generated documentation data.
EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib-dynload",
     "__pycache__", "pydoc_data"}
)
# Generated, machine-specific modules (their content differs per build).
EXCLUDED_PREFIXES = ("_sysconfigdata_",)

PathLike = Union[str, Path]


def stdlib_root() -> Path:
    """The directory of the running interpreter's standard library source."""
    return Path(sysconfig.get_paths()["stdlib"])


def embedded_model_path() -> Path:
    """The directory of the shipped reference model (an mlx-lm model directory)."""
    return Path(__file__).resolve().parent / "assets" / "stdlib-llama"


def split_of(relpath: str) -> str:
    """The split of a corpus file, from the sha256 of its relative POSIX path.

    Args:
        relpath: path relative to the stdlib root, with ``/`` separators
            (e.g. ``"email/parser.py"``).

    Returns:
        One of ``SPLITS``: about 90% of files are ``"train"``, 5% ``"validation"``
        and 5% ``"test"``.
    """
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    edge = 0
    for name, percent in zip(SPLITS, SPLIT_PERCENT):
        edge += percent
        if bucket < edge:
            return name
    raise AssertionError("SPLIT_PERCENT must add up to 100")


def _check_split(split: Optional[str]) -> None:
    if split is not None and split not in SPLITS:
        raise ValueError(f"split={split!r} is not a split; use one of {SPLITS} (or None for all)")


def _excluded_dir(name: str) -> bool:
    return name in EXCLUDED_DIRS or name.startswith("config-")


def stdlib_files(split: Optional[str] = None, root: Optional[PathLike] = None) -> List[Path]:
    """The corpus files of one split, sorted by relative path.

    Args:
        split: ``"train"``, ``"validation"``, ``"test"``, or ``None`` for every file.
        root: the stdlib directory; defaults to :func:`stdlib_root`.

    Returns:
        Absolute paths, in a deterministic order (sorted by relative POSIX path).

    Raises:
        ValueError: ``split`` is not one of ``SPLITS``.
    """
    _check_split(split)
    root = Path(root) if root is not None else stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not _excluded_dir(d)]  # prune: never walk tests
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            if not name.endswith(".py") or name.startswith(EXCLUDED_PREFIXES):
                continue
            rel = (rel_dir / name).as_posix()
            if split is None or split_of(rel) == split:
                found.append((rel, Path(dirpath) / name))
    return [path for _, path in sorted(found)]


def read_source(path: PathLike) -> str:
    """The text of one Python source file, decoded as Python decodes it (PEP 263)."""
    with tokenize.open(path) as f:
        return f.read()


def read_split_text(
    split: str,
    max_chars: Optional[int] = None,
    separator: str = EOS_TOKEN,
    root: Optional[PathLike] = None,
) -> str:
    """The files of one split joined by ``separator``, in :func:`stdlib_files` order.

    Args:
        split: ``"train"``, ``"validation"`` or ``"test"``.
        max_chars: stop once the text reaches this many characters (the last file
            is cut); ``None`` for the whole split.
        separator: put after every file; the default is the tokenizer's
            end-of-text token, as in the reference model's training data.
        root: the stdlib directory; defaults to :func:`stdlib_root`.

    Returns:
        The text.

    Raises:
        ValueError: unknown ``split``, or ``max_chars`` is not positive.
    """
    if split is None:
        raise ValueError(f"split=None is not allowed here; use one of {SPLITS}")
    if max_chars is not None and max_chars <= 0:
        raise ValueError(f"max_chars={max_chars} must be positive (or None for the whole split)")
    pieces, total = [], 0
    for path in stdlib_files(split, root):
        pieces.append(read_source(path) + separator)
        total += len(pieces[-1])
        if max_chars is not None and total >= max_chars:
            break
    text = "".join(pieces)
    return text if max_chars is None else text[:max_chars]
