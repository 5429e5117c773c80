// LayerNorm of fp32 or bf16 rows on x86-64 CPUs with AVX512-BF16 (mmtwins._ext.layer_norm).
//
// PyTorch's CPU LayerNorm of rows of few channels is slow: on an AMD EPYC Zen 5, 0.50 ms for
// 32768 fp32 rows of 64 channels and 0.78 ms for bf16 ones (half the bytes), 36 and 56 us for a
// Twins MLP's chunk of 2048 such rows. Here each row's mean and variance are computed in fp32
// (the variance from the deviations, a second pass over the values, not from their squares'
// sum) and y = (x - mean) * rstd * weight + bias in fp32, for bf16 rounded to nearest-even:
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
template <typename T, int NV, int ROWS>
MMTWINS_AVX512_BF16 void rows_in_registers(const T* x, T* y, const Affine& a) {
  constexpr int C = NV * kLanes;
  __m512 v[ROWS][NV];
  __m512 mean[ROWS], rstd[ROWS];
  for (int r = 0; r < ROWS; ++r) {
    __m512 sum = _mm512_setzero_ps();
    for (int k = 0; k < NV; ++k) {
      v[r][k] = load_lanes(x + r * C + k * kLanes);
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
      store_lanes(y + r * C + k * kLanes, scale_shift(v[r][k], rstd[r], a, k * kLanes));
}

// Rows [begin, end) of NV registers: kRows at a time, then one by one.
template <typename T, int NV>
MMTWINS_AVX512_BF16 void short_rows(const T* x, T* y, const Affine& a, int64_t begin,
                                    int64_t end) {
  constexpr int kRows = NV >= 16 ? 1 : 16 / NV;
  constexpr int64_t C = NV * kLanes;
  int64_t r = begin;
  for (; r + kRows <= end; r += kRows)
    rows_in_registers<T, NV, kRows>(x + r * C, y + r * C, a);
  for (; r < end; ++r)
    rows_in_registers<T, NV, 1>(x + r * C, y + r * C, a);
}

// Rows [begin, end) of any multiple of 16 channels, read three times each.
template <typename T>
MMTWINS_AVX512_BF16 void long_rows(const T* x, T* y, int64_t C, const Affine& a, int64_t begin,
                                   int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const T* row = x + r * C;
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < C; j += kLanes)
      sum = _mm512_add_ps(sum, load_lanes(row + j));
    const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(sum) / C);
    __m512 squares = _mm512_setzero_ps();
    for (int64_t j = 0; j < C; j += kLanes) {
      const __m512 d = _mm512_sub_ps(load_lanes(row + j), mean);
      squares = _mm512_fmadd_ps(d, d, squares);
    }
    const __m512 rstd = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(squares) / C + a.eps));
    for (int64_t j = 0; j < C; j += kLanes)
      store_lanes(y + r * C + j, scale_shift(_mm512_sub_ps(load_lanes(row + j), mean), rstd, a, j));
  }
}

template <typename T>
void rows(const T* x, T* y, int64_t C, const Affine& a, int64_t begin, int64_t end) {
  switch (C) {
    case 64: return short_rows<T, 4>(x, y, a, begin, end);
    case 128: return short_rows<T, 8>(x, y, a, begin, end);
    case 256: return short_rows<T, 16>(x, y, a, begin, end);
    default: return long_rows(x, y, C, a, begin, end);
  }
}

template <typename T>
void all_rows(const at::Tensor& x, const Affine& a, at::Tensor& y) {
  const int64_t C = x.size(-1);
  const T* in = x.const_data_ptr<T>();
  T* out = y.mutable_data_ptr<T>();
  // grain: about 2**14 values a task
  at::parallel_for(0, x.numel() / C, std::max<int64_t>(1, 16384 / C),
                   [&](int64_t begin, int64_t end) { rows(in, out, C, a, begin, end); });
}

}  // namespace

at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                      double eps) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat ||
                                      x.scalar_type() == at::kBFloat16) &&
                  x.is_contiguous() && x.dim() >= 1,
              "layer_norm: a contiguous fp32 or bf16 CPU tensor");
  const int64_t C = x.size(-1);
  TORCH_CHECK(C > 0 && C % kLanes == 0, "layer_norm: a multiple of 16 channels");
  for (const at::Tensor* p : {&weight, &bias})
    TORCH_CHECK(p->device().is_cpu() && p->scalar_type() == at::kFloat && p->is_contiguous() &&
                    p->dim() == 1 && p->size(0) == C,
                "layer_norm: fp32 CPU weight and bias of shape (channels,)");
  RECORD_FUNCTION("mmtwins::layer_norm", std::vector<c10::IValue>({x}));
  at::Tensor y = at::empty(x.sizes(), x.options());
  const Affine a{weight.const_data_ptr<float>(), bias.const_data_ptr<float>(),
                 static_cast<float>(eps)};
  if (x.scalar_type() == at::kFloat)
    all_rows<float>(x, a, y);
  else
    all_rows<at::BFloat16>(x, a, y);
  return y;
}

}  // namespace mmtwins
