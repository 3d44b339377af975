// SIMT emulation of the CUDA programming model for a host compiler (test code only).
//
// A kernel is a plain host function. A launch runs its blocks one at a time, in an order shuffled
// by a seed, and each block's threads as cooperative fibers on one OS thread: a thread runs until
// it reaches a synchronisation point (a warp intrinsic such as __shfl_xor_sync, or
// __syncthreads) or exits, and the scheduler releases a sync point only when every thread it
// names waits at that same call. Everything the hardware leaves undefined and the kernels must
// never do is a hard failure (message on stderr, exit status 3):
//  - a warp intrinsic whose mask names a lane that has exited, does not exist (partial warp) or
//    waits at another sync point; a shuffle reading a lane outside the mask;
//  - __syncthreads not reached by every thread of the block, or reached at different calls;
//  - a launch of an empty grid, or a grid or block past the hardware limits (grid.x < 2^31,
//    grid.y and grid.z < 65536, block.x and block.y <= 1024, block.z <= 64, <= 1024 threads);
//  - more than 48 KiB of shared memory without the cudaFuncSetAttribute opt-in (227 KiB with it).
// Since fibers switch only at sync points, atomics are plain read-modify-writes and shared memory
// is a static variable (blocks never overlap). Memory errors are left to AddressSanitizer and
// UndefinedBehaviorSanitizer (misaligned vector loads are typed loads: -fsanitize=alignment).
//
// The CUDA sources are compiled unchanged except for the launch syntax and shared-memory
// declarations, which tests/test_simt.py rewrites before compiling:
//   kernel<<<grid, block, shmem, stream>>>(args)
//     -> ::simt::Launch(&kernel, "kernel", __FILE__, __LINE__, grid, block, shmem, stream)(args)
//   __shared__ T name[N];      -> static T name[N]; ::simt::DeclareShared(name, sizeof(name), ...)
//   extern __shared__ T name[]; -> T* name = ::simt::DynamicShared<T>(...)

#ifndef FLAXDCN_TESTS_SIMT_SIMT_H_
#define FLAXDCN_TESTS_SIMT_SIMT_H_

#include <cuda_runtime_api.h>  // the toolkit's, or tests/simt/fallback's without a toolkit
#include <vector_types.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

// Device-code keywords: no meaning on the host (the toolkit's host_defines.h maps some of them
// to attributes g++ does not know).
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __constant__
#undef __managed__
#undef __grid_constant__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __constant__
#define __managed__
#define __grid_constant__

namespace simt {

enum class SyncKind : int {
  kNone,
  kShflIdx,
  kShflUp,
  kShflDown,
  kShflXor,
  kBallot,
  kAny,
  kAll,
  kSyncWarp,
  kBarrier,
};

// One emulated thread.
struct Thread {
  uint3 thread_idx;
  int lane;
  int warp;
  int linear;  // index in the block
  // Where it waits, and its operand / result.
  int state;  // see simt.cc
  SyncKind kind;
  unsigned mask;
  int arg;
  int width;
  const char* file;
  int line;
  unsigned char value[16];
  unsigned char result[16];
  int predicate;
};

extern thread_local Thread* current;
extern uint3 block_idx;
extern dim3 block_dim;
extern dim3 grid_dim;

// Reports a violation of the programming model and exits with status 3.
[[noreturn]] void Fail(const char* format, ...) __attribute__((format(printf, 1, 2)));

// Blocks run in the order of a permutation drawn from this seed (0: natural order).
void SetBlockOrderSeed(uint64_t seed);
// Kernel launches so far.
int64_t LaunchCount();

// Waits at a sync point; returns when the scheduler has released it (results in current).
void Sync(SyncKind kind, unsigned mask, const void* value, size_t bytes, int arg, int width,
          int predicate, const char* file, int line);

void DeclareShared(const void* address, size_t bytes, const char* file, int line);
void* DynamicSharedBase(const char* file, int line);

template <typename T>
T* DynamicShared(const char* file, int line) {
  return static_cast<T*>(DynamicSharedBase(file, line));
}

struct LaunchSpec {
  const void* kernel;
  const char* name;
  const char* file;
  int line;
  dim3 grid;
  dim3 block;
  size_t shared_bytes;
  cudaStream_t stream;
};

// Runs `body` for every thread of every block; records a launch error for cudaGetLastError.
void RunKernel(const LaunchSpec& spec, const std::function<void()>& body);

template <typename T>
struct Identity {
  using type = T;
};

template <typename... P>
class Launcher {
 public:
  Launcher(void (*kernel)(P...), LaunchSpec spec) : kernel_(kernel), spec_(spec) {}

  // Arguments convert to the kernel's parameter types once, as at a real launch, and every
  // thread receives its own copy.
  void operator()(typename Identity<P>::type... args) const {
    std::tuple<std::decay_t<P>...> params(std::move(args)...);
    void (*kernel)(P...) = kernel_;
    RunKernel(spec_, [&]() { std::apply(kernel, params); });
  }

 private:
  void (*kernel_)(P...);
  LaunchSpec spec_;
};

template <typename... P>
Launcher<P...> Launch(void (*kernel)(P...), const char* name, const char* file, int line,
                      dim3 grid, dim3 block, size_t shared_bytes = 0,
                      cudaStream_t stream = nullptr) {
  return Launcher<P...>(kernel, LaunchSpec{reinterpret_cast<const void*>(kernel), name, file,
                                           line, grid, block, shared_bytes, stream});
}

template <typename T>
T WarpValue(SyncKind kind, unsigned mask, T var, int arg, int width, const char* file,
            int line) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 16, "unsupported shuffle type");
  Sync(kind, mask, &var, sizeof(T), arg, width, 0, file, line);
  T out;
  std::memcpy(&out, current->result, sizeof(T));
  return out;
}

template <typename T>
T AtomicAdd(T* address, T value) {
  const T old = *address;
  if constexpr (std::is_same_v<T, __half>) {
    *address = __float2half_rn(__half2float(old) + __half2float(value));
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    *address = __float2bfloat16_rn(__bfloat162float(old) + __bfloat162float(value));
  } else {
    *address = old + value;
  }
  return old;
}

}  // namespace simt

#define threadIdx (::simt::current->thread_idx)
#define blockIdx (::simt::block_idx)
#define blockDim (::simt::block_dim)
#define gridDim (::simt::grid_dim)
constexpr int warpSize = 32;

// --- Warp intrinsics: every lane named in `mask` must reach the same call -------------------

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::simt::WarpValue(::simt::SyncKind::kShflIdx, mask, var, src_lane, width, file, line);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                 const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::simt::WarpValue(::simt::SyncKind::kShflUp, mask, var, static_cast<int>(delta), width,
                           file, line);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                   const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::simt::WarpValue(::simt::SyncKind::kShflDown, mask, var, static_cast<int>(delta),
                           width, file, line);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                  const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::simt::WarpValue(::simt::SyncKind::kShflXor, mask, var, lane_mask, width, file, line);
}
unsigned __ballot_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE());
int __any_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
               int line = __builtin_LINE());
int __all_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
               int line = __builtin_LINE());
void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                int line = __builtin_LINE());
unsigned __activemask();

// --- Block barrier ---------------------------------------------------------------------------

void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE());
int __syncthreads_count(int predicate, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE());
int __syncthreads_and(int predicate, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE());
int __syncthreads_or(int predicate, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE());
inline void __threadfence() {}
inline void __threadfence_block() {}

// --- Atomics (fibers switch only at sync points: a read-modify-write is atomic) -------------

inline float atomicAdd(float* a, float v) { return ::simt::AtomicAdd(a, v); }
inline double atomicAdd(double* a, double v) { return ::simt::AtomicAdd(a, v); }
inline int atomicAdd(int* a, int v) { return ::simt::AtomicAdd(a, v); }
inline unsigned atomicAdd(unsigned* a, unsigned v) { return ::simt::AtomicAdd(a, v); }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
  return ::simt::AtomicAdd(a, v);
}
inline __half atomicAdd(__half* a, __half v) { return ::simt::AtomicAdd(a, v); }
inline __nv_bfloat16 atomicAdd(__nv_bfloat16* a, __nv_bfloat16 v) {
  return ::simt::AtomicAdd(a, v);
}

template <typename T>
T SimtAtomicMax(T* a, T v) {
  const T old = *a;
  if (v > old) *a = v;
  return old;
}
template <typename T>
T SimtAtomicMin(T* a, T v) {
  const T old = *a;
  if (v < old) *a = v;
  return old;
}
inline int atomicMax(int* a, int v) { return SimtAtomicMax(a, v); }
inline unsigned atomicMax(unsigned* a, unsigned v) { return SimtAtomicMax(a, v); }
inline long long atomicMax(long long* a, long long v) { return SimtAtomicMax(a, v); }
inline unsigned long long atomicMax(unsigned long long* a, unsigned long long v) {
  return SimtAtomicMax(a, v);
}
inline int atomicMin(int* a, int v) { return SimtAtomicMin(a, v); }
inline unsigned atomicMin(unsigned* a, unsigned v) { return SimtAtomicMin(a, v); }
inline long long atomicMin(long long* a, long long v) { return SimtAtomicMin(a, v); }
inline unsigned long long atomicMin(unsigned long long* a, unsigned long long v) {
  return SimtAtomicMin(a, v);
}
template <typename T>
T atomicExch(T* a, T v) {
  const T old = *a;
  *a = v;
  return old;
}
template <typename T>
T atomicCAS(T* a, T compare, T v) {
  const T old = *a;
  if (old == compare) *a = v;
  return old;
}

// --- Conversions and bit casts ---------------------------------------------------------------

// Round to nearest even; out of range saturates and NaN gives INT64_MIN, as the hardware's
// cvt.rni.s64.f64 does.
inline long long __double2ll_rn(double x) {
  if (std::isnan(x)) return INT64_MIN;
  if (x >= 9223372036854775808.0) return INT64_MAX;
  if (x < -9223372036854775808.0) return INT64_MIN;
  return std::llrint(x);
}
inline long long __double_as_longlong(double x) {
  long long out;
  std::memcpy(&out, &x, sizeof(out));
  return out;
}
inline double __longlong_as_double(long long x) {
  double out;
  std::memcpy(&out, &x, sizeof(out));
  return out;
}
inline int __float_as_int(float x) {
  int out;
  std::memcpy(&out, &x, sizeof(out));
  return out;
}
inline float __int_as_float(int x) {
  float out;
  std::memcpy(&out, &x, sizeof(out));
  return out;
}
inline unsigned __float_as_uint(float x) {
  unsigned out;
  std::memcpy(&out, &x, sizeof(out));
  return out;
}
inline float __uint_as_float(unsigned x) {
  float out;
  std::memcpy(&out, &x, sizeof(out));
  return out;
}
template <typename T>
T __ldg(const T* p) {
  return *p;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }

// The C++ overload of the runtime's cudaFuncSetAttribute (cuda_runtime.h declares it too).
template <typename T>
cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}

#endif  // FLAXDCN_TESTS_SIMT_SIMT_H_
