"""Quantized layers computed as dequantize + matmul: the fast CPU path at training shapes.

MLX's CPU ``quantized_matmul`` is a plain loop; with many rows of activations
(training, evaluation, prefill) dequantizing the weight once and multiplying on
BLAS gives the same product up to float summation order, 20-50x faster on 2
cores. :func:`use_dequantized_matmul` swaps a model's affine quantized layers
for ones that compute that way, at every bit width (the int4 kernel of
:mod:`mlxqat.kernels.int4` covers 4 bits only) and for the tied-embedding output
head. Gradients reach ``scales`` and ``biases`` (the codes fixed), so training
them (DWQ style) works on the swapped layers.

The swapped layers hold the same arrays as the layers they replace (shared, not
copied) and subclass them, so ``isinstance`` checks, saving and
``mlx_lm``'s code that walks quantized layers see what they saw before.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from .. import quant
from ..layers import ActQuantizedLinear


def _runs_dequantized(layer: nn.Module) -> bool:
    return getattr(layer, "mode", "affine") == "affine" and layer.get("biases") is not None


def dequantized_weight(layer: nn.Module) -> mx.array:
    """``scale * code + bias`` of a quantized layer's weight, differentiable in scales and biases."""
    return quant.dequantize_frozen(layer["weight"], layer["scales"], layer["biases"], layer.bits, layer.group_size)


class DequantizedLinear(nn.QuantizedLinear):
    """An ``nn.QuantizedLinear`` computed as ``x @ dequantize(W).T`` (see the module docstring)."""

    def __call__(self, x: mx.array) -> mx.array:
        if not _runs_dequantized(self):
            return super().__call__(x)
        y = x @ dequantized_weight(self).astype(x.dtype).T
        return y + self["bias"] if "bias" in self else y


class DequantizedActQuantizedLinear(ActQuantizedLinear, DequantizedLinear):
    """:class:`~mlxqat.layers.ActQuantizedLinear` (static int activations) with the dequantized product."""


class DequantizedEmbedding(nn.QuantizedEmbedding):
    """An ``nn.QuantizedEmbedding`` whose output-head use (``as_linear``) is dequantize + matmul."""

    def as_linear(self, x: mx.array) -> mx.array:
        if not _runs_dequantized(self):
            return super().as_linear(x)
        return x @ dequantized_weight(self).astype(x.dtype).T


# exact type -> the type computing it dequantized; and back
_SWAP = {nn.QuantizedLinear: DequantizedLinear, ActQuantizedLinear: DequantizedActQuantizedLinear,
         nn.QuantizedEmbedding: DequantizedEmbedding}
_BACK = {v: k for k, v in _SWAP.items()}


def _as(cls, layer: nn.Module) -> nn.Module:
    """A ``cls`` holding ``layer``'s arrays (shared) and settings, frozen and in the same mode."""
    new = cls.__new__(cls)
    new.__dict__.update(vars(layer))
    new.__dict__["_no_grad"] = set(layer._no_grad)
    dict.update(new, layer)
    return new


def use_dequantized_matmul(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Swap the model's quantized layers to compute as dequantize + matmul, in place (or back).

    Affine ``nn.QuantizedLinear``, :class:`~mlxqat.layers.ActQuantizedLinear` and
    ``nn.QuantizedEmbedding`` layers (any bit width and group size) become
    :class:`DequantizedLinear`, :class:`DequantizedActQuantizedLinear` and
    :class:`DequantizedEmbedding`; ``enabled=False`` turns them back. Other
    layers, the int4 kernel's included, are left as they are. Use it on a CPU
    for training or evaluating on many tokens at once; decoding one token at a
    time is faster with ``quantized_matmul`` (``mlxqat.kernels.int4`` picks per shape).

    Returns:
        The same model, for chaining.
    """
    table = _SWAP if enabled else _BACK

    def swap(_path, m):
        cls = table.get(type(m))
        return _as(cls, m) if cls is not None else m

    model.update_modules(tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module))
    return model
