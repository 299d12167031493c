"""Source of the int4 group-quantized matmul kernels, shared by Metal and CUDA.

One kernel body per shape regime is written once in Metal syntax and compiled
by ``mx.fast.metal_kernel`` on Apple GPUs, or by ``mx.fast.cuda_kernel`` on
NVIDIA GPUs after a short CUDA prelude maps the Metal vocabulary (thread
attributes, ``simd_sum``, ``threadgroup`` memory, barriers) onto CUDA's.

Weights are MLX's affine format: ``w`` is uint32 ``(N, K/8)`` with eight 4-bit
codes per word, least significant first; ``scales`` and ``biases`` are
``(N, K/group_size)``; ``w[n, k] = scales[n, k // g] * code + biases[n, k // g]``
and ``y = x @ w.T``. Everything accumulates in float32, whatever the activation
dtype, as MLX's own Metal kernels do.

* ``decode`` (M <= 8): each SIMD group computes 4 output features for up to
  8 rows of ``x`` at once, so a weight word is read once per M rows instead of
  once per row, and any K that is a multiple of 32 takes the same fast loop.
* ``prefill`` (M > 8): a 32 x 32 output tile per threadgroup; the weight tile
  is dequantized once into threadgroup memory and reused by 32 rows of ``x``.

``launch(...)`` returns the keyword arguments of one kernel call, so the same
launch can be run by MLX or by the CPU emulator in ``tools/metal_emu``.
"""

from dataclasses import dataclass

import mlx.core as mx

DECODE_MAX_ROWS = 8  # M above this uses the prefill kernel
_RN = 4  # decode: output features per SIMD group
_SG = 2  # decode: SIMD groups per threadgroup
_TILE = 32  # prefill: BM = BN = BK
_PREFILL_THREADS = 128

# Helpers shared by both kernels; valid Metal and (after the prelude) CUDA.
COMMON_HEADER = """
// Code i (0..7) of a packed word: MLX packs 4-bit codes least significant first.
QMM_FN float qmm_code(uint word, int i) {
  return float((word >> (4 * i)) & 0xfu);
}

// sum_i x[i] * code_i over the eight codes of one word.
QMM_FN float qmm_dot8(uint word, thread const float* x) {
  float s = 0.0f;
  for (int i = 0; i < 8; i++) {
    s += x[i] * qmm_code(word, i);
  }
  return s;
}
"""

METAL_PRELUDE = """
// mlxqat int4 matmul, Metal build (MLX prepends metal_stdlib and bfloat16_t).
#define QMM_FN inline
"""

CUDA_PRELUDE = """
// mlxqat int4 matmul, CUDA build: the Metal vocabulary the kernel body uses.
typedef unsigned int uint;
#define QMM_FN __device__ __forceinline__
#define device
#define thread
#define threadgroup __shared__
#define threadgroup_barrier(flags) __syncthreads()
#define thread_index_in_simdgroup (threadIdx.x & 31u)
#define simdgroup_index_in_threadgroup (threadIdx.x >> 5)
#define thread_index_in_threadgroup (threadIdx.x)
#define threadgroup_position_in_grid (blockIdx)
__device__ __forceinline__ float simd_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}
"""

DECODE_BODY = f"""
  // Template constants: T activation dtype, GROUP group size, MR rows of x
  // per threadgroup (1, 2, 4 or 8).
  constexpr int RN = {_RN};   // output features per SIMD group
  constexpr int SG = {_SG};   // SIMD groups per threadgroup
  constexpr int WPL = 4;  // packed words per lane per step: 32 codes, one group slice
  const int M = x_shape[0];
  const int K = x_shape[1];
  const int N = w_shape[0];
  const int KW = K / 8;
  const int KG = K / GROUP;
  const int lane = int(thread_index_in_simdgroup);
  const int n0 = (int(threadgroup_position_in_grid.x) * SG +
                  int(simdgroup_index_in_threadgroup)) * RN;
  const int m0 = int(threadgroup_position_in_grid.y) * MR;

  float acc[MR][RN];
  for (int m = 0; m < MR; m++) {{
    for (int r = 0; r < RN; r++) {{
      acc[m][r] = 0.0f;
    }}
  }}

  // K is a multiple of 32, so KW is a multiple of WPL: a lane's words are all
  // in range or all out, and all four share one quantization group.
  for (int kw = lane * WPL; kw < KW; kw += 32 * WPL) {{
    const int g = (kw * 8) / GROUP;
    float part[MR][RN];
    float xsum[MR];
    for (int m = 0; m < MR; m++) {{
      xsum[m] = 0.0f;
      for (int r = 0; r < RN; r++) {{
        part[m][r] = 0.0f;
      }}
    }}
    for (int j = 0; j < WPL; j++) {{
      uint words[RN];
      for (int r = 0; r < RN; r++) {{
        words[r] = (n0 + r < N) ? w[(n0 + r) * KW + kw + j] : 0u;
      }}
      for (int m = 0; m < MR; m++) {{
        if (m0 + m < M) {{
          const device T* xp = x + int64_t(m0 + m) * K + (kw + j) * 8;
          float xv[8];
          float s = 0.0f;
          for (int i = 0; i < 8; i++) {{
            xv[i] = float(xp[i]);
            s += xv[i];
          }}
          xsum[m] += s;
          for (int r = 0; r < RN; r++) {{
            part[m][r] += qmm_dot8(words[r], xv);
          }}
        }}
      }}
    }}
    for (int r = 0; r < RN; r++) {{
      if (n0 + r < N) {{
        const float sc = float(scales[(n0 + r) * KG + g]);
        const float bi = float(biases[(n0 + r) * KG + g]);
        for (int m = 0; m < MR; m++) {{
          acc[m][r] += sc * part[m][r] + bi * xsum[m];
        }}
      }}
    }}
  }}

  for (int m = 0; m < MR; m++) {{
    for (int r = 0; r < RN; r++) {{
      const float v = simd_sum(acc[m][r]);
      if (lane == 0 && m0 + m < M && n0 + r < N) {{
        y[int64_t(m0 + m) * N + n0 + r] = static_cast<T>(v);
      }}
    }}
  }}
"""

PREFILL_BODY = f"""
  // Template constants: T activation dtype, GROUP group size.
  constexpr int BM = {_TILE};
  constexpr int BN = {_TILE};
  constexpr int BK = {_TILE};  // 32 divides GROUP: a K tile has one scale per row
  threadgroup float xs[BM][BK + 1];
  threadgroup float ws[BN][BK + 1];
  const int M = x_shape[0];
  const int K = x_shape[1];
  const int N = w_shape[0];
  const int KW = K / 8;
  const int KG = K / GROUP;
  const int t = int(thread_index_in_threadgroup);  // 0..127
  const int mb = int(threadgroup_position_in_grid.y) * BM;
  const int nb = int(threadgroup_position_in_grid.x) * BN;
  const int tr = (t / 8) * 2;  // this thread's 2 rows and 4 columns of the tile
  const int tc = (t % 8) * 4;
  const int lr = t / 4;  // loader: tile row, and which word (8 codes) of it
  const int lq = t % 4;

  float acc[2][4];
  for (int i = 0; i < 2; i++) {{
    for (int c = 0; c < 4; c++) {{
      acc[i][c] = 0.0f;
    }}
  }}

  for (int k0 = 0; k0 < K; k0 += BK) {{
    const int m = mb + lr;
    for (int i = 0; i < 8; i++) {{
      xs[lr][lq * 8 + i] = (m < M) ? float(x[int64_t(m) * K + k0 + lq * 8 + i]) : 0.0f;
    }}
    const int n = nb + lr;
    if (n < N) {{
      const uint word = w[n * KW + k0 / 8 + lq];
      const float sc = float(scales[n * KG + k0 / GROUP]);
      const float bi = float(biases[n * KG + k0 / GROUP]);
      for (int i = 0; i < 8; i++) {{
        ws[lr][lq * 8 + i] = sc * qmm_code(word, i) + bi;
      }}
    }} else {{
      for (int i = 0; i < 8; i++) {{
        ws[lr][lq * 8 + i] = 0.0f;
      }}
    }}
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int kk = 0; kk < BK; kk++) {{
      const float a0 = xs[tr][kk];
      const float a1 = xs[tr + 1][kk];
      for (int c = 0; c < 4; c++) {{
        const float b = ws[tc + c][kk];
        acc[0][c] += a0 * b;
        acc[1][c] += a1 * b;
      }}
    }}
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }}

  for (int i = 0; i < 2; i++) {{
    for (int c = 0; c < 4; c++) {{
      const int m = mb + tr + i;
      const int n = nb + tc + c;
      if (m < M && n < N) {{
        y[int64_t(m) * N + n] = static_cast<T>(acc[i][c]);  // M * N may pass 2**31
      }}
    }}
  }}
"""

_INPUTS = ["x", "w", "scales", "biases"]
_OUTPUTS = ["y"]


def kernel_spec(variant: str, backend: str) -> dict:
    """Constructor arguments of one kernel for ``mx.fast.metal_kernel`` /
    ``mx.fast.cuda_kernel`` (same keys for both).

    Args:
        variant: ``"decode"`` or ``"prefill"``.
        backend: ``"metal"`` or ``"cuda"``.
    """
    if variant not in ("decode", "prefill"):
        raise ValueError(f"variant={variant!r}; use 'decode' or 'prefill'")
    if backend not in ("metal", "cuda"):
        raise ValueError(f"backend={backend!r}; use 'metal' or 'cuda'")
    prelude = METAL_PRELUDE if backend == "metal" else CUDA_PRELUDE
    return dict(
        name=f"mlxqat_int4_{variant}",
        input_names=list(_INPUTS),
        output_names=list(_OUTPUTS),
        source=DECODE_BODY if variant == "decode" else PREFILL_BODY,
        header=prelude + COMMON_HEADER,
        ensure_row_contiguous=True,
    )


@dataclass(frozen=True)
class Launch:
    """Which kernel runs one (M, N, K) product, and its call arguments."""

    variant: str
    call: dict  # keyword arguments of the kernel object's __call__


def _rows_per_group(m: int) -> int:
    for mr in (1, 2, 4):
        if m <= mr:
            return mr
    return 8


def launch(x2: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int) -> Launch:
    """Kernel variant and call arguments for a 2-D ``x2`` (M, K).

    Inputs must already be validated and share one floating dtype.
    """
    m, k = x2.shape
    n = w.shape[0]
    if m <= DECODE_MAX_ROWS:
        mr = _rows_per_group(m)
        per_group = _RN * _SG
        grid = (-(-n // per_group) * 32 * _SG, -(-m // mr), 1)
        threadgroup = (32 * _SG, 1, 1)
        template = [("T", x2.dtype), ("GROUP", group_size), ("MR", mr)]
        variant = "decode"
    else:
        grid = (-(-n // _TILE) * _PREFILL_THREADS, -(-m // _TILE), 1)
        threadgroup = (_PREFILL_THREADS, 1, 1)
        template = [("T", x2.dtype), ("GROUP", group_size)]
        variant = "prefill"
    call = dict(
        inputs=[x2, w, scales, biases],
        template=template,
        grid=grid,
        threadgroup=threadgroup,
        output_shapes=[(m, n)],
        output_dtypes=[x2.dtype],
    )
    return Launch(variant, call)
