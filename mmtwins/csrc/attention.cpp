// Attention on x86-64 CPUs with AVX-512, fp32 or bf16: the forward (mmtwins._ext.attention)
// and the backward (mmtwins._ext.attention_backward, below).
//
// softmax(q k^T * scale) v for every (batch entry, head), query rows in blocks of kBlockRows:
// the block's scores (fp32, one row of every key) stay in L1 between the three steps, keys and
// values are packed once per task (a range of one head's query rows) into the layouts the
// register tiles read. fp32 multiplies with FMAs; bf16 with AVX512-BF16's dot products of
// channel pairs (vdpbf16ps, accumulating in fp32), the softmax weights rounded to bf16 for the
// product with v (as a bf16 matmul rounds them). The softmax runs in fp32: exp to about 1e-7
// relative in fp32 (5e-5 in bf16), normalised on the output, not on the weights. A row whose
// every key is masked gives zeros (as PyTorch's fused CPU kernel does); training takes each
// row's log-sum-exp of its scores too, for the backward.
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
#include <cstring>
#include <type_traits>
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

// r[i] lane j <- r[j] lane i: a 16 x 16 block of 32-bit words transposed in registers
// (unpacks of words and of word pairs, then two rounds of 128-bit lane shuffles).
MMTWINS_AVX512_BF16 inline void transpose_16x16(__m512i r[kLanes]) {
  __m512i t[kLanes];
  for (int i = 0; i < kLanes; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // r[4 g + e], 128-bit lane L: column 4 L + e of rows 4 g .. 4 g + 3
  for (int i = 0; i < kLanes; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // column 4 L + e, 128-bit lane g: r[4 g + e] lane L
  for (int e = 0; e < 4; ++e) {
    const __m512i v0 = _mm512_shuffle_i32x4(r[e], r[4 + e], 0x88);  // lanes 0, 2 of g = 0, 1
    const __m512i v1 = _mm512_shuffle_i32x4(r[e], r[4 + e], 0xdd);  // lanes 1, 3
    const __m512i w0 = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0x88);
    const __m512i w1 = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0xdd);
    t[e] = _mm512_shuffle_i32x4(v0, w0, 0x88);
    t[4 + e] = _mm512_shuffle_i32x4(v1, w1, 0x88);
    t[8 + e] = _mm512_shuffle_i32x4(v0, w0, 0xdd);
    t[12 + e] = _mm512_shuffle_i32x4(v1, w1, 0xdd);
  }
  for (int i = 0; i < kLanes; ++i) r[i] = t[i];
}

// dst[c / kStep][j * kStep, (j + 1) * kStep) = src[j][c, c + kStep) for ``keys`` rows j of
// ``src`` (``row`` elements apart) and d channels c, rows of dst ``ld`` elements apart: k^T as
// rows of 32-bit words (kStep channels each), 16 keys a register, zero beyond the last key up
// to the next multiple of 16 (dst's rows hold that many). Blocks of 16 keys x 16 words are
// read a row at a time and transposed in registers (where gathering 16 keys' word at a time
// made the calls 1.02-1.10x slower on the Zen 4 CPU).
template <typename T>
MMTWINS_AVX512_BF16 void transpose_words(const T* src, int64_t row, int64_t keys, int64_t d,
                                         T* dst, int64_t ld) {
  constexpr int s = Ops<T>::kStep;
  const int64_t words = d / s;
  for (int64_t j = 0; j < keys; j += kLanes) {
    const int64_t n = std::min<int64_t>(kLanes, keys - j);
    for (int64_t c = 0; c < words; c += kLanes) {
      const __mmask16 lanes = first_lanes(words - c);
      __m512i r[kLanes];
      for (int i = 0; i < kLanes; ++i)
        r[i] = i < n ? _mm512_maskz_loadu_epi32(lanes, src + (j + i) * row + c * s)
                     : _mm512_setzero_si512();
      transpose_16x16(r);
      for (int64_t i = 0; i < std::min<int64_t>(kLanes, words - c); ++i)
        _mm512_storeu_si512(dst + (c + i) * ld + j * s, r[i]);
    }
  }
}

// n keys rounded up to whole registers of 16.
constexpr int64_t whole_registers(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

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
    width = whole_registers(keys);
    ldk = (width + kKeyPad) * s;
    kt.assign(d / s * ldk, T(0));
    vp.assign(width / s * d * s, T(0));
    scores.resize(kBlockRows * width);
  }

  // k^T by transpose_words, v in pairs of keys
  MMTWINS_AVX512_BF16 void pack(const T* k, int64_t k_row, const T* v, int64_t v_row,
                                int64_t keys, int64_t d) {
    constexpr int s = Ops<T>::kStep;
    transpose_words(k, k_row, keys, d, kt.data(), ldk);
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

// R rows of scores against every key of kt (rows ``ldk`` values apart, ``width`` keys).
template <typename T, int R>
MMTWINS_AVX512_BF16 void qk_rows(const T* q, int64_t q_row, const T* kt, int64_t ldk,
                                 int64_t width, int64_t d, float* scores) {
  constexpr int s = Ops<T>::kStep;
  int64_t j = 0;
  for (; j + 2 * kLanes <= width; j += 2 * kLanes)
    qk_tile<T, R, 2>(q, q_row, kt + j * s, ldk, d, scores + j, width);
  for (; j < width; j += kLanes)
    qk_tile<T, R, 1>(q, q_row, kt + j * s, ldk, d, scores + j, width);
}

// scores (rows of ``width``) = q kt for ``rows`` rows of q.
template <typename T>
MMTWINS_AVX512_BF16 void qk_block(const T* q, int64_t q_row, int rows, const T* kt, int64_t ldk,
                                  int64_t width, int64_t d, float* scores) {
  int r = 0;
  for (; r + kTileRows <= rows; r += kTileRows)
    qk_rows<T, kTileRows>(q + r * q_row, q_row, kt, ldk, width, d, scores + r * width);
  const T* qr = q + r * q_row;
  float* sr = scores + r * width;
  switch (rows - r) {
    case 1: return qk_rows<T, 1>(qr, q_row, kt, ldk, width, d, sr);
    case 2: return qk_rows<T, 2>(qr, q_row, kt, ldk, width, d, sr);
    case 3: return qk_rows<T, 3>(qr, q_row, kt, ldk, width, d, sr);
    case 4: return qk_rows<T, 4>(qr, q_row, kt, ldk, width, d, sr);
    case 5: return qk_rows<T, 5>(qr, q_row, kt, ldk, width, d, sr);
    case 6: return qk_rows<T, 6>(qr, q_row, kt, ldk, width, d, sr);
    case 7: return qk_rows<T, 7>(qr, q_row, kt, ldk, width, d, sr);
    default: return;
  }
}

// The lanes of keys [j, j + 16) below ``keys`` and, where ``mask`` (a row's bytes) is given,
// attended (nonzero).
MMTWINS_AVX512_BF16 inline __mmask16 key_lanes(const uint8_t* mask, int64_t j, int64_t keys) {
  __mmask16 lanes = first_lanes(keys - j);
  if (mask) {
    const __m128i bytes = _mm_maskz_loadu_epi8(lanes, mask + j);
    lanes &= _mm_test_epi8_mask(bytes, bytes);
  }
  return lanes;
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
      const __mmask16 lanes = key_lanes(m, j, keys);
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

// f(std::integral_constant<int, DV>()) for DV = dv in 1..8: the tiles' registers a row of d =
// 16 * DV channels.
template <typename F>
void with_registers(int64_t dv, F&& f) {
  switch (dv) {
    case 1: return f(std::integral_constant<int, 1>());
    case 2: return f(std::integral_constant<int, 2>());
    case 3: return f(std::integral_constant<int, 3>());
    case 4: return f(std::integral_constant<int, 4>());
    case 5: return f(std::integral_constant<int, 5>());
    case 6: return f(std::integral_constant<int, 6>());
    case 7: return f(std::integral_constant<int, 7>());
    case 8: return f(std::integral_constant<int, 8>());
  }
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

// Asks for ``rows`` rows of d values, ``row`` elements apart, to be brought into L2. A task asks
// for the next one's rows before computing its own: on LSA's windows (49 queries and keys a
// head) the kernel otherwise waited on each head's first reads from memory (asking ahead, LSA's
// calls took 0.80-0.90x their time on the Zen 4 CPU with their inputs out of cache).
template <typename T>
inline void prefetch_rows(const T* p, int64_t row, int64_t rows, int64_t d) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t x = 0; x < d * int64_t(sizeof(T)); x += 64)
      _mm_prefetch(reinterpret_cast<const char*>(p + r * row) + x, _MM_HINT_T1);
}

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
    qk_block<T>(static_cast<const T*>(h.q) + n * h.q_row, h.q_row, rows, w.kt.data(), w.ldk,
                w.width, d, w.scores.data());
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
  // a task's head, and its query rows [begin, end)
  const auto task_at = [&](int64_t task, int64_t& begin, int64_t& end) {
    const int64_t b = task / chunks / H, h = task / chunks % H;
    begin = task % chunks * kTaskRows;
    end = std::min(N, begin + kTaskRows);
    return Head{qp + b * q.stride(0) + h * q.stride(1), kp + b * k.stride(0) + h * k.stride(1),
                vp + b * v.stride(0) + h * v.stride(1), op + b * out.stride(0) + h * out.stride(2),
                mp ? mp + b * mask.stride(0) + h * mask.stride(1) : nullptr,
                lp ? lp + b * lse.stride(0) + h * lse.stride(1) : nullptr,
                q.stride(2), k.stride(2), v.stride(2), out.stride(1),
                mp ? mask.stride(2) : 0, lp ? lse.stride(2) : 0};
  };
  at::parallel_for(0, B * H * chunks, 1, [&](int64_t first, int64_t last) {
    Workspace<T> w(M, d);
    int64_t begin, end, next_begin, next_end;
    for (int64_t task = first; task < last; ++task) {
      const Head head = task_at(task, begin, end);
      if (task + 1 < last) {  // its query rows, and a new head's keys and values
        const Head next = task_at(task + 1, next_begin, next_end);
        prefetch_rows(static_cast<const T*>(next.q) + next_begin * next.q_row, next.q_row,
                      next_end - next_begin, d);
        if (!next_begin) {
          prefetch_rows(static_cast<const T*>(next.k), next.k_row, M, d);
          prefetch_rows(static_cast<const T*>(next.v), next.v_row, M, d);
        }
      }
      with_registers(d / kLanes, [&](auto dv) {
        head_rows<T, decltype(dv)::value>(head, begin, end, M, scale, w);
      });
    }
  });
}

// ---- The backward, in fp32 (bf16 tensors are widened to fp32 first) ----
//
// For each (batch entry, head), with P = softmax(scale q k^T) recomputed from the forward's
// log-sum-exps and delta = rowsum(grad * out):
//   dv = P^T grad,  dS = scale P * (grad v^T - delta),  dq = dS k,  dk = dS^T q.
// Query rows in blocks of kBackRows (the block's P and dS, one row of every key each, stay in
// L2 between the steps); dk and dv accumulate over the blocks of a task, a range of one head's
// query rows, and over the tasks of a head (a head's rows are split only where there are fewer
// than 4 heads a thread).
//
// PyTorch's fused CPU backward multiplies through its BLAS too, and in bf16 was slower than in
// fp32 on the Twins shapes (4.3-6.8x on LSA's windows, forward and backward). On the AMD EPYC
// Zen 4 CPU mmtwins' forward and backward of the Twins calls at 512x512 took 0.75-0.84x
// PyTorch's fused time in fp32, 0.17-0.92x in bf16 (sdpa_ab.py --calls); blocks of 48-128 rows
// timed alike there, 16 slower.

constexpr int kBackRows = 64;  // query rows whose P and dS are computed together
constexpr int kAxpyRegisters = 24;  // accumulators of an axpy tile (rows x d / 16)

// out[i] (+)= sum_{j < n} a[i * a_row + j * a_col] * b[j * b_row] for R rows i of DV registers
// (16 * DV channels) each: rows of a (or with a_row 1, columns) times the rows of b.
template <int R, int DV, bool kAdd>
MMTWINS_AVX512_BF16 inline void axpy_tile(const float* a, int64_t a_row, int64_t a_col,
                                          const float* b, int64_t b_row, int64_t n, float* out,
                                          int64_t out_row) {
  __m512 acc[R][DV];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < DV; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    __m512 values[DV];
    for (int t = 0; t < DV; ++t) values[t] = _mm512_loadu_ps(b + j * b_row + t * kLanes);
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(a[r * a_row + j * a_col]);
      for (int t = 0; t < DV; ++t) acc[r][t] = _mm512_fmadd_ps(x, values[t], acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < DV; ++t) {
      float* o = out + r * out_row + t * kLanes;
      _mm512_storeu_ps(o, kAdd ? _mm512_add_ps(acc[r][t], _mm512_loadu_ps(o)) : acc[r][t]);
    }
}

// axpy_tile over ``rows`` rows i.
template <int DV, bool kAdd>
MMTWINS_AVX512_BF16 void axpy_rows(const float* a, int64_t a_row, int64_t a_col, int64_t rows,
                                   const float* b, int64_t b_row, int64_t n, float* out,
                                   int64_t out_row) {
  constexpr int R = std::max(1, kAxpyRegisters / DV);
  int64_t i = 0;
  for (; i + R <= rows; i += R)
    axpy_tile<R, DV, kAdd>(a + i * a_row, a_row, a_col, b, b_row, n, out + i * out_row, out_row);
  for (; i + 4 <= rows; i += 4)
    axpy_tile<4, DV, kAdd>(a + i * a_row, a_row, a_col, b, b_row, n, out + i * out_row, out_row);
  for (; i < rows; ++i)
    axpy_tile<1, DV, kAdd>(a + i * a_row, a_row, a_col, b, b_row, n, out + i * out_row, out_row);
}

// In place over ``rows`` rows of scores s and of dp = grad v^T (``width`` floats each):
// s = P = exp(scale * s - lse) (0 for keys beyond ``keys`` and where ``mask``, bytes of
// ``mask_row`` per row, is 0) and dp = scale * P * (dp - delta).
MMTWINS_AVX512_BF16 void softmax_gradient(float* s, float* dp, int rows, int64_t width,
                                          int64_t keys, float scale, const uint8_t* mask,
                                          int64_t mask_row, const float* lse, int64_t lse_row,
                                          const float* delta) {
  constexpr float kLog2e = 1.4426950408889634f;
  const __m512 to_log2 = _mm512_set1_ps(scale * kLog2e), scale_v = _mm512_set1_ps(scale);
  for (int r = 0; r < rows; ++r) {
    float* sr = s + r * width;
    float* dpr = dp + r * width;
    const uint8_t* m = mask ? mask + r * mask_row : nullptr;
    const __m512 shift = _mm512_set1_ps(lse[r * lse_row] * kLog2e);
    const __m512 dr = _mm512_set1_ps(delta[r]);
    for (int64_t j = 0; j < width; j += kLanes) {
      const __mmask16 lanes = key_lanes(m, j, keys);
      const __m512 y = _mm512_fmsub_ps(_mm512_loadu_ps(sr + j), to_log2, shift);
      const __m512 p = _mm512_maskz_mov_ps(lanes, exp2_nonpositive<7>(y));
      _mm512_storeu_ps(sr + j, p);
      const __m512 g = _mm512_sub_ps(_mm512_loadu_ps(dpr + j), dr);
      _mm512_storeu_ps(dpr + j, _mm512_mul_ps(_mm512_mul_ps(p, scale_v), g));
    }
  }
}

// One (batch entry, head)'s fp32 rows, and its task's outputs: dq rows, and dk and dv rows
// that the task's first block writes and its later blocks add to.
struct BackwardHead {
  const float *grad, *q, *k, *v, *out, *lse;
  const uint8_t* mask;
  float *dq, *dk, *dv;
  int64_t grad_row, q_row, k_row, v_row, out_row, lse_row, mask_row, dq_row, dkv_row;
};

// A task's buffers: k^T and v^T (as Workspace<float>::kt), and a block's P and dS.
struct BackwardWorkspace {
  int64_t width, ldk;
  std::vector<float> kt, vt, p, ds;

  BackwardWorkspace(int64_t keys, int64_t d)
      : width(whole_registers(keys)), ldk(width + kKeyPad),
        kt(d * ldk, 0.f), vt(d * ldk, 0.f), p(kBackRows * width), ds(kBackRows * width) {}
};

// rowsum(grad * out) for ``rows`` rows of d = DV * 16 channels.
template <int DV>
MMTWINS_AVX512_BF16 void deltas(const float* grad, int64_t grad_row, const float* out,
                                int64_t out_row, int rows, float* delta) {
  for (int r = 0; r < rows; ++r) {
    __m512 sum = _mm512_setzero_ps();
    for (int t = 0; t < DV; ++t)
      sum = _mm512_fmadd_ps(_mm512_loadu_ps(grad + r * grad_row + t * kLanes),
                            _mm512_loadu_ps(out + r * out_row + t * kLanes), sum);
    delta[r] = _mm512_reduce_add_ps(sum);
  }
}

// Query rows [begin, end) of one head.
template <int DV>
MMTWINS_AVX512_BF16 void backward_rows(const BackwardHead& h, int64_t begin, int64_t end,
                                       int64_t keys, float scale, BackwardWorkspace& w) {
  constexpr int64_t d = DV * kLanes;
  transpose_words(h.k, h.k_row, keys, d, w.kt.data(), w.ldk);
  transpose_words(h.v, h.v_row, keys, d, w.vt.data(), w.ldk);
  float delta[kBackRows];
  for (int64_t n = begin; n < end; n += kBackRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kBackRows, end - n));
    const float* q = h.q + n * h.q_row;
    const float* grad = h.grad + n * h.grad_row;
    qk_block<float>(q, h.q_row, rows, w.kt.data(), w.ldk, w.width, d, w.p.data());
    qk_block<float>(grad, h.grad_row, rows, w.vt.data(), w.ldk, w.width, d, w.ds.data());
    deltas<DV>(grad, h.grad_row, h.out + n * h.out_row, h.out_row, rows, delta);
    softmax_gradient(w.p.data(), w.ds.data(), rows, w.width, keys, scale,
                     h.mask ? h.mask + n * h.mask_row : nullptr, h.mask_row,
                     h.lse + n * h.lse_row, h.lse_row, delta);
    // dq = dS k; dv += P^T grad; dk += dS^T q (with a_row 1 the rows of P^T and dS^T)
    axpy_rows<DV, false>(w.ds.data(), w.width, 1, rows, h.k, h.k_row, keys, h.dq + n * h.dq_row,
                         h.dq_row);
    const auto dkv = [&](auto add) {
      axpy_rows<DV, add()>(w.p.data(), 1, w.width, keys, grad, h.grad_row, rows, h.dv,
                           h.dkv_row);
      axpy_rows<DV, add()>(w.ds.data(), 1, w.width, keys, q, h.q_row, rows, h.dk, h.dkv_row);
    };
    if (n == begin)  // the task's first block writes dk and dv
      dkv(std::false_type());
    else
      dkv(std::true_type());
  }
}

// dq (B, N, heads, d) memory; dk and dv (chunks, B, M, heads, d), chunk c the sums over each
// head's query rows [c * chunk_rows, (c + 1) * chunk_rows), none of them empty.
void backward_run(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                  const at::Tensor& mask, double scale, int64_t chunk_rows, at::Tensor& dq,
                  at::Tensor& dk, at::Tensor& dv) {
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), d = q.size(3), M = k.size(2);
  const int64_t chunks = dk.size(0);
  const uint8_t* mp =
      mask.defined() ? reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>()) : nullptr;
  auto at_head = [](const at::Tensor& t, int64_t b, int64_t h) {
    return t.const_data_ptr<float>() + b * t.stride(0) + h * t.stride(1);
  };
  // a task's head, and its query rows [begin, end)
  const auto task_at = [&](int64_t task, int64_t& begin, int64_t& end) {
    const int64_t b = task / chunks / H, h = task / chunks % H, chunk = task % chunks;
    begin = chunk * chunk_rows;
    end = std::min(N, begin + chunk_rows);
    const int64_t dkv = chunk * dk.stride(0) + b * dk.stride(1) + h * d;
    return BackwardHead{
        at_head(grad, b, h), at_head(q, b, h), at_head(k, b, h), at_head(v, b, h),
        at_head(out, b, h), at_head(lse, b, h),
        mp ? mp + b * mask.stride(0) + h * mask.stride(1) : nullptr,
        dq.mutable_data_ptr<float>() + b * dq.stride(0) + h * d,
        dk.mutable_data_ptr<float>() + dkv, dv.mutable_data_ptr<float>() + dkv,
        grad.stride(2), q.stride(2), k.stride(2), v.stride(2), out.stride(2), lse.stride(2),
        mp ? mask.stride(2) : 0, dq.stride(1), dk.stride(2)};
  };
  at::parallel_for(0, B * H * chunks, 1, [&](int64_t first, int64_t last) {
    BackwardWorkspace w(M, d);
    int64_t begin, end, next_begin, next_end;
    for (int64_t task = first; task < last; ++task) {
      const BackwardHead head = task_at(task, begin, end);
      if (task + 1 < last) {  // its rows of grad, q and out, and a new head's keys and values
        const BackwardHead next = task_at(task + 1, next_begin, next_end);
        for (const auto& [t, row] : {std::pair(next.grad, next.grad_row),
                                     std::pair(next.q, next.q_row),
                                     std::pair(next.out, next.out_row)})
          prefetch_rows(t + next_begin * row, row, next_end - next_begin, d);
        if (!next_begin) {
          prefetch_rows(next.k, next.k_row, M, d);
          prefetch_rows(next.v, next.v_row, M, d);
        }
      }
      with_registers(d / kLanes, [&](auto dv) {
        backward_rows<decltype(dv)::value>(head, begin, end, M, scale, w);
      });
    }
  });
}

// The mask expanded to (B, heads, N, M) (undefined for none) if q, k, v and mask are as
// attention() takes them; else an error naming ``op``.
at::Tensor checked_mask(const char* op, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& v, const c10::optional<at::Tensor>& mask,
                        double scale) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() &&
                  q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              op, ": 4-D CPU tensors (batch, heads, rows, channels)");
  TORCH_CHECK(scale > 0 && std::isfinite(scale), op, ": a positive scale");
  TORCH_CHECK((q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16) &&
                  k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              op, ": q, k and v all fp32 or all bf16");
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), d = q.size(3), M = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == d && v.sizes() == k.sizes(),
              op, ": k and v of shape (batch, heads, keys, channels) as q's");
  TORCH_CHECK(d % kLanes == 0 && d > 0 && d <= 8 * kLanes,
              op, ": channels a multiple of 16, at most 128");
  TORCH_CHECK(M > 0, op, ": at least one key");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              op, ": channels contiguous");
  if (!mask || !mask->defined()) return at::Tensor();
  TORCH_CHECK(mask->scalar_type() == at::kBool && mask->device().is_cpu(),
              op, ": a boolean CPU mask");
  at::Tensor m = mask->expand({B, H, N, M});
  TORCH_CHECK(M == 1 || m.stride(3) == 1, op, ": the mask's keys contiguous");
  return m;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v,
                                             const c10::optional<at::Tensor>& mask, double scale,
                                             bool with_lse) {
  const at::Tensor m = checked_mask("attention", q, k, v, mask, scale);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), d = q.size(3);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& mask,
    double scale) {
  const at::Tensor m = checked_mask("attention_backward", q, k, v, mask, scale);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), d = q.size(3), M = k.size(2);
  TORCH_CHECK(grad.sizes() == q.sizes() && out.sizes() == q.sizes() && grad.device().is_cpu() &&
                  out.device().is_cpu() && grad.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type(),
              "attention_backward: grad and out of q's shape and dtype");
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == at::kFloat &&
                  lse.sizes() == at::IntArrayRef({B, H, N}),
              "attention_backward: fp32 log-sum-exps (batch, heads, rows)");
  RECORD_FUNCTION("mmtwins::attention_backward", std::vector<c10::IValue>({grad, q, k, v}));
  // fp32 with the channels contiguous (bf16 widened; a gradient may come broadcast)
  auto wide = [](const at::Tensor& t) {
    const at::Tensor f = t.to(at::kFloat);
    return f.stride(-1) == 1 ? f : f.contiguous();
  };
  const at::Tensor g32 = wide(grad), q32 = wide(q), k32 = wide(k), v32 = wide(v),
                   o32 = wide(out);
  // a head's rows split into chunks of whole blocks where there are fewer than 4 heads a
  // thread, none empty
  const int64_t blocks = (N + kBackRows - 1) / kBackRows;
  const int64_t heads = std::max<int64_t>(1, B * H);
  const int64_t split = std::max<int64_t>(
      1, std::min(blocks, (4 * at::get_num_threads() + heads - 1) / heads));
  const int64_t chunk_rows = std::max<int64_t>(1, (blocks + split - 1) / split) * kBackRows;
  const int64_t chunks = std::max<int64_t>(1, (N + chunk_rows - 1) / chunk_rows);
  // (B, N, heads, d) memory, as the forward's output; dk and dv one sum a chunk (no rows: 0)
  at::Tensor dq = at::empty({B, N, H, d}, q32.options());
  at::Tensor dk = at::empty({chunks, B, M, H, d}, q32.options()), dv = at::empty_like(dk);
  if (!N) {
    dk.zero_();
    dv.zero_();
  }
  backward_run(g32, q32, k32, v32, o32, lse, m, scale, chunk_rows, dq, dk, dv);
  auto result = [&](const at::Tensor& t) {
    return t.transpose(-3, -2).to(q.scalar_type());
  };
  return {result(dq), result(chunks == 1 ? dk[0] : dk.sum(0)),
          result(chunks == 1 ? dv[0] : dv.sum(0))};
}

}  // namespace mmtwins
