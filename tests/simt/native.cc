// A stand-in for flaxdcn's native module (test only): the CUDA FFI handlers of every target
// (xla_ext/cuda/<op>_ffi.cc), with their kernels under the SIMT emulation, registered as the CPU
// targets. tests/test_simt.py imports it as `flaxdcn._native` in a subprocess, so that
// implementation="ffi" on the CPU runs the CUDA handler, launcher and kernel code.
//
// Each handler call is forwarded to the CUDA handler with an API table whose stream query
// returns a null stream and whose device allocator behaves as XLA's does: it rejects alignments
// above 16 bytes, and hands out blocks 16 bytes past a 256-byte boundary. Calls are serialised
// (the emulation runs one kernel at a time).

#include <cstdlib>
#include <cstring>
#include <mutex>

#include "pybind11/pybind11.h"
#include "xla/ffi/api/c_api.h"
#include "xla/ffi/api/ffi.h"
#include "xla_ext/common/handlers.h"

namespace {

namespace py = pybind11;

constexpr size_t kXlaMaxAlignment = 16;
constexpr size_t kOffset = 16;  // past a 256-byte boundary: 16-byte aligned, no more

const XLA_FFI_Api* real_api = nullptr;

XLA_FFI_Error* MakeError(XLA_FFI_Error_Code code, const char* message) {
  XLA_FFI_Error_Create_Args args;
  args.struct_size = XLA_FFI_Error_Create_Args_STRUCT_SIZE;
  args.extension_start = nullptr;
  args.message = message;
  args.errc = code;
  return real_api->XLA_FFI_Error_Create(&args);
}

XLA_FFI_Error* NullStream(XLA_FFI_Stream_Get_Args* args) {
  args->stream = nullptr;
  return nullptr;
}

XLA_FFI_Error* Allocate(XLA_FFI_DeviceMemory_Allocate_Args* args) {
  if (args->alignment > kXlaMaxAlignment) {
    return MakeError(XLA_FFI_Error_Code_UNIMPLEMENTED, "Unsupported alignment");
  }
  void* raw = nullptr;
  if (posix_memalign(&raw, 256, args->size + kOffset) != 0) {
    return MakeError(XLA_FFI_Error_Code_RESOURCE_EXHAUSTED, "out of memory");
  }
  std::memset(raw, 0xff, args->size + kOffset);  // device memory starts as garbage
  args->data = static_cast<char*>(raw) + kOffset;
  return nullptr;
}

XLA_FFI_Error* Free(XLA_FFI_DeviceMemory_Free_Args* args) {
  if (args->data != nullptr) std::free(static_cast<char*>(args->data) - kOffset);
  return nullptr;
}

std::mutex emulation;

template <XLA_FFI_Error* (*Handler)(XLA_FFI_CallFrame*)>
XLA_FFI_Error* OnCpu(XLA_FFI_CallFrame* frame) {
  std::lock_guard<std::mutex> lock(emulation);
  real_api = frame->api;
  XLA_FFI_Api api = *frame->api;
  api.XLA_FFI_Stream_Get = NullStream;
  api.XLA_FFI_DeviceMemory_Allocate = Allocate;
  api.XLA_FFI_DeviceMemory_Free = Free;
  XLA_FFI_CallFrame forwarded = *frame;
  forwarded.api = &api;
  return Handler(&forwarded);
}

template <XLA_FFI_Error* (*Handler)(XLA_FFI_CallFrame*)>
py::capsule Capsule() {
  return py::capsule(reinterpret_cast<void*>(&OnCpu<Handler>));
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "flaxdcn's CUDA FFI handlers under the SIMT emulation, as CPU targets (tests only).";
  m.def("registrations", []() {
    py::dict targets;
#define FLAXDCN_ADD_EMULATED(name, stem) targets[name] = Capsule<Flaxdcn##stem##Cuda>();
    FLAXDCN_FOR_EACH_TARGET(FLAXDCN_ADD_EMULATED)
#undef FLAXDCN_ADD_EMULATED
    py::dict registrations;
    registrations["cpu"] = targets;
    return registrations;
  });
  m.def("build_info", []() {
    py::dict info;
    info["cpu"] = true;
    info["cuda"] = false;
    info["simt"] = true;
    info["ffi_api"] = py::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
    return info;
  });
}
