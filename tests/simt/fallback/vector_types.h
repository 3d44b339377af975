// Host stand-in for the toolkit's vector_types.h (used only where no CUDA toolkit is installed).

#ifndef FLAXDCN_TESTS_SIMT_FALLBACK_VECTOR_TYPES_H_
#define FLAXDCN_TESTS_SIMT_FALLBACK_VECTOR_TYPES_H_

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};
struct alignas(8) int2 {
  int x, y;
};
struct alignas(16) int4 {
  int x, y, z, w;
};

inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

#endif  // FLAXDCN_TESTS_SIMT_FALLBACK_VECTOR_TYPES_H_
