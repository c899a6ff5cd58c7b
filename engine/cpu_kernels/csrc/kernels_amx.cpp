// AMX path (tdpbf16ps), for token blocks of amx_min_tokens and more (prefill).
//
// Both phases compute C^T = W @ X^T with the weights as the A operand, read from their row-major
// storage (16 rows x 32 bf16 per tile; for many token tiles a block is first copied into a small
// per-thread panel, see pack_a), and the activations as the B operand in a tile-major VNNI
// layout (dword [token / 16][k / 2][token % 16] holding the pair k, k+1 of one token), which
// phase 0 packs for x and phase 1 writes for h. Each step uses 2 A tiles x 2 B tiles -> 4 fp32 accumulator tiles
// (phase 1: gate and up rows of the same 16 intermediate rows, so the epilogue forms h directly;
// phase 2: two groups of 16 down rows). K is blocked (amx_k_block) with the accumulators kept in
// per-thread scratch (see run_item_gemm).
// Needs hidden % 32 == 0 and n % 32 == 0 (the driver sends other shapes to avx512).
#include "slice_ffn.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#include <sys/syscall.h>

#include <vector>
#include <unistd.h>

#include "vec_math.h"

namespace scheinfer {
namespace {

constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Accumulates into tiles 0..3: C0 += A0 B0, C1 += A0 B1, C2 += A1 B0, C3 += A1 B1 over nk steps of
// 32 along K. A tiles: 16 rows, row stride a_stride bytes, the next step a_step elements on.
// B tiles: contiguous 1 KB (tile-major VNNI layout), the next step 256 dwords on. c*: 16 x 16 fp32.
// next0/next1 (or nullptr): the raw weight rows (row stride next_stride elements) of the A block
// computed after this one, prefetched into L2 one 32-column step per step (tuning: amx_prefetch).
inline void prefetch_tile_rows(const bf16_t* rows, int64_t stride) {
#pragma GCC unroll 16
  for (int r = 0; r < 16; ++r) _mm_prefetch(reinterpret_cast<const char*>(rows + r * stride), _MM_HINT_T1);
}

// The A block computed after the current one: two 16-row tiles of raw weight rows, `steps` steps
// of 32 columns. rows0 == nullptr: nothing to prefetch.
struct NextBlock {
  const bf16_t* rows0 = nullptr;
  const bf16_t* rows1 = nullptr;
  int64_t stride = 0, steps = 0;

  void prefetch_step(int64_t kk) const {
    if (rows0 == nullptr || kk >= steps) return;
    prefetch_tile_rows(rows0 + 32 * kk, stride);
    prefetch_tile_rows(rows1 + 32 * kk, stride);
  }
};

inline void tile_block(const bf16_t* a0, const bf16_t* a1, int64_t a_stride, int64_t a_step, const uint32_t* b0,
                       const uint32_t* b1, int64_t nk, bool two, bool load_c, float* c0, float* c1, float* c2,
                       float* c3, const NextBlock& next) {
  if (load_c) {
    _tile_loadd(0, c0, 64);
    _tile_loadd(2, c2, 64);
    if (two) {
      _tile_loadd(1, c1, 64);
      _tile_loadd(3, c3, 64);
    }
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  if (two) {
    for (int64_t kk = 0; kk < nk; ++kk) {
      next.prefetch_step(kk);
      _tile_loadd(4, a0 + a_step * kk, a_stride);
      _tile_loadd(6, b0 + 256 * kk, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_loadd(7, b1 + 256 * kk, 64);
      _tile_dpbf16ps(1, 4, 7);
      _tile_loadd(5, a1 + a_step * kk, a_stride);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  } else {
    for (int64_t kk = 0; kk < nk; ++kk) {
      next.prefetch_step(kk);
      _tile_loadd(4, a0 + a_step * kk, a_stride);
      _tile_loadd(6, b0 + 256 * kk, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_loadd(5, a1 + a_step * kk, a_stride);
      _tile_dpbf16ps(2, 5, 6);
    }
  }
  _tile_stored(0, c0, 64);
  _tile_stored(2, c2, 64);
  if (two) {
    _tile_stored(1, c1, 64);
    _tile_stored(3, c3, 64);
  }
}

// Copies 16 rows x 32 nk columns (row stride `stride` elements) into nk contiguous 1 KB tiles, so
// that tile loads reused across token tiles hit L1 (rows of power-of-two stride share one L1 set).
inline void pack_a(const bf16_t* src, int64_t stride, int64_t nk, bf16_t* dst) {
  for (int r = 0; r < 16; ++r)
    for (int64_t kk = 0; kk < nk; ++kk)
      _mm512_store_si512(dst + (kk * 16 + r) * 32, _mm512_loadu_si512(src + r * stride + kk * 32));
}

constexpr int kMaxTiles = 64;  // A tiles per work item (amx rows <= 1024)

// One work item: C[blocks][2][token tile] += A tiles x B over all of K, A tile i starting at
// tiles[i] (16 rows of row_stride elements), B the tile-major VNNI activations [ntile][K / 2][16].
// K is blocked (amx_k_block); per K block and pair of A tiles, every token-tile pair passes over
// the same A block. With many token tiles (amx_pack_min_tiles) the A block is first copied into
// `panel`, whose contiguous tiles stay in L1 (rows of a power-of-two stride would share one L1 set).
struct ItemGemm {
  const bf16_t* const* tiles;
  int64_t blocks;  // pairs of A tiles
  int64_t row_stride, K;
  const uint32_t* b;
  int64_t ntile;
  float* acc;     // [blocks][2][ntile][16][16]
  bf16_t* panel;  // [2][k_block / 32][16][32]
};

void run_item_gemm(const ItemGemm& g) {
  const bool packed = g.ntile >= tuning().amx_pack_min_tiles;
  const bool ahead = tuning().amx_prefetch != 0;
  const int64_t kb_size = tuning().amx_k_block, k_half = g.K / 2;
  auto block_steps = [&](int64_t kb) { return ((kb + kb_size < g.K ? kb + kb_size : g.K) - kb) / 32; };
  for (int64_t kb = 0; kb < g.K; kb += kb_size) {
    const int64_t nk = block_steps(kb);
    for (int64_t blk = 0; blk < g.blocks; ++blk) {
      const bf16_t* a0 = g.tiles[2 * blk] + kb;
      const bf16_t* a1 = g.tiles[2 * blk + 1] + kb;
      // The A block after this one (next pair of tiles, else the first pair at the next K block).
      NextBlock next;
      if (ahead && blk + 1 < g.blocks)
        next = {g.tiles[2 * blk + 2] + kb, g.tiles[2 * blk + 3] + kb, g.row_stride, nk};
      else if (ahead && kb + kb_size < g.K)
        next = {g.tiles[0] + kb + kb_size, g.tiles[1] + kb + kb_size, g.row_stride, block_steps(kb + kb_size)};
      if (packed) {
        pack_a(a0, g.row_stride, nk, g.panel);
        pack_a(a1, g.row_stride, nk, g.panel + nk * 512);
        a0 = g.panel;
        a1 = g.panel + nk * 512;
      }
      float* first = g.acc + (blk * 2) * g.ntile * 256;
      float* second = first + g.ntile * 256;
      for (int64_t tt = 0; tt < g.ntile; tt += 2) {
        const uint32_t* b0 = g.b + (tt * k_half + kb / 2) * 16;
        tile_block(a0, a1, packed ? 64 : g.row_stride * 2, packed ? 512 : 32, b0, b0 + k_half * 16, nk,
                   tt + 1 < g.ntile, kb > 0, first + tt * 256, first + (tt + 1) * 256, second + tt * 256,
                   second + (tt + 1) * 256, tt == 0 ? next : NextBlock{});
      }
    }
  }
}

}  // namespace

bool amx_compiled() { return true; }

bool amx_request_permission() {
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

void amx_configure_thread() {
  TileConfig cfg{};
  cfg.palette_id = 1;
  for (int i = 0; i < 8; ++i) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = 16;
  }
  _tile_loadconfig(&cfg);
}

void amx_release_thread() { _tile_release(); }

// Tile-major VNNI: xv[t / 16][k2][t % 16] = dword (x[t][2 k2], x[t][2 k2 + 1]) for k2 in
// [begin, end), zero for padded tokens; so a B tile (16 k2 x 16 tokens) is 1 KB contiguous.
void amx_pack(const Job& j, int64_t begin, int64_t end) {
  uint32_t* xv = static_cast<uint32_t*>(j.xpack);
  const uint32_t* x = reinterpret_cast<const uint32_t*>(j.x);
  const int64_t half = j.H / 2;
  for (int64_t k2 = begin; k2 < end; ++k2) {
    for (int64_t t = 0; t < j.t_pad; ++t) xv[((t / 16) * half + k2) * 16 + t % 16] = t < j.T ? x[t * half + k2] : 0;
  }
}

// Intermediate rows [begin, end) (a multiple of 16 rows): gate and up tiles, then h in VNNI layout.
void amx_phase1(const Job& j, int64_t begin, int64_t end, ThreadScratch& scratch) {
  const int64_t groups = (end - begin) / 16, ntile = j.t_pad / 16;
  float* acc = scratch.floats(groups * 2 * ntile * 256 + 16 * tuning().amx_k_block);
  const bf16_t* tiles[kMaxTiles];
  for (int64_t g = 0; g < groups; ++g) {
    tiles[2 * g] = gate_row(j, begin + 16 * g);           // gate rows
    tiles[2 * g + 1] = up_row(j, begin + 16 * g);  // the matching up rows
  }
  run_item_gemm({tiles, groups, j.gu_stride, j.H, static_cast<const uint32_t*>(j.xpack), ntile, acc,
                 reinterpret_cast<bf16_t*>(acc + groups * 2 * ntile * 256)});  // panel: 16 kb floats
  // Epilogue: rows r, r + 1 of a group -> 16 tokens of dwords (h[r][t], h[r + 1][t]), tile-major.
  uint32_t* hv = static_cast<uint32_t*>(j.h);
  const int64_t n_half = j.N / 2;
  for (int64_t g = 0; g < groups; ++g) {
    const float* gate_acc = acc + (g * 2) * ntile * 256;
    const float* up_acc = gate_acc + ntile * 256;
    for (int64_t tt = 0; tt < ntile; ++tt) {
      for (int r = 0; r < 16; r += 2) {
        const float* ge = gate_acc + tt * 256 + r * 16;
        const float* ue = up_acc + tt * 256 + r * 16;
        __m512 he = _mm512_mul_ps(silu512(_mm512_load_ps(ge)), _mm512_load_ps(ue));
        __m512 ho = _mm512_mul_ps(silu512(_mm512_load_ps(ge + 16)), _mm512_load_ps(ue + 16));
        __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(he));
        __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(ho));
        __m512i both = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
        _mm512_storeu_si512(hv + (tt * n_half + (begin + 16 * g + r) / 2) * 16, both);
      }
    }
  }
}

// Output columns (down rows) [begin, end), a multiple of 32 rows.
void amx_phase2(const Job& j, int64_t begin, int64_t end, ThreadScratch& scratch) {
  const int64_t pairs = (end - begin) / 32, ntile = j.t_pad / 16;
  float* acc = scratch.floats(pairs * 2 * ntile * 256 + 16 * tuning().amx_k_block);
  const bf16_t* tiles[kMaxTiles];
  for (int64_t i = 0; i < 2 * pairs; ++i) tiles[i] = down_row(j, begin + 16 * i);
  run_item_gemm({tiles, pairs, j.down_stride, j.N, static_cast<const uint32_t*>(j.h), ntile, acc,
                 reinterpret_cast<bf16_t*>(acc + pairs * 2 * ntile * 256)});
  // Epilogue: tile [16 rows i][16 tokens t] -> out[t][i].
  for (int64_t p = 0; p < pairs; ++p) {
    for (int half = 0; half < 2; ++half) {
      const float* tiles = acc + (p * 2 + half) * ntile * 256;
      const int64_t i0 = begin + 32 * p + 16 * half;
      for (int64_t tt = 0; tt < ntile; ++tt) {
        for (int64_t t = 0; t < 16 && tt * 16 + t < j.T; ++t) {
          float* o = j.out + (tt * 16 + t) * j.out_stride + i0;
          const float* c = tiles + tt * 256 + t;
          __m512 col = _mm512_i32gather_ps(_mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176,
                                                             192, 208, 224, 240), c, 4);
          _mm512_storeu_ps(o, col);
        }
      }
    }
  }
}

// Diagnostic (benchmarks only): `iters` steps of 4 tdpbf16ps into tiles 0..3 from sources 4..7.
// mode 0: sources stay in the tile registers (the TMUL's own rate); mode 1: the 4 sources are
// reloaded every step from a 4 KB buffer (L1); mode 2: as the kernel does, A from a 16 KB panel and
// B from a 256 KB buffer (L2), stepping through both. Returns a checksum.
float amx_probe(int64_t iters, int mode) {
  static thread_local std::vector<uint8_t> buffer;
  buffer.assign(300 << 10, 1);
  const uint8_t* a = buffer.data();
  const uint8_t* b = buffer.data() + (32 << 10);
  _tile_loadd(4, a, 64);
  _tile_loadd(5, a + 1024, 64);
  _tile_loadd(6, a + 2048, 64);
  _tile_loadd(7, a + 3072, 64);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t i = 0; i < iters; ++i) {
    if (mode == 1) {
      _tile_loadd(4, a, 64);
      _tile_loadd(6, a + 2048, 64);
    } else if (mode == 2) {
      _tile_loadd(4, a + 1024 * (i % 8), 64);
      _tile_loadd(6, b + 1024 * (i % 256), 64);
    }
    _tile_dpbf16ps(0, 4, 6);
    if (mode == 1) _tile_loadd(7, a + 3072, 64);
    else if (mode == 2) _tile_loadd(7, b + 1024 * ((i + 128) % 256), 64);
    _tile_dpbf16ps(1, 4, 7);
    if (mode == 1) _tile_loadd(5, a + 1024, 64);
    else if (mode == 2) _tile_loadd(5, a + 1024 * (8 + i % 8), 64);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  alignas(64) float c[256];
  _tile_stored(0, c, 64);
  return c[0];
}

}  // namespace scheinfer

#else  // no AMX in this build

namespace scheinfer {
bool amx_compiled() { return false; }
bool amx_request_permission() { return false; }
void amx_configure_thread() {}
void amx_release_thread() {}
void amx_pack(const Job&, int64_t, int64_t) {}
void amx_phase1(const Job&, int64_t, int64_t, ThreadScratch&) {}
void amx_phase2(const Job&, int64_t, int64_t, ThreadScratch&) {}
float amx_probe(int64_t, int) { return 0.0f; }
}  // namespace scheinfer

#endif
