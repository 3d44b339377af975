// The SIMT emulation's scheduler and the CUDA runtime calls the launchers make (see simt.h).

#include "simt.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define SIMT_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SIMT_ASAN 1
#endif
#endif
#if defined(SIMT_ASAN)
#include <sanitizer/common_interface_defs.h>
#endif

// Fiber switches. On x86-64 a few instructions that save the callee-saved registers and swap
// stacks (swapcontext also saves the signal mask, a system call per switch, and switches happen
// at every warp intrinsic); elsewhere ucontext.
#if defined(__x86_64__) && !defined(SIMT_UCONTEXT)
extern "C" void SimtSwitch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl SimtSwitch
  .hidden SimtSwitch
  .type SimtSwitch, @function
SimtSwitch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size SimtSwitch, .-SimtSwitch
  .section .note.GNU-stack,"",@progbits
  .text
)");

namespace simt {
namespace {
struct Context {
  void* sp = nullptr;
};
// A stack whose first switch "returns" into entry() (which never returns).
void MakeContext(Context* c, unsigned char* stack, size_t bytes, void (*entry)()) {
  auto* top = reinterpret_cast<void**>(
      (reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t{15}));
  *--top = nullptr;                               // entry's return address: never used
  *--top = reinterpret_cast<void*>(entry);        // popped by SimtSwitch's ret
  for (int i = 0; i < 6; ++i) *--top = nullptr;   // rbp, rbx, r12-r15
  c->sp = top;
}
void SwapContext(Context* from, Context* to) { SimtSwitch(&from->sp, to->sp); }
}  // namespace
}  // namespace simt
#else
namespace simt {
namespace {
struct Context {
  ucontext_t uc;
};
void MakeContext(Context* c, unsigned char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c->uc);
  c->uc.uc_stack.ss_sp = stack;
  c->uc.uc_stack.ss_size = bytes;
  c->uc.uc_link = nullptr;
  makecontext(&c->uc, entry, 0);
}
void SwapContext(Context* from, Context* to) { swapcontext(&from->uc, &to->uc); }
}  // namespace
}  // namespace simt
#endif

namespace simt {

thread_local Thread* current = nullptr;
uint3 block_idx;
dim3 block_dim;
dim3 grid_dim;

namespace {

enum State : int { kRunnable, kWaiting, kExited };

constexpr int kWarp = 32;
constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = size_t{256} << 10;
constexpr size_t kGuardBytes = size_t{4} << 10;
constexpr size_t kSharedLimit = size_t{48} << 10;         // without the opt-in
constexpr size_t kSharedOptInLimit = size_t{227} << 10;   // sm_90 with the opt-in
constexpr unsigned char kGarbage = 0xff;                  // NaN in every float type

struct Fiber {
  Context context;
  unsigned char* stack;  // usable part, above the guard page
  void* fake_stack = nullptr;
  Thread thread;
};

struct Emulator {
  std::vector<std::unique_ptr<Fiber>> fibers;
  Context scheduler;
  const void* scheduler_bottom = nullptr;
  size_t scheduler_size = 0;
  void* scheduler_fake_stack = nullptr;
  Fiber* running = nullptr;
  const std::function<void()>* body = nullptr;
  const LaunchSpec* spec = nullptr;
  int threads = 0;
  uint64_t seed = 0;
  int64_t launches = 0;
  cudaError_t last_error = cudaSuccess;
  std::map<const void*, int> dynamic_shared_opt_in;  // kernel -> bytes
  std::map<const void*, size_t> static_shared;        // this launch
  size_t static_shared_bytes = 0;
  std::set<const void*> shared_this_block;
  std::unique_ptr<unsigned char[]> dynamic_shared;
};

Emulator& E() {
  static Emulator* emulator = new Emulator();  // never destroyed: fibers may outlive main
  return *emulator;
}

const char* KindName(SyncKind kind) {
  switch (kind) {
    case SyncKind::kShflIdx: return "__shfl_sync";
    case SyncKind::kShflUp: return "__shfl_up_sync";
    case SyncKind::kShflDown: return "__shfl_down_sync";
    case SyncKind::kShflXor: return "__shfl_xor_sync";
    case SyncKind::kBallot: return "__ballot_sync";
    case SyncKind::kAny: return "__any_sync";
    case SyncKind::kAll: return "__all_sync";
    case SyncKind::kSyncWarp: return "__syncwarp";
    case SyncKind::kBarrier: return "__syncthreads";
    case SyncKind::kNone: break;
  }
  return "?";
}

const char* Where() {
  static thread_local char buffer[512];
  const Emulator& e = E();
  if (e.spec == nullptr) return "host code";
  std::snprintf(buffer, sizeof(buffer), "kernel %s launched at %s:%d, block (%u, %u, %u)",
                e.spec->name, e.spec->file, e.spec->line, block_idx.x, block_idx.y, block_idx.z);
  return buffer;
}

void FiberMain();

void SwitchToScheduler(Fiber* f, bool exiting) {
  Emulator& e = E();
#if defined(SIMT_ASAN)
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f->fake_stack, e.scheduler_bottom,
                                 e.scheduler_size);
#else
  (void)exiting;
#endif
  SwapContext(&f->context, &e.scheduler);
#if defined(SIMT_ASAN)
  __sanitizer_finish_switch_fiber(f->fake_stack, &e.scheduler_bottom, &e.scheduler_size);
#endif
}

void FiberMain() {
  Emulator& e = E();
  Fiber* f = e.running;
#if defined(SIMT_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &e.scheduler_bottom, &e.scheduler_size);
#endif
  (*e.body)();
  f->thread.state = kExited;
  SwitchToScheduler(f, true);
  std::abort();  // an exited fiber is never resumed
}

void Resume(Fiber* f) {
  Emulator& e = E();
  e.running = f;
  current = &f->thread;
#if defined(SIMT_ASAN)
  __sanitizer_start_switch_fiber(&e.scheduler_fake_stack, f->stack, kStackBytes);
#endif
  SwapContext(&e.scheduler, &f->context);
#if defined(SIMT_ASAN)
  __sanitizer_finish_switch_fiber(e.scheduler_fake_stack, nullptr, nullptr);
#endif
  current = nullptr;
  e.running = nullptr;
}

Fiber* NewFiber() {
  auto f = std::make_unique<Fiber>();
  void* memory = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (memory == MAP_FAILED) Fail("cannot map a fiber stack");
  mprotect(memory, kGuardBytes, PROT_NONE);  // a stack overflow faults
  f->stack = static_cast<unsigned char*>(memory) + kGuardBytes;
  Fiber* raw = f.get();
  E().fibers.push_back(std::move(f));
  return raw;
}

Thread& ThreadAt(int linear) { return E().fibers[linear]->thread; }

bool SameCall(const Thread& a, const Thread& b) {
  return a.kind == b.kind && a.line == b.line && std::strcmp(a.file, b.file) == 0;
}

// Releases the lanes named by t's mask, all waiting at t's call.
void ReleaseWarpOp(const Thread& t) {
  const int base = t.warp * kWarp;
  const int width = t.width;
  if (width < 1 || width > kWarp || (width & (width - 1)) != 0) {
    Fail("%s at %s:%d: width %d is not a power of two in [1, 32] (%s)", KindName(t.kind), t.file,
         t.line, width, Where());
  }
  if (!(t.mask >> t.lane & 1u)) {
    Fail("%s at %s:%d: lane %d calls it with mask 0x%08x, which excludes itself (%s)",
         KindName(t.kind), t.file, t.line, t.lane, t.mask, Where());
  }
  for (int lane = 0; lane < kWarp; ++lane) {
    if (!(t.mask >> lane & 1u)) continue;
    const int linear = base + lane;
    if (linear >= E().threads) {
      Fail("%s at %s:%d: mask 0x%08x names lane %d of warp %d, which does not exist (block of "
           "%d threads; %s)", KindName(t.kind), t.file, t.line, t.mask, lane, t.warp,
           E().threads, Where());
    }
    const Thread& u = ThreadAt(linear);
    if (u.state == kExited) {
      Fail("%s at %s:%d: mask 0x%08x names lane %d of warp %d, which has exited (on a GPU: a "
           "hang or undefined values; %s)", KindName(t.kind), t.file, t.line, t.mask, lane,
           t.warp, Where());
    }
    if (!SameCall(t, u) || u.mask != t.mask || u.width != t.width) {
      Fail("%s at %s:%d (mask 0x%08x, width %d): lane %d of warp %d waits at %s at %s:%d (mask "
           "0x%08x, width %d) instead (%s)", KindName(t.kind), t.file, t.line, t.mask, t.width,
           lane, t.warp, KindName(u.kind), u.file, u.line, u.mask, u.width, Where());
    }
  }
  unsigned ballot = 0;
  for (int lane = 0; lane < kWarp; ++lane) {
    if ((t.mask >> lane & 1u) && ThreadAt(base + lane).predicate) ballot |= 1u << lane;
  }
  for (int lane = 0; lane < kWarp; ++lane) {
    if (!(t.mask >> lane & 1u)) continue;
    Thread& u = ThreadAt(base + lane);
    const int first = lane & ~(width - 1);
    const int last = first + width - 1;
    int source = lane;
    switch (t.kind) {
      case SyncKind::kShflIdx:
        source = first + (u.arg & (width - 1));
        break;
      case SyncKind::kShflUp:
        source = lane - u.arg >= first ? lane - u.arg : lane;
        break;
      case SyncKind::kShflDown:
        source = lane + u.arg <= last ? lane + u.arg : lane;
        break;
      case SyncKind::kShflXor:
        source = (lane ^ u.arg) <= last ? lane ^ u.arg : lane;
        break;
      default:
        break;
    }
    switch (t.kind) {
      case SyncKind::kShflIdx:
      case SyncKind::kShflUp:
      case SyncKind::kShflDown:
      case SyncKind::kShflXor:
        if (source < 0 || source >= kWarp || !(t.mask >> source & 1u)) {
          Fail("%s at %s:%d: lane %d reads lane %d, outside the mask 0x%08x (%s)",
               KindName(t.kind), t.file, t.line, lane, source, t.mask, Where());
        }
        std::memcpy(u.result, ThreadAt(base + source).value, sizeof(u.result));
        break;
      case SyncKind::kBallot:
        std::memcpy(u.result, &ballot, sizeof(ballot));
        break;
      case SyncKind::kAny: {
        const int any = ballot != 0;
        std::memcpy(u.result, &any, sizeof(any));
        break;
      }
      case SyncKind::kAll: {
        const int all = ballot == t.mask;
        std::memcpy(u.result, &all, sizeof(all));
        break;
      }
      default:
        break;
    }
  }
  for (int lane = 0; lane < kWarp; ++lane) {
    if (t.mask >> lane & 1u) ThreadAt(base + lane).state = kRunnable;
  }
}

// Every live thread waits at a sync point: releases one, or fails.
void ReleaseSomething() {
  Emulator& e = E();
  for (int i = 0; i < e.threads; ++i) {
    const Thread& t = ThreadAt(i);
    if (t.state == kWaiting && t.kind != SyncKind::kBarrier) {
      ReleaseWarpOp(t);
      return;
    }
  }
  // Only __syncthreads left.
  const Thread* first = nullptr;
  int count = 0;
  for (int i = 0; i < e.threads; ++i) {
    const Thread& t = ThreadAt(i);
    if (t.state != kWaiting) continue;
    if (first == nullptr) first = &t;
    if (!SameCall(*first, t)) {
      Fail("__syncthreads: thread %d waits at %s:%d, thread %d at %s:%d (%s)", first->linear,
           first->file, first->line, t.linear, t.file, t.line, Where());
    }
    count += t.predicate != 0;
  }
  for (int i = 0; i < e.threads; ++i) {
    if (ThreadAt(i).state == kExited) {
      Fail("__syncthreads at %s:%d: thread %d of the block has exited, the others wait (%s)",
           first->file, first->line, i, Where());
    }
  }
  for (int i = 0; i < e.threads; ++i) {
    Thread& t = ThreadAt(i);
    std::memcpy(t.result, &count, sizeof(count));
    t.state = kRunnable;
  }
}

void RunBlock(std::mt19937_64& rng) {
  Emulator& e = E();
  const int n = e.threads;
  for (int i = 0; i < n; ++i) {
    Fiber* f = e.fibers[i].get();
    Thread& t = f->thread;
    t = Thread{};
    t.thread_idx = uint3{static_cast<unsigned>(i) % block_dim.x,
                         static_cast<unsigned>(i) / block_dim.x % block_dim.y,
                         static_cast<unsigned>(i) / (block_dim.x * block_dim.y)};
    t.linear = i;
    t.lane = i % kWarp;
    t.warp = i / kWarp;
    t.state = kRunnable;
    MakeContext(&f->context, f->stack, kStackBytes, FiberMain);
  }
  std::vector<int> warps((n + kWarp - 1) / kWarp);
  for (size_t w = 0; w < warps.size(); ++w) warps[w] = static_cast<int>(w);
  if (e.seed != 0) std::shuffle(warps.begin(), warps.end(), rng);
  while (true) {
    bool live = false;
    for (int w : warps) {
      for (int i = w * kWarp; i < std::min(n, (w + 1) * kWarp); ++i) {
        Fiber* f = e.fibers[i].get();
        if (f->thread.state == kRunnable) Resume(f);
        live = live || f->thread.state != kExited;
      }
    }
    if (!live) return;
    ReleaseSomething();
  }
}

void CheckLaunch(const LaunchSpec& s) {
  const dim3 g = s.grid, b = s.block;
  if (g.x == 0 || g.y == 0 || g.z == 0 || b.x == 0 || b.y == 0 || b.z == 0) {
    Fail("launch of %s at %s:%d: empty grid (%u, %u, %u) or block (%u, %u, %u) (a GPU reports "
         "cudaErrorInvalidConfiguration)", s.name, s.file, s.line, g.x, g.y, g.z, b.x, b.y, b.z);
  }
  if (g.x > 2147483647u || g.y > 65535u || g.z > 65535u) {
    Fail("launch of %s at %s:%d: grid (%u, %u, %u) past the limits (2^31 - 1, 65535, 65535)",
         s.name, s.file, s.line, g.x, g.y, g.z);
  }
  const uint64_t threads = uint64_t{b.x} * b.y * b.z;
  if (b.x > 1024 || b.y > 1024 || b.z > 64 || threads > kMaxThreads) {
    Fail("launch of %s at %s:%d: block (%u, %u, %u) past the limits (1024, 1024, 64; 1024 "
         "threads)", s.name, s.file, s.line, b.x, b.y, b.z);
  }
  const auto opt_in = E().dynamic_shared_opt_in.find(s.kernel);
  const size_t allowed =
      opt_in == E().dynamic_shared_opt_in.end() ? kSharedLimit : size_t(opt_in->second);
  if (s.shared_bytes > kSharedLimit && s.shared_bytes > allowed) {
    Fail("launch of %s at %s:%d: %zu bytes of dynamic shared memory, past 48 KiB without "
         "cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize) (opt-in: %zu)",
         s.name, s.file, s.line, s.shared_bytes, allowed);
  }
}

}  // namespace

void Fail(const char* format, ...) {
  std::fflush(stdout);
  std::fputs("SIMT violation: ", stderr);
  va_list args;
  va_start(args, format);
  std::vfprintf(stderr, format, args);
  va_end(args);
  std::fputc('\n', stderr);
  std::fflush(stderr);
  std::_Exit(3);
}

void SetBlockOrderSeed(uint64_t seed) { E().seed = seed; }

int64_t LaunchCount() { return E().launches; }

void Sync(SyncKind kind, unsigned mask, const void* value, size_t bytes, int arg, int width,
          int predicate, const char* file, int line) {
  Emulator& e = E();
  Fiber* f = e.running;
  if (f == nullptr) Fail("%s at %s:%d called outside a kernel", KindName(kind), file, line);
  Thread& t = f->thread;
  t.kind = kind;
  t.mask = mask;
  t.arg = arg;
  t.width = width;
  t.file = file;
  t.line = line;
  t.predicate = predicate;
  std::memset(t.value, 0, sizeof(t.value));
  if (bytes > 0) std::memcpy(t.value, value, bytes);
  t.state = kWaiting;
  SwitchToScheduler(f, false);
  current = &t;
}

void DeclareShared(const void* address, size_t bytes, const char* file, int line) {
  Emulator& e = E();
  if (e.static_shared.emplace(address, bytes).second) {
    e.static_shared_bytes += bytes;
    const auto opt_in = e.dynamic_shared_opt_in.find(e.spec->kernel);
    const size_t limit = opt_in == e.dynamic_shared_opt_in.end() ? kSharedLimit
                                                                 : kSharedOptInLimit;
    if (e.static_shared_bytes > kSharedLimit ||
        e.static_shared_bytes + e.spec->shared_bytes > limit) {
      Fail("__shared__ at %s:%d: %zu bytes of static and %zu of dynamic shared memory, past the "
           "%zu-byte limit (%s)", file, line, e.static_shared_bytes, e.spec->shared_bytes, limit,
           Where());
    }
  }
  if (e.shared_this_block.insert(address).second) {
    // Shared memory starts undefined in every block.
    std::memset(const_cast<void*>(address), kGarbage, bytes);
  }
}

void* DynamicSharedBase(const char* file, int line) {
  Emulator& e = E();
  if (e.spec == nullptr) Fail("extern __shared__ at %s:%d outside a kernel", file, line);
  return e.dynamic_shared.get();
}

void RunKernel(const LaunchSpec& spec, const std::function<void()>& body) {
  Emulator& e = E();
  if (e.running != nullptr) {
    Fail("launch of %s at %s:%d from device code (dynamic parallelism is not emulated)",
         spec.name, spec.file, spec.line);
  }
  CheckLaunch(spec);
  ++e.launches;
  e.spec = &spec;
  e.body = &body;
  grid_dim = spec.grid;
  block_dim = spec.block;
  e.threads = static_cast<int>(spec.block.x * spec.block.y * spec.block.z);
  while (static_cast<int>(e.fibers.size()) < e.threads) NewFiber();
  e.static_shared.clear();
  e.static_shared_bytes = 0;
  e.dynamic_shared.reset(new unsigned char[spec.shared_bytes > 0 ? spec.shared_bytes : 1]);
  const uint64_t blocks = uint64_t{spec.grid.x} * spec.grid.y * spec.grid.z;
  if (blocks > (uint64_t{1} << 26)) {
    Fail("launch of %s at %s:%d: %llu blocks, too many to emulate", spec.name, spec.file,
         spec.line, static_cast<unsigned long long>(blocks));
  }
  std::vector<uint32_t> order(blocks);
  for (uint64_t i = 0; i < blocks; ++i) order[i] = static_cast<uint32_t>(i);
  std::mt19937_64 rng(e.seed * 0x9e3779b97f4a7c15ull + static_cast<uint64_t>(e.launches));
  if (e.seed != 0) std::shuffle(order.begin(), order.end(), rng);
  for (uint32_t id : order) {
    block_idx = uint3{id % spec.grid.x, id / spec.grid.x % spec.grid.y,
                      id / (spec.grid.x * spec.grid.y)};
    e.shared_this_block.clear();
    std::memset(e.dynamic_shared.get(), kGarbage, spec.shared_bytes);
    RunBlock(rng);
  }
  e.spec = nullptr;
  e.body = nullptr;
}

}  // namespace simt

// --- Warp and block intrinsics -----------------------------------------------------------------

unsigned __ballot_sync(unsigned mask, int predicate, const char* file, int line) {
  ::simt::Sync(::simt::SyncKind::kBallot, mask, nullptr, 0, 0, warpSize, predicate, file, line);
  unsigned out;
  std::memcpy(&out, ::simt::current->result, sizeof(out));
  return out;
}

int __any_sync(unsigned mask, int predicate, const char* file, int line) {
  ::simt::Sync(::simt::SyncKind::kAny, mask, nullptr, 0, 0, warpSize, predicate, file, line);
  int out;
  std::memcpy(&out, ::simt::current->result, sizeof(out));
  return out;
}

int __all_sync(unsigned mask, int predicate, const char* file, int line) {
  ::simt::Sync(::simt::SyncKind::kAll, mask, nullptr, 0, 0, warpSize, predicate, file, line);
  int out;
  std::memcpy(&out, ::simt::current->result, sizeof(out));
  return out;
}

void __syncwarp(unsigned mask, const char* file, int line) {
  ::simt::Sync(::simt::SyncKind::kSyncWarp, mask, nullptr, 0, 0, warpSize, 0, file, line);
}

unsigned __activemask() {
  const int warp = ::simt::current->warp;
  unsigned mask = 0;
  for (int lane = 0; lane < 32; ++lane) {
    const int linear = warp * 32 + lane;
    if (linear < ::simt::E().threads && ::simt::ThreadAt(linear).state != ::simt::kExited) {
      mask |= 1u << lane;
    }
  }
  return mask;
}

void __syncthreads(const char* file, int line) {
  ::simt::Sync(::simt::SyncKind::kBarrier, 0, nullptr, 0, 0, 0, 0, file, line);
}

int __syncthreads_count(int predicate, const char* file, int line) {
  ::simt::Sync(::simt::SyncKind::kBarrier, 0, nullptr, 0, 0, 0, predicate != 0, file, line);
  int count;
  std::memcpy(&count, ::simt::current->result, sizeof(count));
  return count;
}

int __syncthreads_and(int predicate, const char* file, int line) {
  return __syncthreads_count(predicate, file, line) == static_cast<int>(
      ::simt::block_dim.x * ::simt::block_dim.y * ::simt::block_dim.z);
}

int __syncthreads_or(int predicate, const char* file, int line) {
  return __syncthreads_count(predicate, file, line) != 0;
}

// --- The CUDA runtime calls (one device, every stream is the host's program order) -------------

namespace {

cudaError_t Record(cudaError_t status) {
  if (status != cudaSuccess) ::simt::E().last_error = status;
  return status;
}

void HostOnly(const char* what) {
  if (::simt::E().running != nullptr) ::simt::Fail("%s called from device code", what);
}

}  // namespace

extern "C" {

cudaError_t cudaGetLastError(void) {
  const cudaError_t status = ::simt::E().last_error;
  ::simt::E().last_error = cudaSuccess;
  return status;
}

cudaError_t cudaPeekAtLastError(void) { return ::simt::E().last_error; }

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    default: return "cudaErrorUnknown";
  }
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    default: return "unknown error";
  }
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t) {
  HostOnly("cudaMemsetAsync");
  if (count == 0) return cudaSuccess;
  if (ptr == nullptr) return Record(cudaErrorInvalidValue);
  std::memset(ptr, value, count);
  return cudaSuccess;
}

cudaError_t cudaMemset(void* ptr, int value, size_t count) {
  return cudaMemsetAsync(ptr, value, count, nullptr);
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, enum cudaMemcpyKind,
                            cudaStream_t) {
  HostOnly("cudaMemcpyAsync");
  if (count == 0) return cudaSuccess;
  if (dst == nullptr || src == nullptr) return Record(cudaErrorInvalidValue);
  std::memmove(dst, src, count);
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, enum cudaMemcpyKind kind) {
  return cudaMemcpyAsync(dst, src, count, kind, nullptr);
}

cudaError_t cudaMalloc(void** ptr, size_t size) {
  HostOnly("cudaMalloc");
  if (posix_memalign(ptr, 256, size > 0 ? size : 1) != 0) return Record(cudaErrorMemoryAllocation);
  return cudaSuccess;
}

cudaError_t cudaFree(void* ptr) {
  HostOnly("cudaFree");
  std::free(ptr);
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }

cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  HostOnly("cudaFuncSetAttribute");
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<size_t>(value) > (size_t{227} << 10)) {
      return Record(cudaErrorInvalidValue);
    }
    ::simt::E().dynamic_shared_opt_in[func] = value;
  }
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

// An sm_90 device (H100/H200).
cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 << 10; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = 132; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 227 << 10; return cudaSuccess;
    default: return Record(cudaErrorInvalidValue);
  }
}

cudaError_t cudaDriverGetVersion(int* version) {
  *version = 13000;
  return cudaSuccess;
}

cudaError_t cudaRuntimeGetVersion(int* version) {
  *version = 13000;
  return cudaSuccess;
}

}  // extern "C"
