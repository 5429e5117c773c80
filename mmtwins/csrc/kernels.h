// mmtwins' CPU kernels: their entry points, and what they share (AVX-512 loads and stores of
// fp32 and bf16 values as fp32 registers).
//
// Only the kernel functions are compiled for AVX-512 (a target attribute, not a compiler flag),
// so the module loads on any x86-64 CPU; Python calls them only where the CPU has AVX512-BF16.
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#define MMTWINS_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

namespace mmtwins {

constexpr int kLanes = 16;  // fp32 lanes of an AVX-512 register

// The first min(n, 16) lanes of a register (n >= 0).
inline __mmask16 first_lanes(int64_t n) {
  return n >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
}

// 16 16-bit values, each in the low half of a 32-bit lane.
MMTWINS_AVX512_BF16 inline __m512i widen_16(const void* p) {
  return _mm512_cvtepu16_epi32(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
}

// 16 fp32 or bf16 values as the fp32 lanes of a register, and back (bf16 rounded to nearest
// even).
MMTWINS_AVX512_BF16 inline __m512 load_lanes(const float* p) { return _mm512_loadu_ps(p); }

MMTWINS_AVX512_BF16 inline __m512 load_lanes(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(widen_16(p), 16));
}

MMTWINS_AVX512_BF16 inline void store_lanes(float* p, __m512 v) { _mm512_storeu_ps(p, v); }

MMTWINS_AVX512_BF16 inline void store_lanes(at::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}

// 2**f = exp(f ln 2) by its Taylor series: the coefficients (ln 2)**i / i!.
constexpr float kExp2Taylor[] = {1.f,          6.9314718e-01f, 2.4022651e-01f, 5.5504109e-02f,
                                 9.6181291e-03f, 1.3333558e-03f, 1.5403530e-04f, 1.5252734e-05f};

// 2**y for y <= 0: 2**f * 2**n, f in [-0.5, 0.5] by a Taylor polynomial of ``Degree`` (relative
// error below 1e-7 for degree 7, 5e-5 for degree 4); exactly 0 below 2**-126 and for -inf and
// NaN.
template <int Degree>
MMTWINS_AVX512_BF16 inline __m512 exp2_nonpositive(__m512 y) {
  const __mmask16 normal = _mm512_cmp_ps_mask(y, _mm512_set1_ps(-126.f), _CMP_GE_OQ);
  const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(y, n);
  __m512 p = _mm512_set1_ps(kExp2Taylor[Degree]);
  for (int i = Degree - 1; i >= 0; --i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Taylor[i]));
  return _mm512_maskz_scalef_ps(normal, p, n);
}

// softmax(q k^T * scale) v (attention.cpp) for fp32 or bf16 CPU tensors q (B, heads, N, d),
// k and v (B, heads, M, d), channels contiguous, d a multiple of 16 up to 128, M > 0; ``mask``
// boolean, broadcastable to (B, heads, N, M) with its keys contiguous, True where a key is
// attended. Returns (B, heads, N, d), a view of (B, N, heads, d) memory, and where ``with_lse``
// each query's log-sum-exp of its scaled scores, fp32 (B, heads, N) (else undefined).
std::tuple<at::Tensor, at::Tensor> attention(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v,
                                             const c10::optional<at::Tensor>& mask, double scale,
                                             bool with_lse);

// The gradients (dq, dk, dv) of attention() at ``grad`` (q's shape and dtype), from its ``out``
// and log-sum-exps ``lse`` for the same q, k, v, mask and scale: q's dtype, each a view of
// (B, rows, heads, d) memory.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& mask,
    double scale);

// LayerNorm over the last dim of a contiguous fp32 or bf16 CPU tensor (a multiple of 16 channels)
// with fp32 weight and bias: a new tensor of x's dtype.
at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                      double eps);

// The exact GELU of a contiguous fp32 or bf16 CPU tensor of a multiple of 16 values (gelu.cpp),
// and with ``grad`` of its shape and dtype, (gelu(h), grad * gelu'(h)): new tensors of h's dtype.
at::Tensor gelu(const at::Tensor& h);
std::tuple<at::Tensor, at::Tensor> gelu_with_grad(const at::Tensor& grad, const at::Tensor& h);

}  // namespace mmtwins
