// LayerNorm of bf16 rows on x86-64 CPUs with AVX512-BF16 (mmtwins._ext.layer_norm_bf16).
//
// PyTorch's CPU LayerNorm of bf16 rows was slower than of fp32 ones on an AMD EPYC Zen 5 (0.80
// against 0.49 ms for 32768 rows of 64 channels, half the bytes), and ran at about 2.5 G
// values/s in a Twins MLP's chunks of 2048 rows. Here each row's mean and variance are computed
// in fp32 (the variance from the deviations, a second pass over the values, not from their
// squares' sum) and y = (x - mean) * rstd * weight + bias in fp32, rounded to nearest-even bf16:
// PyTorch's values up to the order of its fp32 sums. Rows of 64, 128 or 256 channels are read
// once into registers (four and two rows of 64 and 128 interleaved, so their dependency chains
// overlap); other multiples of 16 are read three times (the row stays in L1).
#include "kernels.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cmath>

namespace mmtwins {
namespace {

struct Affine {
  const float* weight;
  const float* bias;
  float eps;
};

MMTWINS_AVX512_BF16 inline __m512 scale_shift(__m512 centred, __m512 rstd, const Affine& a,
                                              int64_t j) {
  return _mm512_fmadd_ps(_mm512_mul_ps(centred, rstd), _mm512_loadu_ps(a.weight + j),
                         _mm512_loadu_ps(a.bias + j));
}

// ROWS rows of NV registers each, read into registers once.
template <int NV, int ROWS>
MMTWINS_AVX512_BF16 void rows_in_registers(const at::BFloat16* x, at::BFloat16* y,
                                           const Affine& a) {
  constexpr int C = NV * kLanes;
  __m512 v[ROWS][NV];
  __m512 mean[ROWS], rstd[ROWS];
  for (int r = 0; r < ROWS; ++r) {
    __m512 sum = _mm512_setzero_ps();
    for (int k = 0; k < NV; ++k) {
      v[r][k] = load_bf16(x + r * C + k * kLanes);
      sum = _mm512_add_ps(sum, v[r][k]);
    }
    mean[r] = _mm512_set1_ps(_mm512_reduce_add_ps(sum) / C);
  }
  for (int r = 0; r < ROWS; ++r) {
    __m512 squares = _mm512_setzero_ps();
    for (int k = 0; k < NV; ++k) {
      v[r][k] = _mm512_sub_ps(v[r][k], mean[r]);
      squares = _mm512_fmadd_ps(v[r][k], v[r][k], squares);
    }
    rstd[r] = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(squares) / C + a.eps));
  }
  for (int r = 0; r < ROWS; ++r)
    for (int k = 0; k < NV; ++k)
      store_bf16(y + r * C + k * kLanes, scale_shift(v[r][k], rstd[r], a, k * kLanes));
}

// Rows [begin, end) of NV registers: kRows at a time, then one by one.
template <int NV>
MMTWINS_AVX512_BF16 void short_rows(const at::BFloat16* x, at::BFloat16* y, const Affine& a,
                                    int64_t begin, int64_t end) {
  constexpr int kRows = NV >= 16 ? 1 : 16 / NV;
  constexpr int64_t C = NV * kLanes;
  int64_t r = begin;
  for (; r + kRows <= end; r += kRows)
    rows_in_registers<NV, kRows>(x + r * C, y + r * C, a);
  for (; r < end; ++r)
    rows_in_registers<NV, 1>(x + r * C, y + r * C, a);
}

// Rows [begin, end) of any multiple of 16 channels, read three times each.
MMTWINS_AVX512_BF16 void long_rows(const at::BFloat16* x, at::BFloat16* y, int64_t C,
                                   const Affine& a, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const at::BFloat16* row = x + r * C;
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < C; j += kLanes)
      sum = _mm512_add_ps(sum, load_bf16(row + j));
    const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(sum) / C);
    __m512 squares = _mm512_setzero_ps();
    for (int64_t j = 0; j < C; j += kLanes) {
      const __m512 d = _mm512_sub_ps(load_bf16(row + j), mean);
      squares = _mm512_fmadd_ps(d, d, squares);
    }
    const __m512 rstd = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(squares) / C + a.eps));
    for (int64_t j = 0; j < C; j += kLanes)
      store_bf16(y + r * C + j, scale_shift(_mm512_sub_ps(load_bf16(row + j), mean), rstd, a, j));
  }
}

void rows(const at::BFloat16* x, at::BFloat16* y, int64_t C, const Affine& a, int64_t begin,
          int64_t end) {
  switch (C) {
    case 64: return short_rows<4>(x, y, a, begin, end);
    case 128: return short_rows<8>(x, y, a, begin, end);
    case 256: return short_rows<16>(x, y, a, begin, end);
    default: return long_rows(x, y, C, a, begin, end);
  }
}

}  // namespace

at::Tensor layer_norm_bf16(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                           double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.is_contiguous() &&
                  x.dim() >= 1,
              "layer_norm_bf16: a contiguous bf16 CPU tensor");
  const int64_t C = x.size(-1);
  TORCH_CHECK(C > 0 && C % kLanes == 0, "layer_norm_bf16: a multiple of 16 channels");
  for (const at::Tensor* p : {&weight, &bias})
    TORCH_CHECK(p->device().is_cpu() && p->scalar_type() == at::kFloat && p->is_contiguous() &&
                    p->dim() == 1 && p->size(0) == C,
                "layer_norm_bf16: fp32 CPU weight and bias of shape (channels,)");
  RECORD_FUNCTION("mmtwins::layer_norm_bf16", std::vector<c10::IValue>({x}));
  at::Tensor y = at::empty(x.sizes(), x.options());
  const int64_t n_rows = x.numel() / C;
  const at::BFloat16* in = x.const_data_ptr<at::BFloat16>();
  at::BFloat16* out = y.mutable_data_ptr<at::BFloat16>();
  const Affine a{weight.const_data_ptr<float>(), bias.const_data_ptr<float>(),
                 static_cast<float>(eps)};
  // grain: about 2**14 values a task
  at::parallel_for(0, n_rows, std::max<int64_t>(1, 16384 / C),
                   [&](int64_t begin, int64_t end) { rows(in, out, C, a, begin, end); });
  return y;
}

}  // namespace mmtwins
