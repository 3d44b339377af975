// Test driver of the SIMT emulation: runs the CUDA launchers (emulated) and the CPU kernels on
// the same inputs and writes both results for tests/test_simt.py to compare.
//
// Usage: driver CASE_DIR...  Each CASE_DIR holds spec.txt ("key value" lines; `op` is conv, roi,
// maxabs, scale or info) and the inputs as raw little-endian arrays in the element type; the
// driver writes its outputs there as <producer>_<name>.bin. Every CUDA launcher runs with two
// block orders (seeds a and b), on device buffers that start 16 bytes past a 256-byte boundary
// (plus `misalign` elements) and are exactly as long as their data, with the bytes before them
// poisoned for AddressSanitizer; outputs and workspace start as 0xff bytes (NaN).

#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "simt.h"
#include "xla_ext/common/base.h"
#include "xla_ext/common/deform_conv.h"
#include "xla_ext/common/roi_pool.h"
#include "xla_ext/cpu/deform_conv_kernels.h"
#include "xla_ext/cpu/roi_pool_kernels.h"
#include "xla_ext/cpu/types.h"
#include "xla_ext/cuda/accumulate.h"
#include "xla_ext/cuda/deform_conv_kernels.h"
#include "xla_ext/cuda/roi_pool_kernels.h"

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
  std::fprintf(stderr, "driver: %s\n", message.c_str());
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
  bool Has(const std::string& key) const { return values_.count(key) > 0; }

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
  size_t bytes() const { return bytes_; }
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

// Calls fn(T{}) with T the CPU kernels' element type of `type`.
template <typename Fn>
void DispatchCpu(fd::ElementType type, Fn&& fn) {
  switch (type) {
    case fd::ElementType::kF32: return fn(float{});
    case fd::ElementType::kF64: return fn(double{});
    case fd::ElementType::kF16: return fn(fd::Float16{});
    case fd::ElementType::kBF16: return fn(fd::BFloat16{});
  }
}

constexpr size_t kDataOffset = 16;  // 16-byte aligned, not 32

size_t DataOffset(const Spec& spec, fd::ElementType type) {
  return kDataOffset + static_cast<size_t>(spec.Int("misalign")) * ElementBytes(type);
}

// Workspace exactly as aligned as XLA's scratch allocator can be asked for (16 bytes), no more.
size_t WorkspaceOffset() { return 16; }

template <typename T>
const T* As(const std::vector<unsigned char>& v) {
  return reinterpret_cast<const T*>(v.data());
}

// --- Convolution sampling ----------------------------------------------------------------------

fd::ConvParams ConvParamsOf(const Spec& s) {
  fd::ConvParams p{};
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
  p.offset_groups = s.Int("offset_groups");
  p.has_mask = s.Int("has_mask") != 0;
  return p;
}

void RunConv(const Spec& spec) {
  const fd::ElementType type = ParseType(spec.Str("dtype"));
  const size_t es = ElementBytes(type);
  const fd::ConvParams p = ConvParamsOf(spec);
  const int64_t positions = p.batch * p.positions();
  const size_t n_input = p.batch * p.height * p.width * p.channels;
  const size_t n_offset = positions * p.offset_groups * p.kernel_points() * 2;
  const size_t n_mask = p.has_mask ? n_offset / 2 : 0;
  const size_t n_columns = positions * p.kernel_points() * p.channels;
  const auto input = ReadArray(spec, "input", n_input * es);
  const auto offset = ReadArray(spec, "offset", n_offset * es);
  const auto mask = ReadArray(spec, "mask", n_mask * es);
  const auto cotangent = ReadArray(spec, "cotangent", n_columns * es);

  // The CPU kernels.
  DispatchCpu(type, [&](auto tag) {
    using T = decltype(tag);
    using A = fd::AccType<T>;
    std::vector<T> columns(n_columns), grad_input(n_input), grad_offset(n_offset),
        grad_mask(n_mask);
    fd::DeformIm2colCpu<T>(p, As<T>(input), As<T>(offset), As<T>(mask), columns.data(), 0,
                           positions);
    std::vector<A> partial(p.samples() * 4);
    for (int64_t task = 0; task < p.batch * p.offset_groups; ++task) {
      fd::DeformIm2colBackwardInputCpu<T>(p, 1, task, As<T>(cotangent), As<T>(input),
                                          As<T>(offset), As<T>(mask), grad_input.data(),
                                          partial.data());
    }
    fd::DeformIm2colBackwardCoordCpu<T>(p, 1, partial.data(), As<T>(offset), As<T>(mask),
                                        grad_offset.data(), grad_mask.data(), 0, positions);
    WriteArray(spec, "cpu_columns", columns.data(), n_columns * es);
    WriteArray(spec, "cpu_grad_input", grad_input.data(), n_input * es);
    WriteArray(spec, "cpu_grad_offset", grad_offset.data(), n_offset * es);
    WriteArray(spec, "cpu_grad_mask", grad_mask.data(), n_mask * es);
  });

  // The CUDA launchers.
  const size_t at = DataOffset(spec, type);
  const DeviceBuffer d_input(input, at), d_offset(offset, at), d_mask(mask, at),
      d_cotangent(cotangent, at);
  for (const char* order : {"a", "b"}) {
    simt::SetBlockOrderSeed(spec.Int(std::string("seed_") + order));
    const DeviceBuffer columns(n_columns * es, at);
    Check(fd::LaunchDeformIm2col(nullptr, type, p, d_input.data(), d_offset.data(),
                                 d_mask.data(), columns.data()),
          "LaunchDeformIm2col");
    columns.Write(spec, std::string("cuda_columns_") + order);
    for (const bool deterministic : {false, true}) {
      const std::string mode = deterministic ? "det" : "atomic";
      const DeviceBuffer grad_input(n_input * es, at), grad_offset(n_offset * es, at),
          grad_mask(n_mask * es, at);
      const DeviceBuffer workspace(fd::DeformIm2colBackwardWorkspace(type, p, deterministic),
                                   WorkspaceOffset());
      Check(fd::LaunchDeformIm2colBackward(nullptr, type, p, deterministic, d_cotangent.data(),
                                           d_input.data(), d_offset.data(), d_mask.data(),
                                           grad_input.data(), grad_offset.data(),
                                           grad_mask.data(), workspace.data()),
            "LaunchDeformIm2colBackward");
      const std::string suffix = "_" + std::string(order);
      grad_input.Write(spec, "cuda_" + mode + "_grad_input" + suffix);
      grad_offset.Write(spec, "cuda_" + mode + "_grad_offset" + suffix);
      grad_mask.Write(spec, "cuda_" + mode + "_grad_mask" + suffix);
    }
  }
}

// --- RoI pooling -------------------------------------------------------------------------------

fd::RoiPoolParams RoiParamsOf(const Spec& s) {
  fd::RoiPoolParams p{};
  p.batch = s.Int("batch");
  p.height = s.Int("height");
  p.width = s.Int("width");
  p.channels = s.Int("channels");
  p.rois = s.Int("rois");
  p.out_height = s.Int("out_height");
  p.out_width = s.Int("out_width");
  p.spatial_scale = s.Real("spatial_scale");
  p.sampling_ratio = s.Int("sampling_ratio");
  p.gamma = s.Real("gamma");
  p.has_offsets = s.Int("has_offsets") != 0;
  return p;
}

void RunRoi(const Spec& spec) {
  const fd::ElementType type = ParseType(spec.Str("dtype"));
  const size_t es = ElementBytes(type);
  const size_t acc_bytes = type == fd::ElementType::kF64 ? 8 : 4;
  const fd::RoiPoolParams p = RoiParamsOf(spec);
  const size_t n_features = p.batch * p.height * p.width * p.channels;
  const size_t n_offset = p.has_offsets ? p.bins() * 2 : 0;
  const size_t n_pooled = p.bins() * p.channels;
  const auto features = ReadArray(spec, "features", n_features * es);
  const auto rois = ReadArray(spec, "rois", p.rois * 5 * acc_bytes);
  const auto offset = ReadArray(spec, "offset", n_offset * es);
  const auto cotangent = ReadArray(spec, "cotangent", n_pooled * es);

  DispatchCpu(type, [&](auto tag) {
    using T = decltype(tag);
    using A = fd::AccType<T>;
    std::vector<T> pooled(n_pooled), grad_features(n_features), grad_offset(n_offset);
    std::vector<A> acc(n_features, A(0));
    fd::DeformRoiPoolCpu<T>(p, As<T>(features), As<A>(rois), As<T>(offset), pooled.data(), 0,
                            p.bins());
    fd::DeformRoiPoolBackwardFeaturesCpu<T>(p, As<T>(cotangent), As<A>(rois), As<T>(offset),
                                            acc.data(), 0, p.channels);
    fd::StoreCpu<T>(acc.data(), grad_features.data(), 0, n_features);
    if (p.has_offsets) {
      fd::DeformRoiPoolBackwardOffsetCpu<T>(p, As<T>(cotangent), As<T>(features), As<A>(rois),
                                            As<T>(offset), grad_offset.data(), 0, p.bins());
    }
    WriteArray(spec, "cpu_pooled", pooled.data(), n_pooled * es);
    WriteArray(spec, "cpu_grad_features", grad_features.data(), n_features * es);
    WriteArray(spec, "cpu_grad_offset", grad_offset.data(), n_offset * es);
  });

  const size_t at = DataOffset(spec, type);
  // The RoIs are a float32/float64 array of their own: never misaligned by the element size.
  const DeviceBuffer d_features(features, at), d_rois(rois, kDataOffset), d_offset(offset, at),
      d_cotangent(cotangent, at);
  for (const char* order : {"a", "b"}) {
    simt::SetBlockOrderSeed(spec.Int(std::string("seed_") + order));
    const DeviceBuffer pooled(n_pooled * es, at);
    Check(fd::LaunchDeformRoiPool(nullptr, type, p, d_features.data(), d_rois.data(),
                                  d_offset.data(), pooled.data()),
          "LaunchDeformRoiPool");
    pooled.Write(spec, std::string("cuda_pooled_") + order);
    for (const bool deterministic : {false, true}) {
      const std::string mode = deterministic ? "det" : "atomic";
      const DeviceBuffer grad_features(n_features * es, at), grad_offset(n_offset * es, at);
      const DeviceBuffer workspace(fd::DeformRoiPoolBackwardWorkspace(type, p, deterministic),
                                   WorkspaceOffset());
      Check(fd::LaunchDeformRoiPoolBackward(nullptr, type, p, deterministic, d_cotangent.data(),
                                            d_features.data(), d_rois.data(), d_offset.data(),
                                            grad_features.data(), grad_offset.data(),
                                            workspace.data()),
            "LaunchDeformRoiPoolBackward");
      const std::string suffix = "_" + std::string(order);
      grad_features.Write(spec, "cuda_" + mode + "_grad_features" + suffix);
      grad_offset.Write(spec, "cuda_" + mode + "_grad_offset" + suffix);
    }
  }
}

// --- The accumulation helpers ------------------------------------------------------------------

// max |x| over the finite entries, into slot `slot` of a zeroed pair.
void RunMaxAbs(const Spec& spec) {
  const fd::ElementType type = ParseType(spec.Str("dtype"));
  const int64_t n = spec.Int("n");
  const int slot = static_cast<int>(spec.Int("slot"));
  const auto x = ReadArray(spec, "x", n * ElementBytes(type));
  const DeviceBuffer d_x(x, DataOffset(spec, type));
  const DeviceBuffer bits(2 * sizeof(unsigned long long), kDataOffset);
  std::memset(bits.data(), 0, bits.bytes());
  simt::SetBlockOrderSeed(spec.Int("seed_a"));
  Check(fd::cuda::LaunchMaxAbs(nullptr, type, d_x.data(), n,
                               static_cast<unsigned long long*>(bits.data()), slot),
        "LaunchMaxAbs");
  bits.Write(spec, "cuda_max_bits");
}

// The fixed-point scale of the maxima `first` and `second` (hexadecimal bit patterns).
void RunScale(const Spec& spec) {
  const DeviceBuffer bits(2 * sizeof(unsigned long long), kDataOffset);
  auto* b = static_cast<unsigned long long*>(bits.data());
  b[0] = std::stoull(spec.Str("first_bits"), nullptr, 16);
  b[1] = std::stoull(spec.Str("second_bits"), nullptr, 16);
  const DeviceBuffer scale(sizeof(double) * 2, kDataOffset);
  fd::cuda::GradBuffers buffers{};
  buffers.max_bits = b;
  buffers.scale = static_cast<fd::cuda::FixedScale*>(scale.data());
  Check(fd::cuda::LaunchFixedPointScale(nullptr, buffers, spec.Int("use_second") != 0,
                                        spec.Real("factor")),
        "LaunchFixedPointScale");
  scale.Write(spec, "cuda_scale");
}

void RunInfo(const Spec& spec) {
  std::ofstream out(spec.dir() + "/info.txt");
  out << "workspace_alignment " << fd::kWorkspaceAlignment << "\n";
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const Spec spec(argv[i]);
    const std::string op = spec.Str("op");
    if (op == "conv") {
      RunConv(spec);
    } else if (op == "roi") {
      RunRoi(spec);
    } else if (op == "maxabs") {
      RunMaxAbs(spec);
    } else if (op == "scale") {
      RunScale(spec);
    } else if (op == "info") {
      RunInfo(spec);
    } else {
      Die("unknown op " + op);
    }
  }
  std::printf("%" PRId64 " launches\n", simt::LaunchCount());
  return 0;
}
