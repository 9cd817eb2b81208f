// Counter-based random numbers shared by the CPU and CUDA kernels (and, bit for bit, by the Triton
// kernels and the pure-PyTorch reference): Philox-4x32-10 (Salmon et al., SC'11), the generator of
// cuRAND, PyTorch's CUDA generator and Triton's tl.randint4x.
//
// Stream convention (every op that draws random numbers follows it, so that the backends and the
// reference draw the same numbers for the same (seed, offset)):
//   key     = (low 32 bits of seed, high 32 bits of seed)
//   counter = (low 32 bits of n, high 32 bits of n, 0, 0) with n = offset + i / 4
//   the i-th number of the call is lane i % 4 of that counter's output.
// This is tl.randint4x(seed, offset + i // 4) in Triton. Each op documents what its i-th number is
// (e.g. the Gumbel noise of element (row, k) of a (rows, K) input is number row * K4 + k, where K4
// is K rounded up to a multiple of 4, so that a row starts on a fresh counter).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LFI_PHILOX_HD __host__ __device__ __forceinline__
#else
#define LFI_PHILOX_HD inline
#endif

namespace lfi_fast {
namespace philox {

struct U4 {
  uint32_t x, y, z, w;
};

LFI_PHILOX_HD uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

// Philox-4x32 with 10 rounds. Known answers (Random123's kat_vectors) are checked in
// tests/test_random.py through the reference, which the kernels must equal.
LFI_PHILOX_HD U4 philox4x32_10(U4 ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    uint32_t hi_b, hi_a;
    const uint32_t lo_b = mulhilo(kRoundB, ctr.z, &hi_b);
    const uint32_t lo_a = mulhilo(kRoundA, ctr.x, &hi_a);
    ctr = U4{hi_b ^ ctr.y ^ k0, lo_b, hi_a ^ ctr.w ^ k1, lo_a};
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return ctr;
}

// The four numbers of counter n (= offset + i / 4) for a 64-bit seed.
LFI_PHILOX_HD U4 block(uint64_t seed, uint64_t n) {
  return philox4x32_10(U4{static_cast<uint32_t>(n), static_cast<uint32_t>(n >> 32), 0u, 0u},
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

LFI_PHILOX_HD uint32_t lane(const U4& v, int l) {
  return l == 0 ? v.x : (l == 1 ? v.y : (l == 2 ? v.z : v.w));
}

// A uniform strictly inside (0, 1): the top 23 bits, centred, (b + 0.5) * 2^-23, exact in
// float32 (b + 0.5 < 2^23 needs 24 significant bits; 24 bits would round 2^24 - 0.5 up to 1).
// Its range is [2^-24, 1 - 2^-24], so -log(-log(u)) (Gumbel) and log(u) (Box-Muller) are always
// finite.
LFI_PHILOX_HD float uniform_open(uint32_t bits) {
  return (static_cast<float>(bits >> 9) + 0.5f) * 1.1920928955078125e-07f;  // 2^-23
}

// Standard Gumbel noise from one uniform, in float32: -log(-log(u)); finite for every u above.
LFI_PHILOX_HD float gumbel(uint32_t bits) {
  return -logf(-logf(uniform_open(bits)));
}

// Two standard normals from two uniforms (Box-Muller): number 2j uses lanes (2j, 2j+1) of the
// stream as (u1, u2): z_{2j} = r cos(2 pi u2), z_{2j+1} = r sin(2 pi u2), r = sqrt(-2 log u1).
LFI_PHILOX_HD void box_muller(uint32_t b1, uint32_t b2, float* z0, float* z1) {
  const float r = sqrtf(-2.0f * logf(uniform_open(b1)));
  const float t = 6.2831853071795864769f * uniform_open(b2);
  *z0 = r * cosf(t);
  *z1 = r * sinf(t);
}

}  // namespace philox
}  // namespace lfi_fast
