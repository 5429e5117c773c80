// The exact GELU and its gradient, fp32 or bf16, on x86-64 CPUs with AVX512-BF16
// (mmtwins._ext.gelu, mmtwins._ext.gelu_with_grad).
//
// The backward of a training MLP needs, for each chunk, gelu(h) (fc2's weight gradient) and
// grad * gelu'(h) (fc1's gradients). PyTorch computes them in two passes (F.gelu, gelu_backward),
// each with its own erf and exp; here one pass gives both from one exp. With z = h / sqrt(2) and
// e = exp(-z**2), the lower tail Phi(-|h|) = erfc(|z|) / 2 = t (a1 + t (a2 + ... + t a5)) e / 2,
// t = 1 / (1 + p |z|) (Abramowitz and Stegun 7.1.26, erf to 1.5e-7: the formula of PyTorch's
// and oneDNN's vectorised erf); Phi(h) is it or 1 minus it, gelu(h) = h Phi(h) and
// gelu'(h) = Phi(h) + h e / sqrt(2 pi). The negative tail is computed directly, not as 1 - erf
// (gelu(-5) within 0.2 % of its -1.43e-6, where 1 - erf gives -1.2e-6).
// NaN gives NaN, -inf NaN (as PyTorch's), +inf gives +inf (PyTorch's NaN) and a NaN gradient.
#include "kernels.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>

namespace mmtwins {
namespace {

constexpr float kP = 0.3275911f;
constexpr float kA[] = {0.254829592f, -0.284496736f, 1.421413741f, -1.453152027f, 1.061405429f};
constexpr float kHalfLog2e = 0.72134752f;        // log2(e) / 2: e = 2**(-h**2 log2(e) / 2)
constexpr float kRsqrt2 = 0.70710678f;
constexpr float kRsqrt2Pi = 0.39894228f;         // 1 / sqrt(2 pi)
constexpr int64_t kGrain = 16384;                // values per task

struct Gelu {
  __m512 value, slope;  // gelu(h), gelu'(h)
};

template <bool kSlope>
MMTWINS_AVX512_BF16 inline Gelu gelu_lanes(__m512 h) {
  const __m512 z = _mm512_abs_ps(_mm512_mul_ps(h, _mm512_set1_ps(kRsqrt2)));
  const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.f),
                                 _mm512_fmadd_ps(z, _mm512_set1_ps(kP), _mm512_set1_ps(1.f)));
  __m512 poly = _mm512_set1_ps(kA[4]);
  for (int i = 3; i >= 0; --i) poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(kA[i]));
  const __m512 e = exp2_nonpositive<7>(_mm512_mul_ps(_mm512_mul_ps(h, h),
                                                     _mm512_set1_ps(-kHalfLog2e)));
  const __m512 tail = _mm512_mul_ps(_mm512_mul_ps(poly, t), _mm512_mul_ps(e, _mm512_set1_ps(.5f)));
  const __mmask16 positive = _mm512_cmp_ps_mask(h, _mm512_setzero_ps(), _CMP_GT_OQ);
  const __m512 phi = _mm512_mask_sub_ps(tail, positive, _mm512_set1_ps(1.f), tail);
  Gelu g{_mm512_mul_ps(h, phi), phi};
  if (kSlope) g.slope = _mm512_fmadd_ps(_mm512_mul_ps(h, e), _mm512_set1_ps(kRsqrt2Pi), phi);
  return g;
}

template <typename T>
MMTWINS_AVX512_BF16 void gelu_range(const T* h, T* out, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; i += kLanes)
    store_lanes(out + i, gelu_lanes<false>(load_lanes(h + i)).value);
}

template <typename T>
MMTWINS_AVX512_BF16 void gelu_with_grad_range(const T* grad, const T* h, T* out, T* grad_h,
                                              int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; i += kLanes) {
    const Gelu g = gelu_lanes<true>(load_lanes(h + i));
    store_lanes(out + i, g.value);
    store_lanes(grad_h + i, _mm512_mul_ps(load_lanes(grad + i), g.slope));
  }
}

void check(const at::Tensor& h, const char* name) {
  TORCH_CHECK(h.device().is_cpu() && h.is_contiguous() &&
                  (h.scalar_type() == at::kFloat || h.scalar_type() == at::kBFloat16) &&
                  h.numel() % kLanes == 0,
              name, ": a contiguous fp32 or bf16 CPU tensor of a multiple of 16 values");
}

}  // namespace

at::Tensor gelu(const at::Tensor& h) {
  check(h, "gelu");
  RECORD_FUNCTION("mmtwins::gelu", std::vector<c10::IValue>({h}));
  at::Tensor out = at::empty_like(h);
  // whole registers per task: the grain and every task's start are multiples of 16 values
  at::parallel_for(0, h.numel() / kLanes, kGrain / kLanes, [&](int64_t first, int64_t last) {
    if (h.scalar_type() == at::kFloat)
      gelu_range(h.const_data_ptr<float>(), out.mutable_data_ptr<float>(), first * kLanes,
                 last * kLanes);
    else
      gelu_range(h.const_data_ptr<at::BFloat16>(), out.mutable_data_ptr<at::BFloat16>(),
                 first * kLanes, last * kLanes);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gelu_with_grad(const at::Tensor& grad, const at::Tensor& h) {
  check(h, "gelu_with_grad");
  TORCH_CHECK(grad.sizes() == h.sizes() && grad.scalar_type() == h.scalar_type() &&
                  grad.device().is_cpu() && grad.is_contiguous(),
              "gelu_with_grad: a contiguous gradient of h's shape and dtype");
  RECORD_FUNCTION("mmtwins::gelu_with_grad", std::vector<c10::IValue>({grad, h}));
  at::Tensor out = at::empty_like(h), grad_h = at::empty_like(h);
  at::parallel_for(0, h.numel() / kLanes, kGrain / kLanes, [&](int64_t first, int64_t last) {
    if (h.scalar_type() == at::kFloat)
      gelu_with_grad_range(grad.const_data_ptr<float>(), h.const_data_ptr<float>(),
                           out.mutable_data_ptr<float>(), grad_h.mutable_data_ptr<float>(),
                           first * kLanes, last * kLanes);
    else
      gelu_with_grad_range(grad.const_data_ptr<at::BFloat16>(), h.const_data_ptr<at::BFloat16>(),
                           out.mutable_data_ptr<at::BFloat16>(),
                           grad_h.mutable_data_ptr<at::BFloat16>(), first * kLanes,
                           last * kLanes);
  });
  return {out, grad_h};
}

}  // namespace mmtwins
