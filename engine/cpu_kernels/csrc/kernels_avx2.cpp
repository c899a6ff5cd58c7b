// AVX2+FMA path, for CPUs without AVX512-BF16.
//
// bf16 weights are widened in registers: a 32-byte load of 16 bf16 gives, as 8 dwords, the even
// elements (dword << 16) and the odd ones (dword & 0xffff0000) as fp32. The activations are kept
// in fp32 in the matching "pair-split" layout: per chunk of 16 elements, the 8 even ones, then the
// 8 odd ones. x is packed to it in phase 0; phase 1 writes h in it (values rounded to bf16).
#include "slice_ffn.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include "vec_math.h"

namespace scheinfer {
namespace {

constexpr int kMaxTokenBlock = 4;

// Position of element k in the pair-split layout.
inline int64_t split_index(int64_t k) {
  const int64_t j = k & 15;
  return (k & ~int64_t{15}) + ((j & 1) ? 8 + (j >> 1) : (j >> 1));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// res[t * res_stride + r] = dot(w row r, v token t) over K; v in the pair-split layout.
template <int R, int TB>
inline void dot_block(const bf16_t* w, int64_t ws, const float* v, int64_t vs, int64_t K, float* res,
                      int64_t res_stride) {
  __m256 acc[R][TB];
#pragma GCC unroll 16
  for (int i = 0; i < R * TB; ++i) acc[i / TB][i % TB] = _mm256_setzero_ps();
  const __m256i hi_mask = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m256 we[R], wo[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      __m256i wi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * ws + k));
      we[r] = _mm256_castsi256_ps(_mm256_slli_epi32(wi, 16));
      wo[r] = _mm256_castsi256_ps(_mm256_and_si256(wi, hi_mask));
    }
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) {
      __m256 xe = _mm256_loadu_ps(v + t * vs + k);
      __m256 xo = _mm256_loadu_ps(v + t * vs + k + 8);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        acc[r][t] = _mm256_fmadd_ps(we[r], xe, acc[r][t]);
        acc[r][t] = _mm256_fmadd_ps(wo[r], xo, acc[r][t]);
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < R * TB; ++i) {
    const int r = i / TB, t = i % TB;
    float s = hsum(acc[r][t]);
    for (int64_t kk = k; kk < K; ++kk) s += bf16_to_f32(w[r * ws + kk]) * v[t * vs + split_index(kk)];
    res[t * res_stride + r] = s;
  }
}

template <int R, int TB>
void dot_rows_r(const bf16_t* w, int64_t ws, int64_t rows, const float* v, int64_t vs, int64_t K, float* res,
                int64_t res_stride) {
  int64_t r = 0;
  for (; r + R <= rows; r += R) dot_block<R, TB>(w + r * ws, ws, v, vs, K, res + r, res_stride);
  for (; r < rows; ++r) dot_block<1, TB>(w + r * ws, ws, v, vs, K, res + r, res_stride);
}

void dot_rows(int tb, const bf16_t* w, int64_t ws, int64_t rows, const float* v, int64_t vs, int64_t K,
              float* res, int64_t res_stride) {
  switch (tb) {
    case 1: return dot_rows_r<4, 1>(w, ws, rows, v, vs, K, res, res_stride);
    case 2: return dot_rows_r<3, 2>(w, ws, rows, v, vs, K, res, res_stride);
    case 3: return dot_rows_r<2, 3>(w, ws, rows, v, vs, K, res, res_stride);
    default: return dot_rows_r<2, 4>(w, ws, rows, v, vs, K, res, res_stride);
  }
}

}  // namespace

bool avx2_compiled() { return true; }

void avx2_pack(const Job& j, int64_t begin, int64_t end) {
  float* xs = static_cast<float*>(j.xpack);
  for (int64_t t = begin; t < end; ++t) {
    float* row = xs + t * j.x_stride;
    const bf16_t* x = j.x + t * j.H;
    for (int64_t k = 0; k < j.x_stride; ++k) row[split_index(k)] = k < j.H ? bf16_to_f32(x[k]) : 0.0f;
  }
}

void avx2_phase1(const Job& j, int64_t begin, int64_t end, ThreadScratch& scratch) {
  const int64_t rows = end - begin;
  float* g = scratch.floats(2 * rows * 8);
  float* u = g + rows * 8;
  float* h = static_cast<float*>(j.h);
  const float* xs = static_cast<const float*>(j.xpack);
  const bf16_t* gate = gate_row(j, begin);
  const bf16_t* up = up_row(j, begin);
  for_token_blocks<kMaxTokenBlock>(j.T, [&](int64_t t0, int tb) {
    const float* x = xs + t0 * j.x_stride;
    dot_rows(tb, gate, j.gu_stride, rows, x, j.x_stride, j.H, g, rows);
    dot_rows(tb, up, j.gu_stride, rows, x, j.x_stride, j.H, u, rows);
    for (int t = 0; t < tb; ++t) {
      float* ht = h + (t0 + t) * j.h_stride;
      const float* gt = g + t * rows;
      const float* ut = u + t * rows;
      int64_t r = 0;
      alignas(32) float hv[8];
      for (; r + 8 <= rows; r += 8) {
        _mm256_store_ps(hv, _mm256_mul_ps(silu256(_mm256_loadu_ps(gt + r)), _mm256_loadu_ps(ut + r)));
        for (int i = 0; i < 8; ++i) ht[split_index(begin + r + i)] = bf16_to_f32(f32_to_bf16(hv[i]));
      }
      for (; r < rows; ++r) {
        const float gr = gt[r];
        const float silu = gr / (1.0f + __builtin_expf(-gr));
        ht[split_index(begin + r)] = bf16_to_f32(f32_to_bf16(silu * ut[r]));
      }
    }
  });
}

void avx2_phase2(const Job& j, int64_t begin, int64_t end, ThreadScratch&) {
  const float* h = static_cast<const float*>(j.h);
  const bf16_t* down = down_row(j, begin);
  for_token_blocks<kMaxTokenBlock>(j.T, [&](int64_t t0, int tb) {
    dot_rows(tb, down, j.down_stride, end - begin, h + t0 * j.h_stride, j.h_stride, j.N,
             j.out + t0 * j.out_stride + begin, j.out_stride);
  });
}

}  // namespace scheinfer

#else  // no AVX2+FMA in this build

namespace scheinfer {
bool avx2_compiled() { return false; }
void avx2_pack(const Job&, int64_t, int64_t) {}
void avx2_phase1(const Job&, int64_t, int64_t, ThreadScratch&) {}
void avx2_phase2(const Job&, int64_t, int64_t, ThreadScratch&) {}
}  // namespace scheinfer

#endif
