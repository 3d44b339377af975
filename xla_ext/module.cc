// The Python module: hands out the FFI handler capsules and the facts of this build.

#include <type_traits>

#include "pybind11/pybind11.h"
#include "xla/ffi/api/c_api.h"
#include "xla_ext/common/dcnv3_handlers.h"
#include "xla_ext/common/handlers.h"

#ifdef FLAXDCN_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace {

namespace py = pybind11;

template <typename T>
py::capsule EncapsulateHandler(T* fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, T, XLA_FFI_CallFrame*>,
                "an XLA FFI handler");
  return py::capsule(reinterpret_cast<void*>(fn));
}

py::dict Targets(py::capsule im2col, py::capsule im2col_bwd, py::capsule roi_pool,
                 py::capsule roi_pool_bwd) {
  py::dict targets;
  targets["flaxdcn_deform_im2col"] = im2col;
  targets["flaxdcn_deform_im2col_bwd"] = im2col_bwd;
  targets["flaxdcn_deform_roi_pool"] = roi_pool;
  targets["flaxdcn_deform_roi_pool_bwd"] = roi_pool_bwd;
  return targets;
}

// The DCNv3 / DCNv4 targets, added to a platform's `targets`.
void AddDcnv3Targets(py::dict targets, py::capsule dcnv3, py::capsule dcnv3_bwd,
                     py::capsule dcnv4, py::capsule dcnv4_bwd) {
  targets["flaxdcn_dcnv3"] = dcnv3;
  targets["flaxdcn_dcnv3_bwd"] = dcnv3_bwd;
  targets["flaxdcn_dcnv4"] = dcnv4;
  targets["flaxdcn_dcnv4_bwd"] = dcnv4_bwd;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "flaxdcn native kernels: XLA FFI handler capsules and build facts.";

  m.def("registrations", []() {
    py::dict registrations;
    registrations["cpu"] = Targets(EncapsulateHandler(FlaxdcnDeformIm2colCpu),
                                   EncapsulateHandler(FlaxdcnDeformIm2colBwdCpu),
                                   EncapsulateHandler(FlaxdcnDeformRoiPoolCpu),
                                   EncapsulateHandler(FlaxdcnDeformRoiPoolBwdCpu));
    AddDcnv3Targets(py::dict(registrations["cpu"]), EncapsulateHandler(FlaxdcnDcnv3Cpu),
                    EncapsulateHandler(FlaxdcnDcnv3BwdCpu), EncapsulateHandler(FlaxdcnDcnv4Cpu),
                    EncapsulateHandler(FlaxdcnDcnv4BwdCpu));
#ifdef FLAXDCN_WITH_CUDA
    registrations["CUDA"] = Targets(EncapsulateHandler(FlaxdcnDeformIm2colCuda),
                                    EncapsulateHandler(FlaxdcnDeformIm2colBwdCuda),
                                    EncapsulateHandler(FlaxdcnDeformRoiPoolCuda),
                                    EncapsulateHandler(FlaxdcnDeformRoiPoolBwdCuda));
    AddDcnv3Targets(py::dict(registrations["CUDA"]), EncapsulateHandler(FlaxdcnDcnv3Cuda),
                    EncapsulateHandler(FlaxdcnDcnv3BwdCuda), EncapsulateHandler(FlaxdcnDcnv4Cuda),
                    EncapsulateHandler(FlaxdcnDcnv4BwdCuda));
#endif
    return registrations;
  }, "{platform: {target name: handler capsule}} of the kernels in this build.");

  m.def("build_info", []() {
    py::dict info;
    info["cpu"] = true;
    info["ffi_api"] = py::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
#ifdef FLAXDCN_WITH_CUDA
    info["cuda"] = true;
    info["cuda_runtime"] = py::make_tuple(CUDART_VERSION / 1000, (CUDART_VERSION % 1000) / 10);
    info["cuda_architectures"] = FLAXDCN_CUDA_ARCHITECTURES;
    // The CUDA version the installed driver supports; 0 (None here) when no driver is installed.
    // The static runtime above needs a driver of at least its own major version.
    int driver = 0;
    if (cudaDriverGetVersion(&driver) != cudaSuccess) driver = 0;
    if (driver > 0) {
      info["cuda_driver"] = py::make_tuple(driver / 1000, (driver % 1000) / 10);
    } else {
      info["cuda_driver"] = py::none();
    }
#else
    info["cuda"] = false;
#endif
    return info;
  }, "Facts of this build: kernels per platform, XLA FFI API version, CUDA runtime, "
     "architectures and the installed driver's CUDA version.");
}
