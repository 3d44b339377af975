// SIMT driver cases of the deformable im2col (op conv): the CUDA launchers (emulated) and the CPU
// kernels on the same inputs, both results written for tests/test_simt.py to compare.

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "driver.h"
#include "simt.h"
#include "xla_ext/common/base.h"
#include "xla_ext/common/deform_conv.h"
#include "xla_ext/cpu/deform_conv_kernels.h"
#include "xla_ext/cpu/types.h"
#include "xla_ext/cuda/deform_conv_kernels.h"

namespace simt_driver {
namespace {

fd::ConvParams ConvParamsOf(const Spec& s) {
  fd::ConvParams p{};
  ReadConvShape(s, &p);
  ReadConvWindow(s, &p);
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
  ForEachBlockOrder(spec, [&](const std::string& order) {
    const DeviceBuffer columns(n_columns * es, at);
    Check(fd::LaunchDeformIm2col(nullptr, type, p, d_input.data(), d_offset.data(),
                                 d_mask.data(), columns.data()),
          "LaunchDeformIm2col");
    columns.Write(spec, "cuda_columns_" + order);
    for (const bool deterministic : {false, true}) {
      const std::string mode = deterministic ? "det" : "atomic";
      const DeviceBuffer grad_input(n_input * es, at), grad_offset(n_offset * es, at),
          grad_mask(n_mask * es, at);
      const DeviceBuffer workspace(fd::DeformIm2colBackwardWorkspace(type, p, deterministic),
                                   kWorkspaceOffset);
      Check(fd::LaunchDeformIm2colBackward(nullptr, type, p, deterministic, d_cotangent.data(),
                                           d_input.data(), d_offset.data(), d_mask.data(),
                                           grad_input.data(), grad_offset.data(),
                                           grad_mask.data(), workspace.data()),
            "LaunchDeformIm2colBackward");
      const std::string suffix = "_" + order;
      grad_input.Write(spec, "cuda_" + mode + "_grad_input" + suffix);
      grad_offset.Write(spec, "cuda_" + mode + "_grad_offset" + suffix);
      grad_mask.Write(spec, "cuda_" + mode + "_grad_mask" + suffix);
    }
  });
}

}  // namespace

FLAXDCN_SIMT_CASE("conv", RunConv);

}  // namespace simt_driver
