// CPU kernels (float32 / float64) for the two Ornstein-Uhlenbeck ops of hvae_fast.ou.
//
// Layout: every [K, B, *S] tensor is contiguous and viewed as [K, N] with N = B * prod(S); every
// [B, *S] tensor as [N]. The noise of element (k, j) is randn(seed, k * N + j): Triton's
// tl.randn(seed, offset) (Philox4x32-10 integers bit for bit, csrc/philox.h; the float part with the
// vectorisable log / cos below). It is never stored: the backward regenerates it.
//
// Parallelisation: at::parallel_for (torch's own OpenMP pool, torch.set_num_threads applies) over
// chunks of CHUNK consecutive elements, with a grain size that keeps small problems (the MNIST MLP
// sizes) on the calling thread: a parallel region costs microseconds when the cores are idle and
// whole scheduler time slices when they are busy. Inside a chunk the loop over k is outside and the
// loop over the chunk's elements inside, so every inner loop reads and writes contiguous memory and
// is a straight-line `omp simd` loop. The noise of a (chunk, k) row is generated into a small buffer
// by one simd loop (Philox lanes side by side), then used.
//
// Math: float32 uses the polynomial exp / log / cos of namespace vm (cephes-style, inlined, so they
// vectorise; maximum errors stated there and tested in tests/test_native.py). float64 (it exists for
// gradcheck) uses the exact std:: functions. Accumulation is in the input's precision; the per-row
// sum of the log-density is done by torch's (pairwise) reduction.
//
// Build: hvae_fast/native.py compiles with -O3 -fopenmp -fno-math-errno -fno-trapping-math, plus
// -mavx2 -mfma when the building CPU has them (the cache directory is keyed on that choice).
//
// Semantics and gradient formulas: hvae_fast/ou.py and hvae_fast/native.py.

// Narrow includes instead of <torch/extension.h>: a third of the compile time of the first use.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "philox.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// ---------------------------------------------------------------------------------------------
// Vectorisable float32 math (all inline, branch-free: selects only)
// ---------------------------------------------------------------------------------------------

namespace vm {

inline float as_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline uint32_t as_uint(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

inline float fmadd(float a, float b, float c) {  // a * b + c, one rounding where the ISA has FMA
#ifdef __FMA__
    return __builtin_fmaf(a, b, c);
#else
    return a * b + c;
#endif
}

// exp(x) for float32, including the subnormal range (2^n applied in two halves); exp(x) = 0 below
// -104 and exp(x) = +inf above 88.72 (the float limits). Cephes expf polynomial. Max relative
// error 1.5e-7 over [-87, 88] (measured 8.3e-8; tests: test_vm_exp_log_cos_accuracy), subnormal
// results within 1.5e-7 relative + 1.5e-45 (one subnormal step).
inline float exp(float x) {
    const float M = 12582912.0f;  // 1.5 * 2^23: x + M - M rounds to an integer
    const float xc = std::min(std::max(x, -104.0f), 88.72283f);
    const float t = fmadd(xc, 1.44269504088896341f, M);
    const float n = t - M;
    const int32_t ni = (int32_t)(as_uint(t) - as_uint(M));
    float r = fmadd(n, -0.693359375f, xc);
    r = fmadd(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = fmadd(p, r, 1.3981999507e-3f);
    p = fmadd(p, r, 8.3334519073e-3f);
    p = fmadd(p, r, 4.1665795894e-2f);
    p = fmadd(p, r, 1.6666665459e-1f);
    p = fmadd(p, r, 5.0000001201e-1f);
    const float y = fmadd(p, r * r, r) + 1.0f;
    const int32_t n1 = ni >> 1, n2 = ni - n1;  // n in [-150, 128]: both halves are normal powers of 2
    const float res = y * as_float((uint32_t)(n1 + 127) << 23) * as_float((uint32_t)(n2 + 127) << 23);
    return x < -104.0f ? 0.0f : (x > 88.72283f ? INFINITY : res);
}

// log(1 + f) - f for f in [sqrt(1/2) - 1, sqrt(2) - 1], without the leading term: the cephes logf
// polynomial, shared by log and log1p_unit.
inline float log1p_core(float f, float z) {
    float p = 7.0376836292e-2f;
    p = fmadd(p, f, -1.1514610310e-1f);
    p = fmadd(p, f, 1.1676998740e-1f);
    p = fmadd(p, f, -1.2420140846e-1f);
    p = fmadd(p, f, 1.4249322787e-1f);
    p = fmadd(p, f, -1.6668057665e-1f);
    p = fmadd(p, f, 2.0000714765e-1f);
    p = fmadd(p, f, -2.4999993993e-1f);
    p = fmadd(p, f, 3.3333331174e-1f);
    return fmadd(z, -0.5f, p * f * z);
}

// log(x) for float32: subnormals handled, log(0) = -inf, log(x < 0) = NaN, log(inf) = inf,
// log(NaN) = NaN. Cephes logf polynomial. Max relative error 1.5e-7 (measured 7.8e-8; tests as above).
inline float log(float x) {
    const bool sub = x < 1.17549435e-38f;
    const float xs = sub ? x * 8388608.0f : x;  // 2^23
    const uint32_t u = as_uint(xs);
    float e = (float)((int32_t)(u >> 23) - 126) - (sub ? 23.0f : 0.0f);
    float m = as_float((u & 0x007fffffu) | 0x3f000000u);  // [0.5, 1)
    const bool lo = m < 0.707106781186547524f;
    e = lo ? e - 1.0f : e;
    const float f = lo ? (m + m) - 1.0f : m - 1.0f;  // exact
    const float z = f * f;
    const float y = fmadd(e, -2.12194440e-4f, log1p_core(f, z));
    float res = f + y;
    res = fmadd(e, 0.693359375f, res);
    res = x == 0.0f ? -INFINITY : res;
    res = !(x >= 0.0f) ? NAN : res;  // x < 0 or NaN
    return x == INFINITY ? INFINITY : res;
}

// log1p(t) for 0 <= t <= 1 without a division: t itself is the polynomial's argument up to
// sqrt(2) - 1, above it log(1 + t) = log 2 + log1p((t - 1) / 2). Max relative error 3e-7 (tests).
inline float log1p_unit(float t) {
    const bool big = t > 0.41421356237f;
    const float f = big ? (t - 1.0f) * 0.5f : t;
    const float e = big ? 1.0f : 0.0f;
    const float z = f * f;
    const float y = fmadd(e, -2.12194440e-4f, log1p_core(f, z));
    return fmadd(e, 0.693359375f, f + y);
}

// cos(x) for 0 <= x <= 8 (the Box-Muller angle 2 pi u lies in [0, 2 pi)): Cody-Waite reduction by
// pi/2 with a three-part constant, cephes sinf / cosf polynomials on [-pi/4, pi/4]. Max absolute
// error 1.5e-7 on [0, 2 pi] (measured 9.2e-8; tests as above).
inline float cos_small(float x) {
    const float M = 12582912.0f;
    const float t = fmadd(x, 0.636619772367581343f, M);  // x * 2/pi, rounded to an integer
    const float q = t - M;
    const uint32_t qi = as_uint(t) - as_uint(M);
    float r = fmadd(q, -1.5703125f, x);
    r = fmadd(q, -4.837512969970703125e-4f, r);
    r = fmadd(q, -7.54978995489188216e-8f, r);
    const float z = r * r;
    float s = -1.9515295891e-4f;
    s = fmadd(s, z, 8.3321608736e-3f);
    s = fmadd(s, z, -1.6666654611e-1f);
    s = fmadd(s * z, r, r);  // sin(r)
    float c = 2.443315711809948e-5f;
    c = fmadd(c, z, -1.388731625493765e-3f);
    c = fmadd(c, z, 4.166664568298827e-2f);
    c = fmadd(c * z, z, fmadd(z, -0.5f, 1.0f));  // cos(r)
    // quadrant q mod 4: cos(r), -sin(r), -cos(r), sin(r)
    const float v = (qi & 1u) ? s : c;
    return ((qi + 1u) & 2u) ? -v : v;
}

// torch.nn.functional.softplus(x) (beta 1, threshold 20) = max(x, 0) + log1p(exp(-|x|)), and its
// derivative sigmoid(x) (torch: e / (e + 1), e = exp(x); here with t = exp(-|x|), no overflow).
// Max relative errors 3e-7 (softplus, derivative) on [-40, 25] (tests).
inline void softplus_and_grad(float x, float& sp, float& grad) {
    const float t = exp(-std::fabs(x));
    const float l = log1p_unit(t);
    sp = x > 20.0f ? x : std::max(x, 0.0f) + l;
    const float num = x >= 0.0f ? 1.0f : t;
    grad = x > 20.0f ? 1.0f : num / (1.0f + t);
}
inline float softplus(float x) {
    const float t = exp(-std::fabs(x));
    return x > 20.0f ? x : std::max(x, 0.0f) + log1p_unit(t);
}
inline float softplus_grad(float x) {
    const float t = exp(-std::fabs(x));
    const float num = x >= 0.0f ? 1.0f : t;
    return x > 20.0f ? 1.0f : num / (1.0f + t);
}

}  // namespace vm

template <typename T>
inline T softplus(T x) {  // torch.nn.functional.softplus(x, beta=1, threshold=20); float64: exact
    return x > T(20) ? x : std::log1p(std::exp(x));
}
template <>
inline float softplus<float>(float x) { return vm::softplus(x); }

// softplus(x) and d softplus / dx exactly as torch's backward computes it (e / (e + 1), 1 above 20)
template <typename T>
inline void softplus_and_grad(T x, T& sp, T& grad) {
    const T e = std::exp(x);
    sp = x > T(20) ? x : std::log1p(e);
    grad = x > T(20) ? T(1) : e / (e + T(1));
}
template <>
inline void softplus_and_grad<float>(float x, float& sp, float& grad) { vm::softplus_and_grad(x, sp, grad); }

template <typename T>
inline T softplus_grad(T x) {
    if (x > T(20)) return T(1);
    const T e = std::exp(x);
    return e / (e + T(1));
}
template <>
inline float softplus_grad<float>(float x) { return vm::softplus_grad(x); }

template <typename T>
inline T log_t(T x) { return std::log(x); }
template <>
inline float log_t<float>(float x) { return vm::log(x); }

// ---------------------------------------------------------------------------------------------
// The noise: tl.randn(seed, offset), vectorised across offsets
// ---------------------------------------------------------------------------------------------

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
void randn_block(uint64_t seed, uint64_t off, int64_t n, float* __restrict out) {
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

constexpr int64_t CHUNK = 512;
constexpr double LOG_2PI = 1.8378770664093453;  // log(2 pi)
// Work (elements x K) below which an op stays on the calling thread (the MNIST MLP sizes, 20k).
// Measured on the 2-core AVX2 benchmark machine: ~5-6 ns per normal (Philox ~45%, Box-Muller ~55%),
// ~2-3 ns per (element, k) of the head; a parallel region costs ~10 us on idle cores.
constexpr int64_t PAR_WORK_NOISE = 1 << 15;  // ~0.2 ms of noise on one core
constexpr int64_t PAR_WORK_HEAD = 1 << 17;   // ~0.3 ms of head work on one core

inline int64_t n_chunks(int64_t N) { return (N + CHUNK - 1) / CHUNK; }

// Grain (in chunks) for at::parallel_for: the whole range runs inline when it is below min_work.
inline int64_t grain_chunks(int64_t N, int64_t K, int64_t min_work) {
    const int64_t per_chunk = std::max<int64_t>(1, CHUNK * K);
    return std::max<int64_t>(1, (min_work + per_chunk - 1) / per_chunk);
}

template <typename F>
inline void for_chunks(int64_t N, int64_t K, int64_t min_work, const F& body) {
    const int64_t nc = n_chunks(N);
    const int64_t grain = grain_chunks(N, K, min_work);
    if (nc <= grain || at::get_num_threads() <= 1) {
        body(int64_t(0), nc);
        return;
    }
    at::parallel_for(0, nc, grain, body);
}

// ---------------------------------------------------------------------------------------------
// Op 1: correlated samples
// ---------------------------------------------------------------------------------------------

template <typename T>
void corr_fwd_kernel(const T* z, const T* mu, const T* sigma, T* out, int64_t N, int64_t K, double rho,
                     uint64_t seed) {
    const T a = T(rho), b = T(1.0 - rho);
    const T c = T(std::sqrt(std::max(0.0, 1.0 - rho * rho)));
    for_chunks(N, c == T(0) ? 1 : K, PAR_WORK_NOISE, [&](int64_t c_begin, int64_t c_end) {
        alignas(64) T base[CHUNK];
        alignas(64) T scale[CHUNK];
        alignas(64) float eps[CHUNK];
        for (int64_t ch = c_begin; ch < c_end; ++ch) {
            const int64_t j0 = ch * CHUNK;
            const int64_t n = std::min(CHUNK, N - j0);
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) {
                base[j] = a * z[j0 + j] + b * mu[j0 + j];
                scale[j] = c * sigma[j0 + j];
            }
            for (int64_t k = 0; k < K; ++k) {
                T* __restrict o = out + k * N + j0;
                if (c == T(0)) {  // rho = 1: z' = z, no noise needed
                    std::memcpy(o, base, sizeof(T) * n);
                    continue;
                }
                randn_block(seed, (uint64_t)(k * N + j0), n, eps);
#pragma omp simd
                for (int64_t j = 0; j < n; ++j) o[j] = base[j] + scale[j] * T(eps[j]);
            }
        }
    });
}

template <typename T>
void corr_bwd_kernel(const T* g, T* dz, T* dmu, T* dsigma, int64_t N, int64_t K, double rho, uint64_t seed,
                     bool need_sigma) {
    const T a = T(rho), b = T(1.0 - rho);
    const T c = T(std::sqrt(std::max(0.0, 1.0 - rho * rho)));
    const bool gen = need_sigma && c != T(0);
    for_chunks(N, gen ? K : 1, gen ? PAR_WORK_NOISE : PAR_WORK_HEAD, [&](int64_t c_begin, int64_t c_end) {
        alignas(64) T sg[CHUNK];
        alignas(64) T sge[CHUNK];
        alignas(64) float eps[CHUNK];
        for (int64_t ch = c_begin; ch < c_end; ++ch) {
            const int64_t j0 = ch * CHUNK;
            const int64_t n = std::min(CHUNK, N - j0);
            for (int64_t j = 0; j < n; ++j) sg[j] = sge[j] = T(0);
            for (int64_t k = 0; k < K; ++k) {
                const T* __restrict gk = g + k * N + j0;
                if (gen) {
                    randn_block(seed, (uint64_t)(k * N + j0), n, eps);
#pragma omp simd
                    for (int64_t j = 0; j < n; ++j) {
                        sg[j] += gk[j];
                        sge[j] += gk[j] * T(eps[j]);
                    }
                } else {
#pragma omp simd
                    for (int64_t j = 0; j < n; ++j) sg[j] += gk[j];
                }
            }
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) {
                dz[j0 + j] = a * sg[j];
                dmu[j0 + j] = b * sg[j];
                dsigma[j0 + j] = c * sge[j];  // 0 when rho = 1 or sigma needs no gradient
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Op 2: averaged Gaussian head
// ---------------------------------------------------------------------------------------------

template <typename T>
void head_fwd_kernel(const T* mr, const T* sr, const T* t, T* mbar, T* sbar, T* lp, int64_t N, int64_t K,
                     bool ratio, double min_scale) {
    const T ms = T(min_scale), invK = T(1) / T(K), half_log2pi = T(0.5 * LOG_2PI);
    for_chunks(N, K, PAR_WORK_HEAD, [&](int64_t c_begin, int64_t c_end) {
        alignas(64) T acc_s[CHUNK];
        alignas(64) T acc_m[CHUNK];
        for (int64_t ch = c_begin; ch < c_end; ++ch) {
            const int64_t j0 = ch * CHUNK;
            const int64_t n = std::min(CHUNK, N - j0);
            for (int64_t j = 0; j < n; ++j) acc_s[j] = acc_m[j] = T(0);
            for (int64_t k = 0; k < K; ++k) {
                const T* __restrict m_k = mr + k * N + j0;
                const T* __restrict s_k = sr + k * N + j0;
                if (ratio) {
#pragma omp simd
                    for (int64_t j = 0; j < n; ++j) {
                        const T sk = softplus(s_k[j]) + ms;
                        acc_s[j] += sk;
                        acc_m[j] += m_k[j] / sk;
                    }
                } else {
#pragma omp simd
                    for (int64_t j = 0; j < n; ++j) {
                        acc_s[j] += softplus(s_k[j]) + ms;
                        acc_m[j] += m_k[j];
                    }
                }
            }
            if (ratio) {  // mu_bar = sigma_bar * mean_k (m_k / sigma_k); two loops keep both vectorised
#pragma omp simd
                for (int64_t j = 0; j < n; ++j) acc_m[j] *= acc_s[j] * invK;
            }
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) {
                const T s = acc_s[j] * invK;
                const T m = acc_m[j] * invK;
                const T d = (t[j0 + j] - m) / s;
                mbar[j0 + j] = m;
                sbar[j0 + j] = s;
                lp[j0 + j] = -half_log2pi - log_t(s) - T(0.5) * d * d;
            }
        }
    });
}

template <typename T>
void head_bwd_kernel(const T* g, const T* mr, const T* sr, const T* t, const T* mbar, const T* sbar, T* dmr,
                     T* dsr, T* dt, int64_t N, int64_t S, int64_t K, bool ratio, double min_scale) {
    const T ms = T(min_scale), invK = T(1) / T(K);
    for_chunks(N, K, PAR_WORK_HEAD, [&](int64_t c_begin, int64_t c_end) {
        alignas(64) T A[CHUNK];   // per-element factors shared by all k
        alignas(64) T Bc[CHUNK];
        alignas(64) T gbuf[CHUNK];  // g of each element's batch row
        for (int64_t ch = c_begin; ch < c_end; ++ch) {
            const int64_t j0 = ch * CHUNK;
            const int64_t n = std::min(CHUNK, N - j0);
            {  // one division per chunk instead of one per element
                int64_t row = j0 / S, next = (row + 1) * S - j0;
                for (int64_t j = 0; j < n; ++j) {
                    if (j == next) {
                        ++row;
                        next += S;
                    }
                    gbuf[j] = g[row];
                }
            }
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) {
                const int64_t i = j0 + j;
                const T gb = gbuf[j];
                const T s = sbar[i], m = mbar[i];
                const T diff = t[i] - m;
                const T is = T(1) / s;
                const T is2 = is * is;
                const T dm = gb * diff * is2;
                dt[i] = -dm;
                if (ratio) {
                    // dr = dm * s and ds_tot = ds + dm * r with r = m / s. Written out,
                    // ds_tot = g (-1/s + (t - m)^2/s^3 + (t - m) m/s^3) = g (-1/s + (t - m) t / s^3):
                    // the same value without the cancellation of the two large terms when |r| is large.
                    A[j] = dm * s * invK;
                    Bc[j] = gb * (-is + diff * t[i] * is2 * is) * invK;
                } else {
                    A[j] = dm * invK;
                    Bc[j] = gb * (-is + diff * diff * is2 * is) * invK;
                }
            }
            if (!ratio) std::memcpy(dmr + j0, A, sizeof(T) * n);  // dmr is [N]: the same for every k
            for (int64_t k = 0; k < K; ++k) {
                const T* __restrict m_k = mr + k * N + j0;
                const T* __restrict s_k = sr + k * N + j0;
                T* __restrict ds_k = dsr + k * N + j0;
                if (ratio) {
                    T* __restrict dm_k = dmr + k * N + j0;
#pragma omp simd
                    for (int64_t j = 0; j < n; ++j) {
                        T sp, sgr;
                        softplus_and_grad(s_k[j], sp, sgr);
                        const T inv = T(1) / (sp + ms);
                        const T a = A[j] * inv;
                        dm_k[j] = a;
                        ds_k[j] = (Bc[j] - a * m_k[j] * inv) * sgr;
                    }
                } else {  // d mean_raw_k = A for every k: written once, above
#pragma omp simd
                    for (int64_t j = 0; j < n; ++j) ds_k[j] = Bc[j] * softplus_grad(s_k[j]);
                }
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Bindings
// ---------------------------------------------------------------------------------------------

void check_cpu_float(const at::Tensor& x, const char* name) {
    TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor");
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, name,
                " must be float32 or float64, got ", x.scalar_type());
    TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
}

void check_same(const at::Tensor& a, const at::Tensor& b, const char* name) {
    TORCH_CHECK(a.scalar_type() == b.scalar_type(), name, " must have dtype ", a.scalar_type());
}

// z, mu, sigma: [B, *S] contiguous, same shape and dtype -> [K, B, *S]
at::Tensor correlated_samples_fwd(const at::Tensor& z, const at::Tensor& mu, const at::Tensor& sigma, double rho,
                                  int64_t K, int64_t seed) {
    check_cpu_float(z, "z");
    check_cpu_float(mu, "mu");
    check_cpu_float(sigma, "sigma");
    check_same(z, mu, "mu");
    check_same(z, sigma, "sigma");
    TORCH_CHECK(z.sizes() == mu.sizes() && z.sizes() == sigma.sizes(), "z, mu and sigma must have one shape");
    TORCH_CHECK(K >= 1, "K must be >= 1");
    TORCH_CHECK(rho >= 0.0 && rho <= 1.0, "rho must lie in [0, 1]");
    std::vector<int64_t> shape{K};
    for (auto s : z.sizes()) shape.push_back(s);
    auto out = at::empty(shape, z.options());
    const int64_t N = z.numel();
    if (N == 0) return out;
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "correlated_samples_fwd", [&] {
        corr_fwd_kernel<scalar_t>(z.data_ptr<scalar_t>(), mu.data_ptr<scalar_t>(), sigma.data_ptr<scalar_t>(),
                                  out.data_ptr<scalar_t>(), N, K, rho, (uint64_t)seed);
    });
    return out;
}

// g: [K, B, *S] contiguous -> (dz, dmu, dsigma), each [B, *S]
std::vector<at::Tensor> correlated_samples_bwd(const at::Tensor& g, double rho, int64_t K, int64_t seed,
                                               bool need_sigma) {
    check_cpu_float(g, "grad");
    TORCH_CHECK(g.dim() >= 1 && g.size(0) == K, "grad must have K rows");
    auto shape = g.sizes().slice(1);
    auto dz = at::empty(shape, g.options());
    auto dmu = at::empty(shape, g.options());
    auto dsigma = at::empty(shape, g.options());
    const int64_t N = dz.numel();
    if (N == 0) return {dz, dmu, dsigma};
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "correlated_samples_bwd", [&] {
        corr_bwd_kernel<scalar_t>(g.data_ptr<scalar_t>(), dz.data_ptr<scalar_t>(), dmu.data_ptr<scalar_t>(),
                                  dsigma.data_ptr<scalar_t>(), N, K, rho, (uint64_t)seed, need_sigma);
    });
    return {dz, dmu, dsigma};
}

// mean_raw, scale_raw: [K, B, *S]; target [B, *S] -> (logprob [B], mu_bar [B, *S], sigma_bar [B, *S])
std::vector<at::Tensor> gaussian_head_fwd(const at::Tensor& mean_raw, const at::Tensor& scale_raw,
                                          const at::Tensor& target, bool ratio, double min_scale) {
    check_cpu_float(mean_raw, "mean_raw");
    check_cpu_float(scale_raw, "scale_raw");
    check_cpu_float(target, "target");
    check_same(target, mean_raw, "mean_raw");
    check_same(target, scale_raw, "scale_raw");
    TORCH_CHECK(target.dim() >= 1, "target must have a batch dimension");
    TORCH_CHECK(mean_raw.sizes() == scale_raw.sizes(), "mean_raw and scale_raw must have one shape");
    TORCH_CHECK(mean_raw.dim() == target.dim() + 1 && mean_raw.sizes().slice(1) == target.sizes(),
                "mean_raw must have shape [K, *target.shape]");
    const int64_t K = mean_raw.size(0);
    TORCH_CHECK(K >= 1, "K must be >= 1");
    const int64_t N = target.numel();
    const int64_t B = target.size(0);
    auto mbar = at::empty_like(target);
    auto sbar = at::empty_like(target);
    auto lp = at::empty_like(target);
    if (N > 0) {
        AT_DISPATCH_FLOATING_TYPES(target.scalar_type(), "gaussian_head_fwd", [&] {
            head_fwd_kernel<scalar_t>(mean_raw.data_ptr<scalar_t>(), scale_raw.data_ptr<scalar_t>(),
                                      target.data_ptr<scalar_t>(), mbar.data_ptr<scalar_t>(),
                                      sbar.data_ptr<scalar_t>(), lp.data_ptr<scalar_t>(), N, K, ratio, min_scale);
        });
    }
    auto out = lp.reshape({B, -1}).sum(1);
    return {out, mbar, sbar};
}

// g [B] -> (d mean_raw, d scale_raw [K, B, *S], d target [B, *S]). d mean_raw is [K, B, *S] in the
// ratio mode and [B, *S] in the mean-std mode, where it does not depend on k (the caller expands it
// over K, as torch's mean backward does, instead of writing K copies).
std::vector<at::Tensor> gaussian_head_bwd(const at::Tensor& g, const at::Tensor& mean_raw,
                                          const at::Tensor& scale_raw, const at::Tensor& target,
                                          const at::Tensor& mbar, const at::Tensor& sbar, bool ratio,
                                          double min_scale) {
    for (auto* p : {&g, &mean_raw, &scale_raw, &target, &mbar, &sbar}) {
        check_cpu_float(*p, "gaussian_head_bwd input");
        check_same(target, *p, "gaussian_head_bwd input");
    }
    const int64_t K = mean_raw.size(0);
    const int64_t N = target.numel();
    const int64_t B = target.size(0);
    TORCH_CHECK(g.numel() == B, "grad must have one entry per batch row");
    auto dmr = ratio ? at::empty_like(mean_raw) : at::empty_like(target);
    auto dsr = at::empty_like(scale_raw);
    auto dt = at::empty_like(target);
    if (N == 0) return {dmr, dsr, dt};
    const int64_t S = N / B;
    AT_DISPATCH_FLOATING_TYPES(target.scalar_type(), "gaussian_head_bwd", [&] {
        head_bwd_kernel<scalar_t>(g.data_ptr<scalar_t>(), mean_raw.data_ptr<scalar_t>(),
                                  scale_raw.data_ptr<scalar_t>(), target.data_ptr<scalar_t>(),
                                  mbar.data_ptr<scalar_t>(), sbar.data_ptr<scalar_t>(), dmr.data_ptr<scalar_t>(),
                                  dsr.data_ptr<scalar_t>(), dt.data_ptr<scalar_t>(), N, S, K, ratio, min_scale);
    });
    return {dmr, dsr, dt};
}

// eps of element (k, j) for every k < K, j < N: float32 [K * N], eps[i] = randn(seed, i).
at::Tensor noise(int64_t seed, int64_t K, int64_t N) {
    TORCH_CHECK(K >= 0 && N >= 0, "K and N must be >= 0");
    auto out = at::empty({K * N}, at::TensorOptions().dtype(at::kFloat));
    float* o = out.data_ptr<float>();
    const int64_t total = K * N;
    for_chunks(total, 1, PAR_WORK_NOISE, [&](int64_t c_begin, int64_t c_end) {
        const int64_t i0 = c_begin * CHUNK, i1 = std::min(total, c_end * CHUNK);
        randn_block((uint64_t)seed, (uint64_t)i0, i1 - i0, o + i0);
    });
    return out;
}

// Test helper: randn(seed, start + i) for i < n through the kernels' block generator (the low
// counter word may wrap inside the range).
at::Tensor noise_range(int64_t seed, int64_t start, int64_t n) {
    TORCH_CHECK(n >= 0, "n must be >= 0");
    auto out = at::empty({n}, at::TensorOptions().dtype(at::kFloat));
    float* o = out.data_ptr<float>();
    for_chunks(n, 1, PAR_WORK_NOISE, [&](int64_t c_begin, int64_t c_end) {
        const int64_t i0 = c_begin * CHUNK, i1 = std::min(n, c_end * CHUNK);
        randn_block((uint64_t)seed, (uint64_t)start + (uint64_t)i0, i1 - i0, o + i0);
    });
    return out;
}

// Test helpers. randn_at: tl.randn(seed, offsets) for arbitrary int64 offsets (the same lane
// function as the kernels).
at::Tensor randn_at(int64_t seed, const at::Tensor& offsets) {
    TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.device().is_cpu(), "offsets must be CPU int64");
    auto off = offsets.contiguous();
    auto out = at::empty(off.sizes(), at::TensorOptions().dtype(at::kFloat));
    const int64_t* p = off.data_ptr<int64_t>();
    float* o = out.data_ptr<float>();
    const uint32_t k0 = (uint32_t)((uint64_t)seed & 0xffffffffull), k1 = (uint32_t)((uint64_t)seed >> 32);
    const int64_t n = off.numel();
#pragma omp simd
    for (int64_t i = 0; i < n; ++i)
        o[i] = randn_lane((uint32_t)((uint64_t)p[i] & 0xffffffffull), (uint32_t)((uint64_t)p[i] >> 32), k0, k1);
    return out;
}

// vm_eval(x, fn): the float32 approximations on a float32 tensor, for the accuracy tests
// (fn: 0 exp, 1 log, 2 cos_small, 3 softplus, 4 softplus_grad, 5 log1p_unit).
at::Tensor vm_eval(const at::Tensor& x, int64_t fn) {
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "x must be CPU float32");
    auto xc = x.contiguous();
    auto out = at::empty_like(xc);
    const float* p = xc.data_ptr<float>();
    float* o = out.data_ptr<float>();
    const int64_t n = xc.numel();
    switch (fn) {
        case 0: for (int64_t i = 0; i < n; ++i) o[i] = vm::exp(p[i]); break;
        case 1: for (int64_t i = 0; i < n; ++i) o[i] = vm::log(p[i]); break;
        case 2: for (int64_t i = 0; i < n; ++i) o[i] = vm::cos_small(p[i]); break;
        case 3: for (int64_t i = 0; i < n; ++i) o[i] = softplus<float>(p[i]); break;
        case 4: for (int64_t i = 0; i < n; ++i) o[i] = softplus_grad<float>(p[i]); break;
        case 5: for (int64_t i = 0; i < n; ++i) o[i] = vm::log1p_unit(p[i]); break;
        default: TORCH_CHECK(false, "unknown function index ", fn);
    }
    return out;
}

// philox_raw: counters [n, 4] (int64 holding uint32 values), key (k0, k1) -> outputs [n, 4] (int64)
at::Tensor philox_raw(const at::Tensor& counters, int64_t k0, int64_t k1) {
    TORCH_CHECK(counters.scalar_type() == at::kLong && counters.dim() == 2 && counters.size(1) == 4,
                "counters must be int64 [n, 4]");
    auto c = counters.contiguous();
    auto out = at::empty_like(c);
    const int64_t* p = c.data_ptr<int64_t>();
    int64_t* o = out.data_ptr<int64_t>();
    for (int64_t i = 0; i < c.size(0); ++i) {
        uint32_t c0 = (uint32_t)p[4 * i], c1 = (uint32_t)p[4 * i + 1], c2 = (uint32_t)p[4 * i + 2],
                 c3 = (uint32_t)p[4 * i + 3];
        hvae::philox4x32_10(c0, c1, c2, c3, (uint32_t)k0, (uint32_t)k1);
        o[4 * i] = c0;
        o[4 * i + 1] = c1;
        o[4 * i + 2] = c2;
        o[4 * i + 3] = c3;
    }
    return out;
}

int64_t num_threads() { return at::get_num_threads(); }

// The instruction set the extension was compiled for (native.py keys the build cache on it).
std::string isa() {
#if defined(__AVX2__) && defined(__FMA__)
    return "avx2-fma";
#elif defined(__AVX__)
    return "avx";
#else
    return "baseline";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "hvae-fast OU ops, CPU (OpenMP, SIMD) kernels";
    m.def("correlated_samples_fwd", &correlated_samples_fwd);
    m.def("correlated_samples_bwd", &correlated_samples_bwd);
    m.def("gaussian_head_fwd", &gaussian_head_fwd);
    m.def("gaussian_head_bwd", &gaussian_head_bwd);
    m.def("noise", &noise);
    m.def("randn_at", &randn_at);
    m.def("noise_range", &noise_range);
    m.def("philox_raw", &philox_raw);
    m.def("num_threads", &num_threads);
    m.def("isa", &isa);
    m.def("vm_eval", &vm_eval);
}
