"""The memory footprint of a model or a file: bytes, bits per weight, ratio to bfloat16."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Union

import mlx.nn as nn
from mlx.utils import tree_flatten

from . import quant
from .gguf.format import read_gguf
from .storage.checks import PathLike
from .storage.load import load


def format_size(n: int) -> str:
    """``"1.234 MB"``, or ``"12,345 B"`` below 100 kB."""
    return f"{n / 1e6:.3f} MB" if n >= 100_000 else f"{n:,} B"


@dataclasses.dataclass
class MemoryReport:
    """What a model costs in memory and on disk."""

    bytes_on_disk: Optional[int]  # all files of the export (None for an in-memory model)
    weight_bytes: int  # tensor data: codes + scales + biases + float tensors
    n_weights: int  # logical number of values of all tensors
    bits_per_weight: float  # over the weight matrices (Linear/Embedding), scales and biases included
    ratio_to_bf16: float  # weight_bytes / (2 bytes * n_weights)

    @property
    def bf16_bytes(self) -> int:
        return 2 * self.n_weights

    def __str__(self) -> str:
        disk = f"{format_size(self.bytes_on_disk)} on disk, " if self.bytes_on_disk is not None else ""
        return (
            f"{disk}weights {format_size(self.weight_bytes)}: {self.bits_per_weight:.3f} bits per weight, "
            f"{self.ratio_to_bf16:.3f}x bf16 ({format_size(self.bf16_bytes)} for {self.n_weights:,} values)"
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["bf16_bytes"] = self.bf16_bytes
        return d


def _model_memory(model: nn.Module, params: Optional[dict] = None) -> MemoryReport:
    params = params if params is not None else dict(tree_flatten(model.parameters()))
    quantized = {p: m for p, m in model.named_modules() if quant.is_quantized(m)}
    matrix_bits = matrix_values = total_bytes = total_values = 0
    for path, m in quantized.items():  # codes + scales + biases: the rule of quant.bits_per_weight
        scales = params.get(f"{path}.scales", m.scales)
        bits, n = quant.layer_storage(m, scale_bits=8 * scales.itemsize)
        matrix_bits += bits
        matrix_values += n
    for path, v in params.items():
        prefix, _, leaf = path.rpartition(".")
        m = quantized.get(prefix)
        total_bytes += v.nbytes
        if m is not None and leaf in ("scales", "biases"):
            continue
        n = v.size * 32 // m.bits if m is not None and leaf == "weight" else v.size  # codes per uint32
        total_values += n
        if m is None and v.ndim == 2 and leaf == "weight":
            matrix_bits += v.nbytes * 8
            matrix_values += n
    return MemoryReport(
        bytes_on_disk=None,
        weight_bytes=total_bytes,
        n_weights=total_values,
        bits_per_weight=matrix_bits / max(matrix_values, 1),
        ratio_to_bf16=total_bytes / max(2 * total_values, 1),
    )


def _gguf_memory(path: Path) -> MemoryReport:
    reader = read_gguf(path)
    matrix_bits = matrix_values = total_bytes = total_values = 0
    for t in reader.tensors:
        n, b = int(t.n_elements), int(t.n_bytes)
        total_bytes += b
        total_values += n
        if len(t.shape) == 2:
            matrix_bits += 8 * b
            matrix_values += n
    return MemoryReport(
        bytes_on_disk=path.stat().st_size,
        weight_bytes=total_bytes,
        n_weights=total_values,
        bits_per_weight=matrix_bits / max(matrix_values, 1),
        ratio_to_bf16=total_bytes / max(2 * total_values, 1),
    )


def memory_report(model_or_path: Union[nn.Module, PathLike], params: Optional[dict] = None) -> MemoryReport:
    """Bytes on disk, bits per weight and size relative to bf16.

    Bits per weight of quantized layers follow :func:`mlxqat.quant.bits_per_weight`.

    Args:
        model_or_path: an MLX model, an mlx-lm model directory, or a ``.gguf`` file.
        params: for a model, ``{path: array}`` as it will be stored (e.g. scales
            compacted to float16 by :func:`mlxqat.save`); default: its parameters.

    Returns:
        A :class:`MemoryReport`; ``str(report)`` is a one-line summary.
    """
    if isinstance(model_or_path, nn.Module):
        return _model_memory(model_or_path, params)
    path = Path(model_or_path)
    if path.is_file():
        return _gguf_memory(path)
    model, _ = load(path, lazy=True)
    report = _model_memory(model)
    report.bytes_on_disk = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return report
