"""run_slice_jobs and kernel_info: pick the kernel path, build on first use, fall back to torch.

Path choice: SCHEINFER_CPU_KERNEL = auto (default) | amx | avx512_bf16 | avx2 | torch caps the path;
under that cap each job takes the best path its CPU, shape and token count allow (AMX for blocks
of at least amx_min_tokens tokens, AVX512-BF16 below, AVX2+FMA without AVX512-BF16).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from engine.cpu_kernels.build import BuiltLibrary, KernelBuildError, build_library
from engine.cpu_kernels.cpu_info import cpu_info, default_num_threads
from engine.cpu_kernels.slice_job import SliceJob, WeightFields, check_shapes, describe, kernel_ready
from engine.cpu_kernels.torch_path import run_torch_jobs

logger = logging.getLogger(__name__)

PATHS = ("avx2", "avx512_bf16", "amx")  # index + 1 = the C++ Path enum
KERNEL_ACTIVATIONS = frozenset({"silu"})


@dataclass
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    built: BuiltLibrary | None = None
    build_error: str | None = None
    tried: bool = False
    num_threads: int | None = None
    logged_path: str | None = None
    active: dict = field(default_factory=dict)  # (requested path, build state) -> _active's answer
    torch_tokens: dict = field(default_factory=dict)  # (settings, build state) -> torch_from_tokens (bf16, compact)
    # the crossovers this machine's profile measured (bf16, compact; None: the defaults)
    measured_torch_tokens: tuple[int | None, int | None] = (None, None)


_state = _State()


def requested_path() -> str:
    value = os.environ.get("SCHEINFER_CPU_KERNEL", "auto").strip().lower() or "auto"
    if value not in ("auto", "torch", *PATHS):
        raise ValueError(f"SCHEINFER_CPU_KERNEL={value!r}: expected auto, torch, {', '.join(PATHS)}")
    return value


def _library() -> BuiltLibrary | None:
    """The built kernels, building them on first use; None after a build failure."""
    with _state.lock:
        if not _state.tried:
            _state.tried = True
            try:
                _state.built = build_library()
            except KernelBuildError as exc:
                _state.build_error = str(exc)
                logger.warning("cpu kernels: build failed, using the torch path: %s", exc)
        return _state.built


def native_library() -> BuiltLibrary | None:
    """The built C++ library when the kernels are in force (not SCHEINFER_CPU_KERNEL=torch)."""
    return None if requested_path() == "torch" else _library()


def available_paths() -> list[str]:
    """Kernel paths this CPU and build can run (best last); empty when the build failed."""
    built = _library()
    if built is None:
        return []
    mask = built.lib.scheinfer_available_paths()
    return [p for i, p in enumerate(PATHS) if mask >> (i + 1) & 1]


def num_threads() -> int:
    return _state.num_threads or default_num_threads()


def set_num_threads(count: int) -> None:
    """Threads of the kernels' pool (the calling thread included); default SCHEINFER_CPU_THREADS."""
    if count < 1:
        raise ValueError(f"thread count must be >= 1, got {count}")
    _state.num_threads = count


def set_tuning(key: str, value: int) -> None:
    """Sets a knob of the C++ driver (see Tuning in csrc/slice_ffn.h); for benchmarks."""
    built = _library()
    if built is None or built.lib.scheinfer_set_tuning(key.encode(), value) != 0:
        raise ValueError(f"cannot set kernel tuning {key!r}")


def get_tuning(key: str) -> int:
    built = _library()
    return -1 if built is None else int(built.lib.scheinfer_get_tuning(key.encode()))


def phase_seconds(reset: bool = True) -> dict[str, float]:
    """Seconds the kernel calls spent in each phase (pack, gate_up, down) since the last reset, and
    the number of calls; for benchmarks. Empty when the kernels are not built."""
    built = _library()
    if built is None:
        return {}
    values = (ctypes.c_int64 * 4)()
    built.lib.scheinfer_phase_ns(ctypes.addressof(values), int(reset))
    return {"pack": values[0] / 1e9, "gate_up": values[1] / 1e9, "down": values[2] / 1e9, "calls": values[3]}


def _active(requested: str) -> tuple[str, int, str]:
    """(top path in force, its cap for the C++ driver, why)."""
    if requested == "torch":
        return "torch", 0, "forced by SCHEINFER_CPU_KERNEL=torch"
    available = available_paths()
    if not available:
        why = _state.build_error or f"CPU lacks {cpu_info().missing('avx2')}"
        return "torch", 0, f"no kernel path: {why}"
    allowed = available if requested == "auto" else [p for p in available if PATHS.index(p) <= PATHS.index(requested)]
    if not allowed:
        return "torch", 0, f"SCHEINFER_CPU_KERNEL={requested} but this CPU/build offers only {available}"
    best = allowed[-1]
    why = "best path this CPU offers" if requested == "auto" else f"SCHEINFER_CPU_KERNEL={requested}"
    if requested not in ("auto", best):
        why += f" is not available here; using {best}"
    missing = [p for p in PATHS if p not in available]
    if missing:
        why += "; unavailable: " + ", ".join(f"{p} ({_why_missing(p)})" for p in missing)
    return best, PATHS.index(best) + 1, why


def active_path() -> str:
    """The top kernel path in force: torch, avx2, avx512_bf16 or amx."""
    return _cached_active()[0]


TORCH_TOKENS_ENV = "SCHEINFER_CPU_TORCH_TOKENS"
# Without AMX, torch's oneDNN GEMMs beat the kernels' vector paths from about this many tokens a
# job (docs/CPU_KERNELS.md "Large blocks without AMX": AMD EPYC with AVX512-BF16, the same threads
# for both: bf16 pieces 1.3-2.5x from 128 tokens; compact pieces, decoded first, about even at 128
# and 1.4-1.9x at 256; below 64 tokens the kernels are as fast or faster)
DEFAULT_TORCH_TOKENS = 128
DEFAULT_TORCH_TOKENS_COMPACT = 256


def torch_from_tokens(compact: bool = False) -> int:
    """Batches whose largest job has this many tokens or more run torch's path instead of the
    kernels (0: never); `compact`: for pieces stored compact (decoded before torch's GEMMs).
    Default: DEFAULT_TORCH_TOKENS(_COMPACT) where AVX512-BF16 is the best path in force (torch's
    oneDNN has bf16 GEMMs there); never with AMX (faster than oneDNN), on AVX2 alone (torch's bf16
    GEMMs fall back to a slow generic routine) or where a kernel path was asked for by name
    (SCHEINFER_CPU_KERNEL: tests and benchmarks of that path). Where the hardware profile measured
    the crossover on this machine (set_measured_torch_tokens), that replaces the default.
    SCHEINFER_CPU_TORCH_TOKENS sets it for both kinds (0 turns it off) and wins over both. Kept per
    setting: this runs for every CPU batch."""
    return _torch_thresholds()[compact]


def torch_route_applies() -> bool:
    """Whether the rule's thresholds come from the default or a measurement here: the best path in
    force is AVX512-BF16 (no AMX), no kernel path was named and SCHEINFER_CPU_TORCH_TOKENS is unset."""
    if os.environ.get(TORCH_TOKENS_ENV, "").strip():
        return False
    path, _, _ = _cached_active()
    return path == "avx512_bf16" and requested_path() == "auto"


def set_measured_torch_tokens(bf16: int | None, compact: int | None) -> None:
    """The token counts from which torch's GEMMs beat the kernels, as this machine's profile measured
    them (engine/placement/profiler.py; 0: never, None: keep the default). Used where
    torch_route_applies()."""
    with _state.lock:
        _state.measured_torch_tokens = (bf16, compact)
        _state.torch_tokens.clear()


@contextmanager
def measured_torch_tokens(bf16: int | None, compact: int | None) -> Iterator[None]:
    """set_measured_torch_tokens inside the block, the previous values restored after (the profiler
    times each path alone this way: 0 = the kernels only, 1 = torch for every batch)."""
    previous = _state.measured_torch_tokens
    set_measured_torch_tokens(bf16, compact)
    try:
        yield
    finally:
        set_measured_torch_tokens(*previous)


def _torch_thresholds() -> tuple[int, int]:
    """(bf16, compact) thresholds of torch_from_tokens, kept per setting."""
    key = (os.environ.get(TORCH_TOKENS_ENV), os.environ.get("SCHEINFER_CPU_KERNEL"), _state.built is not None,
           _state.build_error)
    thresholds = _state.torch_tokens.get(key)
    if thresholds is None:
        thresholds = _state.torch_tokens[key] = _default_thresholds()
    return thresholds


def _default_thresholds() -> tuple[int, int]:
    value = os.environ.get(TORCH_TOKENS_ENV, "").strip()
    if value:
        if not value.isdigit():
            raise ValueError(f"{TORCH_TOKENS_ENV}={value!r}: expected a token count (0: never)")
        return int(value), int(value)
    if not torch_route_applies():
        return 0, 0
    bf16, compact = _state.measured_torch_tokens
    return (DEFAULT_TORCH_TOKENS if bf16 is None else bf16,
            DEFAULT_TORCH_TOKENS_COMPACT if compact is None else compact)


def torch_takes(token_counts: Iterable[int], compact: Iterable[bool] = ()) -> bool:
    """Whether a batch of jobs with these token counts runs torch's path (torch_from_tokens);
    `compact`: whether each job's piece is stored compact. Both are read only where the rule is on
    (this runs for every CPU batch; on AMX machines it never is)."""
    bf16, packed = _torch_thresholds()
    if not bf16 and not packed:
        return False
    threshold = packed if any(compact) else bf16
    return threshold > 0 and max(token_counts, default=0) >= threshold


def _why_missing(path: str) -> str:
    flags = cpu_info().missing(path)
    if flags:
        return "CPU lacks " + " ".join(flags)
    return "the OS refused AMX tile state" if path == "amx" else "compiler did not enable it"


def kernel_info() -> dict:
    """Which path is active ("amx", "avx512_bf16", "avx2" or "torch") and why, with the details."""
    requested = requested_path()
    path, _, reason = _active(requested)
    built = _state.built
    info: dict = {
        "path": path,
        "reason": reason,
        "requested": requested,
        "available": available_paths() if requested != "torch" or built else [],
        "num_threads": num_threads(),
        "cpu": {"model": cpu_info().model_name, "physical_cores": cpu_info().num_physical_cores,
                "logical_cpus": cpu_info().num_logical_cpus,
                "flags": sorted(f for f in cpu_info().flags if f.startswith(("avx", "amx", "fma")))},
        "build_error": _state.build_error,
        "library": str(built.path) if built else None,
        "build_s": round(built.seconds, 3) if built else None,
    }
    info["torch_from_tokens"] = {"bf16": torch_from_tokens(), "compact": torch_from_tokens(compact=True)}
    if path == "amx":
        amx_min = get_tuning("amx_min_tokens")
        info["amx_min_tokens"] = amx_min
        info["by_tokens"] = {f"< {amx_min}": "avx512_bf16", f">= {amx_min}": "amx"}
    return info


def _log_choice(path: str, reason: str) -> None:
    if _state.logged_path != path:
        _state.logged_path = path
        built = _state.built
        logger.info("cpu kernels: path=%s (%s), threads=%d, library=%s", path, reason, num_threads(),
                    built.path if built else "none")


def run_slice_jobs(jobs: list[SliceJob], activation: str = "silu", check: bool = True) -> None:
    """Computes every job's out = down @ (act(gate @ x) * (up @ x)) as one parallel job.

    All jobs of one layer go in one call: their row blocks are spread over the kernel threads
    together. bf16 jobs with activation silu run in the C++ kernels; other jobs in torch.
    Not re-entrant: calls from several threads are serialised. `check=False` skips the shape
    checks for callers that build jobs from the model's own pieces (the executor, every layer).
    """
    prepare_slice_jobs(jobs, activation, check)()


def _cached_active() -> tuple[str, int, str]:
    """_active for the requested path, computed once per setting (this runs for every layer)."""
    requested = requested_path()
    key = (requested, _state.built is not None, _state.build_error)
    if key not in _state.active:
        _state.active[key] = _active(requested)
    return _state.active[key]


def prepare_slice_jobs(jobs: list[SliceJob], activation: str = "silu", check: bool = True) -> Callable[[], None]:
    """Does the Python part of `run_slice_jobs` now (checks, path choice, the C++ job records) and
    returns the call that computes. The executor prepares on the thread that drives the GPU and
    runs the call on the CPU worker, which then holds the GIL only briefly (the C++ call releases it)."""
    if check:
        for job in jobs:
            check_shapes(job)
    path, cap, reason = _cached_active()
    _log_choice(path, reason)
    if (cap == 0 or activation not in KERNEL_ACTIVATIONS
            or torch_takes((job.x.shape[0] for job in jobs), (job.compact is not None for job in jobs))):
        return lambda: run_torch_jobs(jobs, activation)
    native, others = [], []
    for job in jobs:
        (native if kernel_ready(job) else others).append(job)
    records = array("q")
    for job in native:
        records.extend(describe(job))
    lib = _state.built.lib  # type: ignore[union-attr]

    def run() -> None:
        if others:
            run_torch_jobs(others, activation)
        if not native:
            return
        buffer = (ctypes.c_int64 * len(records)).from_buffer(records)
        if lib.scheinfer_run(ctypes.addressof(buffer), len(native), cap, num_threads()) != 0:
            raise RuntimeError(f"cpu kernel failed: {lib.scheinfer_last_error().decode()}")

    return run


@dataclass
class PendingJobs:
    """Jobs submitted to the C++ driver thread; `wait()` returns their (start, end) times in
    seconds on time.perf_counter's clock. After it, `called_s` (this thread entered the submit
    call) and `queued_s` (the driver had the jobs queued) say where the time before the start went."""

    ticket: int
    lib: ctypes.CDLL
    called_s: float = 0.0
    queued_s: float = 0.0

    def wait(self) -> tuple[float, float]:
        times = (ctypes.c_int64 * 3)()
        if self.lib.scheinfer_wait(self.ticket, ctypes.addressof(times)) != 0:
            raise RuntimeError(f"cpu kernel failed: {self.lib.scheinfer_last_error().decode()}")
        self.queued_s = times[2] / 1e9
        return times[0] / 1e9, times[1] / 1e9


def start_slice_jobs(jobs: list[SliceJob], activation: str = "silu",
                     weights: list[WeightFields] | None = None) -> PendingJobs | None:
    """Submits the jobs to the C++ kernels without waiting, when every job runs there (bf16, silu,
    kernel layouts, a kernel path in force); else None (run them with `prepare_slice_jobs`). The
    jobs' tensors must stay alive until `wait()` returns. `weights`: each job's weight_fields, when
    the caller keeps them (shapes are not checked: for callers that build jobs from model pieces)."""
    if not all(kernel_ready(job) for job in jobs):
        return None
    records = array("q")
    for i, job in enumerate(jobs):
        records.extend(describe(job, weights[i] if weights is not None else None))
    return submit_records(records, len(jobs), activation)


def submit_records(records: array, num_jobs: int, activation: str = "silu", signal: int = 0,
                   value: int = 0) -> PendingJobs | None:
    """Submits `num_jobs` job records (DESC_FIELDS each, kernel-ready operands: the caller checked)
    to the C++ driver thread; None when no kernel path is in force for them (then nothing is
    signalled). `signal`: the address of an int64 where `value` is stored once the jobs are over,
    done or failed (0: none)."""
    # the records' address (the C++ side copies them before returning)
    return _submit(activation, lambda lib, cap: lib.scheinfer_submit(
        records.buffer_info()[0], num_jobs, cap, num_threads(), signal or None, value))


def _submit(activation: str, call: Callable[[ctypes.CDLL, int], int]) -> PendingJobs | None:
    """`call(lib, path cap)` -> a driver ticket, made when a kernel path is in force for
    `activation` (else None); a failed submission raises."""
    path, cap, reason = _cached_active()
    if cap == 0 or activation not in KERNEL_ACTIVATIONS:
        return None
    _log_choice(path, reason)
    lib = _state.built.lib  # type: ignore[union-attr]
    called_s = time.perf_counter()
    ticket = call(lib, cap)
    if ticket < 0:
        raise RuntimeError(f"cpu kernel failed: {lib.scheinfer_last_error().decode()}")
    return PendingJobs(ticket, lib, called_s)


@dataclass(frozen=True)
class RoutedGate:
    """Where a routed job learns its routing (all pinned host addresses): `ids` int64 [num_ids], the
    choice of each position; `gate` reaches `value` once the ids and activations are there (a GPU
    stream stores it); `cancel` reaching `value` gives the job up. `out_base`: the outputs' first
    row, `out_row_bytes` a row (each chosen job's rows follow the previous one's)."""

    ids: int
    num_ids: int
    choice_stride: int
    gate: int
    cancel: int
    value: int
    out_base: int
    out_row_bytes: int
    wait_ms: int = 10_000


def submit_routed_records(records: array, choice_offsets: array, where: RoutedGate, activation: str = "silu",
                          signal: int = 0, value: int = 0, copies: array | None = None) -> PendingJobs | None:
    """Submits a job whose records are chosen on the driver thread once the routing is there: choice
    c's records are [choice_offsets[c], choice_offsets[c + 1]) of `records`, and position p takes
    choice p * choice_stride + ids[p] (scheinfer_submit_routed). `copies`: a plan of streamed
    pieces' copies the same routing picks, enqueued first (engine/executor/gate_copies.py). None
    when no kernel path is in force (nothing submitted, nothing signalled)."""
    return _submit(activation, lambda lib, cap: lib.scheinfer_submit_routed(
        records.buffer_info()[0], choice_offsets.buffer_info()[0], len(choice_offsets) - 1, where.ids, where.num_ids,
        where.choice_stride, where.gate, where.cancel, where.value, where.out_base, where.out_row_bytes, where.wait_ms,
        cap, num_threads(), signal or None, value, copies.buffer_info()[0] if copies is not None else None))


def job_path(job: SliceJob) -> str:
    """The path this job would take now (for tests and benchmarks)."""
    _, cap, _ = _active(requested_path())
    if cap == 0 or not kernel_ready(job) or torch_takes([job.x.shape[0]], [job.compact is not None]):
        return "torch"
    records = array("q", describe(job))
    buffer = (ctypes.c_int64 * len(records)).from_buffer(records)
    return PATHS[_state.built.lib.scheinfer_job_path(ctypes.addressof(buffer), cap) - 1]  # type: ignore[union-attr]
