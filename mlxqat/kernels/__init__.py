"""Custom int4 group-quantized matmul (Metal, CUDA, CPU), the layer that uses it, and the CPU training path.

``int4_matmul(x, w_packed, scales, biases, group_size)`` multiplies by a weight
in MLX's 4-bit affine format; ``KernelQuantizedLinear.from_quantized(layer)``
swaps it into a model in place of an ``nn.QuantizedLinear`` that
``is_supported(layer)``. ``use_dequantized_matmul(model)`` makes every affine
quantized layer (any bit width, the tied output head included) compute as
dequantize + matmul, the fast product on a CPU for many tokens at once.
"""

from .dequant import DequantizedActQuantizedLinear, DequantizedEmbedding, DequantizedLinear, use_dequantized_matmul
from .int4 import int4_matmul
from .layer import KernelQuantizedLinear, is_supported

__all__ = ["int4_matmul", "KernelQuantizedLinear", "is_supported", "use_dequantized_matmul", "DequantizedLinear",
           "DequantizedActQuantizedLinear", "DequantizedEmbedding"]
