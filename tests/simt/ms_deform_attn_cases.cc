// SIMT driver cases of multi-scale deformable attention (op ms_deform_attn): the CUDA launchers
// (emulated) and the CPU kernels on the same inputs, both results written for
// tests/test_simt_ms_deform_attn.py to compare. `spatial_shapes` is "H0,W0,H1,W1,..."; the
// locations and their gradient are in the accumulation type (float64 for f64, float32 otherwise).

#include <cstddef>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "driver.h"
#include "simt.h"
#include "xla_ext/common/base.h"
#include "xla_ext/common/ms_deform_attn.h"
#include "xla_ext/cpu/ms_deform_attn_kernels.h"
#include "xla_ext/cpu/types.h"
#include "xla_ext/cuda/ms_deform_attn_kernels.h"

namespace simt_driver {
namespace {

// The parameters as the FFI checks (xla_ext/common/ms_deform_attn_ffi.h) derive them.
fd::MsDeformAttnParams ParamsOf(const Spec& s) {
  fd::MsDeformAttnParams p{};
  p.batch = s.Int("batch");
  p.heads = s.Int("heads");
  p.head_channels = s.Int("head_channels");
  p.channels = p.heads * p.head_channels;
  p.queries = s.Int("queries");
  p.points = s.Int("points");
  std::vector<int64_t> sizes;
  std::stringstream list(s.Str("spatial_shapes"));
  for (std::string item; std::getline(list, item, ',');) sizes.push_back(std::stoll(item));
  if (sizes.empty() || sizes.size() % 2 != 0 ||
      sizes.size() > 2 * static_cast<size_t>(fd::kMsDeformAttnMaxLevels)) {
    Die("spatial_shapes must be 1 to 16 pairs: " + s.Str("spatial_shapes"));
  }
  p.levels = static_cast<int64_t>(sizes.size() / 2);
  int64_t start = 0;
  for (int64_t l = 0; l < p.levels; ++l) {
    p.height[l] = sizes[2 * l];
    p.width[l] = sizes[2 * l + 1];
    p.level_start[l] = start;
    start += p.height[l] * p.width[l];
  }
  p.values = start;
  return p;
}

void RunMsDeformAttn(const Spec& spec) {
  const fd::ElementType type = ParseType(spec.Str("dtype"));
  const fd::ElementType acc_type =
      type == fd::ElementType::kF64 ? fd::ElementType::kF64 : fd::ElementType::kF32;
  const size_t es = ElementBytes(type);
  const size_t as = ElementBytes(acc_type);
  const fd::MsDeformAttnParams p = ParamsOf(spec);
  const size_t n_value = p.batch * p.values * p.channels;
  const size_t n_out = p.units() * p.head_channels;
  const size_t n_samples = p.samples();
  const auto value = ReadArray(spec, "value", n_value * es);
  const auto locations = ReadArray(spec, "locations", 2 * n_samples * as);
  const auto weights = ReadArray(spec, "weights", n_samples * es);
  const auto cotangent = ReadArray(spec, "cotangent", n_out * es);

  DispatchCpu(type, [&](auto tag) {
    using T = decltype(tag);
    using A = fd::AccType<T>;
    std::vector<T> out(n_out), grad_value(n_value), grad_weights(n_samples);
    std::vector<A> grad_locations(2 * n_samples);
    const A* loc = As<A>(locations);
    fd::MsDeformAttnCpu<T>(p, As<T>(value), loc, As<T>(weights), out.data(), 0,
                           p.batch * p.queries);
    for (int64_t task = 0; task < p.batch * p.heads; ++task) {  // one channel block
      fd::MsDeformAttnBackwardValueCpu<T>(p, 1, task, As<T>(cotangent), As<T>(value), loc,
                                          As<T>(weights), grad_value.data(), nullptr,
                                          grad_locations.data(), grad_weights.data());
    }
    WriteArray(spec, "cpu_out", out.data(), n_out * es);
    WriteArray(spec, "cpu_grad_value", grad_value.data(), n_value * es);
    WriteArray(spec, "cpu_grad_locations", grad_locations.data(), 2 * n_samples * as);
    WriteArray(spec, "cpu_grad_weights", grad_weights.data(), n_samples * es);
  });

  const size_t at = DataOffset(spec, type);
  const size_t acc_at = DataOffset(spec, acc_type);  // the locations stay aligned to their type
  const DeviceBuffer d_value(value, at), d_locations(locations, acc_at), d_weights(weights, at),
      d_cotangent(cotangent, at);
  ForEachBlockOrder(spec, [&](const std::string& order) {
    const DeviceBuffer out(n_out * es, at);
    Check(fd::LaunchMsDeformAttn(nullptr, type, p, d_value.data(), d_locations.data(),
                                 d_weights.data(), out.data()),
          "LaunchMsDeformAttn");
    out.Write(spec, "cuda_out_" + order);
    for (const bool deterministic : {false, true}) {
      const std::string mode = deterministic ? "det" : "atomic";
      const DeviceBuffer grad_value(n_value * es, at), grad_locations(2 * n_samples * as, acc_at),
          grad_weights(n_samples * es, at);
      const DeviceBuffer workspace(fd::MsDeformAttnBackwardWorkspace(type, p, deterministic),
                                   kWorkspaceOffset);
      Check(fd::LaunchMsDeformAttnBackward(nullptr, type, p, deterministic, d_cotangent.data(),
                                           d_value.data(), d_locations.data(), d_weights.data(),
                                           grad_value.data(), grad_locations.data(),
                                           grad_weights.data(), workspace.data()),
            "LaunchMsDeformAttnBackward");
      const std::string suffix = "_" + order;
      grad_value.Write(spec, "cuda_" + mode + "_grad_value" + suffix);
      grad_locations.Write(spec, "cuda_" + mode + "_grad_locations" + suffix);
      grad_weights.Write(spec, "cuda_" + mode + "_grad_weights" + suffix);
    }
  });
}

}  // namespace

FLAXDCN_SIMT_CASE("ms_deform_attn", RunMsDeformAttn);

}  // namespace simt_driver
