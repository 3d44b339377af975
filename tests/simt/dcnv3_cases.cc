// SIMT driver cases of DCNv3 / DCNv4 (op dcnv3): the CUDA launchers (emulated) and the CPU
// kernels on the same inputs, both results written for tests/test_simt_dcnv3.py to compare.
// `layout` is 3 (offsets + mask) or 4 (offset_mask).

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "driver.h"
#include "simt.h"
#include "xla_ext/common/base.h"
#include "xla_ext/common/dcnv3.h"
#include "xla_ext/cpu/dcnv3_kernels.h"
#include "xla_ext/cpu/types.h"
#include "xla_ext/cuda/dcnv3_kernels.h"

namespace simt_driver {
namespace {

// The parameters as the FFI checks (xla_ext/common/dcnv3_ffi.h) derive them.
fd::Dcnv3Params ParamsOf(const Spec& s) {
  fd::Dcnv3Params p{};
  ReadConvShape(s, &p);
  ReadConvWindow(s, &p);
  p.groups = s.Int("groups");
  p.offset_scale = s.Real("offset_scale");
  p.remove_center = s.Int("remove_center") != 0;
  fd::SetDcnv3Layout(&p, s.Int("layout") == 4);
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

  const size_t at = DataOffset(spec, type);
  const DeviceBuffer d_input(input, at), d_offset(offset, at), d_mask(mask, at),
      d_cotangent(cotangent, at);
  const auto* d_off = static_cast<const unsigned char*>(d_offset.data());
  const void* d_msk = v4 ? d_off + shift * es : d_mask.data();
  ForEachBlockOrder(spec, [&](const std::string& order) {
    const DeviceBuffer out(n_out * es, at);
    Check(fd::LaunchDcnv3(nullptr, type, p, d_input.data(), d_offset.data(), d_msk, out.data()),
          "LaunchDcnv3");
    out.Write(spec, "cuda_out_" + order);
    for (const bool deterministic : {false, true}) {
      const std::string mode = deterministic ? "det" : "atomic";
      const DeviceBuffer grad_input(n_input * es, at), grad_offset(n_offset * es, at),
          grad_mask(n_mask * es, at);
      const DeviceBuffer workspace(fd::Dcnv3BackwardWorkspace(type, p, deterministic),
                                   kWorkspaceOffset);
      void* g_msk = v4 ? static_cast<unsigned char*>(grad_offset.data()) + shift * es
                       : grad_mask.data();
      Check(fd::LaunchDcnv3Backward(nullptr, type, p, deterministic, d_cotangent.data(),
                                    d_input.data(), d_offset.data(), d_msk, grad_input.data(),
                                    grad_offset.data(), g_msk, workspace.data()),
            "LaunchDcnv3Backward");
      const std::string suffix = "_" + order;
      grad_input.Write(spec, "cuda_" + mode + "_grad_input" + suffix);
      grad_offset.Write(spec, "cuda_" + mode + "_grad_offset" + suffix);
      grad_mask.Write(spec, "cuda_" + mode + "_grad_mask" + suffix);
    }
  });
}

}  // namespace

FLAXDCN_SIMT_CASE("dcnv3", RunDcnv3);

}  // namespace simt_driver
