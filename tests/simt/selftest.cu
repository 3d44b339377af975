// Self-test of the SIMT emulation: kernels that use it correctly (results checked here) and
// kernels that break the programming model (the emulation must stop them).
//
// Usage: selftest SCENARIO. Exit status 0 when a correct scenario computed the right result;
// a violation exits with status 3 (simt::Fail) or a sanitizer report.

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr int kThreads = 128;

// Block sum: warp butterflies, then shared memory across the warps.
__global__ void BlockSumKernel(const float* x, int n, float* out) {
  __shared__ float partial[kThreads / 32];
  const int i = blockIdx.x * kThreads + threadIdx.x;
  float v = i < n ? x[i] : 0.0f;
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int w = 0; w < kThreads / 32; ++w) total += partial[w];
    atomicAdd(out, total);
  }
}

// Every shuffle flavour with sub-warp widths; out[lane * 6 + k].
__global__ void ShuffleKernel(int width, int* out) {
  const int lane = threadIdx.x;
  out[lane * 6 + 0] = __shfl_sync(0xffffffffu, lane * 10, 3, width);
  out[lane * 6 + 1] = __shfl_up_sync(0xffffffffu, lane * 10, 2, width);
  out[lane * 6 + 2] = __shfl_down_sync(0xffffffffu, lane * 10, 2, width);
  out[lane * 6 + 3] = __shfl_xor_sync(0xffffffffu, lane * 10, 5, width);
  out[lane * 6 + 4] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 3 == 0));
  out[lane * 6 + 5] = __syncthreads_count(lane < 7);
}

// Dynamic shared memory: each block reverses its slice through it.
__global__ void ReverseKernel(const int* x, int* out, int per_block) {
  extern __shared__ int buffer[];
  for (int i = threadIdx.x; i < per_block; i += blockDim.x) {
    buffer[i] = x[blockIdx.x * per_block + i];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < per_block; i += blockDim.x) {
    out[blockIdx.x * per_block + i] = buffer[per_block - 1 - i];
  }
}

// The order in which blocks run.
__global__ void OrderKernel(int* counter, int* order) {
  order[blockIdx.x] = atomicAdd(counter, 1);
}

__global__ void ExitedLaneKernel(float* out) {
  if (threadIdx.x % 32 >= 20) return;  // lanes 20..31 exit
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

__global__ void DivergentKernel(float* out) {
  float v = 1.0f;
  if (threadIdx.x % 2 == 0) {
    v = __shfl_xor_sync(0xffffffffu, v, 2);
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 2) + 1.0f;
  }
  out[threadIdx.x] = v;
}

__global__ void PartialWarpKernel(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

__global__ void BarrierAfterExitKernel(float* out) {
  if (threadIdx.x >= 64) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void NothingKernel(float* out) {
  if (out != nullptr) out[0] = 0.0f;
}

struct alignas(16) Vec4 {
  float v[4];
};

__global__ void MisalignedKernel(const float* x, float* out) {
  const Vec4 v = *reinterpret_cast<const Vec4*>(x + 1);  // 4 bytes past a 16-byte boundary
  out[threadIdx.x] = v.v[0];
}

__global__ void OutOfBoundsKernel(const float* x, float* out) {
  out[threadIdx.x] = x[threadIdx.x + 1];
}

int Expect(bool ok, const char* what) {
  if (!ok) std::fprintf(stderr, "selftest: wrong result: %s\n", what);
  return ok ? 0 : 1;
}

int Run(const std::string& scenario) {
  if (scenario == "block_sum") {
    const int n = 1000;
    std::vector<float> x(n);
    float expected = 0.0f;
    for (int i = 0; i < n; ++i) expected += x[i] = static_cast<float>(i % 7);
    float out = 0.0f;
    simt::SetBlockOrderSeed(5);
    BlockSumKernel<<<(n + kThreads - 1) / kThreads, kThreads>>>(x.data(), n, &out);
    return Expect(cudaGetLastError() == cudaSuccess && out == expected, "block sum");
  }
  if (scenario == "shuffles") {
    int failures = 0;
    for (int width : {32, 8, 4}) {
      std::vector<int> out(32 * 6);
      ShuffleKernel<<<1, 32>>>(width, out.data());
      for (int lane = 0; lane < 32; ++lane) {
        const int first = lane / width * width, last = first + width - 1;
        const int idx = first + 3 % width;
        const int up = lane - 2 >= first ? lane - 2 : lane;
        const int down = lane + 2 <= last ? lane + 2 : lane;
        const int bfly = (lane ^ 5) <= last ? lane ^ 5 : lane;
        unsigned ballot = 0;
        for (int l = 0; l < 32; l += 3) ballot |= 1u << l;
        failures += Expect(out[lane * 6 + 0] == idx * 10, "__shfl_sync");
        failures += Expect(out[lane * 6 + 1] == up * 10, "__shfl_up_sync");
        failures += Expect(out[lane * 6 + 2] == down * 10, "__shfl_down_sync");
        failures += Expect(out[lane * 6 + 3] == bfly * 10, "__shfl_xor_sync");
        failures += Expect(static_cast<unsigned>(out[lane * 6 + 4]) == ballot, "__ballot_sync");
        failures += Expect(out[lane * 6 + 5] == 7, "__syncthreads_count");
      }
    }
    return failures;
  }
  if (scenario == "dynamic_shared_opt_in" || scenario == "dynamic_shared_no_opt_in") {
    const int per_block = 16384;  // 64 KiB of ints
    const int blocks = 3;
    std::vector<int> x(per_block * blocks), out(per_block * blocks);
    for (int i = 0; i < per_block * blocks; ++i) x[i] = i;
    if (scenario == "dynamic_shared_opt_in") {
      cudaFuncSetAttribute(ReverseKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           per_block * 4);
    }
    simt::SetBlockOrderSeed(3);
    ReverseKernel<<<blocks, 256, per_block * sizeof(int)>>>(x.data(), out.data(), per_block);
    bool ok = true;
    for (int b = 0; b < blocks; ++b) {
      for (int i = 0; i < per_block; ++i) {
        ok = ok && out[b * per_block + i] == x[b * per_block + per_block - 1 - i];
      }
    }
    return Expect(ok, "reverse through dynamic shared memory");
  }
  if (scenario == "block_order") {
    const int blocks = 64;
    std::vector<int> natural(blocks), shuffled(blocks), again(blocks);
    int counter = 0;
    simt::SetBlockOrderSeed(0);
    OrderKernel<<<blocks, 1>>>(&counter, natural.data());
    counter = 0;
    simt::SetBlockOrderSeed(7);
    OrderKernel<<<blocks, 1>>>(&counter, shuffled.data());
    bool identity = true, permuted = false;
    std::vector<int> seen(blocks, 0);
    for (int b = 0; b < blocks; ++b) {
      identity = identity && natural[b] == b;
      permuted = permuted || shuffled[b] != b;
      ++seen[shuffled[b]];
    }
    for (int b = 0; b < blocks; ++b) permuted = permuted && seen[b] == 1;
    return Expect(identity && permuted, "block orders");
  }
  std::vector<float> out(256, 0.0f);
  if (scenario == "exited_lane") {
    ExitedLaneKernel<<<1, 64>>>(out.data());
  } else if (scenario == "divergent") {
    DivergentKernel<<<1, 32>>>(out.data());
  } else if (scenario == "partial_warp") {
    PartialWarpKernel<<<1, 48>>>(out.data());
  } else if (scenario == "barrier_after_exit") {
    BarrierAfterExitKernel<<<1, 128>>>(out.data());
  } else if (scenario == "grid_y") {
    NothingKernel<<<dim3(1, 65536), 32>>>(nullptr);
  } else if (scenario == "grid_x") {
    NothingKernel<<<dim3(2147483648u), 32>>>(nullptr);
  } else if (scenario == "block_threads") {
    NothingKernel<<<1, dim3(32, 33)>>>(nullptr);
  } else if (scenario == "empty_grid") {
    NothingKernel<<<0, 32>>>(nullptr);
  } else if (scenario == "misaligned") {
    std::vector<float> x(64);
    float* aligned = reinterpret_cast<float*>(
        (reinterpret_cast<uintptr_t>(x.data()) + 15) / 16 * 16);
    MisalignedKernel<<<1, 1>>>(aligned, out.data());
  } else if (scenario == "out_of_bounds") {
    std::vector<float> x(32);
    OutOfBoundsKernel<<<1, 32>>>(x.data(), out.data());
  } else {
    std::fprintf(stderr, "selftest: unknown scenario %s\n", scenario.c_str());
    return 2;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  return Run(argv[1]);
}
