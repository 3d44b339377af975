// The SIMT test driver's library and main (see driver.h): runs every CASE_DIR on the command line
// through the case its spec names.

#include "driver.h"

#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "simt.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define POISON(p, n) ((void)(p), (void)(n))
#define UNPOISON(p, n) ((void)(p), (void)(n))
#endif

namespace simt_driver {
namespace {

// Function-local, so that registrations from other units' static initialisers find it built.
std::map<std::string, void (*)(const Spec&)>& Registry() {
  static std::map<std::string, void (*)(const Spec&)> cases;
  return cases;
}

}  // namespace

void Die(const std::string& message) {
  std::fprintf(stderr, "driver: %s\n", message.c_str());
  std::exit(4);
}

void Check(cudaError_t status, const std::string& what) {
  if (status != cudaSuccess) Die(what + " returned " + cudaGetErrorName(status));
}

Spec::Spec(const std::string& dir) : dir_(dir) {
  std::ifstream in(dir + "/spec.txt");
  if (!in) Die("cannot read " + dir + "/spec.txt");
  std::string key, value;
  while (in >> key >> value) values_[key] = value;
}

std::string Spec::Str(const std::string& key) const {
  auto it = values_.find(key);
  if (it == values_.end()) Die(dir_ + ": spec has no " + key);
  return it->second;
}

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

DeviceBuffer::DeviceBuffer(size_t bytes, size_t offset) : bytes_(bytes), offset_(offset) {
  if (posix_memalign(&raw_, 256, offset + bytes + (offset + bytes == 0)) != 0) {
    Die("out of memory");
  }
  POISON(raw_, offset);
  std::memset(data(), 0xff, bytes);
}

DeviceBuffer::DeviceBuffer(const std::vector<unsigned char>& host, size_t offset)
    : DeviceBuffer(host.size(), offset) {
  if (!host.empty()) std::memcpy(data(), host.data(), host.size());
}

DeviceBuffer::~DeviceBuffer() {
  UNPOISON(raw_, offset_);
  std::free(raw_);
}

void DeviceBuffer::Write(const Spec& spec, const std::string& name) const {
  WriteArray(spec, name, data(), bytes_);
}

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

size_t DataOffset(const Spec& spec, fd::ElementType type) {
  return kDataOffset + static_cast<size_t>(spec.Int("misalign")) * ElementBytes(type);
}

void ReadConvShape(const Spec& spec, fd::ConvShape* shape) {
  shape->batch = spec.Int("batch");
  shape->height = spec.Int("height");
  shape->width = spec.Int("width");
  shape->channels = spec.Int("channels");
  shape->out_height = spec.Int("out_height");
  shape->out_width = spec.Int("out_width");
}

void ReadConvWindow(const Spec& spec, fd::ConvWindow* window) {
  window->kernel_h = spec.Int("kernel_h");
  window->kernel_w = spec.Int("kernel_w");
  window->stride_h = spec.Int("stride_h");
  window->stride_w = spec.Int("stride_w");
  window->pad_h = spec.Int("pad_h");
  window->pad_w = spec.Int("pad_w");
  window->dilation_h = spec.Int("dilation_h");
  window->dilation_w = spec.Int("dilation_w");
}

CaseRegistration::CaseRegistration(const char* name, void (*run)(const Spec&)) {
  if (!Registry().emplace(name, run).second) Die(std::string("case registered twice: ") + name);
}

}  // namespace simt_driver

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const simt_driver::Spec spec(argv[i]);
    const std::string op = spec.Str("op");
    const auto it = simt_driver::Registry().find(op);
    if (it == simt_driver::Registry().end()) simt_driver::Die("unknown op " + op);
    it->second(spec);
  }
  std::printf("%" PRId64 " launches\n", simt::LaunchCount());
  return 0;
}
