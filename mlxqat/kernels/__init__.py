"""Custom int4 group-quantized matmul (Metal, CUDA, CPU) and the layer that uses it.

``int4_matmul(x, w_packed, scales, biases, group_size)`` multiplies by a weight
in MLX's 4-bit affine format; ``KernelQuantizedLinear.from_quantized(layer)``
swaps it into a model in place of an ``nn.QuantizedLinear`` that
``is_supported(layer)``.
"""

from .int4 import int4_matmul
from .layer import KernelQuantizedLinear, is_supported

__all__ = ["int4_matmul", "KernelQuantizedLinear", "is_supported"]
