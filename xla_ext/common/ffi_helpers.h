// Helpers of every FFI handler, on no op in particular: the dtype mapping, shape checks with
// precise error messages, and buffer views. Each op's checks, attributes, binding and handler
// body are in common/<op>_ffi.h.

#ifndef FLAXDCN_XLA_EXT_COMMON_FFI_HELPERS_H_
#define FLAXDCN_XLA_EXT_COMMON_FFI_HELPERS_H_

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <utility>

#include "xla/ffi/api/ffi.h"
#include "xla_ext/common/base.h"

namespace flaxdcn {

namespace ffi = ::xla::ffi;

// The backends' contexts, the first parameter of each op's launch overloads (common/<op>_ffi.h):
// ffi::ThreadPool, XLA:CPU's intra-op pool, on the CPU; CudaContext (cuda/ffi_context.h) on CUDA.
struct CudaContext;

inline std::optional<ElementType> ToElementType(ffi::DataType dtype) {
  switch (dtype) {
    case ffi::DataType::F32:
      return ElementType::kF32;
    case ffi::DataType::F64:
      return ElementType::kF64;
    case ffi::DataType::F16:
      return ElementType::kF16;
    case ffi::DataType::BF16:
      return ElementType::kBF16;
    default:
      return std::nullopt;
  }
}

inline std::string ShapeString(ffi::AnyBuffer::Dimensions dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

inline ffi::Unexpected<ffi::Error> Invalid(std::string message) {
  return ffi::Unexpected<ffi::Error>(ffi::Error::InvalidArgument(std::move(message)));
}

inline ffi::Error ExpectShape(const char* op, const char* name, ffi::AnyBuffer::Dimensions dims,
                              std::initializer_list<int64_t> expected) {
  bool same = dims.size() == expected.size();
  size_t i = 0;
  for (int64_t e : expected) same = same && dims[i++] == e;
  if (same) return ffi::Error::Success();
  std::string want = "[";
  i = 0;
  for (int64_t e : expected) want += (i++ ? ", " : "") + std::to_string(e);
  return ffi::Error::InvalidArgument(std::string(op) + ": " + name + " has shape " +
                                     ShapeString(dims) + ", expected " + want + "]");
}

inline ffi::Error ExpectSameShape(const char* op, const char* name,
                                  ffi::AnyBuffer::Dimensions dims,
                                  ffi::AnyBuffer::Dimensions expected) {
  bool same = dims.size() == expected.size();
  for (size_t i = 0; same && i < dims.size(); ++i) same = dims[i] == expected[i];
  if (same) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string(op) + ": " + name + " has shape " +
                                     ShapeString(dims) + ", expected " + ShapeString(expected));
}

// `buffer`'s data advanced by `elements` elements of its dtype (a view into a packed buffer).
inline void* DataAt(const ffi::AnyBuffer& buffer, int64_t elements) {
  return static_cast<char*>(buffer.untyped_data()) +
         elements * static_cast<int64_t>(ffi::ByteWidth(buffer.element_type()));
}

}  // namespace flaxdcn

#endif  // FLAXDCN_XLA_EXT_COMMON_FFI_HELPERS_H_
