// emu_runtime.h: the CPU runtime behind metal_shim.h and cuda_shim.h.
//
// Every thread of a threadgroup (CUDA: block) is a coroutine (ucontext). A
// lane runs until it reaches a SIMD-group (warp) function or a barrier, then
// yields to the scheduler. When every active lane of a SIMD group waits in
// the same SIMD function, the scheduler computes all lanes' results at once
// (lockstep semantics); when every lane of the threadgroup waits at a barrier,
// all are released. These are reported as errors (undefined behaviour on a
// GPU): a SIMD function reached by part of a SIMD group while other lanes wait
// at a barrier, lanes of one SIMD group in different SIMD functions, a barrier
// not reached by every lane, and deadlock. Threadgroups run one at a time, so
// shared memory can be a function-local `static` (EMU_THREADGROUP). Lanes can
// run in reverse order between synchronization points, which exposes a missing
// barrier. SIMD width is 32 (Apple GPUs; NVIDIA warps).
//
// Also here: `half` and `bfloat` (IEEE round-to-nearest-even on every
// conversion; an operation on two of them rounds its float result once, which
// is the exactly rounded result; mixed with float it gives float), small
// vectors `vec<T, N>`, and the launch geometry (`Dispatch`, `ThreadAttrs`).
#pragma once
#if defined(__APPLE__)  // ucontext is deprecated there but still works
#define _XOPEN_SOURCE 700
#define _DARWIN_C_SOURCE
#endif
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

// ---------------------------------------------------------------- scalars --
typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;

namespace emu {

struct half {
  uint16_t bits;
  half() = default;
  half(float f) {
    _Float16 h = static_cast<_Float16>(f);  // round to nearest even
    std::memcpy(&bits, &h, 2);
  }
  half(double f) : half(static_cast<float>(f)) {}
  half(int i) : half(static_cast<float>(i)) {}
  half(uint i) : half(static_cast<float>(i)) {}
  operator float() const {
    _Float16 h;
    std::memcpy(&h, &bits, 2);
    return static_cast<float>(h);
  }
};

struct bfloat {
  uint16_t bits;
  bfloat() = default;
  bfloat(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
      bits = static_cast<uint16_t>(u >> 16);
    }
  }
  bfloat(double f) : bfloat(static_cast<float>(f)) {}
  bfloat(int i) : bfloat(static_cast<float>(i)) {}
  bfloat(uint i) : bfloat(static_cast<float>(i)) {}
  operator float() const {
    uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

// Arithmetic: (H, H) -> H rounded once (exact IEEE half/bfloat result, since
// float carries more than twice the bits); (H, float) and (float, H) -> float.
#define EMU_LOWP_OPS(H)                                                    \
  inline H operator+(H a, H b) { return H(float(a) + float(b)); }         \
  inline H operator-(H a, H b) { return H(float(a) - float(b)); }         \
  inline H operator*(H a, H b) { return H(float(a) * float(b)); }         \
  inline H operator/(H a, H b) { return H(float(a) / float(b)); }         \
  inline H operator-(H a) { return H(-float(a)); }                        \
  inline float operator+(H a, float b) { return float(a) + b; }           \
  inline float operator-(H a, float b) { return float(a) - b; }           \
  inline float operator*(H a, float b) { return float(a) * b; }           \
  inline float operator/(H a, float b) { return float(a) / b; }           \
  inline float operator+(float a, H b) { return a + float(b); }           \
  inline float operator-(float a, H b) { return a - float(b); }           \
  inline float operator*(float a, H b) { return a * float(b); }           \
  inline float operator/(float a, H b) { return a / float(b); }           \
  inline H& operator+=(H& a, H b) { return a = a + b; }                   \
  inline H& operator-=(H& a, H b) { return a = a - b; }                   \
  inline H& operator*=(H& a, H b) { return a = a * b; }                   \
  inline bool operator<(H a, H b) { return float(a) < float(b); }         \
  inline bool operator>(H a, H b) { return float(a) > float(b); }         \
  inline bool operator==(H a, H b) { return float(a) == float(b); }
EMU_LOWP_OPS(half)
EMU_LOWP_OPS(bfloat)
#undef EMU_LOWP_OPS

// ---------------------------------------------------------------- vectors --
template <class T, int N>
struct vec;
template <class T>
struct vec<T, 2> {
  T x, y;
  T& operator[](int i) { return (&x)[i]; }
  T operator[](int i) const { return (&x)[i]; }
};
template <class T>
struct vec<T, 3> {
  T x, y, z;
  T& operator[](int i) { return (&x)[i]; }
  T operator[](int i) const { return (&x)[i]; }
};
template <class T>
struct vec<T, 4> {
  T x, y, z, w;
  T& operator[](int i) { return (&x)[i]; }
  T operator[](int i) const { return (&x)[i]; }
};
#define EMU_VEC_OP(OP)                                              \
  template <class T, int N>                                        \
  vec<T, N> operator OP(vec<T, N> a, vec<T, N> b) {                \
    for (int i = 0; i < N; i++) a[i] = a[i] OP b[i];               \
    return a;                                                      \
  }                                                                \
  template <class T, int N, class S>                               \
  vec<T, N> operator OP(vec<T, N> a, S b) {                        \
    for (int i = 0; i < N; i++) a[i] = a[i] OP T(b);               \
    return a;                                                      \
  }                                                                \
  template <class T, int N>                                        \
  vec<T, N>& operator OP##=(vec<T, N>& a, vec<T, N> b) {           \
    return a = a OP b;                                             \
  }
EMU_VEC_OP(+)
EMU_VEC_OP(-)
EMU_VEC_OP(*)
EMU_VEC_OP(/)
#undef EMU_VEC_OP

// ---------------------------------------------------------------- runtime --
constexpr int kSimdWidth = 32;

enum class Wait { Ready, Simd, Barrier, Done };

struct Lane;
// Computes every lane's result of one SIMD-group function at once.
typedef void (*Combine)(Lane** lanes, int n);

struct Lane {
  ucontext_t ctx;
  Wait wait = Wait::Ready;
  Combine combine = nullptr;
  unsigned char in[16], out[16];
  int arg = 0;             // lane index operand (shuffle source, delta, mask)
  uint lane = 0, simd = 0;  // index in SIMD group, SIMD group in threadgroup
  vec<uint, 3> tid, tgid;  // position in threadgroup, threadgroup in grid
  uint flat = 0;           // index in threadgroup
};

struct Runtime {
  Lane* current = nullptr;
  ucontext_t scheduler;
};
inline Runtime& rt() {
  static Runtime r;
  return r;
}

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "metal_emu: %s\n", what);
  std::exit(3);
}

inline void yield(Wait why) {
  Lane* l = rt().current;
  l->wait = why;
  swapcontext(&l->ctx, &rt().scheduler);
}

template <class T>
T simd_collective(T v, int arg, Combine combine) {
  static_assert(sizeof(T) <= 16, "SIMD operand too large");
  Lane* l = rt().current;
  std::memcpy(l->in, &v, sizeof(T));
  l->arg = arg;
  l->combine = combine;
  yield(Wait::Simd);
  T r;
  std::memcpy(&r, l->out, sizeof(T));
  return r;
}

template <class T>
T lane_in(Lane* l) {
  T v;
  std::memcpy(&v, l->in, sizeof(T));
  return v;
}
template <class T>
void lane_out(Lane* l, T v) {
  std::memcpy(l->out, &v, sizeof(T));
}
// Lanes are given in lane order; inactive (returned) lanes are absent.
inline Lane* find_lane(Lane** lanes, int n, long idx) {
  for (int i = 0; i < n; i++)
    if (static_cast<long>(lanes[i]->lane) == idx) return lanes[i];
  return nullptr;
}

template <class T, class Op>
void combine_reduce(Lane** lanes, int n, Op op) {
  // Pairwise tree over the active lanes, the order a butterfly reduction uses.
  T vals[kSimdWidth];
  for (int i = 0; i < n; i++) vals[i] = lane_in<T>(lanes[i]);
  for (int step = 1; step < n; step *= 2)
    for (int i = 0; i + step < n; i += 2 * step)
      vals[i] = op(vals[i], vals[i + step]);
  for (int i = 0; i < n; i++) lane_out<T>(lanes[i], vals[0]);
}
template <class T>
void combine_sum(Lane** l, int n) {
  combine_reduce<T>(l, n, [](T a, T b) { return T(a + b); });
}
template <class T>
void combine_max(Lane** l, int n) {
  combine_reduce<T>(l, n, [](T a, T b) { return a < b ? b : a; });
}
template <class T>
void combine_min(Lane** l, int n) {
  combine_reduce<T>(l, n, [](T a, T b) { return b < a ? b : a; });
}
template <class T>
void combine_prefix_sum(Lane** l, int n) {
  T acc = T(0);
  for (int i = 0; i < n; i++) {
    lane_out<T>(l[i], acc);
    acc = T(acc + lane_in<T>(l[i]));
  }
}
// Source lane = f(lane, arg); a source outside the group or inactive keeps
// the lane's own value.
template <class T, int Kind>
void combine_shuffle(Lane** l, int n) {
  T res[kSimdWidth];
  for (int i = 0; i < n; i++) {
    long me = l[i]->lane, a = l[i]->arg;
    long src = Kind == 0 ? a : Kind == 1 ? me + a : Kind == 2 ? me - a : (me ^ a);
    Lane* s = (src >= 0 && src < kSimdWidth) ? find_lane(l, n, src) : nullptr;
    res[i] = lane_in<T>(s ? s : l[i]);
  }
  for (int i = 0; i < n; i++) lane_out<T>(l[i], res[i]);
}

// Runs one threadgroup. `lanes` hold positions; `body` runs one lane.
struct Scheduler {
  std::vector<Lane> lanes;
  std::vector<std::vector<char>> stacks;
  void (*body)(Lane&) = nullptr;
  bool reverse = false;

  static void entry() {
    Lane* l = rt().current;
    Scheduler* s = self();
    s->body(*l);
    l->wait = Wait::Done;
  }
  static Scheduler*& self() {
    static Scheduler* s = nullptr;
    return s;
  }

  void run_group() {
    self() = this;
    const int n = static_cast<int>(lanes.size());
    if (static_cast<int>(stacks.size()) < n) stacks.resize(n);
    for (int i = 0; i < n; i++) {
      Lane& l = lanes[i];
      if (stacks[i].empty()) stacks[i].resize(256 * 1024);
      getcontext(&l.ctx);
      l.ctx.uc_stack.ss_sp = stacks[i].data();
      l.ctx.uc_stack.ss_size = stacks[i].size();
      l.ctx.uc_link = &rt().scheduler;
      makecontext(&l.ctx, entry, 0);
      l.wait = Wait::Ready;
    }
    const int n_simd = (n + kSimdWidth - 1) / kSimdWidth;
    for (;;) {
      for (int k = 0; k < n; k++) {
        Lane& l = lanes[reverse ? n - 1 - k : k];
        if (l.wait != Wait::Ready) continue;
        rt().current = &l;
        swapcontext(&rt().scheduler, &l.ctx);
      }
      int done = 0, at_barrier = 0;
      bool released = false;
      for (int g = 0; g < n_simd; g++) {
        Lane* group[kSimdWidth];
        int m = 0, simd = 0;
        Combine c = nullptr;
        for (int i = g * kSimdWidth; i < std::min(n, (g + 1) * kSimdWidth); i++) {
          Lane& l = lanes[i];
          if (l.wait == Wait::Done) { done++; continue; }
          if (l.wait == Wait::Barrier) { at_barrier++; continue; }
          if (simd++ && l.combine != c)
            fail("lanes of one SIMD group wait in different SIMD functions");
          c = l.combine;
          group[m++] = &l;
        }
        if (simd == 0) continue;
        if (simd + done != std::min(n, (g + 1) * kSimdWidth) - g * kSimdWidth)
          fail("a SIMD function was reached while other lanes of its SIMD "
               "group wait at a barrier");
        c(group, m);
        for (int i = 0; i < m; i++) group[i]->wait = Wait::Ready;
        released = true;
      }
      if (released) continue;
      if (done == n) return;
      if (at_barrier + done == n) {
        if (done) fail("threadgroup_barrier not reached by every thread");
        for (Lane& l : lanes) l.wait = Wait::Ready;
        continue;
      }
      fail("deadlock");
    }
  }
};


// ---------------------------------------------------------------- dispatch --
// One launch: grid in threads and threadgroup size, as mx.fast.metal_kernel
// takes them (grid not a multiple of the threadgroup gives smaller edge
// threadgroups, as Metal's non-uniform dispatch does).
struct Dispatch {
  vec<uint, 3> grid, group, groups;
  vec<uint, 3> cur_group;  // position of the running threadgroup
  vec<uint, 3> cur_size;   // its size (smaller at the edges)
  std::vector<void*> buffers;
};
inline Dispatch& dispatch() {
  static Dispatch d;
  return d;
}

// The values of Metal's thread attributes for one lane, by their Metal names.
struct ThreadAttrs {
  vec<uint, 3> thread_position_in_grid, thread_position_in_threadgroup,
      threadgroup_position_in_grid, threads_per_threadgroup,
      threadgroups_per_grid, threads_per_grid, grid_size;
  uint thread_index_in_threadgroup, thread_index_in_simdgroup,
      simdgroup_index_in_threadgroup, threads_per_simdgroup,
      thread_execution_width, simdgroups_per_threadgroup,
      thread_index_in_quadgroup, quadgroup_index_in_threadgroup;
  explicit ThreadAttrs(const Lane& l) {
    const Dispatch& d = dispatch();
    for (int i = 0; i < 3; i++)
      thread_position_in_grid[i] = l.tgid[i] * d.group[i] + l.tid[i];
    thread_position_in_threadgroup = l.tid;
    threadgroup_position_in_grid = l.tgid;
    threads_per_threadgroup = d.cur_size;
    threadgroups_per_grid = d.groups;
    threads_per_grid = grid_size = d.grid;
    thread_index_in_threadgroup = l.flat;
    thread_index_in_simdgroup = l.lane;
    simdgroup_index_in_threadgroup = l.simd;
    threads_per_simdgroup = thread_execution_width = kSimdWidth;
    uint n = d.cur_size.x * d.cur_size.y * d.cur_size.z;
    simdgroups_per_threadgroup = (n + kSimdWidth - 1) / kSimdWidth;
    thread_index_in_quadgroup = l.flat % 4;
    quadgroup_index_in_threadgroup = l.flat / 4;
  }
};

// Reads a file into memory that ends at a PROT_NONE page, so a kernel that
// reads or writes past the end of a buffer crashes instead of passing.
void* guarded_buffer(size_t nbytes);

// argv: kernel-index gx gy gz tx ty tz reverse nbuf {i:PATH | o:PATH:NBYTES}...
// Runs every threadgroup of the launch with `bodies[kernel-index]` and writes
// the output buffers back to their files.
int run_main(int argc, char** argv, void (*const* bodies)(Lane&), int n_bodies);
}  // namespace emu

// Shared (threadgroup / __shared__) arrays: one copy per kernel function, used
// by the threadgroup that is running.
#define EMU_THREADGROUP static
