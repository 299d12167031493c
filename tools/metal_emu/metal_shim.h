// metal_shim.h: compile MLX-generated Metal kernel source as C++17 and run it
// on the CPU (runtime: emu_runtime.h; launcher: shim_main.h).
//
// The Metal vocabulary provided, enough for mx.fast.metal_kernel kernels:
//   * address-space qualifiers `device`, `constant`, `thread`, `threadgroup`
//     (all empty; the Python driver rewrites threadgroup *array declarations*
//     to `EMU_THREADGROUP`, a `static` shared by the running threadgroup);
//   * `uint`, `ushort`, `uchar`, `half`/`float16_t`, `bfloat`/`bfloat16_t`;
//     `float2..4`, `half2..4`, `int2..4`, `uint2..4` with `.x .y .z .w`, `[]`
//     and element-wise arithmetic;
//   * `metal::` math (`exp`, `log`, `sqrt`, `rsqrt`, `abs`, `fabs`, `min`,
//     `max`, `fma`, `clamp`, `pow`, `tanh`, `precise::`, `fast::`), `as_type`;
//   * `simd_sum`, `simd_max`, `simd_min`, `simd_prefix_exclusive_sum`,
//     `simd_shuffle`, `simd_broadcast`, `simd_shuffle_down`, `simd_shuffle_up`,
//     `simd_shuffle_xor`, `threadgroup_barrier`, `simdgroup_barrier`;
//   * the thread attributes MLX passes as kernel parameters (emu::ThreadAttrs).
// Not provided: atomics, textures, simdgroup matrices; `double` compiles as
// C++ double (Metal has none).
#pragma once

#include "emu_runtime.h"

// ------------------------------------------------------ Metal vocabulary --
using emu::bfloat;
using emu::half;
typedef emu::half float16_t;
typedef emu::bfloat bfloat16_t;
#define EMU_VEC_TYPES(T, NAME)          \
  typedef emu::vec<T, 2> NAME##2;       \
  typedef emu::vec<T, 3> NAME##3;       \
  typedef emu::vec<T, 4> NAME##4;
EMU_VEC_TYPES(float, float)
EMU_VEC_TYPES(emu::half, half)
EMU_VEC_TYPES(int, int)
EMU_VEC_TYPES(uint, uint)
#undef EMU_VEC_TYPES

namespace metal {
using std::abs;
using std::ceil;
using std::exp;
using std::exp2;
using std::fabs;
using std::floor;
using std::fma;
using std::log;
using std::log2;
using std::max;
using std::min;
using std::pow;
using std::sqrt;
using std::tanh;
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
template <class T>
T clamp(T x, T lo, T hi) { return std::min(std::max(x, lo), hi); }
namespace precise {
using std::exp;
using std::log;
using std::sqrt;
using std::tanh;
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
}  // namespace precise
namespace fast {
using std::exp;
using std::log;
using std::sqrt;
}  // namespace fast
enum class mem_flags { mem_none, mem_device, mem_threadgroup, mem_texture };
inline void threadgroup_barrier(mem_flags) { emu::yield(emu::Wait::Barrier); }
// A SIMD group already runs in lockstep between collectives.
inline void simdgroup_barrier(mem_flags) {}
template <class To, class From>
To as_type(From v) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs equal sizes");
  To r;
  std::memcpy(&r, &v, sizeof(To));
  return r;
}
template <class T> T simd_sum(T v) { return emu::simd_collective(v, 0, emu::combine_sum<T>); }
template <class T> T simd_max(T v) { return emu::simd_collective(v, 0, emu::combine_max<T>); }
template <class T> T simd_min(T v) { return emu::simd_collective(v, 0, emu::combine_min<T>); }
template <class T> T simd_prefix_exclusive_sum(T v) {
  return emu::simd_collective(v, 0, emu::combine_prefix_sum<T>);
}
template <class T> T simd_shuffle(T v, ushort lane) {
  return emu::simd_collective(v, lane, emu::combine_shuffle<T, 0>);
}
template <class T> T simd_broadcast(T v, ushort lane) { return simd_shuffle(v, lane); }
template <class T> T simd_shuffle_down(T v, ushort d) {
  return emu::simd_collective(v, d, emu::combine_shuffle<T, 1>);
}
template <class T> T simd_shuffle_up(T v, ushort d) {
  return emu::simd_collective(v, d, emu::combine_shuffle<T, 2>);
}
template <class T> T simd_shuffle_xor(T v, ushort m) {
  return emu::simd_collective(v, m, emu::combine_shuffle<T, 3>);
}
}  // namespace metal
using namespace metal;

#define __METAL_VERSION__ 310
#define kernel
#define device
#define constant
#define thread
#define threadgroup
