// C entry points (loaded with ctypes): plan the work items of one call and run them on the pool.
//
// One call = all CC jobs of one layer. Three phases, each a dynamic loop over work items of all
// jobs at once (threads take the next item from a shared counter), separated by barriers:
//   0. pack activations where the path needs another layout (avx2, amx);
//   1. gate and up rows of every job -> intermediate h = bf16(silu(gate @ x) * (up @ x));
//   2. down rows of every job -> out.
// Weights are read in place, once each (row-major as stored); h stays in cache between phases.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "driver.h"
#include "gate_copies.h"
#include "slice_ffn.h"
#include "thread_pool.h"

namespace scheinfer {

int64_t scratch_floats(const Job& j, int64_t rows1, int64_t rows2) {
  if (j.path == kPathAmx) {
    const int64_t kb = tuning().amx_k_block;
    return std::max(rows1 * 2 * j.t_pad, rows2 * j.t_pad) + 16 * kb;  // accumulators + A panel
  }
  return 2 * rows1 * 8;
}

Tuning& tuning() {
  static Tuning t;
  return t;
}

ThreadScratch::~ThreadScratch() { std::free(data_); }

float* ThreadScratch::floats(size_t count) {
  if (count > capacity_) {
    std::free(data_);
    size_t bytes = ((count * sizeof(float) + 63) / 64) * 64;
    data_ = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (data_ == nullptr) throw std::runtime_error("out of memory for kernel scratch");
    capacity_ = count;
  }
  return data_;
}

namespace {

constexpr int kDescFields = sizeof(JobDesc) / sizeof(int64_t);

struct Item {
  int32_t job;
  int64_t begin, end;
};

std::mutex g_call_mutex;  // one call at a time: the pool and the scratch are shared
ThreadPool* g_pool = nullptr;  // leaked on exit on purpose (no join during interpreter teardown)
std::vector<std::unique_ptr<ThreadScratch>> g_thread_scratch;
std::vector<std::unique_ptr<ThreadScratch>> g_weight_scratch;  // compact jobs: an item's decoded rows
char* g_scratch = nullptr;
size_t g_scratch_bytes = 0;
std::string g_error;
int g_available = -1;
// Wall time of each phase (pack, gate/up, down) summed over calls, as the calling thread sees it
// between barriers; read and reset by scheinfer_phase_ns (benchmarks).
int64_t g_phase_ns[3] = {0, 0, 0};
int64_t g_phase_calls = 0;

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return std::max(lo, std::min(hi, v)); }

// The knobs settable from Python by name, each with the rule that makes a value valid.
struct TuningKnob {
  const char* name;
  int64_t Tuning::*field;
  int64_t (*fix)(int64_t);
};

int64_t at_least_one(int64_t v) { return std::max<int64_t>(1, v); }
int64_t non_negative(int64_t v) { return std::max<int64_t>(0, v); }
int64_t as_is(int64_t v) { return v; }
int64_t amx_row_count(int64_t v) { return clamp64(round_up(v, 32), 32, 1024); }
int64_t k_block(int64_t v) { return std::max<int64_t>(32, round_up(v, 32)); }
int64_t flag(int64_t v) { return v != 0 ? 1 : 0; }

const TuningKnob kKnobs[] = {
    {"item_bytes", &Tuning::item_bytes, at_least_one},
    {"prefetch_bytes", &Tuning::prefetch_bytes, non_negative},
    {"decode_rows", &Tuning::decode_rows, as_is},
    {"amx_min_tokens", &Tuning::amx_min_tokens, at_least_one},
    {"amx_rows", &Tuning::amx_rows, amx_row_count},
    {"amx_prefill_rows", &Tuning::amx_prefill_rows, amx_row_count},
    {"amx_pack_min_tiles", &Tuning::amx_pack_min_tiles, at_least_one},
    {"amx_k_block", &Tuning::amx_k_block, k_block},
    {"amx_prefetch", &Tuning::amx_prefetch, flag},
    {"amx_items_per_thread", &Tuning::amx_items_per_thread, at_least_one},
    {"spin_us", &Tuning::spin_us, non_negative},
    {"copies_in_job", &Tuning::copies_in_job, flag},
};

const TuningKnob* find_knob(const char* key) {
  for (const TuningKnob& knob : kKnobs)
    if (std::strcmp(knob.name, key) == 0) return &knob;
  return nullptr;
}

void ensure_pool(int num_threads) {
  if (g_pool != nullptr && g_pool->size() == num_threads) return;
  delete g_pool;
  g_pool = new ThreadPool(num_threads);
  g_thread_scratch.clear();
  g_weight_scratch.clear();
  for (int i = 0; i < num_threads; ++i) {
    g_thread_scratch.emplace_back(new ThreadScratch());
    g_weight_scratch.emplace_back(new ThreadScratch());
  }
}

char* scratch(size_t bytes) {
  if (bytes > g_scratch_bytes) {
    std::free(g_scratch);
    g_scratch_bytes = round_up(static_cast<int64_t>(bytes), 1 << 21);
    g_scratch = static_cast<char*>(std::aligned_alloc(4096, g_scratch_bytes));
    if (g_scratch == nullptr) {
      g_scratch_bytes = 0;
      throw std::runtime_error("out of memory for kernel intermediates");
    }
  }
  return g_scratch;
}

int available_paths() {
  if (g_available < 0) {
    g_available = 0;
    if (avx2_compiled()) g_available |= 1 << kPathAvx2;
    if (avx512_compiled()) g_available |= 1 << kPathAvx512;
    if (amx_compiled() && amx_request_permission()) g_available |= 1 << kPathAmx;
  }
  return g_available;
}

int choose_path(const JobDesc& d, int max_path, int available) {
  bool amx_shape = d.hidden % 32 == 0 && d.n % 32 == 0 && d.num_tokens >= tuning().amx_min_tokens;
  if (max_path >= kPathAmx && (available >> kPathAmx & 1) && amx_shape) return kPathAmx;
  if (max_path >= kPathAvx512 && (available >> kPathAvx512 & 1)) return kPathAvx512;
  if (max_path >= kPathAvx2 && (available >> kPathAvx2 & 1)) return kPathAvx2;
  return kPathNone;
}

// Lays out every job's scratch in one buffer; returns its size in bytes (offsets kept in the jobs
// as integers until the buffer exists).
size_t plan_scratch(std::vector<Job>& jobs) {
  size_t offset = 0;
  auto take = [&](size_t bytes) {
    size_t at = offset;
    offset += round_up(static_cast<int64_t>(bytes), 64);
    return at;
  };
  for (Job& j : jobs) {
    size_t x_at = 0, h_at = 0;
    if (j.path == kPathAvx2) {
      j.x_stride = round_up(j.H, 16);
      j.h_stride = round_up(j.N, 16);
      x_at = take(j.T * j.x_stride * sizeof(float));
      h_at = take(j.T * j.h_stride * sizeof(float));
    } else if (j.path == kPathAvx512) {
      j.h_stride = round_up(j.N, 32);
      h_at = take(j.T * j.h_stride * sizeof(bf16_t));
    } else {  // amx
      j.t_pad = round_up(j.T, 16);
      x_at = take(j.H / 2 * j.t_pad * sizeof(uint32_t));
      h_at = take(j.N / 2 * j.t_pad * sizeof(uint32_t));
    }
    j.xpack = reinterpret_cast<void*>(x_at);
    j.h = reinterpret_cast<void*>(h_at);
  }
  return offset;
}

// Returns the per-thread scratch (floats) that the largest item needs; weight_need: the floats
// that the largest item of a compact job needs for its decoded weight rows.
int64_t plan_items(const std::vector<Job>& jobs, int num_threads, std::vector<Item>& pack, std::vector<Item>& p1,
                   std::vector<Item>& p2, int64_t& weight_need) {
  int64_t scratch_need = 0;
  weight_need = 0;
  // AMX items are heavy: shrink them until every thread gets about amx_items_per_thread per phase.
  const int64_t target_items = tuning().amx_items_per_thread * static_cast<int64_t>(num_threads);
  const int64_t num_jobs = static_cast<int64_t>(jobs.size());
  const Tuning& t = tuning();
  for (int32_t i = 0; i < static_cast<int32_t>(jobs.size()); ++i) {
    const Job& j = jobs[i];
    int64_t pack_rows, rows1, rows2, pack_total;
    if (j.path == kPathAmx) {
      pack_total = j.H / 2;
      pack_rows = std::max<int64_t>(1, 16384 / j.t_pad);
      const int64_t rows = j.t_pad > 64 ? t.amx_prefill_rows : t.amx_rows;  // weight rows per item
      rows1 = clamp64(std::min(rows / 2, j.N * num_jobs / target_items) / 16 * 16, 16, j.N);  // multiple of 16
      rows2 = clamp64(std::min(rows, j.H * num_jobs / target_items) / 32 * 32, 32, j.H);    // multiple of 32
    } else {
      pack_total = j.path == kPathAvx2 ? j.T : 0;
      pack_rows = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, j.H));
      rows1 = clamp64(t.item_bytes / (4 * std::max<int64_t>(1, j.H)), 1, std::max<int64_t>(1, j.N));
      rows2 = clamp64(t.item_bytes / (2 * std::max<int64_t>(1, j.N)), 1, std::max<int64_t>(1, j.H));
      rows1 = rows1 >= 8 ? rows1 / 8 * 8 : rows1;
      rows2 = rows2 >= 8 ? rows2 / 8 * 8 : rows2;
    }
    scratch_need = std::max(scratch_need, scratch_floats(j, rows1, rows2));
    if (j.compact) weight_need = std::max(weight_need, std::max(2 * rows1 * j.H, rows2 * j.N) / 2 + 16);
    for (int64_t b = 0; b < pack_total; b += pack_rows) pack.push_back({i, b, std::min(pack_total, b + pack_rows)});
    for (int64_t b = 0; b < j.N; b += rows1) p1.push_back({i, b, std::min(j.N, b + rows1)});
    for (int64_t b = 0; b < j.H; b += rows2) p2.push_back({i, b, std::min(j.H, b + rows2)});
  }
  return scratch_need;
}

// A compact job as one work item's kernels read it: its rows decoded into `ws`. Phase 1: gate and
// up rows [begin, end); phase 2: down rows [begin, end).
Job decoded_item(const Job& j, int phase, const Item& it, ThreadScratch& ws) {
  Job d = j;
  const int64_t rows = it.end - it.begin;
  if (phase == 1) {
    bf16_t* buf = reinterpret_cast<bf16_t*>(ws.floats(rows * j.H + 16));
    unpack_rows(j.compact_gu, j.H, it.begin, it.end, buf);
    unpack_rows(j.compact_gu, j.H, j.N + it.begin, j.N + it.end, buf + rows * j.H);
    d.gu = buf;
    d.up = buf + rows * j.H;
    d.gu_stride = j.H;
    d.gu_row0 = it.begin;
  } else {
    bf16_t* buf = reinterpret_cast<bf16_t*>(ws.floats(rows * j.N / 2 + 16));
    unpack_rows(j.compact_down, j.N, it.begin, it.end, buf);
    d.down = buf;
    d.down_stride = j.N;
    d.down_row0 = it.begin;
  }
  return d;
}

// Each thread takes items from `next` until none is left.
template <typename F>
void drain(const std::vector<Item>& items, std::atomic<int64_t>& next, F&& body) {
  const int64_t count = static_cast<int64_t>(items.size());
  for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < count;
       i = next.fetch_add(1, std::memory_order_relaxed)) {
    body(items[i]);
  }
}

// first (may be empty): run by thread 0 once the pack phase is over, while the others start phase 1
// (it must not throw).
void run_jobs(std::vector<Job>& jobs, int num_threads, const std::function<void()>& first = {}) {
  ensure_pool(num_threads);
  char* base = scratch(plan_scratch(jobs));
  for (Job& j : jobs) {
    j.xpack = base + reinterpret_cast<size_t>(j.xpack);
    j.h = base + reinterpret_cast<size_t>(j.h);
  }
  std::vector<Item> pack, p1, p2;
  int64_t weight_need = 0;
  int64_t scratch_need = plan_items(jobs, g_pool->size(), pack, p1, p2, weight_need);
  for (auto& ts : g_thread_scratch) ts->floats(scratch_need);  // allocate here: no throw in threads
  if (weight_need > 0)
    for (auto& ws : g_weight_scratch) ws->floats(weight_need);
  bool any_amx = std::any_of(jobs.begin(), jobs.end(), [](const Job& j) { return j.path == kPathAmx; });
  std::atomic<int64_t> next_pack{0}, next1{0}, next2{0};
  std::atomic<int> failures{0};

  int64_t marks[3] = {now_ns(), 0, 0};  // start, pack done, phase 1 done (written by tid 0)
  g_pool->run([&](int tid) {
    ThreadScratch& ts = *g_thread_scratch[tid];
    ThreadScratch& ws = *g_weight_scratch[tid];
    try {
      if (any_amx) amx_configure_thread();
      if (!pack.empty()) {
        drain(pack, next_pack, [&](const Item& it) {
          const Job& j = jobs[it.job];
          if (j.path == kPathAmx) amx_pack(j, it.begin, it.end);
          else avx2_pack(j, it.begin, it.end);
        });
        g_pool->barrier();
      }
      if (tid == 0) marks[1] = now_ns();
      if (tid == 0 && first) first();
      drain(p1, next1, [&](const Item& it) {
        if (jobs[it.job].compact && jobs[it.job].path == kPathAvx512)
          return avx512_phase1_compact(jobs[it.job], it.begin, it.end, ts);
        const Job& j = jobs[it.job].compact ? decoded_item(jobs[it.job], 1, it, ws) : jobs[it.job];
        if (j.path == kPathAmx) amx_phase1(j, it.begin, it.end, ts);
        else if (j.path == kPathAvx512) avx512_phase1(j, it.begin, it.end, ts);
        else avx2_phase1(j, it.begin, it.end, ts);
      });
      g_pool->barrier();
      if (tid == 0) marks[2] = now_ns();
      drain(p2, next2, [&](const Item& it) {
        if (jobs[it.job].compact && jobs[it.job].path == kPathAvx512)
          return avx512_phase2_compact(jobs[it.job], it.begin, it.end, ts);
        const Job& j = jobs[it.job].compact ? decoded_item(jobs[it.job], 2, it, ws) : jobs[it.job];
        if (j.path == kPathAmx) amx_phase2(j, it.begin, it.end, ts);
        else if (j.path == kPathAvx512) avx512_phase2(j, it.begin, it.end, ts);
        else avx2_phase2(j, it.begin, it.end, ts);
      });
      if (any_amx) amx_release_thread();
    } catch (...) {
      failures.fetch_add(1);  // nothing should throw here: scratch is allocated before the run
    }
  });
  const int64_t end = now_ns();
  g_phase_ns[0] += marks[1] - marks[0];
  g_phase_ns[1] += marks[2] - marks[1];
  g_phase_ns[2] += end - marks[2];
  ++g_phase_calls;
  if (failures.load() != 0) throw std::runtime_error("out of memory in a kernel thread");
}

CompactMatrix compact_matrix(int64_t low, int64_t stride, int64_t codes, int64_t base, int64_t row_ptr, int64_t cols,
                           int64_t vals) {
  CompactMatrix m;
  m.low = reinterpret_cast<const uint8_t*>(low);
  m.low_stride = stride;
  m.codes = reinterpret_cast<const uint8_t*>(codes);
  m.base = base;
  m.exc_row_ptr = reinterpret_cast<const int32_t*>(row_ptr);
  m.exc_cols = reinterpret_cast<const int32_t*>(cols);
  m.exc_vals = reinterpret_cast<const bf16_t*>(vals);
  return m;
}

// descs: num_jobs x kDescFields int64 (JobDesc) -> the jobs to run (empty ones done here: their output is zero).
std::vector<Job> parse_jobs(const int64_t* descs, int num_jobs, int max_path) {
  int available = available_paths();
  std::vector<Job> jobs;
  for (int i = 0; i < num_jobs; ++i) {
    JobDesc d;
    std::memcpy(&d, descs + kDescFields * i, sizeof(JobDesc));
    if (d.num_tokens == 0 || d.hidden == 0) continue;
    float* out = reinterpret_cast<float*>(d.out);
    if (d.n == 0) {  // empty slice: the partial output is zero
      for (int64_t t = 0; t < d.num_tokens; ++t) std::memset(out + t * d.out_stride, 0, d.hidden * sizeof(float));
      continue;
    }
    Job j{};
    j.x = reinterpret_cast<const bf16_t*>(d.x);
    j.T = d.num_tokens;
    j.H = d.hidden;
    j.gu = reinterpret_cast<const bf16_t*>(d.gate_up);
    j.gu_stride = d.gate_up_stride;
    j.N = d.n;
    j.down = reinterpret_cast<const bf16_t*>(d.down);
    j.down_stride = d.down_stride;
    j.up = j.gu + d.n * d.gate_up_stride;
    j.gu_row0 = j.down_row0 = 0;
    j.compact = d.gu_codes != 0;
    if (j.compact) {
      if (d.hidden % 32 != 0 || d.n % 32 != 0) throw std::runtime_error("compact weights need K % 32 == 0");
      j.compact_gu = compact_matrix(d.gate_up, d.gate_up_stride, d.gu_codes, d.gu_base, d.gu_exc_row_ptr,
                                  d.gu_exc_cols, d.gu_exc_vals);
      j.compact_down = compact_matrix(d.down, d.down_stride, d.down_codes, d.down_base, d.down_exc_row_ptr,
                                    d.down_exc_cols, d.down_exc_vals);
      j.gu = j.up = j.down = nullptr;  // set per work item (decoded_item)
    }
    j.out = out;
    j.out_stride = d.out_stride;
    j.path = choose_path(d, max_path, available);
    if (j.path == kPathNone) throw std::runtime_error("no kernel path is available on this CPU");
    jobs.push_back(j);
  }
  return jobs;
}

}  // namespace
}  // namespace scheinfer

using namespace scheinfer;

extern "C" {

// Bitmask of usable paths: bit 1 avx2, bit 2 avx512_bf16, bit 3 amx.
int scheinfer_available_paths() { return available_paths(); }

const char* scheinfer_last_error() { return g_error.c_str(); }

int scheinfer_set_tuning(const char* key, int64_t value) {
  const TuningKnob* knob = find_knob(key);
  if (knob == nullptr) return 1;
  tuning().*(knob->field) = knob->fix(value);
  return 0;
}

int64_t scheinfer_get_tuning(const char* key) {
  const TuningKnob* knob = find_knob(key);
  return knob == nullptr ? -1 : tuning().*(knob->field);
}

// max_path caps the path (3 amx, 2 avx512, 1 avx2). Returns 0, or 1 with scheinfer_last_error()
// set. Shapes are validated by the caller.
int scheinfer_run(const int64_t* descs, int num_jobs, int max_path, int num_threads) {
  std::lock_guard<std::mutex> lock(g_call_mutex);
  try {
    std::vector<Job> jobs = parse_jobs(descs, num_jobs, max_path);
    if (!jobs.empty()) run_jobs(jobs, num_threads < 1 ? 1 : num_threads);
    return 0;
  } catch (const std::exception& e) {
    g_error = e.what();
    return 1;
  }
}

}  // extern "C"

namespace {

void store_signal(int64_t* signal, int64_t value) {
  if (signal != nullptr) __atomic_store_n(signal, value, __ATOMIC_RELEASE);
}

// Runs `work` on the driver thread; `value` is stored at `signal` (may be null) however the call
// ends, and right away when the submission fails (nobody may wait forever). Returns the ticket, or
// -1 with scheinfer_last_error() set.
int64_t submit_signalled(int64_t* signal, int64_t value, std::function<void()> work) {
  try {
    return driver_submit([signal, value, work = std::move(work)]() {
      struct StoreOnExit {
        int64_t* where;
        int64_t value;
        ~StoreOnExit() { store_signal(where, value); }
      } done{signal, value};
      try {
        work();
        return 0;
      } catch (const std::exception& e) {
        set_driver_error(e.what());
        return 1;
      }
    });
  } catch (const std::exception& e) {
    g_error = e.what();
    store_signal(signal, value);
    return -1;
  }
}

int64_t failed_submission(const std::exception& e, int64_t* signal, int64_t value) {
  g_error = e.what();
  store_signal(signal, value);
  return -1;
}

}  // namespace

extern "C" {

// As scheinfer_run, without waiting: the call runs on the driver thread (driver.h). Returns a
// ticket for scheinfer_wait, or -1 with scheinfer_last_error() set (descs are read before return).
// signal (may be null): once the call is over (done or failed), `value` is stored there (release
// order, after the outputs): a GPU stream waiting for that value in pinned memory starts on the
// CPU's outputs without a round trip through the submitting thread.
int64_t scheinfer_submit(const int64_t* descs, int num_jobs, int max_path, int num_threads, int64_t* signal,
                         int64_t value) {
  std::vector<Job> jobs;
  try {
    std::lock_guard<std::mutex> lock(g_call_mutex);  // available_paths() may initialise
    jobs = parse_jobs(descs, num_jobs, max_path);
  } catch (const std::exception& e) {
    return failed_submission(e, signal, value);
  }
  const int threads = num_threads < 1 ? 1 : num_threads;
  return submit_signalled(signal, value, [jobs = std::move(jobs), threads]() mutable {
    std::lock_guard<std::mutex> lock(g_call_mutex);
    if (!jobs.empty()) run_jobs(jobs, threads);
  });
}

// As scheinfer_submit, for a job chosen on the driver thread by a routing the GPU writes into
// pinned memory: the call waits until *gate >= gate_value (a GPU stream stores it once the routing
// ids and the activations have landed), then, unless *cancel >= gate_value (the submitter gave the
// job up), runs for each position p < num_ids the descs of choice p * choice_stride + ids[p]
// (choice c: descs [choice_offsets[c], choice_offsets[c + 1])), their outputs placed one token row
// block after another from out_base (out_row_bytes a row). The job starts as soon as the routing
// is there, with no round trip through the submitting thread. Fails after wait_ms without a gate.
// copies (may be null): a plan of the streamed pieces' copies the same routing picks, enqueued
// first once the gate opens (gate_copies.h).
int64_t scheinfer_submit_routed(const int64_t* descs, const int64_t* choice_offsets, int num_choices,
                                const int64_t* ids, int num_ids, int64_t choice_stride, const int64_t* gate,
                                const int64_t* cancel, int64_t gate_value, int64_t out_base, int64_t out_row_bytes,
                                int64_t wait_ms, int max_path, int num_threads, int64_t* signal, int64_t value,
                                const int64_t* copies) {
  std::vector<int64_t> table, offsets, copy_plan;
  try {
    table.assign(descs, descs + kDescFields * choice_offsets[num_choices]);
    offsets.assign(choice_offsets, choice_offsets + num_choices + 1);
    if (copies != nullptr) copy_plan.assign(copies, copies + gate_copies::plan_length(copies));
  } catch (const std::exception& e) {
    return failed_submission(e, signal, value);
  }
  const int threads = num_threads < 1 ? 1 : num_threads;
  return submit_signalled(signal, value, [=, table = std::move(table), offsets = std::move(offsets),
                                          copy_plan = std::move(copy_plan)]() {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(wait_ms);
    uint32_t spins = 0;
    while (__atomic_load_n(gate, __ATOMIC_ACQUIRE) < gate_value) {
      if (__atomic_load_n(cancel, __ATOMIC_ACQUIRE) >= gate_value) return;
      if ((spins & 1023u) == 0 && std::chrono::steady_clock::now() > deadline)
        throw std::runtime_error("routed CPU job: the routing never came");
      spin_pause(spins);
    }
    if (__atomic_load_n(cancel, __ATOMIC_ACQUIRE) >= gate_value) return;
    driver_restart_clock();  // the job's time starts now, not at the wait
    const bool copies_in_job = !copy_plan.empty() && tuning().copies_in_job != 0;
    if (!copy_plan.empty() && !copies_in_job) gate_copies::issue(copy_plan, ids, num_ids, choice_stride, gate_value);
    std::vector<int64_t> chosen;
    int64_t row = 0;
    for (int p = 0; p < num_ids; ++p) {
      const int64_t c = p * choice_stride + ids[p];
      if (c < 0 || c >= num_choices) throw std::runtime_error("routed CPU job: routing id out of range");
      for (int64_t d = offsets[c]; d < offsets[c + 1]; ++d) {
        JobDesc desc;
        std::memcpy(&desc, table.data() + kDescFields * d, sizeof(JobDesc));
        desc.out = out_base + row * out_row_bytes;
        desc.out_stride = out_row_bytes / static_cast<int64_t>(sizeof(float));
        const size_t at = chosen.size();
        chosen.resize(at + kDescFields);
        std::memcpy(chosen.data() + at, &desc, sizeof(JobDesc));
        row += desc.num_tokens;
      }
    }
    std::lock_guard<std::mutex> lock(g_call_mutex);
    std::vector<Job> jobs = parse_jobs(chosen.data(), static_cast<int>(chosen.size() / kDescFields), max_path);
    std::string copy_error;
    std::function<void()> copies;
    if (copies_in_job) {
      copies = [&]() {
        try {
          gate_copies::issue(copy_plan, ids, num_ids, choice_stride, gate_value);
        } catch (const std::exception& e) {
          copy_error = e.what();
        }
      };
      if (jobs.empty()) copies();
    }
    if (!jobs.empty()) run_jobs(jobs, threads, copies);
    if (!copy_error.empty()) throw std::runtime_error(copy_error);
  });
}

// Waits for a submitted call: 0, or 1 with scheinfer_last_error() set. times_ns (3 int64, may be
// null): the call's start and end and its submission, steady clock (Python's perf_counter clock).
int scheinfer_wait(int64_t ticket, int64_t* times_ns) {
  int status = driver_wait(ticket, times_ns);
  if (status != 0) {
    std::lock_guard<std::mutex> lock(g_call_mutex);
    g_error = driver_last_error();
  }
  return status;
}

// The path each job of a call would take (for tests and kernel_info), without running it.
int scheinfer_job_path(const int64_t* desc, int max_path) {
  JobDesc d;
  std::memcpy(&d, desc, sizeof(JobDesc));
  return choose_path(d, max_path, available_paths());
}

// Benchmark helper: runs amx_probe(iters, mode) on num_threads pool threads at once; returns the
// wall seconds (-1 when AMX is not available).
double scheinfer_amx_probe(int64_t iters, int mode, int num_threads) {
  if (!(available_paths() >> kPathAmx & 1)) return -1.0;
  std::lock_guard<std::mutex> lock(g_call_mutex);
  ensure_pool(num_threads < 1 ? 1 : num_threads);
  std::atomic<float> sink{0.0f};
  const int64_t start = now_ns();
  g_pool->run([&](int) {
    amx_configure_thread();
    sink.store(amx_probe(iters, mode));
    amx_release_thread();
  });
  return (now_ns() - start) / 1e9;
}

// Benchmark helper: out[0..2] = nanoseconds spent in the pack, gate/up and down phases, out[3] =
// calls, summed since the last reset; reset != 0 zeroes them after reading.
void scheinfer_phase_ns(int64_t* out, int reset) {
  std::lock_guard<std::mutex> lock(g_call_mutex);
  for (int i = 0; i < 3; ++i) out[i] = g_phase_ns[i];
  out[3] = g_phase_calls;
  if (reset != 0) {
    g_phase_ns[0] = g_phase_ns[1] = g_phase_ns[2] = 0;
    g_phase_calls = 0;
  }
}

// Benchmark helper: reads [data, data + bytes) once with num_threads pool threads; returns a
// checksum so that the reads cannot be optimised away. Each thread reads 1 MiB chunks as 8
// interleaved sequential streams (as the kernels read 8 weight rows at once): one stream per core
// does not keep enough misses in flight to reach DRAM bandwidth.
int64_t scheinfer_stream_read(const void* data, int64_t bytes, int num_threads) {
  typedef uint64_t v8 __attribute__((vector_size(64)));
  constexpr int64_t kChunk = 1 << 20, kStreams = 8, kPart = kChunk / kStreams;
  std::lock_guard<std::mutex> lock(g_call_mutex);
  ensure_pool(num_threads < 1 ? 1 : num_threads);
  const char* base = static_cast<const char*>(data);
  const int64_t num_chunks = bytes / kChunk;
  std::atomic<int64_t> next{0};
  std::atomic<uint64_t> total{0};
  g_pool->run([&](int) {
    v8 acc[kStreams] = {};
    for (int64_t c = next.fetch_add(1); c < num_chunks; c = next.fetch_add(1)) {
      const char* chunk = base + c * kChunk;
      for (int64_t i = 0; i < kPart; i += 64) {
        for (int s = 0; s < kStreams; ++s) {
          v8 v;
          std::memcpy(&v, chunk + s * kPart + i, sizeof(v));
          acc[s] ^= v;
        }
      }
    }
    uint64_t sum = 0;
    for (int s = 0; s < kStreams; ++s)
      for (int e = 0; e < 8; ++e) sum ^= acc[s][e];
    total.fetch_xor(sum);
  });
  return static_cast<int64_t>(total.load());
}

}  // extern "C"
