// What mmtwins' bf16 CPU kernels share: AVX-512 loads and stores of bf16 as fp32 registers.
//
// Only the kernel functions are compiled for AVX-512 (a target attribute, not a compiler flag),
// so the module loads on any x86-64 CPU; Python calls them only where the CPU has AVX512-BF16.
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#define MMTWINS_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

namespace mmtwins {

constexpr int kLanes = 16;  // fp32 lanes of an AVX-512 register

MMTWINS_AVX512_BF16 inline __m512 load_bf16(const at::BFloat16* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// Rounded to nearest even.
MMTWINS_AVX512_BF16 inline void store_bf16(at::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}

// In place: the softmax over the first ``keys`` scores of each row of ``scale * scores``
// (``scores`` a contiguous bf16 CPU tensor whose rows are a multiple of 16 scores; ``scale``
// positive), and zeros in the rest of each row.
at::Tensor softmax_bf16_(at::Tensor scores, int64_t keys, double scale);

// LayerNorm over the last dim of a contiguous bf16 CPU tensor (a multiple of 16 channels) with
// fp32 weight and bias: a new bf16 tensor.
at::Tensor layer_norm_bf16(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                           double eps);

}  // namespace mmtwins
