// The CPU kernels of csrc/ou_cpu_kernels.cpp on raw contiguous buffers (float and double are
// instantiated there). Shapes: every [K, B, *S] buffer is viewed as [K, N] with N = B * prod(S),
// every [B, *S] buffer as [N]; S = N / B in the head's backward. Semantics: hvae_fast/ops/ou.py.
#pragma once

#include <cstdint>

namespace hvae {
namespace cpu {

// out [K, N] = rho z + (1 - rho) mu + sigma sqrt(1 - rho^2) eps,
// eps[k, j] = randn(seed, offset_base + k N + j)
template <typename T>
void corr_fwd_kernel(const T* z, const T* mu, const T* sigma, T* out, int64_t N, int64_t K, double rho,
                     uint64_t seed, uint64_t offset_base);
// g [K, N] -> dz, dmu, dsigma [N] (dsigma = 0 unless need_sigma; the noise is regenerated)
template <typename T>
void corr_bwd_kernel(const T* g, T* dz, T* dmu, T* dsigma, int64_t N, int64_t K, double rho, uint64_t seed,
                     uint64_t offset_base, bool need_sigma);
// A [K, B, S] operand of the head read in place: element (k, b, s) at p[k * sK + b * sB + s]. The model
// passes the two halves of its [K, B, 2C, ...] generator output, whose rows are not packed (sB = 2S);
// packed means the [B, S] of each k is one contiguous run (sB == S, or B == 1).
template <typename T>
struct Rows {
    const T* p;
    int64_t sK, sB;
    bool packed;
};
// mr, sr [K, B, S] (N = B S), t [N] -> mbar, sbar, per-element log-density lp [N]
template <typename T>
void head_fwd_kernel(Rows<T> mr, Rows<T> sr, const T* t, T* mbar, T* sbar, T* lp, int64_t N, int64_t S,
                     int64_t K, bool ratio, double min_scale);
// g [B] -> dmr ([K, N] in the ratio mode, [N] in the mean-std mode), dsr [K, N], dt [N] (all packed)
template <typename T>
void head_bwd_kernel(const T* g, Rows<T> mr, Rows<T> sr, const T* t, const T* mbar, const T* sbar, T* dmr,
                     T* dsr, T* dt, int64_t N, int64_t S, int64_t K, bool ratio, double min_scale);
// out[i] = randn(seed, start + i), i < n (the low counter word may wrap inside the range)
void noise_kernel(uint64_t seed, uint64_t start, int64_t n, float* out);

// The instruction set these files were compiled for (hvae_fast/ops/native.py keys the build cache on it).
inline const char* compiled_isa() {
#if defined(__AVX2__) && defined(__FMA__)
    return "avx2-fma";
#elif defined(__AVX__)
    return "avx";
#else
    return "baseline";
#endif
}

}  // namespace cpu
}  // namespace hvae
