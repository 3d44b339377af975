// SIMT test driver of the DCNv3 / DCNv4 CUDA launchers: runs them (emulated) and the CPU kernels
// (xla_ext/cpu_dcnv3_kernels.cc) on the same inputs and writes both results for
// tests/test_simt_dcnv3.py to compare. The conventions are those of tests/simt/driver.cc: each
// CASE_DIR holds spec.txt ("key value" lines) and the inputs as raw arrays; outputs are written
// as <producer>_<name>.bin; every launcher runs with two block orders (seeds a and b) on device
// buffers that start 16 bytes past a 256-byte boundary (plus `misalign` elements), exactly as
// long as their data, poisoned before them, outputs and workspace starting as 0xff bytes (NaN).
//
// Usage: dcnv3_driver CASE_DIR...  `layout` is 3 (offsets + mask) or 4 (offset_mask).

#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "simt.h"
#include "xla_ext/common/base.h"
#include "xla_ext/common/dcnv3.h"
#include "xla_ext/cpu/dcnv3_kernels.h"
#include "xla_ext/cpu/types.h"
#include "xla_ext/cuda/dcnv3_kernels.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define POISON(p, n) ((void)(p), (void)(n))
#define UNPOISON(p, n) ((void)(p), (void)(n))
#endif

namespace fd = flaxdcn;

namespace {

[[noreturn]] void Die(const std::string& message) {
  std::fprintf(stderr, "dcnv3_driver: %s\n", message.c_str());
  std::exit(4);
}

void Check(cudaError_t status, const std::string& what) {
  if (status != cudaSuccess) Die(what + " returned " + cudaGetErrorName(status));
}

class Spec {
 public:
  explicit Spec(const std::string& dir) : dir_(dir) {
    std::ifstream in(dir + "/spec.txt");
    if (!in) Die("cannot read " + dir + "/spec.txt");
    std::string key, value;
    while (in >> key >> value) values_[key] = value;
  }
  const std::string& dir() const { return dir_; }
  std::string Str(const std::string& key) const {
    auto it = values_.find(key);
    if (it == values_.end()) Die(dir_ + ": spec has no " + key);
    return it->second;
  }
  int64_t Int(const std::string& key) const { return std::stoll(Str(key)); }
  double Real(const std::string& key) const { return std::stod(Str(key)); }

 private:
  std::string dir_;
  std::map<std::string, std::string> values_;
};

std::vector<unsigned char> ReadArray(const Spec& spec, const std::string& name, size_t bytes) {
  const std::string path = spec.dir() + "/" + name + ".bin";
  std::ifstream in(path, std::ios::binary);
  if (!in) Die("cannot read " + path);
  std::vector<unsigned char> data((std::istreambuf_iterator<char>(in)),
                                  std::istreambuf_iterator<char>());
  if (data.size() != bytes) {
    Die(path + " holds " + std::to_string(data.size()) + " bytes, expected " +
        std::to_string(bytes));
  }
  return data;
}

void WriteArray(const Spec& spec, const std::string& name, const void* data, size_t bytes) {
  const std::string path = spec.dir() + "/" + name + ".bin";
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr || (bytes > 0 && std::fwrite(data, 1, bytes, f) != bytes)) {
    Die("cannot write " + path);
  }
  std::fclose(f);
}

// `bytes` of emulated device memory at an address = `offset` (mod 256), nothing after it.
class DeviceBuffer {
 public:
  DeviceBuffer(size_t bytes, size_t offset) : bytes_(bytes), offset_(offset) {
    if (posix_memalign(&raw_, 256, offset + bytes + (offset + bytes == 0)) != 0) {
      Die("out of memory");
    }
    POISON(raw_, offset);
    std::memset(data(), 0xff, bytes);
  }
  DeviceBuffer(const std::vector<unsigned char>& host, size_t offset)
      : DeviceBuffer(host.size(), offset) {
    if (!host.empty()) std::memcpy(data(), host.data(), host.size());
  }
  ~DeviceBuffer() {
    UNPOISON(raw_, offset_);
    std::free(raw_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* data() const { return static_cast<unsigned char*>(raw_) + offset_; }
  void Write(const Spec& spec, const std::string& name) const {
    WriteArray(spec, name, data(), bytes_);
  }

 private:
  void* raw_ = nullptr;
  size_t bytes_;
  size_t offset_;
};

fd::ElementType ParseType(const std::string& name) {
  if (name == "f32") return fd::ElementType::kF32;
  if (name == "f64") return fd::ElementType::kF64;
  if (name == "f16") return fd::ElementType::kF16;
  if (name == "bf16") return fd::ElementType::kBF16;
  Die("unknown dtype " + name);
}

size_t ElementBytes(fd::ElementType type) {
  return type == fd::ElementType::kF64 ? 8 : type == fd::ElementType::kF32 ? 4 : 2;
}

template <typename Fn>
void DispatchCpu(fd::ElementType type, Fn&& fn) {
  switch (type) {
    case fd::ElementType::kF32: return fn(float{});
    case fd::ElementType::kF64: return fn(double{});
    case fd::ElementType::kF16: return fn(fd::Float16{});
    case fd::ElementType::kBF16: return fn(fd::BFloat16{});
  }
}

template <typename T>
const T* As(const std::vector<unsigned char>& v) {
  return reinterpret_cast<const T*>(v.data());
}

// The parameters as the FFI checks (xla_ext/dcnv3_ffi.h) derive them.
fd::Dcnv3Params ParamsOf(const Spec& s) {
  fd::Dcnv3Params p{};
  p.batch = s.Int("batch");
  p.height = s.Int("height");
  p.width = s.Int("width");
  p.channels = s.Int("channels");
  p.out_height = s.Int("out_height");
  p.out_width = s.Int("out_width");
  p.kernel_h = s.Int("kernel_h");
  p.kernel_w = s.Int("kernel_w");
  p.stride_h = s.Int("stride_h");
  p.stride_w = s.Int("stride_w");
  p.pad_h = s.Int("pad_h");
  p.pad_w = s.Int("pad_w");
  p.dilation_h = s.Int("dilation_h");
  p.dilation_w = s.Int("dilation_w");
  p.groups = s.Int("groups");
  p.offset_scale = s.Real("offset_scale");
  p.remove_center = s.Int("remove_center") != 0;
  const int64_t points = p.points(), gp = p.groups * points;
  if (s.Int("layout") == 3) {
    p.offset_stride = gp * 2;
    p.offset_group_stride = points * 2;
    p.mask_stride = gp;
    p.mask_group_stride = points;
    p.pad_channels_begin = 0;
  } else {
    const int64_t d = (gp * 3 + 7) / 8 * 8;
    p.offset_stride = p.mask_stride = d;
    p.offset_group_stride = p.mask_group_stride = points * 3;
    p.pad_channels_begin = gp * 3 < d ? gp * 3 : 0;
  }
  return p;
}

void RunDcnv3(const Spec& spec) {
  const fd::ElementType type = ParseType(spec.Str("dtype"));
  const size_t es = ElementBytes(type);
  const fd::Dcnv3Params p = ParamsOf(spec);
  const bool v4 = spec.Int("layout") == 4;
  const int64_t rows = p.batch * p.positions();
  const size_t n_input = p.batch * p.height * p.width * p.channels;
  const size_t n_out = rows * p.channels;
  const size_t n_offset = rows * p.offset_stride;
  const size_t n_mask = v4 ? 0 : rows * p.mask_stride;
  const int64_t shift = v4 ? 2 * p.points() : 0;  // DCNv4's mask inside offset_mask
  const auto input = ReadArray(spec, "input", n_input * es);
  const auto offset = ReadArray(spec, "offset", n_offset * es);
  const auto mask = ReadArray(spec, "mask", n_mask * es);
  const auto cotangent = ReadArray(spec, "cotangent", n_out * es);

  DispatchCpu(type, [&](auto tag) {
    using T = decltype(tag);
    using A = fd::AccType<T>;
    std::vector<T> out(n_out), grad_input(n_input), grad_offset(n_offset), grad_mask(n_mask);
    const T* off = As<T>(offset);
    const T* msk = v4 ? off + shift : As<T>(mask);
    fd::Dcnv3Cpu<T>(p, As<T>(input), off, msk, out.data(), 0, rows);
    std::vector<A> partial(p.samples() * 4);
    for (int64_t task = 0; task < p.batch * p.groups; ++task) {
      fd::Dcnv3BackwardInputCpu<T>(p, 1, task, As<T>(cotangent), As<T>(input), off, msk,
                                   grad_input.data(), partial.data());
    }
    fd::Dcnv3BackwardCoordCpu<T>(p, 1, partial.data(), off, msk, grad_offset.data(),
                                 v4 ? grad_offset.data() + shift : grad_mask.data(), 0, rows);
    WriteArray(spec, "cpu_out", out.data(), n_out * es);
    WriteArray(spec, "cpu_grad_input", grad_input.data(), n_input * es);
    WriteArray(spec, "cpu_grad_offset", grad_offset.data(), n_offset * es);
    WriteArray(spec, "cpu_grad_mask", grad_mask.data(), n_mask * es);
  });

  const size_t at = 16 + static_cast<size_t>(spec.Int("misalign")) * es;
  const DeviceBuffer d_input(input, at), d_offset(offset, at), d_mask(mask, at),
      d_cotangent(cotangent, at);
  const auto* d_off = static_cast<const unsigned char*>(d_offset.data());
  const void* d_msk = v4 ? d_off + shift * es : d_mask.data();
  for (const char* order : {"a", "b"}) {
    simt::SetBlockOrderSeed(spec.Int(std::string("seed_") + order));
    const DeviceBuffer out(n_out * es, at);
    Check(fd::LaunchDcnv3(nullptr, type, p, d_input.data(), d_offset.data(), d_msk, out.data()),
          "LaunchDcnv3");
    out.Write(spec, std::string("cuda_out_") + order);
    for (const bool deterministic : {false, true}) {
      const std::string mode = deterministic ? "det" : "atomic";
      const DeviceBuffer grad_input(n_input * es, at), grad_offset(n_offset * es, at),
          grad_mask(n_mask * es, at);
      // Workspace exactly as aligned as XLA's scratch allocator can be asked for (16 bytes).
      const DeviceBuffer workspace(fd::Dcnv3BackwardWorkspace(type, p, deterministic), 16);
      void* g_msk = v4 ? static_cast<unsigned char*>(grad_offset.data()) + shift * es
                       : grad_mask.data();
      Check(fd::LaunchDcnv3Backward(nullptr, type, p, deterministic, d_cotangent.data(),
                                    d_input.data(), d_offset.data(), d_msk, grad_input.data(),
                                    grad_offset.data(), g_msk, workspace.data()),
            "LaunchDcnv3Backward");
      const std::string suffix = "_" + std::string(order);
      grad_input.Write(spec, "cuda_" + mode + "_grad_input" + suffix);
      grad_offset.Write(spec, "cuda_" + mode + "_grad_offset" + suffix);
      grad_mask.Write(spec, "cuda_" + mode + "_grad_mask" + suffix);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const Spec spec(argv[i]);
    if (spec.Str("op") != "dcnv3") Die("unknown op " + spec.Str("op"));
    RunDcnv3(spec);
  }
  std::printf("%" PRId64 " launches\n", simt::LaunchCount());
  return 0;
}
