"""``KernelQuantizedLinear``: an ``nn.QuantizedLinear`` that runs ``int4_matmul``."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .int4 import SUPPORTED_GROUP_SIZES, int4_matmul


def is_supported(layer: nn.Module) -> bool:
    """Whether ``layer`` is an ``nn.QuantizedLinear`` that ``int4_matmul`` can run:
    4 bits, affine mode (with biases), group size 32, 64 or 128."""
    return (
        isinstance(layer, nn.QuantizedLinear)
        and getattr(layer, "bits", None) == 4
        and getattr(layer, "mode", "affine") == "affine"
        and getattr(layer, "group_size", None) in SUPPORTED_GROUP_SIZES
        and layer.get("biases") is not None
    )


class KernelQuantizedLinear(nn.QuantizedLinear):
    """A drop-in ``nn.QuantizedLinear`` (4-bit affine) computed by ``int4_matmul``.

    It holds exactly the parameters of the layer it replaces (``weight``,
    ``scales``, ``biases`` and optional ``bias``) with the same ``group_size``,
    ``bits`` and ``mode``, so saved safetensors and config.json are unchanged and
    ``mlx_lm.load`` opens a saved model as plain ``nn.QuantizedLinear`` layers.
    Build it with ``KernelQuantizedLinear.from_quantized(layer)``.
    """

    @classmethod
    def from_quantized(cls, ql: nn.QuantizedLinear) -> "KernelQuantizedLinear":
        """Wrap the parameters of ``ql`` (shared, not copied) in the kernel layer.

        Raises:
            ValueError: ``ql`` is not 4-bit affine with group size 32, 64 or 128
                (check with ``is_supported`` and keep such layers as they are).
        """
        if not is_supported(ql):
            raise ValueError(
                f"cannot run {type(ql).__name__}(bits={getattr(ql, 'bits', None)}, "
                f"group_size={getattr(ql, 'group_size', None)}, mode={getattr(ql, 'mode', None)!r}) "
                f"with the int4 kernel; it needs bits=4, mode='affine' and group_size in "
                f"{SUPPORTED_GROUP_SIZES}: keep this layer as nn.QuantizedLinear")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.group_size, layer.bits, layer.mode = ql.group_size, ql.bits, ql.mode
        layer.weight, layer.scales, layer.biases = ql.weight, ql.scales, ql.biases
        if "bias" in ql:
            layer.bias = ql.bias
        layer.freeze()
        trainable = [k for k, _ in tree_flatten(ql.trainable_parameters())]
        if trainable:
            layer.unfreeze(keys=trainable, recurse=False)
        layer.train(ql.training)
        return layer

    def __call__(self, x: mx.array) -> mx.array:
        y = int4_matmul(x, self["weight"], self["scales"], self["biases"], self.group_size)
        if "bias" in self:
            y = y + self["bias"]
        return y
