// Fused CPU kernel for FFN unit slices: out = down @ (silu(gate @ x) * (up @ x)).
//
// Shared declarations of the driver (api.cpp) and the per-ISA kernels (kernels_*.cpp).
// Every file is compiled with -march=native on the machine that runs it; a kernel whose ISA the
// compiler does not enable is compiled as a stub that is never called (see *_compiled()).
#pragma once

#include <cstddef>
#include <cstdint>

namespace scheinfer {

using bf16_t = uint16_t;

enum Path : int { kPathNone = 0, kPathAvx2 = 1, kPathAvx512 = 2, kPathAmx = 3 };

// A matrix [rows][K] stored compact, its exponents coded (engine/model/compact_weights.py), lossless:
// element (r, k) has low byte low[r * low_stride + k] = sign << 7 | mantissa and a 4-bit code, the
// nibble (k % 32) / 16 of codes[r * low_stride / 2 + k / 32 * 16 + k % 16]; code c < 15 means exponent
// base + c, code 15 an exception whose bf16 value is exc_vals[i] for the i in
// [exc_row_ptr[r], exc_row_ptr[r + 1]) with exc_cols[i] == k. K is a multiple of 32.
struct CompactMatrix {
  const uint8_t* low = nullptr;
  int64_t low_stride = 0;
  const uint8_t* codes = nullptr;
  int64_t base = 0;
  const int32_t* exc_row_ptr = nullptr;
  const int32_t* exc_cols = nullptr;
  const bf16_t* exc_vals = nullptr;
};

// Rows [r0, r1) of a compact matrix with K columns, decoded into out[(r - r0) * K + k] (bit-exact).
void unpack_rows(const CompactMatrix& m, int64_t K, int64_t r0, int64_t r1, bf16_t* out);

// One job as the Python side lays it out: 20 int64 fields (see engine/cpu_kernels/slice_job.py).
// gu_codes == 0: plain bf16 weights; else gate_up and down are the low bytes of compact matrices
// (strides in bytes) and the gu_* / down_* fields the rest of them.
struct JobDesc {
  int64_t x, num_tokens, hidden, gate_up, gate_up_stride, n, down, down_stride, out, out_stride;
  int64_t gu_codes, gu_base, gu_exc_row_ptr, gu_exc_cols, gu_exc_vals;
  int64_t down_codes, down_base, down_exc_row_ptr, down_exc_cols, down_exc_vals;
};

// One job with its path and scratch. Shapes: x [T, H] (row stride H), gate_up [2N, H] (row stride
// gu_stride), down [H, N] (row stride down_stride), out [T, H] fp32 (row stride out_stride).
struct Job {
  const bf16_t* x;
  int64_t T, H;
  // Weight rows as the kernels read them: gate row r at gu + (r - gu_row0) * gu_stride, up row r at
  // up + (r - gu_row0) * gu_stride, down row r at down + (r - down_row0) * down_stride. For compact
  // weights the driver points them at one work item's rows, decoded into thread scratch.
  const bf16_t* gu;
  const bf16_t* up;
  int64_t gu_stride, gu_row0;
  int64_t N;
  const bf16_t* down;
  int64_t down_stride, down_row0;
  bool compact;
  CompactMatrix compact_gu, compact_down;  // when compact: gate_up [2N][H] and down [H][N]
  float* out;
  int64_t out_stride;
  int path;
  // Packed activations (avx2: fp32 pair-split [T][x_stride]; amx: VNNI dwords [H/2][t_pad]).
  void* xpack;
  int64_t x_stride;
  // Intermediate act(gate)*up rounded to bf16. avx512: bf16 [T][h_stride];
  // avx2: fp32 pair-split [T][h_stride]; amx: VNNI dwords [N/2][t_pad].
  void* h;
  int64_t h_stride;
  int64_t t_pad;  // amx: T rounded up to 16
};

inline const bf16_t* gate_row(const Job& j, int64_t r) { return j.gu + (r - j.gu_row0) * j.gu_stride; }
inline const bf16_t* up_row(const Job& j, int64_t r) { return j.up + (r - j.gu_row0) * j.gu_stride; }
inline const bf16_t* down_row(const Job& j, int64_t r) { return j.down + (r - j.down_row0) * j.down_stride; }

// Run-time knobs (set from Python for tuning; defaults are the tuned values).
struct Tuning {
  int64_t item_bytes = 256 << 10;  // weight bytes per work item (avx2/avx512 paths)
  int64_t prefetch_bytes = 1024;   // software prefetch distance in the weight streams (0: off)
  int64_t decode_rows = 8;         // rows per avx512 micro-kernel pass at one token: 1, 2, 4 or 8
  int64_t amx_prefetch = 1;        // amx: prefetch the next A block into L2 while computing (0/1)
  int64_t amx_min_tokens = 4;      // jobs with fewer tokens use avx512
  int64_t amx_rows = 64;           // weight rows per amx work item, up to 64 tokens (multiple of 32)
  int64_t amx_prefill_rows = 64;   // weight rows per amx work item, more tokens (multiple of 32)
  int64_t amx_pack_min_tiles = 5;  // copy A blocks into a panel from this many 16-token tiles on
  int64_t amx_k_block = 256;       // amx K blocking (multiple of 32)
  int64_t amx_items_per_thread = 8;  // amx items shrink until each thread gets about this many per phase
  int64_t spin_us = 4000;          // idle workers spin this long before sleeping
  int64_t copies_in_job = 0;       // routed jobs' gate copies: 1 enqueued by thread 0 once the job's
                                   // pack phase is over (the others compute), 0 before the job
};
Tuning& tuning();

// Per-thread scratch memory: grows, never shrinks; 64-byte aligned.
class ThreadScratch {
 public:
  ThreadScratch() = default;
  ThreadScratch(const ThreadScratch&) = delete;
  ThreadScratch& operator=(const ThreadScratch&) = delete;
  ~ThreadScratch();
  float* floats(size_t count);

 private:
  float* data_ = nullptr;
  size_t capacity_ = 0;
};

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Calls body(t0, tb) for tokens [t0, t0 + tb) of `num_tokens`, in blocks of at most kBlock (a
// path's register tile of tokens).
template <int kBlock, class Body>
inline void for_token_blocks(int64_t num_tokens, Body&& body) {
  for (int64_t t0 = 0; t0 < num_tokens; t0 += kBlock)
    body(t0, static_cast<int>(num_tokens - t0 < kBlock ? num_tokens - t0 : kBlock));
}

// bf16 <-> fp32 (round to nearest even, NaN kept quiet).
inline float bf16_to_f32(bf16_t v) {
  union { uint32_t u; float f; } c;
  c.u = static_cast<uint32_t>(v) << 16;
  return c.f;
}
inline bf16_t f32_to_bf16(float f) {
  union { uint32_t u; float f; } c;
  c.f = f;
  if ((c.u & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16_t>((c.u >> 16) | 0x40u);
  c.u += 0x7fffu + ((c.u >> 16) & 1u);
  return static_cast<bf16_t>(c.u >> 16);
}

// Kernels. pack: rows [begin, end) of the packed activations; phase1: intermediate rows [begin, end)
// (gate rows and their up rows); phase2: output columns (down rows) [begin, end).
bool avx2_compiled();
void avx2_pack(const Job& job, int64_t begin, int64_t end);
void avx2_phase1(const Job& job, int64_t begin, int64_t end, ThreadScratch& scratch);
void avx2_phase2(const Job& job, int64_t begin, int64_t end, ThreadScratch& scratch);

bool avx512_compiled();
void avx512_phase1(const Job& job, int64_t begin, int64_t end, ThreadScratch& scratch);
void avx512_phase2(const Job& job, int64_t begin, int64_t end, ThreadScratch& scratch);
// Compact jobs: weights decoded in registers as they stream (no scratch copy of the rows).
void avx512_phase1_compact(const Job& job, int64_t begin, int64_t end, ThreadScratch& scratch);
void avx512_phase2_compact(const Job& job, int64_t begin, int64_t end, ThreadScratch& scratch);

bool amx_compiled();
bool amx_request_permission();  // asks Linux for the AMX tile state; false if refused
void amx_pack(const Job& job, int64_t begin, int64_t end);
void amx_phase1(const Job& job, int64_t begin, int64_t end, ThreadScratch& scratch);
void amx_phase2(const Job& job, int64_t begin, int64_t end, ThreadScratch& scratch);
void amx_configure_thread();  // load the tile configuration on the calling thread
void amx_release_thread();
float amx_probe(int64_t iters, int mode);  // diagnostic: see kernels_amx.cpp

// Floats of per-thread scratch that a work item of `rows` rows of this job needs.
int64_t scratch_floats(const Job& job, int64_t rows1, int64_t rows2);

}  // namespace scheinfer
