// Test-only functions of the CPU backend (module hvae_fast_ou_cpu_testing, built by the tests through
// hvae_fast.ops.native.CPU_TEST_EXT from this file + ou_cpu_kernels.cpp with the production flags): raw
// Philox outputs, tl.randn at arbitrary offsets, the float32 approximations of cpu_vec_math.h. They
// reach the same inline code as the production kernels, so what they check is what runs.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <string>

#include "cpu_philox.h"
#include "cpu_vec_math.h"
#include "ou_cpu_kernels.h"
#include "philox.h"

namespace {

using namespace hvae::cpu;

// noise_range: randn(seed, start + i) for i < n through the kernels' block generator (the low
// counter word may wrap inside the range).
at::Tensor noise_range(int64_t seed, int64_t start, int64_t n) {
    TORCH_CHECK(n >= 0, "n must be >= 0");
    auto out = at::empty({n}, at::TensorOptions().dtype(at::kFloat));
    hvae::cpu::noise_kernel((uint64_t)seed, (uint64_t)start, n, out.data_ptr<float>());
    return out;
}

// randn_at: tl.randn(seed, offsets) for arbitrary int64 offsets (the same lane
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

std::string isa() { return compiled_isa(); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "hvae-fast CPU OU kernels: test-only entry points";
    m.def("noise_range", &noise_range);
    m.def("randn_at", &randn_at);
    m.def("philox_raw", &philox_raw);
    m.def("vm_eval", &vm_eval);
    m.def("isa", &isa);
}
