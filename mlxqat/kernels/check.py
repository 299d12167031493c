"""The accuracy contract of ``int4_matmul`` and of any kernel that replaces it.

Reference: ``mx.quantized_matmul`` on the float32-upcast inputs (upcasting
float16/bfloat16 is exact), i.e. float32 accumulation, rounded once to the
output dtype. That is what MLX's Metal kernels compute. MLX's *CPU*
``quantized_matmul`` with float16/bfloat16 inputs accumulates in reduced
precision (measured: about 20x the error of float32 accumulation against a
float64 product), so it is not the reference for those dtypes.

The reference (and the tolerance's magnitude term) is always computed on the
CPU stream, in float32, whatever the default device. MLX's CUDA
``quantized_matmul`` is no float32 reference: on an H100 with MLX 0.32.4 it
stopped the CUDA check's grid with ``cuGraphAddKernelNode ... invalid
argument`` (benchmarks/cuda_kernel_check.py). On the CPU the result is the
same as before (the default device there is the CPU).

Tolerance, elementwise, for a result ``y`` against the reference ``r``:

    |y - r| <= ulp(dtype) * |r| + 1e-5 * (|x| @ |W|.T)

* ``ulp(dtype) * |r|``: both sides round a float32 sum to the output dtype;
  sums that differ in the last float32 bits can round one output ulp apart
  (2**-10 for float16, 2**-7 for bfloat16, 0 for float32).
* ``1e-5 * (|x| @ |W|.T)``: float32 sums in a different order (per-word
  partial sums, SIMD tree reductions, BLAS blocking) differ by a few units of
  2**-24 times sqrt(K) times the sum of absolute terms; 1e-5 covers K up to a
  few thousand with a wide margin, while any wrong code, scale or bias moves
  the result by about ``scale * |x|``, orders of magnitude more.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .int4 import result_dtype

OUTPUT_ULP = {mx.float32: 0.0, mx.float16: 2.0**-10, mx.bfloat16: 2.0**-7}
ACCUMULATION_RTOL = 1e-5


def reference(x, w_packed, scales, biases, group_size):
    """``mx.quantized_matmul`` in float32 on the CPU, rounded to the promoted dtype.

    Always on the CPU stream, whatever the default device: MLX's CUDA
    ``quantized_matmul`` is no float32 reference (see the module docstring).
    """
    out = result_dtype(x.dtype, scales.dtype)
    f = mx.float32
    with mx.stream(mx.cpu):
        y = mx.quantized_matmul(x.astype(f), w_packed, scales.astype(f), biases.astype(f),
                                transpose=True, group_size=group_size, bits=4)
        return y.astype(out)


def error_ratio(y, x, w_packed, scales, biases, group_size) -> float:
    """max over elements of |y - reference| / tolerance; <= 1 passes."""
    ref = reference(x, w_packed, scales, biases, group_size)
    if y.shape != ref.shape or y.dtype != ref.dtype:
        raise AssertionError(f"result is {y.dtype}{tuple(y.shape)}, reference is {ref.dtype}{tuple(ref.shape)}")
    with mx.stream(mx.cpu):
        w = mx.dequantize(w_packed, scales.astype(mx.float32), biases.astype(mx.float32),
                          group_size=group_size, bits=4)
        mag = np.array(mx.abs(x.astype(mx.float32)) @ mx.abs(w).T, dtype=np.float64)
    r = np.array(ref.astype(mx.float32), dtype=np.float64)
    yy = np.array(y.astype(mx.float32), dtype=np.float64)
    tol = OUTPUT_ULP[ref.dtype] * np.abs(r) + ACCUMULATION_RTOL * mag + 1e-30
    err = np.abs(yy - r)
    err[np.isnan(yy)] = np.inf
    return float((err / tol).max()) if err.size else 0.0
