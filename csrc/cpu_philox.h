// The CPU kernels' noise: Triton's tl.randn(seed, offset), vectorised across offsets. The Philox
// integers are those of csrc/philox.h bit for bit; the float part is Box-Muller with the polynomial
// log / cos of csrc/cpu_vec_math.h (within 1e-6 of Triton's, tests/test_native.py).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu_vec_math.h"
#include "philox.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace hvae {
namespace cpu {

// Box-Muller on the first two Philox outputs, as in hvae::philox_randn (Triton's tl.randn), with
// vm::log / vm::cos_small. uint_to_uniform_float: int32 bitcast, x < 0 -> ~x, times 4.6566127342e-10f.
inline float box_muller(uint32_t c0, uint32_t c1) {
    const int32_t i1 = (int32_t)c0, i2 = (int32_t)c1;
    float u1 = (float)(i1 ^ (i1 >> 31)) * 4.6566127342e-10f;
    const float u2 = (float)(i2 ^ (i2 >> 31)) * 4.6566127342e-10f;
    u1 = u1 > 1.0e-7f ? u1 : 1.0e-7f;
    const float th = 6.283185307179586f * u2;
    const float rad = std::sqrt(-2.0f * vm::log(u1));
    return rad * vm::cos_small(th);
}

// One normal from the Philox counter (c0, c1, 0, 0) and key (k0, k1): the same integers as
// hvae::philox4x32_10, written out so that a simd loop over lanes keeps it in vector registers.
inline float randn_lane(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1) {
    uint32_t c2 = 0u, c3 = 0u;
#pragma GCC unroll 10
    for (int r = 0; r < hvae::PHILOX_ROUNDS; ++r) {
        const uint64_t p0 = (uint64_t)hvae::PHILOX_ROUND_B * (uint64_t)c2;
        const uint64_t p1 = (uint64_t)hvae::PHILOX_ROUND_A * (uint64_t)c0;
        c0 = (uint32_t)(p0 >> 32) ^ c1 ^ k0;
        c2 = (uint32_t)(p1 >> 32) ^ c3 ^ k1;
        c1 = (uint32_t)p0;
        c3 = (uint32_t)p1;
        k0 += hvae::PHILOX_KEY_A;
        k1 += hvae::PHILOX_KEY_B;
    }
    return box_muller(c0, c1);
}

#if defined(__AVX2__)
// The first two Philox4x32-10 outputs for counters (lo + i, hi, 0, 0), i < m, eight lanes per
// __m256i: the 32x32 -> 64 bit products of the even lanes and of the odd lanes (shifted down) by
// _mm256_mul_epu32, high and low halves put back in place by blends. Integers identical to
// hvae::philox4x32_10 (tests: philox / randn against independent models and Triton).
inline void philox_pairs_avx2(uint32_t lo, uint32_t hi, uint32_t k0, uint32_t k1, int64_t m, uint32_t* __restrict o0,
                              uint32_t* __restrict o1) {
    const __m256i MA = _mm256_set1_epi32((int)hvae::PHILOX_ROUND_A);
    const __m256i MB = _mm256_set1_epi32((int)hvae::PHILOX_ROUND_B);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i KA[hvae::PHILOX_ROUNDS], KB[hvae::PHILOX_ROUNDS];
    {
        uint32_t ka = k0, kb = k1;
        for (int r = 0; r < hvae::PHILOX_ROUNDS; ++r) {
            KA[r] = _mm256_set1_epi32((int)ka);
            KB[r] = _mm256_set1_epi32((int)kb);
            ka += hvae::PHILOX_KEY_A;
            kb += hvae::PHILOX_KEY_B;
        }
    }
    int64_t i = 0;
    for (; i + 8 <= m; i += 8) {
        const __m256i x0 = _mm256_add_epi32(_mm256_set1_epi32((int)(lo + (uint32_t)i)), lane);
        // round 0 with c2 = c3 = 0: the B product vanishes
        const __m256i pe = _mm256_mul_epu32(MA, x0);
        const __m256i po = _mm256_mul_epu32(MA, _mm256_srli_epi64(x0, 32));
        __m256i c0 = _mm256_xor_si256(_mm256_set1_epi32((int)hi), KA[0]);
        __m256i c1 = _mm256_setzero_si256();
        __m256i c2 = _mm256_xor_si256(_mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA), KB[0]);
        __m256i c3 = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
#pragma GCC unroll 9
        for (int r = 1; r < hvae::PHILOX_ROUNDS; ++r) {
            const __m256i pe0 = _mm256_mul_epu32(MB, c2);
            const __m256i po0 = _mm256_mul_epu32(MB, _mm256_srli_epi64(c2, 32));
            const __m256i pe1 = _mm256_mul_epu32(MA, c0);
            const __m256i po1 = _mm256_mul_epu32(MA, _mm256_srli_epi64(c0, 32));
            const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(pe0, 32), po0, 0xAA);
            const __m256i lo0 = _mm256_blend_epi32(pe0, _mm256_slli_epi64(po0, 32), 0xAA);
            const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(pe1, 32), po1, 0xAA);
            const __m256i lo1 = _mm256_blend_epi32(pe1, _mm256_slli_epi64(po1, 32), 0xAA);
            c0 = _mm256_xor_si256(_mm256_xor_si256(hi0, c1), KA[r]);
            c2 = _mm256_xor_si256(_mm256_xor_si256(hi1, c3), KB[r]);
            c1 = lo0;
            c3 = lo1;
        }
        _mm256_storeu_si256((__m256i*)(o0 + i), c0);
        _mm256_storeu_si256((__m256i*)(o1 + i), c1);
    }
    for (; i < m; ++i) {
        uint32_t c0 = lo + (uint32_t)i, c1 = hi, c2 = 0u, c3 = 0u;
        hvae::philox4x32_10(c0, c1, c2, c3, k0, k1);
        o0[i] = c0;
        o1[i] = c1;
    }
}
#endif

constexpr int64_t RANDN_BLOCK = 256;

// out[i] = randn(seed, off + i) for i < n.
inline void randn_block(uint64_t seed, uint64_t off, int64_t n, float* __restrict out) {
    const uint32_t k0 = (uint32_t)(seed & 0xffffffffull), k1 = (uint32_t)(seed >> 32);
    while (n > 0) {
        // a run whose low counter word does not wrap: c0 = lo + i, c1 constant
        const uint32_t lo = (uint32_t)(off & 0xffffffffull), hi = (uint32_t)(off >> 32);
        int64_t m = std::min<int64_t>(n, (int64_t)(0x100000000ull - (uint64_t)lo));
#if defined(__AVX2__)
        m = std::min<int64_t>(m, RANDN_BLOCK);
        alignas(64) uint32_t b0[RANDN_BLOCK], b1[RANDN_BLOCK];
        philox_pairs_avx2(lo, hi, k0, k1, m, b0, b1);
#pragma omp simd
        for (int64_t i = 0; i < m; ++i) out[i] = box_muller(b0[i], b1[i]);
#else
#pragma omp simd
        for (int64_t i = 0; i < m; ++i) out[i] = randn_lane(lo + (uint32_t)i, hi, k0, k1);
#endif
        out += m;
        off += (uint64_t)m;
        n -= m;
    }
}

}  // namespace cpu
}  // namespace hvae
