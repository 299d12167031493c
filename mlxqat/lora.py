"""Group-wise LoRA on a fake-quantized base that merges without leaving the quantized format.

A plain LoRA delta ``B @ A`` is an arbitrary (out, in) matrix: merging it into
a quantized layer means re-quantizing, which loses part of what the adapter
learned. Here the adapter sees the input summed over each quantization group
(the QA-LoRA construction), so its delta is constant inside every group:

    delta[n, k] = scale * (B @ A)[n, k // group_size]

and ``scale * code + bias + delta`` is the same codes with new biases. Merging
adds the delta to the per-group biases of the converted layer: no
re-quantization. The adapted layer computes with those merged biases too
(rounded to the dtype they are stored in, when the base says), so the merged
model computes what the adapted model computed, to the bit.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path, tree_unflatten

from . import quant
from .layers import FakeQuantLinear, quantized_params


_MERGED_CACHE: dict = {}


def _make_merged_matmul(bits: int, group_size: int):
    @mx.custom_function
    def matmul(x, packed, scales, biases):
        return x @ quant.dequantize(packed, scales, biases, bits, group_size).T

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        x, packed, scales, biases = primals
        dx = cotangent @ quant.dequantize(packed, scales, biases, bits, group_size)
        # d/d(bias of group k of row n) = sum over the group's inputs of the weight's gradient: the
        # cotangent against the input summed over each group (no (out, in) weight gradient is formed)
        pooled = x.reshape(-1, x.shape[-1] // group_size, group_size).sum(-1)  # (tokens, in / g)
        dbiases = cotangent.reshape(-1, cotangent.shape[-1]).T @ pooled  # (out, in / g)
        return dx, mx.zeros_like(packed), mx.zeros_like(scales), dbiases.astype(biases.dtype)

    return matmul


def merged_matmul(x: mx.array, packed: mx.array, scales: mx.array, biases: mx.array, bits: int,
                  group_size: int) -> mx.array:
    """``x @ dequantize(packed, scales, biases).T``, differentiable in ``x`` and the biases only (codes and
    scales frozen), its bias gradient computed from the group-summed input."""
    key = (bits, group_size)
    if key not in _MERGED_CACHE:
        _MERGED_CACHE[key] = _make_merged_matmul(bits, group_size)
    return _MERGED_CACHE[key](x, packed, scales, biases)


class QALoRALinear(nn.Module):
    """A frozen :class:`FakeQuantLinear` plus a trainable group-wise low-rank adapter.

    Args:
        base: the fake-quant layer (frozen here).
        rank: adapter rank.
        scale: multiplier of the adapter's output.
    """

    def __init__(self, base: FakeQuantLinear, rank: int = 8, scale: float = 1.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank={rank} must be at least 1")
        out_dims, in_dims = base.weight.shape
        self.base = base
        self.base.freeze()
        n_groups = in_dims // base.group_size
        self.scale = scale
        bound = 1 / math.sqrt(n_groups * base.group_size)
        self.lora_a = mx.random.uniform(-bound, bound, (rank, n_groups)).astype(base.weight.dtype)
        self.lora_b = mx.zeros((out_dims, rank), dtype=base.weight.dtype)

    def _extra_repr(self) -> str:
        return f"rank={self.lora_a.shape[0]}, scale={self.scale}"

    def delta(self) -> mx.array:
        """The adapter's per-group bias change, shape (out, in // group_size)."""
        return (self.lora_b @ self.lora_a) * self.scale

    def merged(self):
        """``(packed, scales, biases)`` of the merged layer: the base's, its biases plus :meth:`delta` (differentiable
        in the adapters; the merged biases rounded to the base's stored dtype, straight-through)."""
        packed, scales, biases = quantized_params(self.base)
        biases = mx.stop_gradient(biases) + self.delta().astype(biases.dtype)
        return packed, mx.stop_gradient(scales), quant.round_as_stored(biases, self.base.stored_dtype)

    def __call__(self, x: mx.array) -> mx.array:
        base = self.base
        xq = base.quantize_input(x)
        y = merged_matmul(xq, *self.merged(), base.spec.bits, base.group_size)
        if "bias" in base:
            y = y + base.bias
        return y

    def to_quantized(self, **_ignored) -> nn.QuantizedLinear:
        """Merge: the base's converted layer with the delta added to its biases."""
        ql = self.base.to_quantized()
        ql.biases = self.merged()[2].astype(ql.biases.dtype)
        ql.freeze()
        return ql


def apply_lora(model: nn.Module, rank: int = 8, scale: float = 1.0, seed: int = 0) -> int:
    """Wrap every :class:`FakeQuantLinear` of a prepared model with a :class:`QALoRALinear`.

    Freezes everything else. Returns the number of adapted layers.

    Raises:
        ValueError: if the model has no fake-quant linear layer (prepare it first).
    """
    mx.random.seed(seed)
    count = 0

    def visit(path, m):
        nonlocal count
        if isinstance(m, FakeQuantLinear):
            count += 1
            return QALoRALinear(m, rank, scale)
        return m

    model.freeze()
    leaves = tree_map_with_path(visit, model.leaf_modules(), is_leaf=nn.Module.is_module)
    model.update_modules(leaves)
    if count == 0:
        raise ValueError("apply_lora() found no FakeQuantLinear; call mlxqat.prepare(model, recipe) first")
    for _, m in model.named_modules():
        if isinstance(m, QALoRALinear):
            m.unfreeze(keys=["lora_a", "lora_b"], recurse=False)
    return count


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace adapted layers by merged, converted ``nn.QuantizedLinear`` layers (in place)."""

    # QALoRALinear is not a leaf (it holds its base): walk named modules instead.
    merged = [(p, m.to_quantized()) for p, m in model.named_modules() if isinstance(m, QALoRALinear)]
    if merged:
        model.update_modules(tree_unflatten(merged))
    return model
