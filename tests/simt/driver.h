// The SIMT test driver's library: the case format, array files, emulated device buffers and the
// registry of per-op cases (tests/simt/<op>_cases.cc). tests/test_simt.py links driver.cc, every
// cases file, the CUDA sources (rewritten) and the CPU kernels into one binary.
//
// Usage: driver CASE_DIR...  Each CASE_DIR holds spec.txt ("key value" lines; `op` names a
// registered case) and the inputs as raw little-endian arrays in the element type; the case
// writes its outputs there as <producer>_<name>.bin. Every CUDA launcher runs with two block
// orders (seeds a and b, `ForEachBlockOrder`), on device buffers that start 16 bytes past a
// 256-byte boundary (plus `misalign` elements) and are exactly as long as their data, with the
// bytes before them poisoned for AddressSanitizer; outputs and workspace start as 0xff bytes
// (NaN).

#ifndef FLAXDCN_TESTS_SIMT_DRIVER_H_
#define FLAXDCN_TESTS_SIMT_DRIVER_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "simt.h"
#include "xla_ext/common/base.h"
#include "xla_ext/common/deform_conv.h"
#include "xla_ext/cpu/types.h"

namespace simt_driver {

namespace fd = ::flaxdcn;

// Reports a broken case (missing file, bad spec) and exits with status 4.
[[noreturn]] void Die(const std::string& message);

// Dies unless `status` is cudaSuccess; `what` names the call.
void Check(cudaError_t status, const std::string& what);

class Spec {
 public:
  explicit Spec(const std::string& dir);
  const std::string& dir() const { return dir_; }
  std::string Str(const std::string& key) const;
  int64_t Int(const std::string& key) const { return std::stoll(Str(key)); }
  double Real(const std::string& key) const { return std::stod(Str(key)); }

 private:
  std::string dir_;
  std::map<std::string, std::string> values_;
};

// <dir>/<name>.bin, which must hold exactly `bytes` bytes.
std::vector<unsigned char> ReadArray(const Spec& spec, const std::string& name, size_t bytes);
void WriteArray(const Spec& spec, const std::string& name, const void* data, size_t bytes);

// `bytes` of emulated device memory at an address = `offset` (mod 256), nothing after it, the
// `offset` bytes before it poisoned; it starts as 0xff bytes, or as a copy of `host`.
class DeviceBuffer {
 public:
  DeviceBuffer(size_t bytes, size_t offset);
  DeviceBuffer(const std::vector<unsigned char>& host, size_t offset);
  ~DeviceBuffer();
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* data() const { return static_cast<unsigned char*>(raw_) + offset_; }
  size_t bytes() const { return bytes_; }
  void Write(const Spec& spec, const std::string& name) const;

 private:
  void* raw_ = nullptr;
  size_t bytes_;
  size_t offset_;
};

// `dtype` of the spec: f32, f64, f16 or bf16.
fd::ElementType ParseType(const std::string& name);
size_t ElementBytes(fd::ElementType type);

// Where a case's device arrays start: 16 bytes past a 256-byte boundary (16-byte aligned, not
// 32) plus `misalign` elements.
constexpr size_t kDataOffset = 16;
size_t DataOffset(const Spec& spec, fd::ElementType type);
// Workspace exactly as aligned as XLA's scratch allocator can be asked for (16 bytes), no more.
constexpr size_t kWorkspaceOffset = 16;

// Calls fn(order) for the block orders "a" and "b" after seeding the emulation with the spec's
// seed_a, seed_b.
template <typename Fn>
void ForEachBlockOrder(const Spec& spec, Fn&& fn) {
  for (const std::string order : {"a", "b"}) {
    simt::SetBlockOrderSeed(spec.Int("seed_" + order));
    fn(order);
  }
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

template <typename T>
const T* As(const std::vector<unsigned char>& v) {
  return reinterpret_cast<const T*>(v.data());
}

// The spec's batch, height, width, channels, out_height and out_width.
void ReadConvShape(const Spec& spec, fd::ConvShape* shape);
// The spec's kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h and dilation_w.
void ReadConvWindow(const Spec& spec, fd::ConvWindow* window);

// Registers `run` for the cases whose spec says `op NAME` (at static initialisation).
struct CaseRegistration {
  CaseRegistration(const char* name, void (*run)(const Spec&));
};

}  // namespace simt_driver

#define FLAXDCN_SIMT_CASE(name, run) \
  static const ::simt_driver::CaseRegistration kRegistration_##run(name, run)

#endif  // FLAXDCN_TESTS_SIMT_DRIVER_H_
