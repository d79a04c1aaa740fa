// CUDA kernels for the two Ornstein-Uhlenbeck ops of hvae_fast.ops.ou (float32 / float16 / bfloat16
// storage, float32 arithmetic and accumulation).
//
// No torch headers: this file compiles stand-alone (`nvcc -c -std=c++17 ou_cuda_kernels.cu`), which
// is how the test-suite checks it on machines without a GPU. The torch bindings live in ou_cuda.cpp
// and call the `extern "C"` launchers below through raw pointers. Keep the launcher prototypes in
// ou_cuda.cpp in sync with this file.
//
// Layout as in ou_cpu.cpp: [K, B, *S] tensors are contiguous [K, N], [B, *S] ones [N], except the
// head's inputs mean_raw / scale_raw, read in place with any strides on K and B and packed *S
// (element (k, j = b S + s) at k sK + b sB + s: a channel half of the model's [K, B, 2C, ...]
// output); the gradients the head writes are contiguous [K, N]. The noise of
// element (k, j) is hvae::philox_randn(seed, offset_base + k * N + j) == Triton's
// tl.randn(seed, offset_base + k * N + j).
// One thread per element j (grid-stride), looping over k: every access is coalesced in j.
//
// dtype codes: 0 = float32, 1 = float16, 2 = bfloat16. Launchers return a cudaError_t as int.

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#include "philox.h"

namespace {

constexpr int THREADS = 256;
constexpr double LOG_2PI = 1.8378770664093453;

__device__ __forceinline__ float ld(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float ld(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float ld(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void st(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
__device__ __forceinline__ void st(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }

__device__ __forceinline__ float softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }
__device__ __forceinline__ float softplus_grad(float x) {
    if (x > 20.0f) return 1.0f;
    const float e = expf(x);
    return e / (e + 1.0f);
}

inline unsigned int n_blocks(int64_t n) {
    int64_t b = (n + THREADS - 1) / THREADS;
    if (b > 65536) b = 65536;  // grid-stride loops cover the rest
    if (b < 1) b = 1;
    return (unsigned int)b;
}

// ---------------------------------------------------------------------------------------------
// Op 1: correlated samples
// ---------------------------------------------------------------------------------------------

template <typename T>
__global__ void corr_fwd_kernel(const T* __restrict__ z, const T* __restrict__ mu, const T* __restrict__ sigma,
                                T* __restrict__ out, int64_t N, int64_t K, float a, float b, float c,
                                uint64_t seed, uint64_t offset_base) {
    for (int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; j < N; j += (int64_t)gridDim.x * blockDim.x) {
        const float base = a * ld(z, j) + b * ld(mu, j);
        const float scale = c * ld(sigma, j);
        for (int64_t k = 0; k < K; ++k) {
            const int64_t i = k * N + j;
            const float eps = c != 0.0f ? hvae::philox_randn(seed, offset_base + (uint64_t)i) : 0.0f;
            st(out, i, base + scale * eps);
        }
    }
}

template <typename T>
__global__ void corr_bwd_kernel(const T* __restrict__ g, T* __restrict__ dz, T* __restrict__ dmu,
                                T* __restrict__ dsigma, int64_t N, int64_t K, float a, float b, float c,
                                uint64_t seed, uint64_t offset_base, int gen) {
    for (int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; j < N; j += (int64_t)gridDim.x * blockDim.x) {
        float sg = 0.0f, sge = 0.0f;
        for (int64_t k = 0; k < K; ++k) {
            const int64_t i = k * N + j;
            const float gk = ld(g, i);
            sg += gk;
            if (gen) sge += gk * hvae::philox_randn(seed, offset_base + (uint64_t)i);
        }
        st(dz, j, a * sg);
        st(dmu, j, b * sg);
        st(dsigma, j, c * sge);
    }
}

__global__ void noise_kernel(float* __restrict__ out, int64_t total, uint64_t seed, uint64_t offset_base) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x)
        out[i] = hvae::philox_randn(seed, offset_base + (uint64_t)i);
}

// ---------------------------------------------------------------------------------------------
// Op 2: averaged Gaussian head. mu_bar, sigma_bar and the element-wise log-density are float32.
// ---------------------------------------------------------------------------------------------

// The strides of a [K, B, *S] head input with packed *S (see the layout note above).
struct RowStrides {
    int64_t sK, sB;
};

template <typename T>
__global__ void head_fwd_kernel(const T* __restrict__ mr, const T* __restrict__ sr, const T* __restrict__ t,
                                float* __restrict__ mbar, float* __restrict__ sbar, float* __restrict__ lp,
                                int64_t N, int64_t S, int64_t K, RowStrides ms, RowStrides ss, int ratio,
                                float min_scale) {
    const float invK = 1.0f / (float)K;
    for (int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; j < N; j += (int64_t)gridDim.x * blockDim.x) {
        float acc_s = 0.0f, acc_m = 0.0f;
        const int64_t b = j / S, e = j - b * S;
        const T* mrow = mr + b * ms.sB + e;  // element j of sample k: mrow[k * ms.sK]
        const T* srow = sr + b * ss.sB + e;
        for (int64_t k = 0; k < K; ++k) {
            const float sk = softplus(ld(srow, k * ss.sK)) + min_scale;
            acc_s += sk;
            acc_m += ratio ? ld(mrow, k * ms.sK) / sk : ld(mrow, k * ms.sK);
        }
        const float s = acc_s * invK;
        const float m = ratio ? s * (acc_m * invK) : acc_m * invK;
        const float d = (ld(t, j) - m) / s;
        mbar[j] = m;
        sbar[j] = s;
        lp[j] = -(float)(0.5 * LOG_2PI) - logf(s) - 0.5f * d * d;
    }
}

template <typename T>
__global__ void head_bwd_kernel(const float* __restrict__ g, const T* __restrict__ mr, const T* __restrict__ sr,
                                const T* __restrict__ t, const float* __restrict__ mbar,
                                const float* __restrict__ sbar, T* __restrict__ dmr, T* __restrict__ dsr,
                                T* __restrict__ dt, int64_t N, int64_t S, int64_t K, RowStrides ms, RowStrides ss,
                                int ratio, float min_scale) {
    const float invK = 1.0f / (float)K;
    for (int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; j < N; j += (int64_t)gridDim.x * blockDim.x) {
        const int64_t b = j / S, e = j - b * S;
        const T* mrow = mr + b * ms.sB + e;  // the inputs read in place; the gradients are packed [K, N]
        const T* srow = sr + b * ss.sB + e;
        const float gb = g[b];
        const float s = sbar[j], m = mbar[j];
        const float tj = ld(t, j);
        const float diff = tj - m;
        const float is2 = 1.0f / (s * s);
        const float dm = gb * diff * is2;
        const float ds = gb * (-1.0f / s + diff * diff * is2 / s);
        st(dt, j, -dm);
        float A, Bc;
        if (ratio) {
            // dr = dm * s; ds_tot = ds + dm * m / s = g (-1/s + (t - m) t / s^3), cancellation-free
            A = dm * s * invK;
            Bc = gb * (-1.0f / s + diff * tj * is2 / s) * invK;
        } else {
            A = dm * invK;
            Bc = ds * invK;
        }
        for (int64_t k = 0; k < K; ++k) {
            const int64_t i = k * N + j;
            const float x = ld(srow, k * ss.sK);
            if (ratio) {
                const float inv = 1.0f / (softplus(x) + min_scale);
                const float a = A * inv;
                st(dmr, i, a);
                st(dsr, i, (Bc - a * ld(mrow, k * ms.sK) * inv) * softplus_grad(x));
            } else {
                st(dmr, i, A);
                st(dsr, i, Bc * softplus_grad(x));
            }
        }
    }
}

template <typename T>
int corr_fwd_t(const void* z, const void* mu, const void* sigma, void* out, int64_t N, int64_t K, double rho,
               uint64_t seed, uint64_t offset_base, cudaStream_t stream) {
    const float a = (float)rho, b = (float)(1.0 - rho);
    const double c2 = 1.0 - rho * rho;
    const float c = (float)(c2 > 0.0 ? sqrt(c2) : 0.0);
    corr_fwd_kernel<T><<<n_blocks(N), THREADS, 0, stream>>>((const T*)z, (const T*)mu, (const T*)sigma, (T*)out, N, K,
                                                            a, b, c, seed, offset_base);
    return (int)cudaGetLastError();
}

template <typename T>
int corr_bwd_t(const void* g, void* dz, void* dmu, void* dsigma, int64_t N, int64_t K, double rho, uint64_t seed,
               uint64_t offset_base, int need_sigma, cudaStream_t stream) {
    const float a = (float)rho, b = (float)(1.0 - rho);
    const double c2 = 1.0 - rho * rho;
    const float c = (float)(c2 > 0.0 ? sqrt(c2) : 0.0);
    const int gen = (need_sigma && c != 0.0f) ? 1 : 0;
    corr_bwd_kernel<T><<<n_blocks(N), THREADS, 0, stream>>>((const T*)g, (T*)dz, (T*)dmu, (T*)dsigma, N, K, a, b, c,
                                                            seed, offset_base, gen);
    return (int)cudaGetLastError();
}

template <typename T>
int head_fwd_t(const void* mr, const void* sr, const void* t, float* mbar, float* sbar, float* lp, int64_t N,
               int64_t S, int64_t K, RowStrides ms, RowStrides ss, int ratio, double min_scale, cudaStream_t stream) {
    head_fwd_kernel<T><<<n_blocks(N), THREADS, 0, stream>>>((const T*)mr, (const T*)sr, (const T*)t, mbar, sbar, lp,
                                                            N, S, K, ms, ss, ratio, (float)min_scale);
    return (int)cudaGetLastError();
}

template <typename T>
int head_bwd_t(const float* g, const void* mr, const void* sr, const void* t, const float* mbar, const float* sbar,
               void* dmr, void* dsr, void* dt, int64_t N, int64_t S, int64_t K, RowStrides ms, RowStrides ss,
               int ratio, double min_scale, cudaStream_t stream) {
    head_bwd_kernel<T><<<n_blocks(N), THREADS, 0, stream>>>(g, (const T*)mr, (const T*)sr, (const T*)t, mbar, sbar,
                                                            (T*)dmr, (T*)dsr, (T*)dt, N, S, K, ms, ss, ratio,
                                                            (float)min_scale);
    return (int)cudaGetLastError();
}

constexpr int BAD_DTYPE = -1;

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launchers (C linkage, raw pointers; `stream` is a cudaStream_t, nullptr for the default stream)
// ---------------------------------------------------------------------------------------------

extern "C" {

const char* hvae_cuda_error_string(int code) {
    if (code == BAD_DTYPE) return "unsupported dtype code (0 float32, 1 float16, 2 bfloat16)";
    return cudaGetErrorString((cudaError_t)code);
}

int hvae_cuda_corr_fwd(int dtype, const void* z, const void* mu, const void* sigma, void* out, int64_t N, int64_t K,
                       double rho, uint64_t seed, uint64_t offset_base, void* stream) {
    if (N <= 0 || K <= 0) return 0;
    cudaStream_t s = (cudaStream_t)stream;
    switch (dtype) {
        case 0: return corr_fwd_t<float>(z, mu, sigma, out, N, K, rho, seed, offset_base, s);
        case 1: return corr_fwd_t<__half>(z, mu, sigma, out, N, K, rho, seed, offset_base, s);
        case 2: return corr_fwd_t<__nv_bfloat16>(z, mu, sigma, out, N, K, rho, seed, offset_base, s);
        default: return BAD_DTYPE;
    }
}

int hvae_cuda_corr_bwd(int dtype, const void* g, void* dz, void* dmu, void* dsigma, int64_t N, int64_t K, double rho,
                       uint64_t seed, uint64_t offset_base, int need_sigma, void* stream) {
    if (N <= 0 || K <= 0) return 0;
    cudaStream_t s = (cudaStream_t)stream;
    switch (dtype) {
        case 0: return corr_bwd_t<float>(g, dz, dmu, dsigma, N, K, rho, seed, offset_base, need_sigma, s);
        case 1: return corr_bwd_t<__half>(g, dz, dmu, dsigma, N, K, rho, seed, offset_base, need_sigma, s);
        case 2: return corr_bwd_t<__nv_bfloat16>(g, dz, dmu, dsigma, N, K, rho, seed, offset_base, need_sigma, s);
        default: return BAD_DTYPE;
    }
}

int hvae_cuda_noise(float* out, int64_t total, uint64_t seed, uint64_t offset_base, void* stream) {
    if (total <= 0) return 0;
    noise_kernel<<<n_blocks(total), THREADS, 0, (cudaStream_t)stream>>>(out, total, seed, offset_base);
    return (int)cudaGetLastError();
}

// mr / sr: [K, B, *S] with strides (m_sK, m_sB) / (s_sK, s_sB) on K and B and packed *S; S = N / B.
int hvae_cuda_head_fwd(int dtype, const void* mr, const void* sr, const void* t, float* mbar, float* sbar, float* lp,
                       int64_t N, int64_t S, int64_t K, int64_t m_sK, int64_t m_sB, int64_t s_sK, int64_t s_sB,
                       int ratio, double min_scale, void* stream) {
    if (N <= 0 || K <= 0 || S <= 0) return 0;
    cudaStream_t s = (cudaStream_t)stream;
    const RowStrides ms{m_sK, m_sB}, ss{s_sK, s_sB};
    switch (dtype) {
        case 0: return head_fwd_t<float>(mr, sr, t, mbar, sbar, lp, N, S, K, ms, ss, ratio, min_scale, s);
        case 1: return head_fwd_t<__half>(mr, sr, t, mbar, sbar, lp, N, S, K, ms, ss, ratio, min_scale, s);
        case 2: return head_fwd_t<__nv_bfloat16>(mr, sr, t, mbar, sbar, lp, N, S, K, ms, ss, ratio, min_scale, s);
        default: return BAD_DTYPE;
    }
}

int hvae_cuda_head_bwd(int dtype, const float* g, const void* mr, const void* sr, const void* t, const float* mbar,
                       const float* sbar, void* dmr, void* dsr, void* dt, int64_t N, int64_t S, int64_t K,
                       int64_t m_sK, int64_t m_sB, int64_t s_sK, int64_t s_sB, int ratio, double min_scale,
                       void* stream) {
    if (N <= 0 || K <= 0 || S <= 0) return 0;
    cudaStream_t s = (cudaStream_t)stream;
    const RowStrides ms{m_sK, m_sB}, ss{s_sK, s_sB};
    switch (dtype) {
        case 0: return head_bwd_t<float>(g, mr, sr, t, mbar, sbar, dmr, dsr, dt, N, S, K, ms, ss, ratio, min_scale, s);
        case 1: return head_bwd_t<__half>(g, mr, sr, t, mbar, sbar, dmr, dsr, dt, N, S, K, ms, ss, ratio, min_scale, s);
        case 2:
            return head_bwd_t<__nv_bfloat16>(g, mr, sr, t, mbar, sbar, dmr, dsr, dt, N, S, K, ms, ss, ratio, min_scale,
                                             s);
        default: return BAD_DTYPE;
    }
}

}  // extern "C"
