// Vectorisable float32 math of the CPU kernels: polynomial exp / log / cos / softplus (cephes-style),
// all inline and branch-free (selects only), so the `omp simd` loops of csrc/ou_cpu_kernels.cpp
// vectorise them. float64 (it exists for gradcheck) uses the exact std:: functions through the
// templates at the end. Maximum errors are stated per function and tested in tests/test_native.py
// (through the test-only module csrc/ou_cpu_testing.cpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace hvae {
namespace cpu {

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

}  // namespace cpu
}  // namespace hvae
