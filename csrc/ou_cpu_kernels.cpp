// CPU kernels (float32 / float64) for the two Ornstein-Uhlenbeck ops of hvae_fast.ops.ou.
//
// Layout: every [K, B, *S] tensor is viewed as [K, N] with N = B * prod(S), every [B, *S] tensor as
// [N]. The head's inputs mean_raw / scale_raw may have any strides on K and B (Rows, see the header):
// a chunk of a non-packed input is gathered row segment by row segment into a stack buffer. The noise of element (k, j) is randn(seed, k * N + j): Triton's
// tl.randn(seed, offset) (Philox4x32-10 integers bit for bit, csrc/philox.h; the float part with the
// vectorisable log / cos of csrc/cpu_philox.h). It is never stored: the backward regenerates it.
//
// Parallelisation: at::parallel_for (torch's own OpenMP pool, torch.set_num_threads applies) over
// chunks of CHUNK consecutive elements, with a grain size that keeps small problems (the MNIST MLP
// sizes) on the calling thread: a parallel region costs microseconds when the cores are idle and
// whole scheduler time slices when they are busy. Inside a chunk the loop over k is outside and the
// loop over the chunk's elements inside, so every inner loop reads and writes contiguous memory and
// is a straight-line `omp simd` loop. The noise of a (chunk, k) row is generated into a small buffer
// by one simd loop (Philox lanes side by side), then used.
//
// Math: float32 uses the polynomial exp / log / cos of csrc/cpu_vec_math.h (cephes-style, inlined, so
// they vectorise; maximum errors stated there and tested in tests/test_native.py). float64 (it exists for
// gradcheck) uses the exact std:: functions. Accumulation is in the input's precision; the per-row
// sum of the log-density is done by torch's (pairwise) reduction.
//
// Build: hvae_fast/ops/native.py compiles with -O3 -fopenmp -fno-math-errno -fno-trapping-math, plus
// -mavx2 -mfma when the building CPU has them (the cache directory is keyed on that choice).
//
// Semantics and gradient formulas: hvae_fast/ops/ou.py and hvae_fast/ops/native.py. Torch bindings:
// csrc/ou_cpu.cpp.

#include "ou_cpu_kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu_philox.h"
#include "cpu_vec_math.h"

namespace hvae {
namespace cpu {

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
                     uint64_t seed, uint64_t offset_base) {
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
                randn_block(seed, offset_base + (uint64_t)(k * N + j0), n, eps);
#pragma omp simd
                for (int64_t j = 0; j < n; ++j) o[j] = base[j] + scale[j] * T(eps[j]);
            }
        }
    });
}

template <typename T>
void corr_bwd_kernel(const T* g, T* dz, T* dmu, T* dsigma, int64_t N, int64_t K, double rho, uint64_t seed,
                     uint64_t offset_base, bool need_sigma) {
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
                    randn_block(seed, offset_base + (uint64_t)(k * N + j0), n, eps);
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

// Elements [j0, j0 + n) of row k of x: a pointer into x when its rows are packed, else gathered into
// buf (one memcpy per batch row the chunk touches; S = elements per batch row).
template <typename T>
inline const T* row_chunk(const Rows<T>& x, int64_t S, int64_t k, int64_t j0, int64_t n, T* buf) {
    const T* base = x.p + k * x.sK;
    if (x.packed) return base + j0;
    int64_t b = j0 / S, s = j0 - b * S;
    for (int64_t j = 0; j < n; ++b, s = 0) {
        const int64_t len = std::min(n - j, S - s);
        std::memcpy(buf + j, base + b * x.sB + s, sizeof(T) * len);
        j += len;
    }
    return buf;
}

template <typename T>
void head_fwd_kernel(Rows<T> mr, Rows<T> sr, const T* t, T* mbar, T* sbar, T* lp, int64_t N, int64_t S,
                     int64_t K, bool ratio, double min_scale) {
    const T ms = T(min_scale), invK = T(1) / T(K), half_log2pi = T(0.5 * LOG_2PI);
    for_chunks(N, K, PAR_WORK_HEAD, [&](int64_t c_begin, int64_t c_end) {
        alignas(64) T acc_s[CHUNK];
        alignas(64) T acc_m[CHUNK];
        alignas(64) T mbuf[CHUNK];
        alignas(64) T sbuf[CHUNK];
        for (int64_t ch = c_begin; ch < c_end; ++ch) {
            const int64_t j0 = ch * CHUNK;
            const int64_t n = std::min(CHUNK, N - j0);
            for (int64_t j = 0; j < n; ++j) acc_s[j] = acc_m[j] = T(0);
            for (int64_t k = 0; k < K; ++k) {
                const T* __restrict m_k = row_chunk(mr, S, k, j0, n, mbuf);
                const T* __restrict s_k = row_chunk(sr, S, k, j0, n, sbuf);
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
void head_bwd_kernel(const T* g, Rows<T> mr, Rows<T> sr, const T* t, const T* mbar, const T* sbar, T* dmr,
                     T* dsr, T* dt, int64_t N, int64_t S, int64_t K, bool ratio, double min_scale) {
    const T ms = T(min_scale), invK = T(1) / T(K);
    for_chunks(N, K, PAR_WORK_HEAD, [&](int64_t c_begin, int64_t c_end) {
        alignas(64) T mbuf[CHUNK];
        alignas(64) T sbuf[CHUNK];
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
                const T* __restrict m_k = ratio ? row_chunk(mr, S, k, j0, n, mbuf) : nullptr;
                const T* __restrict s_k = row_chunk(sr, S, k, j0, n, sbuf);
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

void noise_kernel(uint64_t seed, uint64_t start, int64_t n, float* out) {
    for_chunks(n, 1, PAR_WORK_NOISE, [&](int64_t c_begin, int64_t c_end) {
        const int64_t i0 = c_begin * CHUNK, i1 = std::min(n, c_end * CHUNK);
        randn_block(seed, start + (uint64_t)i0, i1 - i0, out + i0);
    });
}

#define HVAE_INSTANTIATE(T)                                                                                   \
    template void corr_fwd_kernel<T>(const T*, const T*, const T*, T*, int64_t, int64_t, double, uint64_t,    \
                                     uint64_t);                                                          \
    template void corr_bwd_kernel<T>(const T*, T*, T*, T*, int64_t, int64_t, double, uint64_t, uint64_t, bool); \
    template void head_fwd_kernel<T>(Rows<T>, Rows<T>, const T*, T*, T*, T*, int64_t, int64_t, int64_t, bool,  \
                                     double);                                                                 \
    template void head_bwd_kernel<T>(const T*, Rows<T>, Rows<T>, const T*, const T*, const T*, T*, T*, T*,     \
                                     int64_t, int64_t, int64_t, bool, double);
HVAE_INSTANTIATE(float)
HVAE_INSTANTIATE(double)
#undef HVAE_INSTANTIATE

}  // namespace cpu
}  // namespace hvae
