// Counter-based random numbers (Philox4x32-10) for per-request noise.
// A value depends only on (seed, stream, index): an image depends on its seed and settings, never on batch
// composition, rank count or placement. Streams: 0 = initial latents, 1 + k = noise of sampler step k.
// Thread-safety: pure functions.
#pragma once
#include <cmath>
#include <cstdint>

namespace diffpipe {

inline void philox4x32_10(uint32_t ctr[4], uint32_t k0, uint32_t k1) {
  constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(M0) * ctr[0];
    const uint64_t p1 = static_cast<uint64_t>(M1) * ctr[2];
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    const uint32_t n0 = hi1 ^ ctr[1] ^ k0, n1 = lo1, n2 = hi0 ^ ctr[3] ^ k1, n3 = lo0;
    ctr[0] = n0; ctr[1] = n1; ctr[2] = n2; ctr[3] = n3;
    k0 += W0; k1 += W1;
  }
}

// Fills out[0..n) with standard normal floats for (seed, stream), elements [0, n).
inline void philox_normal(uint64_t seed, uint64_t stream, float* out, int64_t n) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int64_t base = 0; base < n; base += 4) {
    const uint64_t block = static_cast<uint64_t>(base / 4);
    uint32_t c[4] = {static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                     static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32)};
    philox4x32_10(c, k0, k1);
    double z[4];
    for (int p = 0; p < 2; ++p) {
      // u1 in (0, 1], u2 in [0, 1): 32-bit uniforms.
      const double u1 = (static_cast<double>(c[2 * p]) + 1.0) / 4294967296.0;
      const double u2 = static_cast<double>(c[2 * p + 1]) / 4294967296.0;
      const double r = std::sqrt(-2.0 * std::log(u1));
      z[2 * p] = r * std::cos(2.0 * M_PI * u2);
      z[2 * p + 1] = r * std::sin(2.0 * M_PI * u2);
    }
    for (int j = 0; j < 4 && base + j < n; ++j) out[base + j] = static_cast<float>(z[j]);
  }
}

}  // namespace diffpipe
