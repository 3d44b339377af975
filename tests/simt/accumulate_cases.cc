// SIMT driver cases of the CUDA backward's grad accumulation (ops maxabs, scale, info): the
// fixed-point helpers of xla_ext/cuda/accumulate.h (emulated), and the workspace alignment the
// launchers ask for.

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>

#include "driver.h"
#include "simt.h"
#include "xla_ext/cuda/accumulate.h"

namespace simt_driver {
namespace {

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

FLAXDCN_SIMT_CASE("maxabs", RunMaxAbs);
FLAXDCN_SIMT_CASE("scale", RunScale);
FLAXDCN_SIMT_CASE("info", RunInfo);

}  // namespace simt_driver
