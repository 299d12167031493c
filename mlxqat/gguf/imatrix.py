"""Importance matrices: how much each input column of each matrix matters, and round-to-nearest that uses it.

llama.cpp's ``llama-imatrix`` runs a model over calibration text and keeps, for every matrix of the
transformer blocks, the sum of each input column's squared activation and the number of tokens; its
quantizers (``llama-quantize --imatrix``) then weight each weight's rounding error by that column's mean
squared activation. mlxqat computes the same statistic with MLX (:func:`collect`), reads and writes
llama.cpp's files (:func:`load`, :func:`save`: its GGUF imatrix format, and the older ``.dat`` one for
reading), and quantizes with llama.cpp's importance-weighted algorithms, bit for bit
(:func:`mlxqat.gguf.blocks.quantize_blocks`)::

    python -m mlxqat.imatrix --model full-precision-dir/ --out imatrix.gguf [--data my-text/]
    python -m mlxqat export full-precision-dir/ --format gguf --type q4_k_m --imatrix imatrix.gguf --out m.gguf

As ``llama-imatrix`` does by default, only the blocks' matrices have entries (not the token embedding or the
output head); as llama.cpp's quantizers, Q8_0 ignores them. An importance matrix belongs to one model.
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten
from tqdm.auto import tqdm

from .._cli import ArgumentParser, run_main
from .._version import __version__
from ..data import build_dataset, check_seq_len, model_context, stdlib_windows
from ..storage.destinations import atomic_path, check_destination
from ..storage.load import load as load_model
from .writer import gguf_base_name


@dataclass
class ImportanceMatrix:
    """Per GGUF tensor name (``blk.0.attn_q.weight``): the sum of each input column's squared activation over
    ``counts[name]`` tokens; ``chunk_count`` windows of ``chunk_size`` tokens of ``datasets``."""

    sums: Dict[str, np.ndarray] = field(default_factory=dict)
    counts: Dict[str, int] = field(default_factory=dict)
    datasets: List[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def importance(self, name: str) -> Optional[np.ndarray]:
        """The mean squared activation per input column of tensor ``name`` (what llama.cpp's quantizers are
        given), or None when the matrix has no entry."""
        if name not in self.sums:
            return None
        count = self.counts[name]
        s = self.sums[name].astype(np.float32)
        return s / np.float32(count) if count > 0 else np.ones_like(s)


# --- computing one ------------------------------------------------------------------------------------------

class _Tap(nn.Module):
    """A matrix layer that adds each call's squared input columns to a running sum, then runs the layer."""

    def __init__(self, inner: nn.Module, sink):
        super().__init__()
        self.inner = inner
        self.sink = sink  # a function: not a parameter

    def __call__(self, x):
        self.sink(x)
        return self.inner(x)


def block_matrices(model: nn.Module) -> Dict[str, str]:
    """``{module path: GGUF tensor name}`` of the matrix layers in ``model``'s transformer blocks (the ones
    llama.cpp's importance matrices cover)."""
    out = {}
    for path, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.QuantizedLinear)):
            base = gguf_base_name(model, path)
            if base is not None and base.startswith("blk."):
                out[path] = base + ".weight"
    return out


def collect(model: nn.Module, windows: Iterable[np.ndarray], *, dataset: str = "", progress: bool = False
            ) -> ImportanceMatrix:
    """Run ``model`` over ``windows`` (each a 1-D or (1, n) array of token ids) and return their importance
    matrix: per matrix of the transformer blocks, the sum of squared input activations per column and the
    token count, as ``llama-imatrix`` computes it (in float32 sums, every token of every window counted)."""
    names = block_matrices(model)
    if not names:
        raise ValueError("the model has no linear layers in transformer blocks to collect an importance matrix "
                         "for; collect on the full-precision model (before mlxqat.prepare)")
    sums: Dict[str, mx.array] = {}
    counts: Dict[str, int] = {n: 0 for n in names.values()}

    def sink_for(name):
        def sink(x):
            flat = x.reshape(-1, x.shape[-1]).astype(mx.float32)
            sums[name] = (sums[name] + mx.sum(flat * flat, axis=0)) if name in sums else mx.sum(flat * flat, axis=0)
            counts[name] += flat.shape[0]
        return sink

    originals = {p: m for p, m in model.named_modules() if p in names}
    model.update_modules(tree_unflatten([(p, _Tap(m, sink_for(names[p]))) for p, m in originals.items()]))
    n, size = 0, 0
    try:
        items = list(windows)
        if progress:
            items = tqdm(items, desc="importance matrix", unit="window")
        for ids in items:
            ids = np.asarray(ids)
            if ids.ndim > 2 or (ids.ndim == 2 and ids.shape[0] != 1) or ids.size == 0:
                raise ValueError(f"a window of token ids has shape {ids.shape}; give 1-D windows of at least 1 token")
            ids = ids.astype(np.int32).reshape(1, -1)
            out = model(mx.array(ids))
            finite = {k: mx.all(mx.isfinite(v)) for k, v in sums.items()}
            mx.eval(out, sums, finite)  # one evaluation: the sums and their check together
            n, size = n + 1, ids.shape[1]
            bad = [k for k, ok in finite.items() if not ok.item()]
            if bad:
                raise ValueError(f"activations that are not finite reached {bad[0]} in window {n}; load the model "
                                 "in float32 or bfloat16 (float16 overflows) and collect again")
    finally:
        model.update_modules(tree_unflatten(list(originals.items())))
    if n == 0:
        raise ValueError("no windows of text to collect an importance matrix from")
    return ImportanceMatrix({k: np.array(v, dtype=np.float32) for k, v in sums.items()}, counts,
                            [dataset] if dataset else [], n, size)


# --- llama.cpp's files -------------------------------------------------------------------------------------

def save(im: ImportanceMatrix, path, *, sources: Iterable = ()) -> Path:
    """Write ``im`` as llama.cpp's GGUF importance matrix (``general.type = imatrix``; tensors
    ``<name>.in_sum2`` and ``<name>.counts``), which ``llama-quantize --imatrix`` reads too. Atomic; replaces
    only a file mlxqat wrote, and never one of ``sources`` (the model and text it was computed from)."""
    path = Path(path)
    with atomic_path(path, sources=sources) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch="")
        try:
            w.kv_data[0].pop("general.architecture", None)  # an imatrix file has none
            w.add_string("general.type", "imatrix")
            w.add_array("imatrix.datasets", list(im.datasets) or ["mlxqat"])
            w.add_uint32("imatrix.chunk_count", int(im.chunk_count))
            w.add_uint32("imatrix.chunk_size", int(im.chunk_size))
            w.add_string("general.quantized_by", f"mlxqat {__version__}")
            for name in sorted(im.sums):
                w.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(im.sums[name], dtype=np.float32).reshape(1, -1))
                w.add_tensor(f"{name}.counts", np.array([[float(im.counts[name])]], dtype=np.float32))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
    return path


def load(path) -> ImportanceMatrix:
    """Read an importance matrix: llama.cpp's GGUF format (``llama-imatrix``'s default, or :func:`save`'s) or
    its older ``.dat`` format.

    Raises:
        ValueError: the file is neither.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"importance matrix {path}: no such file; make one with python -m mlxqat.imatrix "
                                "--model MODEL --out imatrix.gguf")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _load_gguf(path)
    return _load_dat(path)


def _load_gguf(path: Path) -> ImportanceMatrix:
    try:
        r = gguf.GGUFReader(str(path))
        kind = r.get_field("general.type")
        kind = None if kind is None else kind.contents()
        tensors = {t.name: np.array(t.data, dtype=np.float32) for t in r.tensors} if kind == "imatrix" else {}
    except (ValueError, IndexError, KeyError, OSError, struct.error) as e:
        raise ValueError(f"{path} is a damaged or truncated GGUF file ({e}); compute the importance matrix again "
                         "(python -m mlxqat imatrix)") from None
    if kind != "imatrix":
        raise ValueError(f"{path} is a GGUF file but not an importance matrix (no general.type = imatrix); "
                         "pass the file llama-imatrix or `python -m mlxqat imatrix` wrote")
    im = ImportanceMatrix()
    for key, value in tensors.items():
        if not key.endswith(".in_sum2"):
            continue
        name = key[: -len(".in_sum2")]
        counts = tensors.get(name + ".counts")
        if counts is None:
            raise ValueError(f"{path}: {key} has no {name}.counts")
        if counts.size != 1:
            raise ValueError(f"{path}: {name} has {counts.size} counts (a mixture of experts); mlxqat reads one "
                             "count per matrix")
        count = float(counts.reshape(-1)[0])
        if not np.isfinite(count) or count < 0:
            raise ValueError(f"{path}: {name} has a token count of {count}; compute the importance matrix again")
        im.sums[name] = value.reshape(-1)
        im.counts[name] = int(round(count))
    for key, attr in (("imatrix.chunk_count", "chunk_count"), ("imatrix.chunk_size", "chunk_size")):
        fld = r.get_field(key)
        if fld is not None:
            setattr(im, attr, int(fld.contents()))
    fld = r.get_field("imatrix.datasets")
    im.datasets = list(fld.contents()) if fld is not None else []
    return _checked(im, path)


def _load_dat(path: Path) -> ImportanceMatrix:
    data = path.read_bytes()
    bad = ValueError(f"{path} is not an importance matrix (llama.cpp's GGUF or .dat format)")
    try:
        (n,), pos = struct.unpack_from("<i", data, 0), 4
        if n < 1:
            raise bad
        im = ImportanceMatrix()
        for _ in range(n):
            (length,), pos = struct.unpack_from("<i", data, pos), pos + 4
            name = data[pos : pos + length].decode("utf-8")
            pos += length
            ncall, nval = struct.unpack_from("<ii", data, pos)
            pos += 8
            if nval <= 0 or pos + 4 * nval > len(data):
                raise bad
            values = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
            pos += 4 * nval
            im.sums[name], im.counts[name] = values, int(ncall) if ncall > 0 else 1  # per-call means x ncall
        if pos + 4 <= len(data):
            (im.chunk_count,) = struct.unpack_from("<i", data, pos)
    except (struct.error, UnicodeDecodeError):
        raise bad from None
    return _checked(im, path)


def _checked(im: ImportanceMatrix, path: Path) -> ImportanceMatrix:
    for name, v in im.sums.items():
        if not np.all(np.isfinite(v)) or np.any(v < 0):
            raise ValueError(f"{path}: {name} holds sums of squares that are negative or not finite; compute the "
                             "importance matrix again")
    return im


# --- python -m mlxqat imatrix --------------------------------------------------------------------------------

def main(argv: Optional[List[str]] = None) -> int:
    """``python -m mlxqat imatrix --model M --out imatrix.gguf [--data PATH]``: compute and save an importance
    matrix (status 2 and one ``error:`` line on bad input)."""
    parser = ArgumentParser(
        prog="python -m mlxqat.imatrix",
        description="Compute an importance matrix (llama.cpp's GGUF imatrix format) for importance-weighted "
                    "round-to-nearest: python -m mlxqat export ... --imatrix FILE, or llama-quantize --imatrix FILE.")
    parser.add_argument("--model", default=None, help="model directory, Hugging Face id or GGUF file "
                                                      "(default: the embedded one); full precision is best")
    parser.add_argument("--out", required=True, help="the .gguf file to write")
    parser.add_argument("--data", default=None,
                        help="calibration text: a file, folder or JSONL (default: the Python standard library "
                             "source, the training split QAT uses)")
    parser.add_argument("--windows", type=int, default=64, help="windows of text to run (default: 64)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window (default: 512)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = parser.parse_args(argv)

    def run() -> int:
        if args.windows < 1:
            raise ValueError(f"--windows {args.windows}: give at least 1")
        check_seq_len(args.seq_len, None)
        if args.data is not None and not Path(args.data).exists():
            raise FileNotFoundError(f"--data {args.data}: no such file or folder")
        sources = [x for x in (args.model, args.data) if x is not None and Path(x).exists()]
        out = check_destination(Path(args.out), sources=sources, kind="file")
        model, tokenizer = load_model(args.model)
        check_seq_len(args.seq_len, model_context(model))
        if args.data is None:
            windows, what = stdlib_windows(tokenizer, "train", args.seq_len, args.windows, oversample=4), "stdlib"
        else:
            windows, what = build_dataset(args.data, tokenizer, args.seq_len, val_fraction=0.0).train, str(args.data)
        windows = windows[: args.windows, : args.seq_len]
        if len(windows) < args.windows:
            print(f"note: {what} holds {len(windows)} windows of {args.seq_len} tokens; --windows asked for "
                  f"{args.windows}", file=sys.stderr)
        im = collect(model, windows, dataset=what, progress=args.progress)
        save(im, out, sources=sources)
        tokens = im.chunk_count * im.chunk_size
        print(f"wrote {out}: {len(im.sums)} matrices, {im.chunk_count} windows x {im.chunk_size} tokens "
              f"({tokens} tokens) of {what}")
        return 0

    return run_main(run)
