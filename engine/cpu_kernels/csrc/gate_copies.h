// Copies of a routed decode layer's streamed pieces, enqueued by the kernels' driver thread the
// moment the GPU's gate opens (engine/executor/gate_copies.py): the routing picks them, as it picks
// the routed CPU job's records, with no round trip through the thread that drives the GPU.
//
// The plan (int64, built by Python): CUDA driver entry points cuMemcpyHtoDAsync_v2,
// cuStreamWaitEvent, cuEventRecord, cuCtxSetCurrent; the context; the copy stream; two events to
// record before the first copy (0: none); `done` (int64* in pinned memory: the gate value once the
// copies are enqueued, minus it when they failed); then S slots from `first`, at most `max` copies,
// C choices; each slot (compact-region address, bf16 address, free event, ready event); the
// choices' entry offsets [C + 1]; the entries (source, bytes, 0: a compact region, 1: bf16, 2: staged
// already, no copy: expert look-ahead copied it before the gate).
// Copy k takes slot (first + k) % S: it waits for the slot's free event, copies, records ready.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace gate_copies {

enum Head : int64_t {
  kMemcpy, kWaitEvent, kRecord, kSetContext, kContext, kStream, kStartA, kStartB, kDone,
  kNumSlots, kFirst, kMax, kNumChoices, kHeadFields
};
constexpr int64_t kSlotFields = 4;
constexpr int64_t kEntryFields = 3;
constexpr int64_t kStagedAhead = 2;  // an entry's kind: no copy, no slot

// Number of int64 in a plan (read from its head).
inline int64_t plan_length(const int64_t* plan) {
  const int64_t slots = plan[kNumSlots], choices = plan[kNumChoices];
  const int64_t* offsets = plan + kHeadFields + kSlotFields * slots;
  return kHeadFields + kSlotFields * slots + choices + 1 + kEntryFields * offsets[choices];
}

inline void check(int status, const char* what) {
  if (status != 0) throw std::runtime_error(std::string("gate copies: ") + what + " failed (CUDA error " +
                                            std::to_string(status) + ")");
}

// Enqueues the copies of the positions' chosen entries (choice p * choice_stride + ids[p]).
inline void issue(const std::vector<int64_t>& plan, const int64_t* ids, int num_ids, int64_t choice_stride,
                  int64_t gate_value) {
  using Memcpy = int (*)(uint64_t, const void*, size_t, void*);
  using WaitEvent = int (*)(void*, void*, unsigned);
  using Record = int (*)(void*, void*);
  using SetContext = int (*)(void*);
  const int64_t* p = plan.data();
  auto* done = reinterpret_cast<int64_t*>(p[kDone]);
  try {
    const auto memcpy_async = reinterpret_cast<Memcpy>(p[kMemcpy]);
    const auto wait_event = reinterpret_cast<WaitEvent>(p[kWaitEvent]);
    const auto record = reinterpret_cast<Record>(p[kRecord]);
    void* stream = reinterpret_cast<void*>(p[kStream]);
    check(reinterpret_cast<SetContext>(p[kSetContext])(reinterpret_cast<void*>(p[kContext])), "cuCtxSetCurrent");
    for (const Head start : {kStartA, kStartB})
      if (p[start] != 0) check(record(reinterpret_cast<void*>(p[start]), stream), "cuEventRecord");
    const int64_t slots = p[kNumSlots], choices = p[kNumChoices];
    const int64_t* slot = p + kHeadFields;
    const int64_t* offsets = slot + kSlotFields * slots;
    const int64_t* entries = offsets + choices + 1;
    int64_t k = 0;
    for (int position = 0; position < num_ids && k < p[kMax]; ++position) {
      const int64_t c = position * choice_stride + ids[position];
      if (c < 0 || c >= choices) throw std::runtime_error("gate copies: routing id out of range");
      for (int64_t e = offsets[c]; e < offsets[c + 1] && k < p[kMax]; ++e) {
        const int64_t* entry = entries + kEntryFields * e;
        if (entry[2] == kStagedAhead) continue;
        const int64_t* s = slot + kSlotFields * ((p[kFirst] + k++) % slots);
        check(wait_event(stream, reinterpret_cast<void*>(s[2]), 0), "cuStreamWaitEvent");
        check(memcpy_async(static_cast<uint64_t>(s[entry[2] == 0 ? 0 : 1]), reinterpret_cast<const void*>(entry[0]),
                           static_cast<size_t>(entry[1]), stream), "cuMemcpyHtoDAsync");
        check(record(reinterpret_cast<void*>(s[3]), stream), "cuEventRecord");
      }
    }
  } catch (...) {
    __atomic_store_n(done, -gate_value, __ATOMIC_RELEASE);
    throw;
  }
  __atomic_store_n(done, gate_value, __ATOMIC_RELEASE);
}

}  // namespace gate_copies
