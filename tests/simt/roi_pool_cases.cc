// SIMT driver cases of deformable RoI pooling (op roi): the CUDA launchers (emulated) and the CPU
// kernels on the same inputs, both results written for tests/test_simt.py to compare.

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "driver.h"
#include "simt.h"
#include "xla_ext/common/base.h"
#include "xla_ext/common/roi_pool.h"
#include "xla_ext/cpu/roi_pool_kernels.h"
#include "xla_ext/cpu/types.h"
#include "xla_ext/cuda/roi_pool_kernels.h"

namespace simt_driver {
namespace {

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
  ForEachBlockOrder(spec, [&](const std::string& order) {
    const DeviceBuffer pooled(n_pooled * es, at);
    Check(fd::LaunchDeformRoiPool(nullptr, type, p, d_features.data(), d_rois.data(),
                                  d_offset.data(), pooled.data()),
          "LaunchDeformRoiPool");
    pooled.Write(spec, "cuda_pooled_" + order);
    for (const bool deterministic : {false, true}) {
      const std::string mode = deterministic ? "det" : "atomic";
      const DeviceBuffer grad_features(n_features * es, at), grad_offset(n_offset * es, at);
      const DeviceBuffer workspace(fd::DeformRoiPoolBackwardWorkspace(type, p, deterministic),
                                   kWorkspaceOffset);
      Check(fd::LaunchDeformRoiPoolBackward(nullptr, type, p, deterministic, d_cotangent.data(),
                                            d_features.data(), d_rois.data(), d_offset.data(),
                                            grad_features.data(), grad_offset.data(),
                                            workspace.data()),
            "LaunchDeformRoiPoolBackward");
      const std::string suffix = "_" + order;
      grad_features.Write(spec, "cuda_" + mode + "_grad_features" + suffix);
      grad_offset.Write(spec, "cuda_" + mode + "_grad_offset" + suffix);
    }
  });
}

}  // namespace

FLAXDCN_SIMT_CASE("roi", RunRoi);

}  // namespace simt_driver
