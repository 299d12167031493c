"""``int4_matmul``: y = x @ dequantize(w).T for MLX's 4-bit affine format.

Dispatch, per call:

* Metal (Apple GPU, default device GPU): the custom kernel of ``source.py``
  through ``mx.fast.metal_kernel``.
* CUDA (MLX's CUDA build): the same kernel body through ``mx.fast.cuda_kernel``.
* CPU (everything else, and every test): MLX ops in float32, picking per
  shape between ``mx.quantized_matmul`` (few rows: reads the packed weight
  once per row) and dequantize-then-matmul (many rows: one dequantization,
  then BLAS), at the crossover measured by ``benchmarks/kernels.py``.

All paths accumulate in float32 and round once to the output dtype, which is
``result_dtype(x.dtype, scales.dtype)``, as for ``mx.quantized_matmul``.
Gradients reach ``x``, ``scales`` and ``biases`` on every path (DWQ-style
training of scales and biases works on the converted layer).
"""

from __future__ import annotations

import functools

import mlx.core as mx

from . import source

SUPPORTED_GROUP_SIZES = (32, 64, 128)
_FLOATS = (mx.float16, mx.bfloat16, mx.float32)
_FLOAT_NAMES = "float16, bfloat16 or float32"

# CPU path: rows of x up to which mx.quantized_matmul beats dequantize + matmul
# (benchmarks/kernels.py measures it: dequantize wins from M = 4 on 0.5B-8B
# shapes with OpenBLAS on 2 cores, M = 3 is about a tie).
CPU_QMM_MAX_ROWS = 3
# CPU path: dequantize this many weight elements at a time, so the float32
# copy stays in cache while BLAS consumes it (about 2 MB).
CPU_DEQUANT_CHUNK = 1 << 19

_SHIFTS = mx.arange(0, 32, 4, dtype=mx.uint32)


def result_dtype(x_dtype: mx.Dtype, scales_dtype: mx.Dtype) -> mx.Dtype:
    """Output dtype of ``int4_matmul`` (and of ``mx.quantized_matmul``): the
    common dtype, float32 when they differ (float16 with bfloat16 included)."""
    return x_dtype if x_dtype == scales_dtype else mx.float32


def _check(x, w_packed, scales, biases, group_size) -> None:
    """Raise a ValueError/TypeError naming the bad value and the fix."""
    for name, a in (("x", x), ("w_packed", w_packed), ("scales", scales), ("biases", biases)):
        if not isinstance(a, mx.array):
            raise TypeError(f"{name} must be an mx.array, got {type(a).__name__}; wrap it with mx.array(...)")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size={group_size} is not supported; use 32, 64 or 128")
    if x.dtype not in _FLOATS:
        raise TypeError(f"x has dtype {x.dtype}; int4_matmul takes {_FLOAT_NAMES} activations "
                        f"(cast with x.astype(mx.float32))")
    if w_packed.dtype != mx.uint32 or w_packed.ndim != 2:
        raise TypeError(f"w_packed has dtype {w_packed.dtype} and shape {tuple(w_packed.shape)}; it must be the "
                        f"uint32 (N, K/8) array returned by mx.quantize(w, group_size, bits=4)")
    if x.ndim < 1:
        raise ValueError("x is a scalar; give it at least one dimension of size K")
    n, kw = w_packed.shape
    k = x.shape[-1]
    if k != 8 * kw:
        raise ValueError(f"x has {k} features in its last axis but w_packed holds {8 * kw} per row "
                         f"(shape {tuple(w_packed.shape)}, 8 codes per uint32); pass the matching weight, "
                         f"or check that it was quantized with bits=4")
    if k % group_size != 0:
        raise ValueError(f"K={k} is not divisible by group_size={group_size}; "
                         f"quantize with a group size that divides K")
    want = (n, k // group_size)
    for name, a in (("scales", scales), ("biases", biases)):
        if a.dtype not in _FLOATS:
            raise TypeError(f"{name} has dtype {a.dtype}; it must be {_FLOAT_NAMES}")
        if tuple(a.shape) != want:
            raise ValueError(f"{name} has shape {tuple(a.shape)} but N={n}, K={k}, group_size={group_size} "
                             f"needs {want}; was the weight quantized with group_size={group_size}?")
    if scales.dtype != biases.dtype:
        raise TypeError(f"scales ({scales.dtype}) and biases ({biases.dtype}) must share one dtype")


def dequantize_float32(w_packed: mx.array, scales: mx.array, biases: mx.array, group_size: int) -> mx.array:
    """Float32 ``(N, K)`` weight: ``scale * code + bias`` for every code.

    Equals ``mx.dequantize(w_packed, scales, biases, group_size, 4)`` on float32
    scales bit for bit, and is differentiable in ``scales`` and ``biases``.
    """
    n = w_packed.shape[0]
    codes = (w_packed[:, :, None] >> _SHIFTS) & 0xF  # (N, K/8, 8)
    codes = codes.reshape(n, -1, group_size).astype(mx.float32)  # (N, K/g, g)
    s = scales.astype(mx.float32)[..., None]
    b = biases.astype(mx.float32)[..., None]
    return (codes * s + b).reshape(n, -1)


def cpu_few_rows(x2, w_packed, scales, biases, group_size):
    """CPU float32 product through ``mx.quantized_matmul`` (best for few rows)."""
    f = mx.float32
    return mx.quantized_matmul(x2.astype(f), w_packed, scales.astype(f), biases.astype(f),
                               transpose=True, group_size=group_size, bits=4)


def cpu_many_rows(x2, w_packed, scales, biases, group_size):
    """CPU float32 product: dequantize (in chunks of rows) then BLAS matmul."""
    k = x2.shape[1]
    n = w_packed.shape[0]
    xf = x2.astype(mx.float32)
    rows = max(1, CPU_DEQUANT_CHUNK // k)
    if rows >= n:
        return xf @ dequantize_float32(w_packed, scales, biases, group_size).T
    parts = [
        xf @ dequantize_float32(w_packed[i:i + rows], scales[i:i + rows], biases[i:i + rows], group_size).T
        for i in range(0, n, rows)
    ]
    return mx.concatenate(parts, axis=-1)


def _cpu_matmul(x2, w_packed, scales, biases, group_size):
    """Float32 result of the (M, K) x (N, K)^T product with MLX CPU ops."""
    if x2.shape[0] <= CPU_QMM_MAX_ROWS:
        return cpu_few_rows(x2, w_packed, scales, biases, group_size)
    return cpu_many_rows(x2, w_packed, scales, biases, group_size)


def _int4_vjp(group_size, primals, cotangent, output):
    """Gradients of y = x @ W.T with W = scales * codes + biases (per group)."""
    x2, w_packed, scales, biases = primals
    g = cotangent.astype(mx.float32)  # (M, N)
    xf = x2.astype(mx.float32)
    w = dequantize_float32(w_packed, scales, biases, group_size)
    dx = (g @ w).astype(x2.dtype)
    dw = (g.T @ xf).reshape(w_packed.shape[0], -1, group_size)  # (N, K/g, g)
    codes = dequantize_float32(w_packed, mx.ones_like(scales), mx.zeros_like(biases), group_size)
    codes = codes.reshape(dw.shape)
    dscales = (dw * codes).sum(-1).astype(scales.dtype)
    dbiases = dw.sum(-1).astype(biases.dtype)
    return dx, mx.zeros_like(w_packed), dscales, dbiases


@functools.lru_cache(maxsize=None)
def _gpu_kernel(variant: str, backend: str):
    spec = source.kernel_spec(variant, backend)
    if backend == "metal":
        return mx.fast.metal_kernel(**spec)
    return mx.fast.cuda_kernel(**spec)


@functools.lru_cache(maxsize=None)
def _gpu_function(group_size: int, backend: str):
    """The kernel call as an mx.custom_function, so it has a VJP."""

    @mx.custom_function
    def f(x2, w_packed, scales, biases):
        plan = source.launch(x2, w_packed, scales, biases, group_size)
        return _gpu_kernel(plan.variant, backend)(**plan.call)[0]

    @f.vjp
    def f_vjp(primals, cotangent, output):
        return _int4_vjp(group_size, primals, cotangent, output)

    return f


def gpu_backend() -> str | None:
    """``"metal"`` or ``"cuda"`` if the kernel can run on the default device, else None."""
    if mx.default_device() != mx.gpu:
        return None
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return None


def int4_matmul(x: mx.array, w_packed: mx.array, scales: mx.array, biases: mx.array,
                group_size: int = 64, *, backend: str = "auto") -> mx.array:
    """``x @ W.T`` for a 4-bit affine-quantized ``W`` of shape (N, K).

    Computes the same product as ``mx.quantized_matmul(x, w_packed, scales,
    biases, transpose=True, group_size=group_size, bits=4)``, accumulating in
    float32 for every activation dtype.

    Args:
        x: activations ``(..., K)``, float16, bfloat16 or float32; any leading
            batch shape; need not be contiguous.
        w_packed: uint32 ``(N, K/8)`` from ``mx.quantize(w, group_size, bits=4)``.
        scales, biases: ``(N, K/group_size)``, float16, bfloat16 or float32.
        group_size: 32, 64 or 128.
        backend: ``"auto"`` (Metal or CUDA kernel when the default device is a
            GPU that has one, else CPU), ``"metal"``, ``"cuda"`` or ``"cpu"``.

    Returns:
        ``(..., N)`` in ``result_dtype(x.dtype, scales.dtype)``.

    Raises:
        TypeError / ValueError: wrong dtypes, shapes that do not match, or a
            group size that is not 32, 64 or 128 or does not divide K.
    """
    _check(x, w_packed, scales, biases, group_size)
    if backend == "auto":
        backend = gpu_backend() or "cpu"
    if backend not in ("metal", "cuda", "cpu"):
        raise ValueError(f"backend={backend!r}; use 'auto', 'metal', 'cuda' or 'cpu'")
    if backend == "metal" and not mx.metal.is_available():
        raise ValueError("backend='metal' needs an Apple GPU (mx.metal.is_available() is False); "
                         "use backend='auto' or 'cpu'")
    if backend == "cuda" and not (getattr(mx, "cuda", None) and mx.cuda.is_available()):
        raise ValueError("backend='cuda' needs MLX's CUDA build on an NVIDIA GPU (pip install 'mlx[cuda13]'); "
                         "use backend='auto' or 'cpu'")
    out_dtype = result_dtype(x.dtype, scales.dtype)
    n, k = w_packed.shape[0], x.shape[-1]
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, k)  # (M, K)
    if x2.shape[0] == 0:
        return mx.zeros(lead + (n,), dtype=out_dtype)
    if backend == "cpu":
        y = _cpu_matmul(x2, w_packed, scales, biases, group_size).astype(out_dtype)
    else:
        # Promotion is exact (float16/bfloat16 -> float32), so one dtype in the kernel.
        x2, s, b = (a.astype(out_dtype) for a in (x2, scales, biases))
        y = _gpu_function(group_size, backend)(x2, w_packed, s, b)
    return y.reshape(lead + (n,))
