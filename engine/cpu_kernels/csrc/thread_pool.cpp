#include "thread_pool.h"

#include <chrono>

#include "slice_ffn.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace scheinfer {

void spin_pause(uint32_t& spins) {
#if defined(__x86_64__)
  _mm_pause();
#endif
  if ((++spins & 1023u) == 0) std::this_thread::yield();
}

ThreadPool::ThreadPool(int num_threads) : num_threads_(num_threads < 1 ? 1 : num_threads) {
  for (int tid = 1; tid < num_threads_; ++tid) threads_.emplace_back([this, tid] { worker(tid); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_.store(true);
    generation_.fetch_add(1);
  }
  wake_.notify_all();
  for (auto& t : threads_) t.join();
}

void ThreadPool::worker(int tid) {
  uint64_t seen = 0;
  for (;;) {
    uint32_t spins = 0;
    auto start = std::chrono::steady_clock::now();
    while (generation_.load(std::memory_order_acquire) == seen) {
      spin_pause(spins);
      if ((spins & 255u) == 0) {
        auto spun = std::chrono::steady_clock::now() - start;
        if (spun > std::chrono::microseconds(tuning().spin_us)) {
          std::unique_lock<std::mutex> lock(mutex_);
          wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        }
      }
    }
    seen = generation_.load(std::memory_order_acquire);
    if (stop_.load()) return;
    (*fn_)(tid);
    pending_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

void ThreadPool::run(const std::function<void(int)>& fn) {
  fn_ = &fn;
  pending_.store(num_threads_ - 1, std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    generation_.fetch_add(1, std::memory_order_acq_rel);
  }
  wake_.notify_all();
  fn(0);
  uint32_t spins = 0;
  while (pending_.load(std::memory_order_acquire) != 0) spin_pause(spins);
  fn_ = nullptr;
}

void ThreadPool::barrier() {
  if (num_threads_ == 1) return;
  uint64_t generation = barrier_generation_.load(std::memory_order_acquire);
  if (barrier_count_.fetch_add(1, std::memory_order_acq_rel) == num_threads_ - 1) {
    barrier_count_.store(0, std::memory_order_relaxed);
    barrier_generation_.fetch_add(1, std::memory_order_release);
    return;
  }
  uint32_t spins = 0;
  while (barrier_generation_.load(std::memory_order_acquire) == generation) spin_pause(spins);
}

}  // namespace scheinfer
