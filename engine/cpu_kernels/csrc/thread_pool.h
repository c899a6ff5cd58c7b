// A small fixed-size thread pool for one parallel job at a time.
//
// run(fn) calls fn(tid) on every thread (the caller is tid 0) and returns when all are done.
// Idle workers spin for tuning().spin_us before sleeping, so that back-to-back calls (one per layer)
// do not pay a futex wake-up each. barrier() synchronises all threads inside fn.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace scheinfer {

class ThreadPool {
 public:
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return num_threads_; }
  void run(const std::function<void(int)>& fn);
  void barrier();

 private:
  void worker(int tid);

  int num_threads_;
  std::vector<std::thread> threads_;
  const std::function<void(int)>* fn_ = nullptr;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
  std::mutex mutex_;
  std::condition_variable wake_;
  alignas(64) std::atomic<int> barrier_count_{0};
  alignas(64) std::atomic<uint64_t> barrier_generation_{0};
};

// Spin-wait step: pause, and yield now and then so that an oversubscribed machine still progresses.
void spin_pause(uint32_t& spins);

}  // namespace scheinfer
