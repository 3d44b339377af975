// The CUDA backend's FFI context: XLA's stream and its scratch allocator, decoded as one value
// (`.Ctx<CudaContext>()`), and the helpers of the CUDA launches of common/<op>_ffi.h.

#ifndef FLAXDCN_XLA_EXT_CUDA_FFI_CONTEXT_H_
#define FLAXDCN_XLA_EXT_CUDA_FFI_CONTEXT_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <optional>
#include <string>
#include <utility>

#include "xla/ffi/api/ffi.h"
#include "xla_ext/common/ffi_helpers.h"
#include "xla_ext/cuda/accumulate.h"

namespace flaxdcn {

struct CudaContext {
  cudaStream_t stream;            // XLA's stream: every launch goes here
  ffi::ScratchAllocator scratch;  // device workspace, freed when the handler returns
};

inline ffi::Error CudaStatus(cudaError_t status, const char* op) {
  if (status == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string(op) + ": CUDA error: " + cudaGetErrorString(status));
}

// `bytes` of device workspace aligned to kWorkspaceAlignment (nullptr for zero bytes). XLA rejects
// alignments above 16 bytes, and reports no reason through ScratchAllocator: the message names
// the request.
inline ffi::ErrorOr<void*> Workspace(CudaContext& device, size_t bytes, const char* op) {
  if (bytes == 0) return static_cast<void*>(nullptr);
  std::optional<void*> buffer = device.scratch.Allocate(bytes, kWorkspaceAlignment);
  if (!buffer.has_value()) {
    return ffi::Unexpected<ffi::Error>(ffi::Error(
        ffi::ErrorCode::kResourceExhausted,
        std::string(op) + ": XLA's scratch allocator refused " + std::to_string(bytes) +
            " bytes of device workspace aligned to " + std::to_string(kWorkspaceAlignment) +
            " bytes (out of device memory?)"));
  }
  return *buffer;
}

}  // namespace flaxdcn

namespace xla::ffi {

// `.Ctx<flaxdcn::CudaContext>()`: the stream and the scratch allocator of the call.
template <>
struct CtxDecoding<flaxdcn::CudaContext> {
  using Type = flaxdcn::CudaContext;

  static std::optional<Type> Decode(const XLA_FFI_Api* api, XLA_FFI_ExecutionContext* ctx,
                                    DiagnosticEngine& diagnostic) {
    std::optional<cudaStream_t> stream =
        CtxDecoding<PlatformStream<cudaStream_t>>::Decode(api, ctx, diagnostic);
    if (!stream.has_value()) return std::nullopt;
    std::optional<ScratchAllocator> scratch =
        CtxDecoding<ScratchAllocator>::Decode(api, ctx, diagnostic);
    if (!scratch.has_value()) return std::nullopt;
    return Type{*stream, std::move(*scratch)};
  }
};

}  // namespace xla::ffi

#endif  // FLAXDCN_XLA_EXT_CUDA_FFI_CONTEXT_H_
