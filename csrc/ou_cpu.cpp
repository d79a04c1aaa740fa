// Torch bindings of the CPU OU kernels (module hvae_fast_ou_cpu): argument checks, allocation, dtype
// dispatch. Layout of csrc/ for the CPU backend:
//   cpu_vec_math.h      vectorisable float32 exp / log / cos / softplus (and the float64 templates)
//   cpu_philox.h        tl.randn(seed, offset) vectorised across offsets (Philox lanes, AVX2 path)
//   philox.h            the scalar Philox4x32-10 / tl.randn, shared with the CUDA kernels
//   ou_cpu_kernels.*    the four kernels and the noise on raw buffers (OpenMP via at::parallel_for)
//   ou_cpu.cpp          this file: the production extension
//   ou_cpu_testing.cpp  test-only functions (raw Philox, vm accuracy), a separate extension that only
//                       the tests build (hvae_fast.ops.native.CPU_TEST_EXT)
// hvae_fast/ops/native.py compiles ou_cpu.cpp + ou_cpu_kernels.cpp (flags: see there).
//
// The four kernels are torch operators (torch.ops.hvae_fast.*): this file holds the one
// TORCH_LIBRARY(hvae_fast) with their schemas and registers the CPU kernels; ou_cuda.cpp registers
// the CUDA kernels under the same names; autograd and the fake (meta) kernels are registered once,
// in Python (hvae_fast/ops/native.py). Seeds and offsets are int64 here: the seed policy and the offset
// limit are hvae_fast/backends.py's.

// Narrow includes instead of <torch/extension.h>: a third of the compile time of the first use.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "ou_cpu_kernels.h"

namespace {

void check_cpu_float(const at::Tensor& x, const char* name, bool contiguous = true) {
    TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor");
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, name,
                " must be float32 or float64, got ", x.scalar_type());
    TORCH_CHECK(!contiguous || x.is_contiguous(), name, " must be contiguous");
}

// A [K, B, *S] head input read in place: any strides on K and B, the *S dims packed row-major (as in
// a channel half of the model's [K, B, 2C, ...] output; hvae_fast.backends.packed_rows is the same test).
template <typename T>
hvae::cpu::Rows<T> rows_of(const at::Tensor& x, const char* name) {
    int64_t expected = 1;
    for (int64_t d = x.dim() - 1; d >= 2; --d) {
        TORCH_CHECK(x.size(d) == 1 || x.stride(d) == expected, name,
                    " must have packed trailing dims (any strides on K and B only)");
        expected *= x.size(d);
    }
    return {x.data_ptr<T>(), x.stride(0), x.stride(1), x.size(1) <= 1 || x.stride(1) == expected};
}

using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

void check_same(const at::Tensor& a, const at::Tensor& b, const char* name) {
    TORCH_CHECK(a.scalar_type() == b.scalar_type(), name, " must have dtype ", a.scalar_type());
}

// z, mu, sigma: [B, *S] contiguous, same shape and dtype -> [K, B, *S]
at::Tensor correlated_samples_fwd(const at::Tensor& z, const at::Tensor& mu, const at::Tensor& sigma, double rho,
                                  int64_t K, int64_t seed, int64_t offset_base) {
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
        hvae::cpu::corr_fwd_kernel<scalar_t>(z.data_ptr<scalar_t>(), mu.data_ptr<scalar_t>(), sigma.data_ptr<scalar_t>(),
                                  out.data_ptr<scalar_t>(), N, K, rho, (uint64_t)seed,
                                             (uint64_t)offset_base);
    });
    return out;
}

// g: [K, B, *S] contiguous -> (dz, dmu, dsigma), each [B, *S]
Tensor3 correlated_samples_bwd(const at::Tensor& g, double rho, int64_t K, int64_t seed, int64_t offset_base,
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
        hvae::cpu::corr_bwd_kernel<scalar_t>(g.data_ptr<scalar_t>(), dz.data_ptr<scalar_t>(), dmu.data_ptr<scalar_t>(),
                                  dsigma.data_ptr<scalar_t>(), N, K, rho, (uint64_t)seed, (uint64_t)offset_base,
                                             need_sigma);
    });
    return {dz, dmu, dsigma};
}

// mean_raw, scale_raw: [K, B, *S] (strided, see rows_of); target [B, *S] contiguous
// -> (logprob [B], mu_bar [B, *S], sigma_bar [B, *S])
Tensor3 gaussian_head_fwd(const at::Tensor& mean_raw, const at::Tensor& scale_raw,
                                          const at::Tensor& target, bool ratio, double min_scale) {
    check_cpu_float(mean_raw, "mean_raw", false);
    check_cpu_float(scale_raw, "scale_raw", false);
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
            hvae::cpu::head_fwd_kernel<scalar_t>(rows_of<scalar_t>(mean_raw, "mean_raw"),
                                                 rows_of<scalar_t>(scale_raw, "scale_raw"), target.data_ptr<scalar_t>(),
                                                 mbar.data_ptr<scalar_t>(), sbar.data_ptr<scalar_t>(),
                                                 lp.data_ptr<scalar_t>(), N, N / B, K, ratio, min_scale);
        });
    }
    // An empty batch (or empty rows): a [B] of zeros; reshape({0, -1}) would throw.
    auto out = N > 0 ? lp.reshape({B, -1}).sum(1) : at::zeros({B}, lp.options());
    return {out, mbar, sbar};
}

// g [B] -> (d mean_raw, d scale_raw [K, B, *S], d target [B, *S]), all contiguous. d mean_raw is
// [K, B, *S] in the ratio mode and [B, *S] in the mean-std mode, where it does not depend on k (the
// caller expands it over K, as torch's mean backward does, instead of writing K copies). mean_raw and
// scale_raw may be strided as in the forward.
Tensor3 gaussian_head_bwd(const at::Tensor& g, const at::Tensor& mean_raw,
                                          const at::Tensor& scale_raw, const at::Tensor& target,
                                          const at::Tensor& mbar, const at::Tensor& sbar, bool ratio,
                                          double min_scale) {
    for (auto* p : {&g, &mean_raw, &scale_raw, &target, &mbar, &sbar}) {
        check_cpu_float(*p, "gaussian_head_bwd input", p != &mean_raw && p != &scale_raw);
        check_same(target, *p, "gaussian_head_bwd input");
    }
    const int64_t K = mean_raw.size(0);
    const int64_t N = target.numel();
    const int64_t B = target.size(0);
    TORCH_CHECK(g.numel() == B, "grad must have one entry per batch row");
    auto dmr = at::empty(ratio ? mean_raw.sizes() : target.sizes(), target.options());
    auto dsr = at::empty(scale_raw.sizes(), target.options());
    auto dt = at::empty_like(target);
    if (N == 0) return {dmr, dsr, dt};
    const int64_t S = N / B;
    AT_DISPATCH_FLOATING_TYPES(target.scalar_type(), "gaussian_head_bwd", [&] {
        hvae::cpu::head_bwd_kernel<scalar_t>(g.data_ptr<scalar_t>(), rows_of<scalar_t>(mean_raw, "mean_raw"),
                                  rows_of<scalar_t>(scale_raw, "scale_raw"), target.data_ptr<scalar_t>(),
                                  mbar.data_ptr<scalar_t>(), sbar.data_ptr<scalar_t>(), dmr.data_ptr<scalar_t>(),
                                  dsr.data_ptr<scalar_t>(), dt.data_ptr<scalar_t>(), N, S, K, ratio, min_scale);
    });
    return {dmr, dsr, dt};
}

// eps of element (k, j) for every k < K, j < N: float32 [K * N], eps[i] = randn(seed, offset_base + i).
at::Tensor noise(int64_t seed, int64_t K, int64_t N, int64_t offset_base) {
    TORCH_CHECK(K >= 0 && N >= 0, "K and N must be >= 0");
    auto out = at::empty({K * N}, at::TensorOptions().dtype(at::kFloat));
    hvae::cpu::noise_kernel((uint64_t)seed, (uint64_t)offset_base, K * N, out.data_ptr<float>());
    return out;
}

int64_t num_threads() { return at::get_num_threads(); }

std::string isa() { return hvae::cpu::compiled_isa(); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "hvae-fast OU ops, CPU (OpenMP, SIMD) kernels";
    m.def("noise", &noise);
    m.def("num_threads", &num_threads);
    m.def("isa", &isa);
}

// The schemas of the four ops (seed and offset_base are SymInt so that torch.compile can pass the
// seed it draws inside the graph; the kernels read them as int64).
TORCH_LIBRARY(hvae_fast, m) {
    m.def("correlated_samples_fwd(Tensor z, Tensor mu, Tensor sigma, float rho, int K, SymInt seed, "
          "SymInt offset_base) -> Tensor");
    m.def("correlated_samples_bwd(Tensor grad, float rho, int K, SymInt seed, SymInt offset_base, "
          "bool need_sigma) -> (Tensor, Tensor, Tensor)");
    m.def("gaussian_head_fwd(Tensor mean_raw, Tensor scale_raw, Tensor target, bool ratio, float min_scale) "
          "-> (Tensor, Tensor, Tensor)");
    m.def("gaussian_head_bwd(Tensor grad, Tensor mean_raw, Tensor scale_raw, Tensor target, Tensor mu_bar, "
          "Tensor sigma_bar, bool ratio, float min_scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hvae_fast, CPU, m) {
    m.impl("correlated_samples_fwd", &correlated_samples_fwd);
    m.impl("correlated_samples_bwd", &correlated_samples_bwd);
    m.impl("gaussian_head_fwd", &gaussian_head_fwd);
    m.impl("gaussian_head_bwd", &gaussian_head_bwd);
}
