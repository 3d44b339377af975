// Conversion tables of cuda_fp16.h / cuda_bf16.h, from the toolkit or tests/simt/fallback/
// (whichever the include path names), for tests/test_simt.py to compare.
//
// Writes to stdout, as little-endian uint32: for every 16-bit pattern h, the float bits of
// __half2float(h) and of __bfloat162float(h); then for each float bit pattern u = k * 65521 (and
// the specials below), the bits of __float2half_rn and __float2bfloat16_rn of that float.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

namespace {

uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

float Float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

template <typename H>
H FromBits(uint16_t bits) {
  H h;
  std::memcpy(&h, &bits, sizeof(h));
  return h;
}

template <typename H>
uint16_t ToBits(H h) {
  uint16_t bits;
  std::memcpy(&bits, &h, sizeof(bits));
  return bits;
}

}  // namespace

int main() {
  std::vector<uint32_t> out;
  for (uint32_t h = 0; h < 65536; ++h) {
    out.push_back(Bits(__half2float(FromBits<__half>(static_cast<uint16_t>(h)))));
    out.push_back(Bits(__bfloat162float(FromBits<__nv_bfloat16>(static_cast<uint16_t>(h)))));
  }
  std::vector<uint32_t> inputs;
  for (uint64_t u = 0; u < (uint64_t{1} << 32); u += 65521) inputs.push_back(uint32_t(u));
  // Ties and edges: half's largest finite and overflow threshold, subnormal ties, bfloat16 ties.
  for (uint32_t u : {0x477fe000u, 0x477ff000u, 0x477fefffu, 0x33000000u, 0x33000001u,
                     0x387fc000u, 0x38800000u, 0x3f808000u, 0x3f818000u, 0x7f7fffffu,
                     0x7f800000u, 0xff800000u, 0x7fc00000u, 0x80000000u}) {
    inputs.push_back(u);
  }
  for (uint32_t u : inputs) {
    out.push_back(ToBits(__float2half_rn(Float(u))));
    out.push_back(ToBits(__float2bfloat16_rn(Float(u))));
  }
  std::fwrite(out.data(), sizeof(uint32_t), out.size(), stdout);
  return 0;
}
