// Calls submitted without waiting: a driver thread runs them one at a time as the pool's caller.
//
// The Python thread that drives the GPU submits a layer's CPU job and goes on enqueuing GPU work;
// it waits only where the result is needed. No Python thread computes, so no GIL hand-off sits
// between the job's submission and its start, or between its end and the wait's return.
#pragma once

#include <cstdint>
#include <functional>

namespace scheinfer {

// Runs `call` on the driver thread (after every earlier submission); returns its ticket (>= 1).
// `call` returns 0 or 1 (an error, whose text it stores with set_driver_error).
int64_t driver_submit(std::function<int()> call);

// Blocks until the call of `ticket` is done. Returns its status; times_ns (3 values, may be null)
// receives its start and end on the steady clock (CLOCK_MONOTONIC) and the submission time.
int driver_wait(int64_t ticket, int64_t* times_ns);

// Sets the error text of the call running now (on the driver thread); driver_last_error() gives
// the text of the call the last driver_wait returned.
void set_driver_error(const char* text);
// Called by the running call (on the driver thread): its start time is now (a call that first
// waited for its input reports the work's time, not the wait's).
void driver_restart_clock();
const char* driver_last_error();

}  // namespace scheinfer
