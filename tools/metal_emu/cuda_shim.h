// cuda_shim.h: compile the CUDA source MLX builds for mx.fast.cuda_kernel as
// C++17 and run it on the CPU (runtime: emu_runtime.h; launcher: shim_main.h).
//
// It stands in for what MLX's CUDA kernels see before the user header:
// `__global__`/`__device__`/`__forceinline__`/`__grid_constant__` (empty),
// `__shared__` (shared by the running block, as `threadgroup` in
// metal_shim.h), `threadIdx`/`blockIdx`/`blockDim`/`gridDim`,
// `__syncthreads`, the full-warp `__shfl_*_sync` functions (any other mask is
// reported), `__half`, `__nv_bfloat16`, and MLX's `Shape`/`Strides` kernel
// arguments (fixed arrays of kMaxDims). Warps are 32 lanes, in lockstep
// between warp functions, like SIMD groups in metal_shim.h.
#pragma once

#include <limits>

#include "emu_runtime.h"

namespace emu {
constexpr int kMaxDims = 8;
template <class T>
struct DimArray {
  T v[kMaxDims];
  T operator[](int i) const { return v[i]; }
};
inline vec<uint, 3> cuda_thread_idx() { return rt().current->tid; }
inline vec<uint, 3> cuda_block_idx() { return rt().current->tgid; }
inline void check_full_mask(unsigned mask) {
  if (mask != 0xffffffffu) fail("only full-warp masks (0xffffffff) are emulated");
}
}  // namespace emu

typedef emu::half __half;
typedef emu::bfloat __nv_bfloat16;
typedef emu::vec<uint, 3> uint3;
typedef emu::vec<uint, 3> dim3;
typedef emu::DimArray<int32_t> Shape;
typedef emu::DimArray<int64_t> Strides;
namespace cooperative_groups {}

inline void __syncthreads() { emu::yield(emu::Wait::Barrier); }
template <class T> T __shfl_sync(unsigned mask, T v, int lane, int = 32) {
  emu::check_full_mask(mask);
  return emu::simd_collective(v, lane, emu::combine_shuffle<T, 0>);
}
template <class T> T __shfl_down_sync(unsigned mask, T v, unsigned d, int = 32) {
  emu::check_full_mask(mask);
  return emu::simd_collective(v, static_cast<int>(d), emu::combine_shuffle<T, 1>);
}
template <class T> T __shfl_up_sync(unsigned mask, T v, unsigned d, int = 32) {
  emu::check_full_mask(mask);
  return emu::simd_collective(v, static_cast<int>(d), emu::combine_shuffle<T, 2>);
}
template <class T> T __shfl_xor_sync(unsigned mask, T v, int m, int = 32) {
  emu::check_full_mask(mask);
  return emu::simd_collective(v, m, emu::combine_shuffle<T, 3>);
}

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __grid_constant__
#define __shared__ EMU_THREADGROUP
#define threadIdx (emu::cuda_thread_idx())
#define blockIdx (emu::cuda_block_idx())
#define blockDim (emu::dispatch().group)
#define gridDim (emu::dispatch().groups)
#define inf std::numeric_limits<float>::infinity()
