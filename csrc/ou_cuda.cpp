// Torch bindings for the CUDA launchers of csrc/ou_cuda_kernels.cu (float32 / float16 / bfloat16
// inputs, float32 accumulation; mu_bar and sigma_bar are kept in float32 for the backward).
// Built by hvae_fast/ops/native.py only when torch has CUDA and a device is present, after the C++
// extension whose TORCH_LIBRARY(hvae_fast) (csrc/ou_cpu.cpp) holds the schemas: this file registers
// the CUDA kernels of the same four ops, mirroring ou_cpu.cpp's CPU registration line for line.

// Narrow includes instead of <torch/extension.h>: a third of the compile time of the first use.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <tuple>
#include <vector>

// Prototypes of the launchers in ou_cuda_kernels.cu (C linkage: keep the two files in sync).
extern "C" {
const char* hvae_cuda_error_string(int code);
int hvae_cuda_corr_fwd(int dtype, const void* z, const void* mu, const void* sigma, void* out, int64_t N, int64_t K,
                       double rho, uint64_t seed, uint64_t offset_base, void* stream);
int hvae_cuda_corr_bwd(int dtype, const void* g, void* dz, void* dmu, void* dsigma, int64_t N, int64_t K, double rho,
                       uint64_t seed, uint64_t offset_base, int need_sigma, void* stream);
int hvae_cuda_noise(float* out, int64_t total, uint64_t seed, uint64_t offset_base, void* stream);
int hvae_cuda_head_fwd(int dtype, const void* mr, const void* sr, const void* t, float* mbar, float* sbar, float* lp,
                       int64_t N, int64_t S, int64_t K, int64_t m_sK, int64_t m_sB, int64_t s_sK, int64_t s_sB,
                       int ratio, double min_scale, void* stream);
int hvae_cuda_head_bwd(int dtype, const float* g, const void* mr, const void* sr, const void* t, const float* mbar,
                       const float* sbar, void* dmr, void* dsr, void* dt, int64_t N, int64_t S, int64_t K,
                       int64_t m_sK, int64_t m_sB, int64_t s_sK, int64_t s_sB, int ratio, double min_scale,
                       void* stream);
}

namespace {

using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

int dtype_code(const at::Tensor& x) {
    switch (x.scalar_type()) {
        case at::kFloat: return 0;
        case at::kHalf: return 1;
        case at::kBFloat16: return 2;
        default: TORCH_CHECK(false, "CUDA OU kernels take float32, float16 or bfloat16, got ", x.scalar_type());
    }
    return -1;
}

void check_input(const at::Tensor& x, const at::Tensor& ref, const char* name) {
    TORCH_CHECK(x.is_cuda(), name, " must be a CUDA tensor");
    TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
    TORCH_CHECK(x.scalar_type() == ref.scalar_type(), name, " must have dtype ", ref.scalar_type());
    TORCH_CHECK(x.device() == ref.device(), name, " must be on ", ref.device());
}

void check_launch(int code) {
    TORCH_CHECK(code == 0, "hvae-fast CUDA kernel launch failed: ", hvae_cuda_error_string(code));
}

void* stream_of(const at::Tensor& x) { return (void*)c10::cuda::getCurrentCUDAStream(x.device().index()).stream(); }

at::Tensor correlated_samples_fwd(const at::Tensor& z, const at::Tensor& mu, const at::Tensor& sigma, double rho,
                                  int64_t K, int64_t seed, int64_t offset_base) {
    check_input(z, z, "z");
    check_input(mu, z, "mu");
    check_input(sigma, z, "sigma");
    TORCH_CHECK(z.sizes() == mu.sizes() && z.sizes() == sigma.sizes(), "z, mu and sigma must have one shape");
    TORCH_CHECK(K >= 1, "K must be >= 1");
    TORCH_CHECK(rho >= 0.0 && rho <= 1.0, "rho must lie in [0, 1]");
    const c10::cuda::CUDAGuard guard(z.device());
    std::vector<int64_t> shape{K};
    for (auto s : z.sizes()) shape.push_back(s);
    auto out = at::empty(shape, z.options());
    check_launch(hvae_cuda_corr_fwd(dtype_code(z), z.data_ptr(), mu.data_ptr(), sigma.data_ptr(), out.data_ptr(),
                                    z.numel(), K, rho, (uint64_t)seed, (uint64_t)offset_base, stream_of(z)));
    return out;
}

Tensor3 correlated_samples_bwd(const at::Tensor& g, double rho, int64_t K, int64_t seed, int64_t offset_base,
                               bool need_sigma) {
    check_input(g, g, "grad");
    TORCH_CHECK(g.dim() >= 1 && g.size(0) == K, "grad must have K rows");
    const c10::cuda::CUDAGuard guard(g.device());
    auto shape = g.sizes().slice(1);
    auto dz = at::empty(shape, g.options());
    auto dmu = at::empty(shape, g.options());
    auto dsigma = at::empty(shape, g.options());
    check_launch(hvae_cuda_corr_bwd(dtype_code(g), g.data_ptr(), dz.data_ptr(), dmu.data_ptr(), dsigma.data_ptr(),
                                    dz.numel(), K, rho, (uint64_t)seed, (uint64_t)offset_base, need_sigma ? 1 : 0,
                                    stream_of(g)));
    return {dz, dmu, dsigma};
}

// A [K, B, *S] head input is read in place when its *S dims are packed row-major (any strides on K
// and B: a channel half of the model's [K, B, 2C, ...] output, as ou_cpu.cpp's rows_of and
// hvae_fast.backends.packed_rows); anything else is copied first. Not yet run on a GPU.
at::Tensor rows_packed(const at::Tensor& x) {
    int64_t expected = 1;
    for (int64_t d = x.dim() - 1; d >= 2; --d) {
        if (x.size(d) != 1 && x.stride(d) != expected) return x.contiguous();
        expected *= x.size(d);
    }
    return x;
}

void check_head_input(const at::Tensor& x, const at::Tensor& ref, const char* name) {
    TORCH_CHECK(x.is_cuda(), name, " must be a CUDA tensor");
    TORCH_CHECK(x.scalar_type() == ref.scalar_type(), name, " must have dtype ", ref.scalar_type());
    TORCH_CHECK(x.device() == ref.device(), name, " must be on ", ref.device());
    TORCH_CHECK(x.dim() >= 2, name, " must have shape [K, B, ...]");
}

Tensor3 gaussian_head_fwd(const at::Tensor& mean_raw_in, const at::Tensor& scale_raw_in,
                                          const at::Tensor& target, bool ratio, double min_scale) {
    const auto mean_raw = rows_packed(mean_raw_in), scale_raw = rows_packed(scale_raw_in);
    check_input(target, target, "target");
    check_head_input(mean_raw, target, "mean_raw");
    check_head_input(scale_raw, target, "scale_raw");
    TORCH_CHECK(target.dim() >= 1, "target must have a batch dimension");
    TORCH_CHECK(mean_raw.sizes() == scale_raw.sizes(), "mean_raw and scale_raw must have one shape");
    TORCH_CHECK(mean_raw.dim() == target.dim() + 1 && mean_raw.sizes().slice(1) == target.sizes(),
                "mean_raw must have shape [K, *target.shape]");
    const int64_t K = mean_raw.size(0);
    TORCH_CHECK(K >= 1, "K must be >= 1");
    const c10::cuda::CUDAGuard guard(target.device());
    auto f32 = target.options().dtype(at::kFloat);
    auto mbar = at::empty(target.sizes(), f32);
    auto sbar = at::empty(target.sizes(), f32);
    auto lp = at::empty(target.sizes(), f32);
    // An empty batch (or empty rows): a [B] of zeros; reshape({0, -1}) below would throw.
    if (target.numel() == 0) return {at::zeros({target.size(0)}, f32), mbar, sbar};
    const int64_t N = target.numel(), S = N / target.size(0);
    check_launch(hvae_cuda_head_fwd(dtype_code(target), mean_raw.data_ptr(), scale_raw.data_ptr(), target.data_ptr(),
                                    mbar.data_ptr<float>(), sbar.data_ptr<float>(), lp.data_ptr<float>(), N, S, K,
                                    mean_raw.stride(0), mean_raw.stride(1), scale_raw.stride(0), scale_raw.stride(1),
                                    ratio ? 1 : 0, min_scale, stream_of(target)));
    auto out = lp.reshape({target.size(0), -1}).sum(1);
    return {out, mbar, sbar};
}

Tensor3 gaussian_head_bwd(const at::Tensor& g, const at::Tensor& mean_raw_in,
                                          const at::Tensor& scale_raw_in, const at::Tensor& target,
                                          const at::Tensor& mbar, const at::Tensor& sbar, bool ratio,
                                          double min_scale) {
    const auto mean_raw = rows_packed(mean_raw_in), scale_raw = rows_packed(scale_raw_in);
    check_input(target, target, "target");
    check_head_input(mean_raw, target, "mean_raw");
    check_head_input(scale_raw, target, "scale_raw");
    TORCH_CHECK(mbar.scalar_type() == at::kFloat && sbar.scalar_type() == at::kFloat, "saved averages must be float32");
    TORCH_CHECK(mbar.is_contiguous() && sbar.is_contiguous(), "saved averages must be contiguous");
    const c10::cuda::CUDAGuard guard(target.device());
    const int64_t K = mean_raw.size(0);
    const int64_t N = target.numel();
    const int64_t B = target.size(0);
    auto g32 = g.to(at::kFloat).contiguous();
    TORCH_CHECK(g32.numel() == B, "grad must have one entry per batch row");
    auto dmr = at::empty(mean_raw.sizes(), mean_raw.options());  // packed [K, N], whatever the inputs' strides
    auto dsr = at::empty(scale_raw.sizes(), scale_raw.options());
    auto dt = at::empty_like(target);
    if (N == 0) return {dmr, dsr, dt};
    check_launch(hvae_cuda_head_bwd(dtype_code(target), g32.data_ptr<float>(), mean_raw.data_ptr(),
                                    scale_raw.data_ptr(), target.data_ptr(), mbar.data_ptr<float>(),
                                    sbar.data_ptr<float>(), dmr.data_ptr(), dsr.data_ptr(), dt.data_ptr(), N, N / B, K,
                                    mean_raw.stride(0), mean_raw.stride(1), scale_raw.stride(0), scale_raw.stride(1),
                                    ratio ? 1 : 0, min_scale, stream_of(target)));
    return {dmr, dsr, dt};
}

at::Tensor noise(int64_t seed, int64_t K, int64_t N, int64_t offset_base, int64_t device_index) {
    TORCH_CHECK(K >= 0 && N >= 0, "K and N must be >= 0");
    const c10::cuda::CUDAGuard guard((c10::DeviceIndex)device_index);
    auto out = at::empty({K * N}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, device_index));
    check_launch(hvae_cuda_noise(out.data_ptr<float>(), K * N, (uint64_t)seed, (uint64_t)offset_base,
                                 stream_of(out)));
    return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "hvae-fast OU ops, CUDA kernels";
    m.def("noise", &noise);
}

TORCH_LIBRARY_IMPL(hvae_fast, CUDA, m) {
    m.impl("correlated_samples_fwd", &correlated_samples_fwd);
    m.impl("correlated_samples_bwd", &correlated_samples_bwd);
    m.impl("gaussian_head_fwd", &gaussian_head_fwd);
    m.impl("gaussian_head_bwd", &gaussian_head_bwd);
}
