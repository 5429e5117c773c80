// Attention's forward on x86-64 CPUs with AVX-512 (mmtwins._ext.attention), fp32 or bf16.
//
// softmax(q k^T * scale) v for every (batch entry, head), query rows in blocks of kBlockRows:
// the block's scores (fp32, one row of every key) stay in L1 between the three steps, keys and
// values are packed once per task (a range of one head's query rows) into the layouts the
// register tiles read. fp32 multiplies with FMAs; bf16 with AVX512-BF16's dot products of
// channel pairs (vdpbf16ps, accumulating in fp32), the softmax weights rounded to bf16 for the
// product with v (as a bf16 matmul rounds them). The softmax runs in fp32: exp to about 1e-7
// relative in fp32 (5e-5 in bf16), normalised on the output, not on the weights. A row whose
// every key is masked gives zeros (as PyTorch's fused CPU kernel does); training takes each
// row's log-sum-exp of its scores too, for PyTorch's fused backward.
//
// PyTorch's fused CPU kernel multiplies through its BLAS, which on an AMD EPYC Zen 5 is MKL at
// its AVX2 rate (about 240 GFLOP/s for fp32 on 2 cores, against 500 for oneDNN's AVX-512
// kernels), and its bf16 form ran slower than its fp32 one there.
#include "kernels.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <climits>
#include <cstring>
#include <vector>

namespace mmtwins {
namespace {

constexpr int kBlockRows = 24;   // query rows whose scores are computed together
constexpr int kTileRows = 8;     // query rows of a q k^T register tile (x 32 keys)
constexpr int kPvRegisters = 24; // accumulators of a weights x v tile (rows x d / 16)
constexpr int64_t kTaskRows = 240;  // query rows of one task
// Extra keys in a packed row of k^T: rows 2**n keys long would map every channel's row to the
// same few L1 sets (a 64-channel k^T of 256 keys ran 1.5x slower unpadded on the Zen 5)
constexpr int64_t kKeyPad = 16;

// Scalar type T's arithmetic: kStep channels (or keys) per 32-bit lane of a product, the degree
// of the softmax's exp polynomial.
template <typename T>
struct Ops;

template <>
struct Ops<float> {
  static constexpr int kStep = 1;
  static constexpr int kExpDegree = 7;  // the softmax's exp to about fp32 rounding
  MMTWINS_AVX512_BF16 static __m512 broadcast(const float* p) { return _mm512_set1_ps(*p); }
  MMTWINS_AVX512_BF16 static __m512 fma(__m512 acc, __m512 a, __m512 b) {
    return _mm512_fmadd_ps(a, b, acc);
  }
};

template <>
struct Ops<at::BFloat16> {
  static constexpr int kStep = 2;
  // to 5e-5, far inside the weights' bf16 rounding (2**-8); 3-5 % faster calls than degree 7
  static constexpr int kExpDegree = 4;
  MMTWINS_AVX512_BF16 static __m512 broadcast(const at::BFloat16* p) {
    int32_t pair;
    std::memcpy(&pair, p, sizeof(pair));
    return _mm512_castsi512_ps(_mm512_set1_epi32(pair));
  }
  MMTWINS_AVX512_BF16 static __m512 fma(__m512 acc, __m512 a, __m512 b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
  }
};

// One head's keys and values, packed for the tiles, and a block's scores.
//   kt: for each group of kStep channels, a row of kStep values per key, ``ldk`` values long
//       (keys beyond the last are 0): 16 keys' products with one query are one register.
//   vp: for each group of kStep keys, d channels x kStep values (keys beyond the last are 0).
//   scores: kBlockRows rows of ``width`` fp32 scores; the softmax writes its weights (as T)
//       over the start of each row.
template <typename T>
struct Workspace {
  std::vector<T> kt, vp;
  std::vector<float> scores;
  int64_t width = 0, ldk = 0;

  Workspace(int64_t keys, int64_t d) {
    constexpr int s = Ops<T>::kStep;
    width = (keys + kLanes - 1) / kLanes * kLanes;
    ldk = (width + kKeyPad) * s;
    kt.assign(d / s * ldk, T(0));
    vp.assign(width / s * d * s, T(0));
    scores.resize(kBlockRows * width);
  }

  // k^T is a transpose of 32-bit words (kStep channels each): gathered, 16 keys a register.
  MMTWINS_AVX512_BF16 void pack(const T* k, int64_t k_row, const T* v, int64_t v_row,
                                int64_t keys, int64_t d) {
    constexpr int s = Ops<T>::kStep;
    const int64_t row_bytes = k_row * int64_t(sizeof(T));
    const __m512i offsets = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(static_cast<int32_t>(row_bytes)));
    for (int64_t j = 0; j < keys; j += kLanes) {
      const __mmask16 lanes = first_lanes(keys - j);
      for (int64_t c = 0; c < d; c += s) {
        const __m512i words = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), lanes, offsets,
                                                          k + j * k_row + c, 1);
        _mm512_mask_storeu_epi32(kt.data() + c / s * ldk + j * s, lanes, words);
      }
    }
    for (int64_t j = 0; j < keys; j += s) {
      T* dst = vp.data() + j / s * d * s;
      const T* a = v + j * v_row;
      if constexpr (s == 1) {
        std::memcpy(dst, a, d * sizeof(T));
      } else {
        // pairs (v[j][c], v[j + 1][c]); a missing row j + 1 pairs with 0
        const T* b = j + 1 < keys ? a + v_row : nullptr;
        for (int64_t c = 0; c < d; c += kLanes) {
          __m512i pairs = widen_16(a + c);
          if (b) pairs = _mm512_or_si512(pairs, _mm512_slli_epi32(widen_16(b + c), 16));
          _mm512_storeu_si512(dst + c * s, pairs);
        }
      }
    }
  }
};

// scores[r][0, 16 * NJ) = q[r] . kt[:, 0, 16 * NJ) for R rows of q.
template <typename T, int R, int NJ>
MMTWINS_AVX512_BF16 inline void qk_tile(const T* q, int64_t q_row, const T* kt, int64_t ldk,
                                        int64_t d, float* scores, int64_t width) {
  using O = Ops<T>;
  __m512 acc[R][NJ];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NJ; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t c = 0; c < d; c += O::kStep) {
    __m512 keys[NJ];
    for (int t = 0; t < NJ; ++t)
      keys[t] = _mm512_loadu_ps(kt + c / O::kStep * ldk + t * kLanes * O::kStep);
    for (int r = 0; r < R; ++r) {
      const __m512 qr = O::broadcast(q + r * q_row + c);
      for (int t = 0; t < NJ; ++t) acc[r][t] = O::fma(acc[r][t], qr, keys[t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NJ; ++t) _mm512_storeu_ps(scores + r * width + t * kLanes, acc[r][t]);
}

// R rows of scores against every key.
template <typename T, int R>
MMTWINS_AVX512_BF16 void qk_rows(const T* q, int64_t q_row, const Workspace<T>& w, int64_t d,
                                 float* scores) {
  constexpr int s = Ops<T>::kStep;
  int64_t j = 0;
  for (; j + 2 * kLanes <= w.width; j += 2 * kLanes)
    qk_tile<T, R, 2>(q, q_row, w.kt.data() + j * s, w.ldk, d, scores + j, w.width);
  for (; j < w.width; j += kLanes)
    qk_tile<T, R, 1>(q, q_row, w.kt.data() + j * s, w.ldk, d, scores + j, w.width);
}

template <typename T>
MMTWINS_AVX512_BF16 void qk_block(const T* q, int64_t q_row, int rows, const Workspace<T>& w,
                                  int64_t d, float* scores) {
  int r = 0;
  for (; r + kTileRows <= rows; r += kTileRows)
    qk_rows<T, kTileRows>(q + r * q_row, q_row, w, d, scores + r * w.width);
  const T* qr = q + r * q_row;
  float* sr = scores + r * w.width;
  switch (rows - r) {
    case 1: return qk_rows<T, 1>(qr, q_row, w, d, sr);
    case 2: return qk_rows<T, 2>(qr, q_row, w, d, sr);
    case 3: return qk_rows<T, 3>(qr, q_row, w, d, sr);
    case 4: return qk_rows<T, 4>(qr, q_row, w, d, sr);
    case 5: return qk_rows<T, 5>(qr, q_row, w, d, sr);
    case 6: return qk_rows<T, 6>(qr, q_row, w, d, sr);
    case 7: return qk_rows<T, 7>(qr, q_row, w, d, sr);
    default: return;
  }
}

// In place, for each of ``rows`` rows of scores: the unnormalised softmax weights
// exp(scale * (score - max)) as T over the row's start (0 for keys beyond ``keys`` and where
// ``mask``, bytes of ``mask_row`` per row, is 0), 1 / their sum in ``inv`` (0 for a row
// without a key, NaN for a row with a NaN score) and, where ``lse`` is given (every ``lse_row``
// floats), the log of the sum of exp(scale * score) (+inf, NaN for those rows). ``scale`` > 0.
template <typename T>
MMTWINS_AVX512_BF16 void softmax_block(float* scores, int rows, int64_t width, int64_t keys,
                                       float scale, const uint8_t* mask, int64_t mask_row,
                                       float* inv, float* lse, int64_t lse_row) {
  const float to_log2 = scale * 1.4426950408889634f;
  for (int r = 0; r < rows; ++r) {
    float* row = scores + r * width;
    const uint8_t* m = mask ? mask + r * mask_row : nullptr;
    __m512 hi = _mm512_set1_ps(-INFINITY);
    __mmask16 nan = 0;
    for (int64_t j = 0; j < width; j += kLanes) {
      __mmask16 lanes = first_lanes(keys - j);
      if (m) {
        const __m128i bytes = _mm_maskz_loadu_epi8(lanes, m + j);
        lanes &= _mm_test_epi8_mask(bytes, bytes);
      }
      const __m512 x = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), lanes,
                                          _mm512_loadu_ps(row + j));
      _mm512_storeu_ps(row + j, x);
      hi = _mm512_max_ps(hi, x);
      nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    }
    const float row_max = _mm512_reduce_max_ps(hi);
    T* weights = reinterpret_cast<T*>(row);
    if (row_max == -INFINITY || nan) {
      // no key: zero weights, zero output (and a backward gives every key weight 0); a NaN
      // score: a NaN output, as PyTorch's
      std::fill(weights, weights + width, T(0));
      inv[r] = nan ? NAN : 0.f;
      if (lse) lse[r * lse_row] = nan ? NAN : INFINITY;
      continue;
    }
    const __m512 to_log2_v = _mm512_set1_ps(to_log2);
    const __m512 shift = _mm512_set1_ps(row_max * to_log2);
    __m512 sum = _mm512_setzero_ps();
    // Weights as T overwrite scores already read (T is at most as wide as fp32)
    for (int64_t j = 0; j < width; j += kLanes) {
      const __m512 y = _mm512_fmsub_ps(_mm512_loadu_ps(row + j), to_log2_v, shift);
      const __m512 e = exp2_nonpositive<Ops<T>::kExpDegree>(y);
      sum = _mm512_add_ps(sum, e);
      store_lanes(weights + j, e);
    }
    const float total = _mm512_reduce_add_ps(sum);
    inv[r] = 1.f / total;
    if (lse) lse[r * lse_row] = row_max * scale + std::log(total);
  }
}

// out[r] = inv[r] * weights[r] . v for R rows; DV registers of 16 channels.
template <typename T, int R, int DV>
MMTWINS_AVX512_BF16 inline void pv_tile(const T* weights, int64_t weights_row, const T* vp,
                                        int64_t keys, const float* inv, T* out, int64_t out_row) {
  using O = Ops<T>;
  constexpr int d = DV * kLanes;
  __m512 acc[R][DV];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < DV; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t j = 0; j < keys; j += O::kStep) {
    __m512 values[DV];
    for (int t = 0; t < DV; ++t)
      values[t] = _mm512_loadu_ps(vp + (j / O::kStep * d + t * kLanes) * O::kStep);
    for (int r = 0; r < R; ++r) {
      const __m512 p = O::broadcast(weights + r * weights_row + j);
      for (int t = 0; t < DV; ++t) acc[r][t] = O::fma(acc[r][t], p, values[t]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 norm = _mm512_set1_ps(inv[r]);
    for (int t = 0; t < DV; ++t)
      store_lanes(out + r * out_row + t * kLanes, _mm512_mul_ps(acc[r][t], norm));
  }
}

template <typename T, int DV>
MMTWINS_AVX512_BF16 void pv_block(const T* weights, int64_t weights_row, int rows, const T* vp,
                                  int64_t keys, const float* inv, T* out, int64_t out_row) {
  constexpr int R = std::max(1, kPvRegisters / DV);
  int r = 0;
  for (; r + R <= rows; r += R)
    pv_tile<T, R, DV>(weights + r * weights_row, weights_row, vp, keys, inv + r,
                      out + r * out_row, out_row);
  for (; r + 4 <= rows; r += 4)
    pv_tile<T, 4, DV>(weights + r * weights_row, weights_row, vp, keys, inv + r,
                      out + r * out_row, out_row);
  for (; r < rows; ++r)
    pv_tile<T, 1, DV>(weights + r * weights_row, weights_row, vp, keys, inv + r,
                      out + r * out_row, out_row);
}

// Strides (elements) of one (batch entry, head)'s rows and where its task starts.
struct Head {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  const uint8_t* mask;
  float* lse;
  int64_t q_row, k_row, v_row, out_row, mask_row, lse_row;
};

// Query rows [begin, end) of one head: pack, then blocks of kBlockRows rows.
template <typename T, int DV>
MMTWINS_AVX512_BF16 void head_rows(const Head& h, int64_t begin, int64_t end, int64_t keys,
                                   float scale, Workspace<T>& w) {
  constexpr int64_t d = DV * kLanes;
  w.pack(static_cast<const T*>(h.k), h.k_row, static_cast<const T*>(h.v), h.v_row, keys, d);
  const int64_t padded_keys = (keys + Ops<T>::kStep - 1) / Ops<T>::kStep * Ops<T>::kStep;
  float inv[kBlockRows];
  for (int64_t n = begin; n < end; n += kBlockRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kBlockRows, end - n));
    qk_block<T>(static_cast<const T*>(h.q) + n * h.q_row, h.q_row, rows, w, d,
                w.scores.data());
    softmax_block<T>(w.scores.data(), rows, w.width, keys, scale,
                     h.mask ? h.mask + n * h.mask_row : nullptr, h.mask_row, inv,
                     h.lse ? h.lse + n * h.lse_row : nullptr, h.lse_row);
    // weights rows: the scores' rows, in T
    pv_block<T, DV>(reinterpret_cast<const T*>(w.scores.data()),
                    w.width * int64_t(sizeof(float) / sizeof(T)), rows, w.vp.data(),
                    padded_keys, inv, static_cast<T*>(h.out) + n * h.out_row, h.out_row);
  }
}

template <typename T>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
         double scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), d = q.size(3), M = k.size(2);
  const int64_t chunks = (N + kTaskRows - 1) / kTaskRows;
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  const uint8_t* mp =
      mask.defined() ? reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>()) : nullptr;
  float* lp = lse.defined() ? lse.mutable_data_ptr<float>() : nullptr;
  at::parallel_for(0, B * H * chunks, 1, [&](int64_t first, int64_t last) {
    Workspace<T> w(M, d);
    for (int64_t task = first; task < last; ++task) {
      const int64_t b = task / chunks / H, h = task / chunks % H, chunk = task % chunks;
      const Head head{qp + b * q.stride(0) + h * q.stride(1),
                      kp + b * k.stride(0) + h * k.stride(1),
                      vp + b * v.stride(0) + h * v.stride(1),
                      op + b * out.stride(0) + h * out.stride(2),
                      mp ? mp + b * mask.stride(0) + h * mask.stride(1) : nullptr,
                      lp ? lp + b * lse.stride(0) + h * lse.stride(1) : nullptr,
                      q.stride(2), k.stride(2), v.stride(2), out.stride(1),
                      mp ? mask.stride(2) : 0, lp ? lse.stride(2) : 0};
      const int64_t begin = chunk * kTaskRows, end = std::min(N, begin + kTaskRows);
      switch (d / kLanes) {
        case 1: head_rows<T, 1>(head, begin, end, M, scale, w); break;
        case 2: head_rows<T, 2>(head, begin, end, M, scale, w); break;
        case 3: head_rows<T, 3>(head, begin, end, M, scale, w); break;
        case 4: head_rows<T, 4>(head, begin, end, M, scale, w); break;
        case 5: head_rows<T, 5>(head, begin, end, M, scale, w); break;
        case 6: head_rows<T, 6>(head, begin, end, M, scale, w); break;
        case 7: head_rows<T, 7>(head, begin, end, M, scale, w); break;
        case 8: head_rows<T, 8>(head, begin, end, M, scale, w); break;
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v,
                                             const c10::optional<at::Tensor>& mask, double scale,
                                             bool with_lse) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() &&
                  q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "attention: 4-D CPU tensors (batch, heads, rows, channels)");
  TORCH_CHECK(scale > 0 && std::isfinite(scale), "attention: a positive scale");
  TORCH_CHECK((q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16) &&
                  k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "attention: q, k and v all fp32 or all bf16");
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), d = q.size(3), M = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == d && v.sizes() == k.sizes(),
              "attention: k and v of shape (batch, heads, keys, channels) as q's");
  TORCH_CHECK(d % kLanes == 0 && d > 0 && d <= 8 * kLanes,
              "attention: channels a multiple of 16, at most 128");
  TORCH_CHECK(M > 0, "attention: at least one key");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "attention: channels contiguous");
  // the packing gathers 16 keys by 32-bit byte offsets
  TORCH_CHECK(M == 1 || k.stride(2) * int64_t(k.element_size()) * (kLanes - 1) <= INT32_MAX,
              "attention: keys at most 2**31 / 15 bytes apart");
  at::Tensor m;
  if (mask && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->device().is_cpu(),
                "attention: a boolean CPU mask");
    m = mask->expand({B, H, N, M});
    TORCH_CHECK(M == 1 || m.stride(3) == 1, "attention: the mask's keys contiguous");
  }
  // (B, N, heads, d) memory, as PyTorch's fused kernel returns
  RECORD_FUNCTION("mmtwins::attention", std::vector<c10::IValue>({q, k, v}));
  at::Tensor out = at::empty({B, N, H, d}, q.options());
  // (B, heads, N) as PyTorch's fused kernel gives it, a view of (B, N, heads) memory
  at::Tensor lse;
  if (with_lse) lse = at::empty({B, N, H}, q.options().dtype(at::kFloat)).transpose(1, 2);
  if (q.scalar_type() == at::kFloat)
    run<float>(q, k, v, m, scale, out, lse);
  else
    run<at::BFloat16>(q, k, v, m, scale, out, lse);
  return {out.transpose(1, 2), lse};
}

}  // namespace mmtwins
