// Row softmax of bf16 scores on x86-64 CPUs with AVX512-BF16 (mmtwins._ext.softmax_bf16_).
//
// PyTorch's CPU softmax computes its exp with a vectorised fp32 exp accurate to about one fp32
// ulp, more than a bf16 result keeps; on an AMD EPYC Zen 5 its bf16 softmax took 0.29 ms per
// 2**20 scores, its exp alone 0.14. Here exp(x) is 2**f * 2**n (f in [-0.5, 0.5] by a degree-4
// Taylor polynomial, relative error below 6e-5, far inside bf16's rounding, a relative 2**-8;
// results below 2**-126 flush to 0, as the bf16 conversion flushes subnormals). Rows of exactly
// 32, 64, 128 or 256 scores are read once into registers (several rows interleaved so their
// dependency chains overlap); other multiples of 16 are read twice (max, then exp into an fp32
// buffer). Each row is written back in place once. A row's scores beyond its ``keys`` are
// ignored (they count -inf: rows padded to whole registers need no -inf written into them) and
// come out 0, unless the row's softmax is NaN (a NaN or +inf score, or every key at -inf): then
// the whole row is NaN, as PyTorch's softmax gives it. The scores are scaled on the way (by
// attention's 1 / sqrt(d)), which then costs its caller no pass over the queries or scores.
#include "bf16.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace mmtwins {
namespace {

constexpr float kLog2E = 1.4426950408889634f;

// exp(x * scale) for x <= 0 (x - row max), given ``to_log2`` = scale * log2(e); exactly 0
// below 2**-126 (and for -inf), NaN for NaN.
MMTWINS_AVX512_BF16 inline __m512 exp_nonpositive(__m512 x, __m512 to_log2) {
  const __m512 y = _mm512_mul_ps(x, to_log2);
  const __mmask16 normal = _mm512_cmp_ps_mask(y, _mm512_set1_ps(-126.f), _CMP_GE_OQ);
  const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(y, n);
  __m512 p = _mm512_set1_ps(0.009618129f);  // ln(2)**4 / 24
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.05550411f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2402265f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931472f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  const __m512 e = _mm512_maskz_scalef_ps(normal, p, n);
  // NaN in, NaN out (a row whose every score is -inf has max -inf, and -inf - -inf is NaN)
  return _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);
}

// The scores of a row's k-th register that are among its first ``keys`` (the rest count -inf).
inline __mmask16 key_lanes(int64_t k, int64_t keys) {
  const int64_t n = keys - k * kLanes;
  return n >= kLanes ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

MMTWINS_AVX512_BF16 inline __m512 load_keys(const at::BFloat16* p, __mmask16 lanes) {
  return _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), lanes, load_bf16(p));
}

// ROWS rows of NV registers each, in place: read into registers, written back once.
template <int NV, int ROWS>
MMTWINS_AVX512_BF16 void rows_in_registers(at::BFloat16* s, const __mmask16* lanes,
                                           __m512 to_log2) {
  __m512 v[ROWS][NV];
  __m512 row_max[ROWS], inv[ROWS];
  for (int r = 0; r < ROWS; ++r) {
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (int k = 0; k < NV; ++k) {
      v[r][k] = load_keys(s + (r * NV + k) * kLanes, lanes[k]);
      m = _mm512_max_ps(m, v[r][k]);
    }
    row_max[r] = _mm512_set1_ps(_mm512_reduce_max_ps(m));
  }
  for (int r = 0; r < ROWS; ++r) {
    __m512 sum = _mm512_setzero_ps();
    for (int k = 0; k < NV; ++k) {
      v[r][k] = exp_nonpositive(_mm512_sub_ps(v[r][k], row_max[r]), to_log2);
      sum = _mm512_add_ps(sum, v[r][k]);
    }
    inv[r] = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
  }
  for (int r = 0; r < ROWS; ++r)
    for (int k = 0; k < NV; ++k)
      store_bf16(s + (r * NV + k) * kLanes, _mm512_mul_ps(v[r][k], inv[r]));
}

// Rows [begin, end) of NV registers: kRows at a time, then one by one.
template <int NV>
MMTWINS_AVX512_BF16 void short_rows(at::BFloat16* s, int64_t keys, float scale, int64_t begin,
                                    int64_t end) {
  constexpr int kRows = NV >= 16 ? 1 : 16 / NV;
  const __m512 to_log2 = _mm512_set1_ps(scale * kLog2E);
  const int64_t width = NV * kLanes;
  __mmask16 lanes[NV];
  for (int k = 0; k < NV; ++k) lanes[k] = key_lanes(k, keys);
  int64_t r = begin;
  for (; r + kRows <= end; r += kRows)
    rows_in_registers<NV, kRows>(s + r * width, lanes, to_log2);
  for (; r < end; ++r)
    rows_in_registers<NV, 1>(s + r * width, lanes, to_log2);
}

// Rows [begin, end) of any multiple of 16 scores, the exps kept in ``buf`` (one row's worth).
MMTWINS_AVX512_BF16 void long_rows(at::BFloat16* s, int64_t width, int64_t keys, float scale,
                                   int64_t begin, int64_t end, float* buf) {
  const __m512 to_log2 = _mm512_set1_ps(scale * kLog2E);
  for (int64_t r = begin; r < end; ++r) {
    at::BFloat16* row = s + r * width;
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < width; j += kLanes)
      m = _mm512_max_ps(m, load_keys(row + j, key_lanes(j / kLanes, keys)));
    const __m512 row_max = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < width; j += kLanes) {
      const __m512 x_j = load_keys(row + j, key_lanes(j / kLanes, keys));
      const __m512 e = exp_nonpositive(_mm512_sub_ps(x_j, row_max), to_log2);
      _mm512_storeu_ps(buf + j, e);
      sum = _mm512_add_ps(sum, e);
    }
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
    for (int64_t j = 0; j < width; j += kLanes)
      store_bf16(row + j, _mm512_mul_ps(_mm512_loadu_ps(buf + j), inv));
  }
}

void rows(at::BFloat16* s, int64_t width, int64_t keys, float scale, int64_t begin,
          int64_t end) {
  switch (width) {
    case 32: return short_rows<2>(s, keys, scale, begin, end);
    case 64: return short_rows<4>(s, keys, scale, begin, end);
    case 128: return short_rows<8>(s, keys, scale, begin, end);
    case 256: return short_rows<16>(s, keys, scale, begin, end);
    default: {
      std::vector<float> buf(width);
      return long_rows(s, width, keys, scale, begin, end, buf.data());
    }
  }
}

}  // namespace

at::Tensor softmax_bf16_(at::Tensor scores, int64_t keys, double scale) {
  TORCH_CHECK(scores.device().is_cpu() && scores.scalar_type() == at::kBFloat16 &&
                  scores.is_contiguous() && scores.dim() >= 1,
              "softmax_bf16_: a contiguous bf16 CPU tensor");
  const int64_t width = scores.size(-1);
  TORCH_CHECK(width > 0 && width % kLanes == 0, "softmax_bf16_: rows of a multiple of 16 scores");
  TORCH_CHECK(keys > 0 && keys <= width, "softmax_bf16_: keys in [1, the row's width]");
  TORCH_CHECK(scale > 0, "softmax_bf16_: a positive scale");
  const int64_t n_rows = scores.numel() / width;
  at::BFloat16* s = scores.mutable_data_ptr<at::BFloat16>();
  // grain: about 2**14 scores a task
  at::parallel_for(0, n_rows, std::max<int64_t>(1, 16384 / width),
                   [&](int64_t begin, int64_t end) { rows(s, width, keys, scale, begin, end); });
  return scores;
}

}  // namespace mmtwins
