// The Python module: hands out the FFI handler capsules and the facts of this build.

#include <type_traits>

#include "pybind11/pybind11.h"
#include "xla/ffi/api/c_api.h"
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

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "flaxdcn native kernels: XLA FFI handler capsules and build facts.";

  m.def("registrations", []() {
    py::dict cpu;
#define FLAXDCN_ADD_CPU(name, stem) cpu[name] = EncapsulateHandler(Flaxdcn##stem##Cpu);
    FLAXDCN_FOR_EACH_TARGET(FLAXDCN_ADD_CPU)
#undef FLAXDCN_ADD_CPU
    py::dict registrations;
    registrations["cpu"] = cpu;
#ifdef FLAXDCN_WITH_CUDA
    py::dict cuda;
#define FLAXDCN_ADD_CUDA(name, stem) cuda[name] = EncapsulateHandler(Flaxdcn##stem##Cuda);
    FLAXDCN_FOR_EACH_TARGET(FLAXDCN_ADD_CUDA)
#undef FLAXDCN_ADD_CUDA
    registrations["CUDA"] = cuda;
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
