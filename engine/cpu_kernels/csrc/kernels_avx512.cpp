// AVX512-BF16 path (vdpbf16ps): small token blocks (decode), and every block when AMX is absent.
//
// Micro-kernel: R weight rows x TB tokens of dot products over K, bf16 pairs multiplied and summed
// into fp32 by vdpbf16ps. Weights stream from memory row-major as stored; activations (x in
// phase 1, the intermediate h in phase 2) are read from cache. Tails of K use masked loads.
#include "slice_ffn.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>

#include "vec_math.h"

namespace scheinfer {
namespace {

constexpr int kMaxTokenBlock = 8;

// res[t * res_stride + r] = dot(w[r * ws : + K], v[t * vs : + K]) for r < R, t < TB.
template <int R, int TB, bool PF>
inline void dot_block(const bf16_t* w, int64_t ws, const bf16_t* v, int64_t vs, int64_t K, int64_t pf,
                      float* res, int64_t res_stride) {
  __m512 acc[R][TB];
#pragma GCC unroll 32
  for (int i = 0; i < R * TB; ++i) acc[i / TB][i % TB] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512i wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_si512(static_cast<const void*>(w + r * ws + k));
    if (PF) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(w + r * ws + k) + pf, _MM_HINT_T0);
    }
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(static_cast<const void*>(v + t * vs + k));
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], (__m512bh)wv[r], xv);
    }
  }
  if (k < K) {
    const __mmask32 m = static_cast<__mmask32>((1ull << (K - k)) - 1);
    __m512i wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_epi16(m, w + r * ws + k);
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) {
      __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, v + t * vs + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], (__m512bh)wv[r], xv);
    }
  }
#pragma GCC unroll 32
  for (int i = 0; i < R * TB; ++i) res[(i % TB) * res_stride + i / TB] = _mm512_reduce_add_ps(acc[i / TB][i % TB]);
}

// Rows per pass for TB tokens: keeps R*TB accumulators + R weight vectors within 32 registers.
template <int TB>
constexpr int rows_for() {
  return TB <= 2 ? 8 : TB <= 3 ? 6 : TB <= 6 ? 4 : 3;
}

template <int R, int TB, bool PF>
void dot_rows_r(const bf16_t* w, int64_t ws, int64_t rows, const bf16_t* v, int64_t vs, int64_t K,
                int64_t pf, float* res, int64_t res_stride) {
  int64_t r = 0;
  for (; r + R <= rows; r += R) dot_block<R, TB, PF>(w + r * ws, ws, v, vs, K, pf, res + r, res_stride);
  for (; r < rows; ++r) dot_block<1, TB, PF>(w + r * ws, ws, v, vs, K, pf, res + r, res_stride);
}

template <int TB, bool PF>
void dot_rows_tb(const bf16_t* w, int64_t ws, int64_t rows, const bf16_t* v, int64_t vs, int64_t K,
                 int64_t pf, float* res, int64_t res_stride) {
  if (TB == 1) {
    switch (tuning().decode_rows) {
      case 1: return dot_rows_r<1, TB, PF>(w, ws, rows, v, vs, K, pf, res, res_stride);
      case 2: return dot_rows_r<2, TB, PF>(w, ws, rows, v, vs, K, pf, res, res_stride);
      case 4: return dot_rows_r<4, TB, PF>(w, ws, rows, v, vs, K, pf, res, res_stride);
      default: break;
    }
  }
  dot_rows_r<rows_for<TB>(), TB, PF>(w, ws, rows, v, vs, K, pf, res, res_stride);
}

template <bool PF>
void dot_rows_pf(int tb, const bf16_t* w, int64_t ws, int64_t rows, const bf16_t* v, int64_t vs, int64_t K,
                 int64_t pf, float* res, int64_t res_stride) {
  switch (tb) {
    case 1: return dot_rows_tb<1, PF>(w, ws, rows, v, vs, K, pf, res, res_stride);
    case 2: return dot_rows_tb<2, PF>(w, ws, rows, v, vs, K, pf, res, res_stride);
    case 3: return dot_rows_tb<3, PF>(w, ws, rows, v, vs, K, pf, res, res_stride);
    case 4: return dot_rows_tb<4, PF>(w, ws, rows, v, vs, K, pf, res, res_stride);
    case 5: return dot_rows_tb<5, PF>(w, ws, rows, v, vs, K, pf, res, res_stride);
    case 6: return dot_rows_tb<6, PF>(w, ws, rows, v, vs, K, pf, res, res_stride);
    case 7: return dot_rows_tb<7, PF>(w, ws, rows, v, vs, K, pf, res, res_stride);
    default: return dot_rows_tb<8, PF>(w, ws, rows, v, vs, K, pf, res, res_stride);
  }
}

// res[t * res_stride + r] for rows r < rows, tokens t < tb (tb <= 8).
void dot_rows(int tb, const bf16_t* w, int64_t ws, int64_t rows, const bf16_t* v, int64_t vs, int64_t K,
              float* res, int64_t res_stride) {
  const int64_t pf = tuning().prefetch_bytes;
  if (pf > 0) dot_rows_pf<true>(tb, w, ws, rows, v, vs, K, pf, res, res_stride);
  else dot_rows_pf<false>(tb, w, ws, rows, v, vs, K, 0, res, res_stride);
}

// Compact weights (slice_ffn.h, CompactMatrix), decoded in registers as they stream: the same
// vectors as the bf16 rows give, so the same bits come out. An exception (code 15) decodes to 0
// and is patched from its row's list, which holds the row's exceptions in column order.
struct CompactDecoder {
  __m512i lut, nibble_shift, sign_mantissa;
  explicit CompactDecoder(int64_t base) {
    alignas(64) uint16_t table[32];
    for (int c = 0; c < 32; ++c) table[c] = c % 16 == 15 ? 0 : static_cast<uint16_t>((base + c % 16) << 7);
    lut = _mm512_load_si512(table);
    nibble_shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
    sign_mantissa = _mm512_set1_epi16(static_cast<int16_t>(0x807F));
  }
  // 32 values from low[0..32) and codes[0..16); exceptions taken from *next (advanced).
  inline __m512i load(const uint8_t* low, const uint8_t* codes, const bf16_t*& next) const {
    const __m512i l = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(low)));
    const __m128i cb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
    const __m512i c = _mm512_srlv_epi16(_mm512_cvtepu8_epi16(_mm256_broadcastsi128_si256(cb)), nibble_shift);
    const __m512i exponent = _mm512_permutexvar_epi16(c, lut);
    __m512i w = _mm512_or_si512(_mm512_ternarylogic_epi32(l, _mm512_slli_epi16(l, 8), sign_mantissa, 0xA8), exponent);
    __mmask32 escapes = _mm512_cmpeq_epi16_mask(exponent, _mm512_setzero_si512());
    while (__builtin_expect(escapes != 0, 0)) {
      const int lane = __builtin_ctz(escapes);
      w = _mm512_mask_set1_epi16(w, static_cast<__mmask32>(1u << lane), static_cast<short>(*next++));
      escapes &= escapes - 1;
    }
    return w;
  }
};

// res[t * res_stride + r] = dot(row row0 + r of m, v[t * vs : + K]) for r < R, t < TB (K % 32 == 0).
template <int R, int TB>
inline void dot_block_compact(const CompactMatrix& m, const CompactDecoder& dec, int64_t row0, const bf16_t* v,
                              int64_t vs, int64_t K, int64_t pf, float* res, int64_t res_stride) {
  __m512 acc[R][TB];
#pragma GCC unroll 32
  for (int i = 0; i < R * TB; ++i) acc[i / TB][i % TB] = _mm512_setzero_ps();
  const uint8_t* low[R];
  const uint8_t* codes[R];
  const bf16_t* next[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    low[r] = m.low + (row0 + r) * m.low_stride;
    codes[r] = m.codes + (row0 + r) * (m.low_stride / 2);
    next[r] = m.exc_vals + m.exc_row_ptr[row0 + r];
  }
  for (int64_t k = 0; k < K; k += 32) {
    __m512i wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      if (pf > 0) {
        _mm_prefetch(reinterpret_cast<const char*>(low[r] + k) + pf, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(codes[r] + k / 2) + pf / 2, _MM_HINT_T0);
      }
      wv[r] = dec.load(low[r] + k, codes[r] + k / 2, next[r]);
    }
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(static_cast<const void*>(v + t * vs + k));
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], (__m512bh)wv[r], xv);
    }
  }
#pragma GCC unroll 32
  for (int i = 0; i < R * TB; ++i) res[(i % TB) * res_stride + i / TB] = _mm512_reduce_add_ps(acc[i / TB][i % TB]);
}

template <int TB>
void dot_rows_compact_tb(const CompactMatrix& m, int64_t row0, int64_t rows, const bf16_t* v, int64_t vs, int64_t K,
                         float* res, int64_t res_stride) {
  const CompactDecoder dec(m.base);
  const int64_t pf = tuning().prefetch_bytes / 2;  // compact rows: 3/4 of the bytes, in two streams
  constexpr int R = TB <= 2 ? 4 : 2;  // each row's decode keeps a few more registers live
  int64_t r = 0;
  for (; r + R <= rows; r += R) dot_block_compact<R, TB>(m, dec, row0 + r, v, vs, K, pf, res + r, res_stride);
  for (; r < rows; ++r) dot_block_compact<1, TB>(m, dec, row0 + r, v, vs, K, pf, res + r, res_stride);
}

// As dot_rows for rows [row0, row0 + rows) of a compact matrix.
void dot_rows_compact(int tb, const CompactMatrix& m, int64_t row0, int64_t rows, const bf16_t* v, int64_t vs,
                      int64_t K, float* res, int64_t res_stride) {
  switch (tb) {
    case 1: return dot_rows_compact_tb<1>(m, row0, rows, v, vs, K, res, res_stride);
    case 2: return dot_rows_compact_tb<2>(m, row0, rows, v, vs, K, res, res_stride);
    case 3: return dot_rows_compact_tb<3>(m, row0, rows, v, vs, K, res, res_stride);
    case 4: return dot_rows_compact_tb<4>(m, row0, rows, v, vs, K, res, res_stride);
    case 5: return dot_rows_compact_tb<5>(m, row0, rows, v, vs, K, res, res_stride);
    case 6: return dot_rows_compact_tb<6>(m, row0, rows, v, vs, K, res, res_stride);
    case 7: return dot_rows_compact_tb<7>(m, row0, rows, v, vs, K, res, res_stride);
    default: return dot_rows_compact_tb<8>(m, row0, rows, v, vs, K, res, res_stride);
  }
}

// h[r] = bf16(silu(g[r]) * u[r]) for r < rows.
void silu_mul_store(const float* g, const float* u, int64_t rows, bf16_t* h) {
  for (int64_t r = 0; r < rows; r += 16) {
    const int64_t left = rows - r;
    const __mmask16 m = left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1);
    __m512 gv = _mm512_maskz_loadu_ps(m, g + r);
    __m512 uv = _mm512_maskz_loadu_ps(m, u + r);
    __m256bh hv = _mm512_cvtneps_pbh(_mm512_mul_ps(silu512(gv), uv));
    _mm256_mask_storeu_epi16(h + r, m, (__m256i)hv);
  }
}

}  // namespace

bool avx512_compiled() { return true; }

void avx512_phase1(const Job& j, int64_t begin, int64_t end, ThreadScratch& scratch) {
  const int64_t rows = end - begin;
  float* g = scratch.floats(2 * rows * kMaxTokenBlock);
  float* u = g + rows * kMaxTokenBlock;
  bf16_t* h = static_cast<bf16_t*>(j.h);
  const bf16_t* gate = gate_row(j, begin);
  const bf16_t* up = up_row(j, begin);
  for_token_blocks<kMaxTokenBlock>(j.T, [&](int64_t t0, int tb) {
    const bf16_t* x = j.x + t0 * j.H;
    dot_rows(tb, gate, j.gu_stride, rows, x, j.H, j.H, g, rows);
    dot_rows(tb, up, j.gu_stride, rows, x, j.H, j.H, u, rows);
    for (int t = 0; t < tb; ++t) silu_mul_store(g + t * rows, u + t * rows, rows, h + (t0 + t) * j.h_stride + begin);
  });
}

void avx512_phase1_compact(const Job& j, int64_t begin, int64_t end, ThreadScratch& scratch) {
  const int64_t rows = end - begin;
  float* g = scratch.floats(2 * rows * kMaxTokenBlock);
  float* u = g + rows * kMaxTokenBlock;
  bf16_t* h = static_cast<bf16_t*>(j.h);
  for_token_blocks<kMaxTokenBlock>(j.T, [&](int64_t t0, int tb) {
    const bf16_t* x = j.x + t0 * j.H;
    dot_rows_compact(tb, j.compact_gu, begin, rows, x, j.H, j.H, g, rows);
    dot_rows_compact(tb, j.compact_gu, j.N + begin, rows, x, j.H, j.H, u, rows);
    for (int t = 0; t < tb; ++t) silu_mul_store(g + t * rows, u + t * rows, rows, h + (t0 + t) * j.h_stride + begin);
  });
}

void avx512_phase2_compact(const Job& j, int64_t begin, int64_t end, ThreadScratch&) {
  const bf16_t* h = static_cast<const bf16_t*>(j.h);
  for_token_blocks<kMaxTokenBlock>(j.T, [&](int64_t t0, int tb) {
    dot_rows_compact(tb, j.compact_down, begin, end - begin, h + t0 * j.h_stride, j.h_stride, j.N,
                     j.out + t0 * j.out_stride + begin, j.out_stride);
  });
}

void avx512_phase2(const Job& j, int64_t begin, int64_t end, ThreadScratch&) {
  const bf16_t* h = static_cast<const bf16_t*>(j.h);
  const bf16_t* down = down_row(j, begin);
  for_token_blocks<kMaxTokenBlock>(j.T, [&](int64_t t0, int tb) {
    dot_rows(tb, down, j.down_stride, end - begin, h + t0 * j.h_stride, j.h_stride, j.N,
             j.out + t0 * j.out_stride + begin, j.out_stride);
  });
}

}  // namespace scheinfer

#else  // no AVX512-BF16 in this build

namespace scheinfer {
bool avx512_compiled() { return false; }
void avx512_phase1(const Job&, int64_t, int64_t, ThreadScratch&) {}
void avx512_phase2(const Job&, int64_t, int64_t, ThreadScratch&) {}
void avx512_phase1_compact(const Job&, int64_t, int64_t, ThreadScratch&) {}
void avx512_phase2_compact(const Job&, int64_t, int64_t, ThreadScratch&) {}
}  // namespace scheinfer

#endif
