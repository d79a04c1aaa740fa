// CPU kernels (float32 / float64, OpenMP) for the two Ornstein-Uhlenbeck ops of hvae_fast.ou.
//
// Layout: every [K, B, *S] tensor is contiguous and viewed as [K, N] with N = B * prod(S); every
// [B, *S] tensor as [N]. The noise of element (k, j) is philox_randn(seed, k * N + j), identical to
// Triton's tl.randn(seed, offset) (csrc/philox.h); it is never stored, the backward regenerates it.
//
// Parallelisation: `omp parallel for` over chunks of CHUNK consecutive elements; inside a chunk the
// loop over k is outside and the loop over the chunk's elements inside, so every inner loop reads
// and writes contiguous memory and is a straight-line loop the compiler can vectorise. Accumulation
// is in the input's precision (float for float32, double for float64); the per-row sum of the
// log-density is done by torch's (pairwise) reduction.
//
// Semantics and gradient formulas: hvae_fast/ou.py and hvae_fast/native.py.

// Narrow includes instead of <torch/extension.h>: a third of the compile time of the first use.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "philox.h"

namespace {

constexpr int64_t CHUNK = 256;
constexpr double LOG_2PI = 1.8378770664093453;  // log(2 pi)

inline int64_t n_chunks(int64_t N) { return (N + CHUNK - 1) / CHUNK; }

template <typename T>
inline T softplus(T x) {  // torch.nn.functional.softplus(x, beta=1, threshold=20)
    return x > T(20) ? x : std::log1p(std::exp(x));
}

template <typename T>
inline T softplus_grad(T x) {  // d softplus / dx exactly as torch's backward computes it
    if (x > T(20)) return T(1);
    const T e = std::exp(x);
    return e / (e + T(1));
}

// ---------------------------------------------------------------------------------------------
// Op 1: correlated samples
// ---------------------------------------------------------------------------------------------

template <typename T>
void corr_fwd_kernel(const T* z, const T* mu, const T* sigma, T* out, int64_t N, int64_t K, double rho,
                     uint64_t seed) {
    const T a = T(rho), b = T(1.0 - rho);
    const T c = T(std::sqrt(std::max(0.0, 1.0 - rho * rho)));
    const int64_t nc = n_chunks(N);
#pragma omp parallel for schedule(static)
    for (int64_t ch = 0; ch < nc; ++ch) {
        const int64_t j0 = ch * CHUNK;
        const int64_t n = std::min(CHUNK, N - j0);
        T base[CHUNK], scale[CHUNK];
        for (int64_t j = 0; j < n; ++j) {
            base[j] = a * z[j0 + j] + b * mu[j0 + j];
            scale[j] = c * sigma[j0 + j];
        }
        for (int64_t k = 0; k < K; ++k) {
            T* o = out + k * N + j0;
            const uint64_t off = (uint64_t)(k * N + j0);
            if (c == T(0)) {  // rho = 1: z' = z, no noise needed
                for (int64_t j = 0; j < n; ++j) o[j] = base[j];
            } else {
#pragma omp simd
                for (int64_t j = 0; j < n; ++j)
                    o[j] = base[j] + scale[j] * T(hvae::philox_randn(seed, off + (uint64_t)j));
            }
        }
    }
}

template <typename T>
void corr_bwd_kernel(const T* g, T* dz, T* dmu, T* dsigma, int64_t N, int64_t K, double rho, uint64_t seed,
                     bool need_sigma) {
    const T a = T(rho), b = T(1.0 - rho);
    const T c = T(std::sqrt(std::max(0.0, 1.0 - rho * rho)));
    const bool gen = need_sigma && c != T(0);
    const int64_t nc = n_chunks(N);
#pragma omp parallel for schedule(static)
    for (int64_t ch = 0; ch < nc; ++ch) {
        const int64_t j0 = ch * CHUNK;
        const int64_t n = std::min(CHUNK, N - j0);
        T sg[CHUNK], sge[CHUNK];
        for (int64_t j = 0; j < n; ++j) sg[j] = sge[j] = T(0);
        for (int64_t k = 0; k < K; ++k) {
            const T* gk = g + k * N + j0;
            const uint64_t off = (uint64_t)(k * N + j0);
            if (gen) {
#pragma omp simd
                for (int64_t j = 0; j < n; ++j) {
                    sg[j] += gk[j];
                    sge[j] += gk[j] * T(hvae::philox_randn(seed, off + (uint64_t)j));
                }
            } else {
#pragma omp simd
                for (int64_t j = 0; j < n; ++j) sg[j] += gk[j];
            }
        }
        for (int64_t j = 0; j < n; ++j) {
            dz[j0 + j] = a * sg[j];
            dmu[j0 + j] = b * sg[j];
            dsigma[j0 + j] = c * sge[j];  // 0 when rho = 1 or sigma needs no gradient
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Op 2: averaged Gaussian head
// ---------------------------------------------------------------------------------------------

template <typename T>
void head_fwd_kernel(const T* mr, const T* sr, const T* t, T* mbar, T* sbar, T* lp, int64_t N, int64_t K,
                     bool ratio, double min_scale) {
    const T ms = T(min_scale), invK = T(1) / T(K), half_log2pi = T(0.5 * LOG_2PI);
    const int64_t nc = n_chunks(N);
#pragma omp parallel for schedule(static)
    for (int64_t ch = 0; ch < nc; ++ch) {
        const int64_t j0 = ch * CHUNK;
        const int64_t n = std::min(CHUNK, N - j0);
        T acc_s[CHUNK], acc_m[CHUNK];
        for (int64_t j = 0; j < n; ++j) acc_s[j] = acc_m[j] = T(0);
        for (int64_t k = 0; k < K; ++k) {
            const T* m_k = mr + k * N + j0;
            const T* s_k = sr + k * N + j0;
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
        for (int64_t j = 0; j < n; ++j) {
            const T s = acc_s[j] * invK;
            const T m = ratio ? s * (acc_m[j] * invK) : acc_m[j] * invK;
            const T d = (t[j0 + j] - m) / s;
            mbar[j0 + j] = m;
            sbar[j0 + j] = s;
            lp[j0 + j] = -half_log2pi - std::log(s) - T(0.5) * d * d;
        }
    }
}

template <typename T>
void head_bwd_kernel(const T* g, const T* mr, const T* sr, const T* t, const T* mbar, const T* sbar, T* dmr,
                     T* dsr, T* dt, int64_t N, int64_t S, int64_t K, bool ratio, double min_scale) {
    const T ms = T(min_scale), invK = T(1) / T(K);
    const int64_t nc = n_chunks(N);
#pragma omp parallel for schedule(static)
    for (int64_t ch = 0; ch < nc; ++ch) {
        const int64_t j0 = ch * CHUNK;
        const int64_t n = std::min(CHUNK, N - j0);
        T A[CHUNK], Bc[CHUNK];  // per-element factors shared by all k
        for (int64_t j = 0; j < n; ++j) {
            const int64_t i = j0 + j;
            const T gb = g[i / S];
            const T s = sbar[i], m = mbar[i];
            const T diff = t[i] - m;
            const T is2 = T(1) / (s * s);
            const T dm = gb * diff * is2;
            const T ds = gb * (-T(1) / s + diff * diff * is2 / s);
            dt[i] = -dm;
            if (ratio) {
                // dr = dm * s and ds_tot = ds + dm * r with r = m / s. Written out,
                // ds_tot = g (-1/s + (t - m)^2/s^3 + (t - m) m/s^3) = g (-1/s + (t - m) t / s^3):
                // the same value without the cancellation of the two large terms when |r| is large.
                A[j] = dm * s * invK;
                Bc[j] = gb * (-T(1) / s + diff * t[i] * is2 / s) * invK;
            } else {
                A[j] = dm * invK;
                Bc[j] = ds * invK;
            }
        }
        for (int64_t k = 0; k < K; ++k) {
            const T* m_k = mr + k * N + j0;
            const T* s_k = sr + k * N + j0;
            T* dm_k = dmr + k * N + j0;
            T* ds_k = dsr + k * N + j0;
            if (ratio) {
#pragma omp simd
                for (int64_t j = 0; j < n; ++j) {
                    const T x = s_k[j];
                    const T inv = T(1) / (softplus(x) + ms);
                    const T a = A[j] * inv;
                    dm_k[j] = a;
                    ds_k[j] = (Bc[j] - a * m_k[j] * inv) * softplus_grad(x);
                }
            } else {
#pragma omp simd
                for (int64_t j = 0; j < n; ++j) {
                    dm_k[j] = A[j];
                    ds_k[j] = Bc[j] * softplus_grad(s_k[j]);
                }
            }
        }
    }
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

// g [B] -> (d mean_raw [K, B, *S], d scale_raw [K, B, *S], d target [B, *S])
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
    auto dmr = at::empty_like(mean_raw);
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

// eps of element (k, j) for every k < K, j < N: float32 [K * N], eps[i] = philox_randn(seed, i).
at::Tensor noise(int64_t seed, int64_t K, int64_t N) {
    TORCH_CHECK(K >= 0 && N >= 0, "K and N must be >= 0");
    auto out = at::empty({K * N}, at::TensorOptions().dtype(at::kFloat));
    float* o = out.data_ptr<float>();
    const int64_t total = K * N;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < total; ++i) o[i] = hvae::philox_randn((uint64_t)seed, (uint64_t)i);
    return out;
}

// Test helpers. randn_at: tl.randn(seed, offsets) for arbitrary int64 offsets.
at::Tensor randn_at(int64_t seed, const at::Tensor& offsets) {
    TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.device().is_cpu(), "offsets must be CPU int64");
    auto off = offsets.contiguous();
    auto out = at::empty(off.sizes(), at::TensorOptions().dtype(at::kFloat));
    const int64_t* p = off.data_ptr<int64_t>();
    float* o = out.data_ptr<float>();
    for (int64_t i = 0; i < off.numel(); ++i) o[i] = hvae::philox_randn((uint64_t)seed, (uint64_t)p[i]);
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

int64_t num_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "hvae-fast OU ops, CPU (OpenMP) kernels";
    m.def("correlated_samples_fwd", &correlated_samples_fwd);
    m.def("correlated_samples_bwd", &correlated_samples_bwd);
    m.def("gaussian_head_fwd", &gaussian_head_fwd);
    m.def("gaussian_head_bwd", &gaussian_head_bwd);
    m.def("noise", &noise);
    m.def("randn_at", &randn_at);
    m.def("philox_raw", &philox_raw);
    m.def("num_threads", &num_threads);
}
