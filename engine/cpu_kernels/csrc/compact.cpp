// Compact bf16 weights (lossless; format in slice_ffn.h, CompactMatrix): the encoder
// (load time, C entry points called from engine/model/compact_weights.py) and the decoder that
// the driver runs on each work item's rows before the kernels read them.
//
// A bf16 value is sign (1 bit), exponent (8) and mantissa (7). Trained and random weights use few
// exponents, so the exponent becomes a 4-bit code for 15 consecutive exponents [base, base + 15);
// every other value (zeros, subnormals, rare large or tiny values) is an exception kept aside with
// its exact bits. 12 bits a value instead of 16: a quarter fewer bytes for the CPU and PCIe to read.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "slice_ffn.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#endif

namespace scheinfer {
namespace {

constexpr int kEscape = 15;

// Runs fn(begin, end) over [0, count) in num_threads contiguous chunks.
void parallel_rows(int64_t count, int num_threads, const std::function<void(int64_t, int64_t)>& fn) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(num_threads, count));
  if (threads == 1) {
    fn(0, count);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t chunk = (count + threads - 1) / threads;
  for (int64_t t = 0; t < threads; ++t) {
    const int64_t b = t * chunk, e = std::min(count, b + chunk);
    if (b < e) pool.emplace_back(fn, b, e);
  }
  for (auto& th : pool) th.join();
}

inline int code_of(bf16_t v, int64_t base) {
  const int64_t e = (v >> 7) & 0xFF;
  return e >= base && e < base + kEscape ? static_cast<int>(e - base) : kEscape;
}

void unpack_row_scalar(const uint8_t* low, const uint8_t* codes, int64_t base, int64_t K, bf16_t* out) {
  for (int64_t k = 0; k < K; ++k) {
    const int code = (codes[k / 32 * 16 + k % 16] >> ((k % 32) / 16 * 4)) & 0xF;
    const uint16_t l = low[k];
    out[k] = code == kEscape ? 0 : static_cast<bf16_t>((l & 0x80) << 8 | (base + code) << 7 | (l & 0x7F));
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
void unpack_row_avx512(const uint8_t* low, const uint8_t* codes, int64_t base, int64_t K, bf16_t* out) {
  alignas(64) uint16_t table[32];
  for (int c = 0; c < 32; ++c) table[c] = c % 16 == kEscape ? 0 : static_cast<uint16_t>((base + c % 16) << 7);
  const __m512i lut = _mm512_load_si512(table);
  // lanes 0-15 take the low nibble of code bytes 0-15, lanes 16-31 the high nibble; the table
  // repeats every 16 entries, so the other nibble's bit 4 left in lanes 0-15 does not matter.
  const __m512i nibble_shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
  const __m512i sign_mantissa = _mm512_set1_epi16(static_cast<int16_t>(0x807F));
  for (int64_t k = 0; k < K; k += 32) {
    const __m512i l = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(low + k)));
    const __m128i cb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + k / 2));
    const __m512i c = _mm512_srlv_epi16(_mm512_cvtepu8_epi16(_mm256_broadcastsi128_si256(cb)), nibble_shift);
    const __m512i exponent = _mm512_permutexvar_epi16(c, lut);
    // (l | l << 8) & 0x807F: the sign to bit 15, the mantissa in bits 0-6; then the exponent.
    const __m512i sm = _mm512_ternarylogic_epi32(l, _mm512_slli_epi16(l, 8), sign_mantissa, 0xA8);
    _mm512_storeu_si512(out + k, _mm512_or_si512(sm, exponent));
  }
}
#endif

}  // namespace

void unpack_rows(const CompactMatrix& m, int64_t K, int64_t r0, int64_t r1, bf16_t* out) {
  for (int64_t r = r0; r < r1; ++r) {
    bf16_t* o = out + (r - r0) * K;
    const uint8_t* low = m.low + r * m.low_stride;
    const uint8_t* codes = m.codes + r * (m.low_stride / 2);
#if defined(__AVX512F__) && defined(__AVX512BW__)
    unpack_row_avx512(low, codes, m.base, K, o);
#else
    unpack_row_scalar(low, codes, m.base, K, o);
#endif
    for (int32_t i = m.exc_row_ptr[r]; i < m.exc_row_ptr[r + 1]; ++i) o[m.exc_cols[i]] = m.exc_vals[i];
  }
}

}  // namespace scheinfer

using namespace scheinfer;

extern "C" {

// hist[e] += number of values of src [rows][K] (row stride `stride` values) whose exponent is e.
void scheinfer_exponent_histogram(const bf16_t* src, int64_t rows, int64_t K, int64_t stride, int64_t* hist,
                                  int num_threads) {
  std::vector<std::vector<int64_t>> parts;
  std::mutex parts_mutex;
  parallel_rows(rows, num_threads, [&](int64_t b, int64_t e) {
    std::vector<int64_t> h(256, 0);
    for (int64_t r = b; r < e; ++r)
      for (int64_t k = 0; k < K; ++k) ++h[(src[r * stride + k] >> 7) & 0xFF];
    std::lock_guard<std::mutex> lock(parts_mutex);
    parts.push_back(std::move(h));
  });
  for (const auto& h : parts)
    for (int i = 0; i < 256; ++i) hist[i] += h[i];
}

// Encodes src [rows][K] (K a multiple of 32) into low [rows][K] and codes [rows][K / 2] (both
// contiguous); row_counts[r] = exceptions in row r (their low bytes are 0, codes 15).
void scheinfer_pack_exponents(const bf16_t* src, int64_t rows, int64_t K, int64_t stride, int64_t base,
                              uint8_t* low, uint8_t* codes, int32_t* row_counts, int num_threads) {
  parallel_rows(rows, num_threads, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const bf16_t* s = src + r * stride;
      uint8_t* l = low + r * K;
      uint8_t* c = codes + r * (K / 2);
      int32_t count = 0;
      for (int64_t k0 = 0; k0 < K; k0 += 32) {
        for (int64_t i = 0; i < 16; ++i) {
          const bf16_t v0 = s[k0 + i], v1 = s[k0 + 16 + i];
          const int c0 = code_of(v0, base), c1 = code_of(v1, base);
          l[k0 + i] = c0 == kEscape ? 0 : static_cast<uint8_t>((v0 >> 8 & 0x80) | (v0 & 0x7F));
          l[k0 + 16 + i] = c1 == kEscape ? 0 : static_cast<uint8_t>((v1 >> 8 & 0x80) | (v1 & 0x7F));
          c[k0 / 2 + i] = static_cast<uint8_t>(c0 | c1 << 4);
          count += (c0 == kEscape) + (c1 == kEscape);
        }
      }
      row_counts[r] = count;
    }
  });
}

// The exceptions of src (as scheinfer_pack_exponents counted them), row by row in column order:
// cols[i], vals[i] for i in [row_ptr[r], row_ptr[r + 1]).
void scheinfer_pack_exceptions(const bf16_t* src, int64_t rows, int64_t K, int64_t stride, int64_t base,
                               const int32_t* row_ptr, int32_t* cols, bf16_t* vals, int num_threads) {
  parallel_rows(rows, num_threads, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      if (row_ptr[r] == row_ptr[r + 1]) continue;
      int32_t at = row_ptr[r];
      for (int64_t k = 0; k < K; ++k) {
        const bf16_t v = src[r * stride + k];
        if (code_of(v, base) == kEscape) {
          cols[at] = static_cast<int32_t>(k);
          vals[at] = v;
          ++at;
        }
      }
    }
  });
}

// Decodes rows [r0, r1) of a compact matrix (test and benchmark entry for unpack_rows).
void scheinfer_unpack_rows(const uint8_t* low, int64_t low_stride, const uint8_t* codes, int64_t base,
                           const int32_t* exc_row_ptr, const int32_t* exc_cols, const bf16_t* exc_vals, int64_t K,
                           int64_t r0, int64_t r1, bf16_t* out, int num_threads) {
  CompactMatrix m;
  m.low = low;
  m.low_stride = low_stride;
  m.codes = codes;
  m.base = base;
  m.exc_row_ptr = exc_row_ptr;
  m.exc_cols = exc_cols;
  m.exc_vals = exc_vals;
  parallel_rows(r1 - r0, num_threads, [&](int64_t b, int64_t e) { unpack_rows(m, K, r0 + b, r0 + e, out + b * K); });
}

}  // extern "C"
