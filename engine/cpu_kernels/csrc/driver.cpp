#include "driver.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <thread>

#include "slice_ffn.h"
#include "thread_pool.h"

namespace scheinfer {
namespace {

int64_t steady_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

struct Outcome {
  int status = 0;
  int64_t start_ns = 0, end_ns = 0, submit_ns = 0;
  std::string error;
};

class Driver {
 public:
  Driver() : thread_([this] { loop(); }) { thread_.detach(); }  // lives until the process exits

  int64_t submit(std::function<int()> call) {
    int64_t ticket;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ticket = ++last_ticket_;
      queue_.push_back({ticket, std::move(call), steady_ns()});
      queued_.store(ticket, std::memory_order_release);
    }
    wake_.notify_one();
    return ticket;
  }

  int wait(int64_t ticket, int64_t* times_ns) {
    // The waiter has nothing else to do: spin (its core is not one of the pool's), sleep after a while.
    uint32_t spins = 0;
    const int64_t until = steady_ns() + 20'000'000;
    while (done_.load(std::memory_order_acquire) < ticket && steady_ns() < until) spin_pause(spins);
    std::unique_lock<std::mutex> lock(mutex_);
    finished_.wait(lock, [&] { return done_.load(std::memory_order_acquire) >= ticket; });
    auto it = outcomes_.find(ticket);
    if (it == outcomes_.end()) return 1;
    Outcome outcome = it->second;
    outcomes_.erase(it);
    if (times_ns != nullptr) {
      times_ns[0] = outcome.start_ns;
      times_ns[1] = outcome.end_ns;
      times_ns[2] = outcome.submit_ns;
    }
    last_error_ = outcome.error;
    return outcome.status;
  }

  void set_error(const char* text) { running_error_ = text; }
  void restart_clock() { running_start_ns_ = steady_ns(); }
  const char* last_error() const { return last_error_.c_str(); }

 private:
  struct Entry {
    int64_t ticket;
    std::function<int()> call;
    int64_t submit_ns;
  };

  void loop() {
    int64_t taken = 0;
    for (;;) {
      uint32_t spins = 0;
      const int64_t spin_until = steady_ns() + tuning().spin_us * 1000;
      while (queued_.load(std::memory_order_acquire) == taken && steady_ns() < spin_until) spin_pause(spins);
      Entry entry;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return !queue_.empty(); });
        entry = std::move(queue_.front());
        queue_.pop_front();
      }
      taken = entry.ticket;
      Outcome outcome;
      outcome.submit_ns = entry.submit_ns;
      running_error_.clear();
      running_start_ns_ = steady_ns();
      try {
        outcome.status = entry.call();
      } catch (const std::exception& e) {
        outcome.status = 1;
        running_error_ = e.what();
      }
      outcome.start_ns = running_start_ns_;
      outcome.end_ns = steady_ns();
      outcome.error = running_error_;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        outcomes_[entry.ticket] = std::move(outcome);
        done_.store(entry.ticket, std::memory_order_release);
      }
      finished_.notify_all();
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_, finished_;
  std::deque<Entry> queue_;
  std::map<int64_t, Outcome> outcomes_;
  int64_t last_ticket_ = 0;
  alignas(64) std::atomic<int64_t> queued_{0};
  alignas(64) std::atomic<int64_t> done_{0};
  std::string running_error_, last_error_;
  int64_t running_start_ns_ = 0;  // the running call's start (driver thread only)
  std::thread thread_;
};

Driver& driver() {
  static Driver* d = new Driver();  // leaked on exit on purpose, like the pool
  return *d;
}

}  // namespace

int64_t driver_submit(std::function<int()> call) { return driver().submit(std::move(call)); }
int driver_wait(int64_t ticket, int64_t* times_ns) { return driver().wait(ticket, times_ns); }
void set_driver_error(const char* text) { driver().set_error(text); }
void driver_restart_clock() { driver().restart_clock(); }
const char* driver_last_error() { return driver().last_error(); }

}  // namespace scheinfer
