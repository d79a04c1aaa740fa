// Philox4x32-10 counter-based generator and the normal draw of Triton's `tl.randn(seed, offset)`.
//
// Reproduces triton/language/random.py exactly (integer part bit for bit; the float part up to the
// rounding of logf/cosf/sqrtf of the platform's libm):
//   key   = (k0, k1) = (seed & 0xffffffff, seed >> 32)            (seed as uint64)
//   ctr   = (c0, c1, c2, c3) = (offset & 0xffffffff, offset >> 32, 0, 0)   (offset as int64)
//   10 rounds, multipliers 0xD2511F53 / 0xCD9E8D57, key bumps 0x9E3779B9 / 0xBB67AE85
//   u     = int32 bitcast of the output, x < 0 -> ~x, times 4.6566127342e-10f   (float32)
//   n     = sqrt(-2 log(max(1e-7, u1))) * cos(2 pi u2)   (Box-Muller on the first two outputs)
//
// Header only, no dependencies: usable from host C++ and from CUDA (__host__ __device__).
#pragma once

#include <stdint.h>
#include <math.h>

#if defined(__CUDACC__)
#define HVAE_HD __host__ __device__ __forceinline__
#else
#define HVAE_HD inline
#endif

namespace hvae {

constexpr uint32_t PHILOX_KEY_A = 0x9E3779B9u;
constexpr uint32_t PHILOX_KEY_B = 0xBB67AE85u;
constexpr uint32_t PHILOX_ROUND_A = 0xD2511F53u;
constexpr uint32_t PHILOX_ROUND_B = 0xCD9E8D57u;
constexpr int PHILOX_ROUNDS = 10;

HVAE_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
    return __umulhi(a, b);
#else
    return (uint32_t)(((uint64_t)a * (uint64_t)b) >> 32);
#endif
}

// In place: c[0..3] counter -> random output, key (k0, k1). Same round structure as Triton's
// philox_impl: (c0, c2) feed the multiplications, (c1, c3) the xors.
HVAE_HD void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int r = 0; r < PHILOX_ROUNDS; ++r) {
        const uint32_t a0 = c0, a2 = c2;
        c0 = mulhi32(PHILOX_ROUND_B, a2) ^ c1 ^ k0;
        c2 = mulhi32(PHILOX_ROUND_A, a0) ^ c3 ^ k1;
        c1 = PHILOX_ROUND_B * a2;
        c3 = PHILOX_ROUND_A * a0;
        k0 += PHILOX_KEY_A;
        k1 += PHILOX_KEY_B;
    }
}

// triton.language.random.uint_to_uniform_float for uint32 input: a float in [0, 1).
HVAE_HD float uint_to_uniform_float(uint32_t x) {
    int32_t i = (int32_t)x;
    i = i < 0 ? ~i : i;
    return (float)i * 4.6566127342e-10f;
}

// tl.randn(seed, offset): one standard normal float32 for a 64-bit seed and a 64-bit offset.
HVAE_HD float philox_randn(uint64_t seed, uint64_t offset) {
    uint32_t c0 = (uint32_t)(offset & 0xffffffffull);
    uint32_t c1 = (uint32_t)(offset >> 32);
    uint32_t c2 = 0u, c3 = 0u;
    philox4x32_10(c0, c1, c2, c3, (uint32_t)(seed & 0xffffffffull), (uint32_t)(seed >> 32));
    float u1 = uint_to_uniform_float(c0);
    const float u2 = uint_to_uniform_float(c1);
    u1 = u1 > 1.0e-7f ? u1 : 1.0e-7f;
    const float th = 6.283185307179586f * u2;
    const float r = sqrtf(-2.0f * logf(u1));
    return r * cosf(th);
}

}  // namespace hvae
