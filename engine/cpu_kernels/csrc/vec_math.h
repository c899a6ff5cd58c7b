// Vector exp and silu (fp32) for the kernels' epilogues; relative error about 2e-7.
#pragma once

#include <immintrin.h>

namespace scheinfer {

// Cephes-style range reduction: exp(x) = 2^n * exp(r), |r| <= ln2/2, exp(r) by a degree-6 polynomial.
#define SCHEINFER_EXP_CONSTANTS                            \
  constexpr float kLog2e = 1.44269504088896341f;           \
  constexpr float kLn2Hi = 0.693359375f;                   \
  constexpr float kLn2Lo = -2.12194440e-4f;                \
  constexpr float kC[7] = {1.0f, 1.0f, 0.5f, 1.0f / 6, 1.0f / 24, 1.0f / 120, 1.0f / 720};

#if defined(__AVX512F__)
inline __m512 exp512(__m512 x) {
  SCHEINFER_EXP_CONSTANTS
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3f)), _mm512_set1_ps(-87.3f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kC[6]);
  for (int i = 5; i >= 0; --i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kC[i]));
  return _mm512_scalef_ps(p, n);
}

inline __m512 silu512(__m512 g) {
  __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
  return _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
inline __m256 exp256(__m256 x) {
  SCHEINFER_EXP_CONSTANTS
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3f)), _mm256_set1_ps(-87.3f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kC[6]);
  for (int i = 5; i >= 0; --i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kC[i]));
  __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

inline __m256 silu256(__m256 g) {
  __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
  return _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}
#endif

#undef SCHEINFER_EXP_CONSTANTS

}  // namespace scheinfer
