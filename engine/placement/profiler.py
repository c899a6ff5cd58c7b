"""Measures a HardwareProfile in well under 30 s, and caches it per machine.

    profile = load_or_profile()                     # cached, else measured and saved
    profile = load_or_profile(reprofile=True)       # measured again
    python -m engine.placement.profiler --out p.json   # where typer is not installed

Each reading is small and robust: weights larger than the last-level cache and rotated (every
byte comes from DRAM), a warm-up call first, the median of a few repeats, GPU work timed with CUDA
events. CPU slices go through the executor's own CPU path (`engine.cpu_kernels` when it is
available, else torch), with all the CC slices of a "layer" handed over in one call.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.model.config import ModelConfig
from engine.placement.hardware import (
    PROFILE_FORMAT,
    HardwareProfile,
    LinearTimeTable,
    cached_profile_path,
    calibration_of,
    current_fingerprint,
    load_cached,
)

logger = logging.getLogger(__name__)
MIB = 1 << 20
HARDWARE_CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs" / "hardware"


@dataclass(frozen=True)
class ProfileSizes:
    """How big each reading is. The defaults take ~10 s on a 16-core host with an H100."""

    hidden: int = 4096
    slice_rows: int = 1024  # rows of one CPU slice: the engine's host chunk
    cpu_buffer_bytes: int = 1024 * MIB  # CPU weights, rotated; at least `llc_multiple` last-level caches
    llc_multiple: int = 8
    cpu_tokens: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    slices_per_call: int = 4  # slices handed to the CPU path at once, like one layer's CC pieces
    min_reading_s: float = 0.05  # each reading repeats calls for at least this long
    repeat: int = 3
    pcie_bytes: int = 256 * MIB
    gpu_rows: int = 14336  # one whole FFN unit on the GPU (larger than the GPU's L2)
    gpu_tokens: tuple[int, ...] = (1, 8, 32, 128, 512, 1024, 2048, 4096)

    @classmethod
    def for_model(cls, config: ModelConfig, host_chunk_rows: int = 1024) -> ProfileSizes:
        """The model's own slice shapes: its hidden size, host chunks, and widest unit on the GPU."""
        widest = max(config.intermediate_size, config.moe.expert_intermediate_size if config.moe else 0,
                     config.moe.shared_expert_intermediate_size if config.moe else 0)
        return cls(hidden=config.hidden_size, slice_rows=min(widest, host_chunk_rows), gpu_rows=widest)

    @classmethod
    def quick(cls) -> ProfileSizes:
        """Small shapes for tests and CPU-only CI (a second or two)."""
        return cls(hidden=256, slice_rows=256, cpu_buffer_bytes=48 * MIB, llc_multiple=0, cpu_tokens=(1, 8, 64),
                   slices_per_call=8, min_reading_s=0.01, repeat=3, pcie_bytes=32 * MIB, gpu_rows=2048,
                   gpu_tokens=(1, 64, 512))


# -- CPU -----------------------------------------------------------------------------------------

Job = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # x, gate_up, down, out


def _cpu_path() -> tuple[str, int, Callable[[list[Job]], None]]:
    """(path name, threads, run): the CPU path the executor's CPU pool uses for bf16 silu slices."""
    from engine.cpu_kernels.cpu_info import default_num_threads

    try:
        from engine.cpu_kernels import SliceJob, kernel_info, run_slice_jobs
    except ImportError:
        kernel_info = None
    if kernel_info is not None:
        info = kernel_info()
        if info["path"] != "torch":
            def run_kernel(jobs: list[Job]) -> None:
                run_slice_jobs([SliceJob(*job) for job in jobs], "silu")

            return info["path"], int(info["num_threads"]), run_kernel

    def run_torch(jobs: list[Job]) -> None:
        for x, gate_up, down, out in jobs:
            gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
            out.copy_(F.linear(F.silu(gate) * up, down))

    return "torch", default_num_threads(), run_torch


def llc_bytes() -> int:
    """Size of the largest CPU cache (Linux sysfs; 32 MiB when unknown)."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=32 * MIB)


def cpu_buffer_bytes(sizes: ProfileSizes) -> int:
    """At least `llc_multiple` last-level caches, at most an eighth of the machine's memory."""
    wanted = max(sizes.cpu_buffer_bytes, sizes.llc_multiple * llc_bytes())
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return wanted
    return max(sizes.cpu_buffer_bytes, min(wanted, total // 8))


class CpuSlices:
    """FFN slices carved from one large bf16 buffer; each call runs the next `slices_per_call`
    of them through the CPU path, so that successive calls read different memory. After
    `compact_slices`, the same slices stored compact (`compact`: their pieces): calls then read the
    compact bytes but still report the bf16 bytes of the weights, so a table of them is in seconds
    per bf16 byte, comparable with the bf16 one."""

    def __init__(self, sizes: ProfileSizes, buffer: torch.Tensor) -> None:
        self.path, self.num_threads, self.run_path = _cpu_path()
        h, n = sizes.hidden, sizes.slice_rows
        self.hidden = h
        self.slice_bytes = 3 * n * h * buffer.element_size()
        numel = 3 * n * h
        count = buffer.numel() // numel
        if count < sizes.slices_per_call:
            raise ValueError(f"CPU buffer of {buffer.nbytes} bytes holds fewer than {sizes.slices_per_call} slices")
        self.slices = [(buffer[i * numel: i * numel + 2 * n * h].view(2 * n, h),
                        buffer[i * numel + 2 * n * h: (i + 1) * numel].view(h, n)) for i in range(count)]
        self.regions = [buffer[i * numel: (i + 1) * numel].view(torch.uint8) for i in range(count)]  # each slice's bytes
        self.compact: list | None = None  # the slices' compact pieces, once compact_slices ran
        self._meta: tuple[torch.Tensor, torch.Tensor] | None = None  # a compact job's weight shapes
        self.per_call = sizes.slices_per_call
        self.num_calls = count // self.per_call

    def caller(self, num_tokens: int) -> Callable[[int], int]:
        """call(i): runs the i-th call at `num_tokens` tokens, returns the weight bytes it read."""
        x = torch.randn(num_tokens, self.hidden).to(torch.bfloat16)
        outs = [torch.empty(num_tokens, self.hidden, dtype=torch.float32) for _ in range(self.per_call)]
        run = self._run_bf16 if self.compact is None else self._run_compact

        def call(i: int) -> int:
            first = (i % self.num_calls) * self.per_call
            with torch.inference_mode():
                run(x, outs, first)
            return self.per_call * self.slice_bytes

        return call

    def _run_bf16(self, x: torch.Tensor, outs: list[torch.Tensor], first: int) -> None:
        group = self.slices[first: first + self.per_call]
        self.run_path([(x, gate_up, down, out) for (gate_up, down), out in zip(group, outs, strict=True)])

    def _run_compact(self, x: torch.Tensor, outs: list[torch.Tensor], first: int) -> None:
        from engine.cpu_kernels import SliceJob, run_slice_jobs

        assert self.compact is not None and self._meta is not None
        gate_up, down = self._meta
        group = self.compact[first: first + self.per_call]
        run_slice_jobs([SliceJob(x, gate_up, down, out, piece) for out, piece in zip(outs, group, strict=True)],
                       "silu", check=False)


def compact_slices(slices: CpuSlices) -> bool:
    """Re-encodes the slices compact in their own memory (their bf16 weights are gone after), to be
    run through the C++ kernels; False, with nothing changed, where those cannot run compact jobs
    (no library, torch path) or a slice cannot be stored compact."""
    from engine.cpu_kernels import compact

    if slices.path == "torch" or not compact.available():
        return False
    if not all(compact.compactable(tuple(t.shape)) for t in slices.slices[0]):  # every slice has these shapes
        return False
    pieces = []
    for (gate_up, down), region in zip(slices.slices, slices.regions, strict=True):
        piece = compact.compact_piece(gate_up, down, region, slices.num_threads)
        if piece is None:
            raise RuntimeError("profiler: a slice could not be stored compact after the first ones were")
        pieces.append(piece)
    slices.compact = pieces
    slices._meta = tuple(torch.empty(t.shape, dtype=t.dtype, device="meta") for t in slices.slices[0])
    return True


def _reading_s_per_byte(call: Callable[[int], int], sizes: ProfileSizes) -> float:
    """Median over `repeat` readings of seconds per weight byte; `call(i)` runs the i-th call and
    returns the weight bytes it read."""
    call(0)  # warm-up
    readings, i = [], 1
    for _ in range(sizes.repeat):
        num_bytes, start = 0, time.perf_counter()
        while True:
            num_bytes += call(i)
            i += 1
            elapsed = time.perf_counter() - start
            if elapsed >= sizes.min_reading_s:
                break
        readings.append(elapsed / num_bytes)
    return statistics.median(readings)


@dataclass(frozen=True)
class CpuReading:
    """CPU slice time vs tokens through the CPU path, and where that path sends large batches to
    torch's GEMMs (`torch_from_tokens`, measured here: None where the rule does not apply)."""

    table: LinearTimeTable
    torch_from_tokens: int | None = None
    kernels_s_per_byte: tuple[float, ...] = ()  # both paths, where the crossover was measured
    torch_s_per_byte: tuple[float, ...] = ()  # (torch at the candidate token counts only)


TORCH_CANDIDATE_MIN_TOKENS = 16  # below this the kernels' vector paths win (decode sizes: one pass over the weights)
TORCH_WIN_MARGIN = 0.95  # torch takes a token count where it needs at most this share of the kernels' time


def torch_crossover(num_tokens: tuple[int, ...], kernels: list[float], torch_s: dict[int, float]) -> int:
    """The smallest token count from which torch's time is at most TORCH_WIN_MARGIN of the kernels'
    at that count and at every larger one measured (0: none). `kernels`: seconds per byte at each
    of `num_tokens`; `torch_s`: the same for torch at some of them."""
    crossover = 0
    for n, kernel_s in sorted(zip(num_tokens, kernels, strict=True), reverse=True):
        if n not in torch_s:
            break
        if torch_s[n] > TORCH_WIN_MARGIN * kernel_s:
            break
        crossover = n
    return crossover


def measure_cpu_ffn(sizes: ProfileSizes, slices: CpuSlices, bar: tqdm) -> CpuReading:
    """CPU slice time vs tokens, rotating over the slices call after call.

    One untimed pass over the whole buffer comes first (kernel threads started, pages mapped: a
    1-token reading taken cold was seen at 40% of the 2-token rate on the H100 machine). Time per
    byte cannot fall as tokens are added (t tokens do the work of t - 1 and more), so a reading
    below a later one is noise and takes the later one's value.

    Where the kernels send large batches to torch's GEMMs (runner.torch_route_applies: AVX512-BF16
    without AMX), both paths are timed from TORCH_CANDIDATE_MIN_TOKENS on and the crossover is
    this machine's (`torch_from_tokens`); the table is then what that rule gives."""
    from engine.cpu_kernels.runner import measured_torch_tokens, torch_route_applies

    warm = slices.caller(sizes.cpu_tokens[0])
    for i in range(slices.num_calls):
        warm(i)
    tokens = tuple(sizes.cpu_tokens)

    def reading(num_tokens: int) -> float:
        return _reading_s_per_byte(slices.caller(num_tokens), sizes)

    if slices.path == "torch" or not torch_route_applies():
        rates = [reading(n) for n in bar_steps(tokens, bar)]
        return CpuReading(LinearTimeTable(tokens, tuple(non_decreasing_from_right(rates))))
    with measured_torch_tokens(0, 0):  # the kernels alone
        kernels = [reading(n) for n in bar_steps(tokens, bar)]
    with measured_torch_tokens(1, 1):  # torch's GEMMs for every batch
        torch_s = {n: reading(n) for n in tokens if n >= TORCH_CANDIDATE_MIN_TOKENS}
    crossover = torch_crossover(tokens, kernels, torch_s)
    rates = [torch_s[n] if crossover and n >= crossover else k for n, k in zip(tokens, kernels, strict=True)]
    return CpuReading(LinearTimeTable(tokens, tuple(non_decreasing_from_right(rates))), crossover,
                      tuple(kernels), tuple(torch_s.get(n, 0.0) for n in tokens))


def bar_steps(items: tuple[int, ...], bar: tqdm) -> Iterator[int]:
    """`items`, the progress bar advanced after each one."""
    for item in items:
        yield item
        bar.update(1)


def non_decreasing_from_right(values: list[float]) -> list[float]:
    """Each value capped by every later one: [3, 1, 2, 5] -> [1, 1, 2, 5]."""
    out = list(values)
    for i in range(len(out) - 2, -1, -1):
        out[i] = min(out[i], out[i + 1])
    return out


def measure_cpu_job_latency_s(slices: CpuSlices, has_gpu: bool) -> float:
    """The executor's round trip for one tiny CPU job: activations device->host (pinned), an
    event, a hand-over to a worker thread that waits for it and runs the CPU path on one small
    slice, the partial sums host->device, and the wait for them. Median of many."""
    device = "cuda" if has_gpu else "cpu"
    h = slices.hidden
    gate_up, down = slices.slices[0][0][:32], slices.slices[0][1][:, :16].contiguous()
    x = torch.randn(1, h, device=device).to(torch.bfloat16)
    host_x = torch.empty(1, h, dtype=torch.bfloat16, pin_memory=has_gpu)
    host_out = torch.empty(1, h, dtype=torch.float32, pin_memory=has_gpu)

    def work(ready) -> None:
        if ready is not None:
            ready.synchronize()
        with torch.inference_mode():
            slices.run_path([(host_x, gate_up, down, host_out)])

    times = []
    with ThreadPoolExecutor(max_workers=1) as worker:
        for i in range(41):
            start = time.perf_counter()
            host_x.copy_(x, non_blocking=True)
            ready = None
            if has_gpu:
                ready = torch.cuda.Event()
                ready.record()
            worker.submit(work, ready).result()
            back = host_out.to(device, non_blocking=True)
            if has_gpu:
                torch.cuda.current_stream().synchronize()
            del back
            if i:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_dram_read(buffer: torch.Tensor, sizes: ProfileSizes) -> float:
    """Bytes/s of a streaming read (fp32 sum) over `buffer` with every usable CPU."""
    flat = buffer.view(torch.float32)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    try:
        flat.sum()
        times = []
        for _ in range(max(3, sizes.repeat)):
            start = time.perf_counter()
            flat.sum()
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous_threads)
    return buffer.nbytes / statistics.median(times)


def measure_handover_s() -> float:
    """One hand-over to a worker thread and back (how the executor reaches its CPU worker)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(int).result()
        times = []
        for _ in range(200):
            start = time.perf_counter()
            pool.submit(int).result()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


# -- GPU -----------------------------------------------------------------------------------------

def _events_s(fn: Callable[[], object], repeat: int, inner: int = 1,
              statistic: Callable[[list[float]], float] = statistics.median) -> float:
    """Seconds of `inner` calls of fn over `repeat` timings (their median, or `statistic`), timed
    with CUDA events after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / inner)
    return statistic(times)


def measure_pcie(sizes: ProfileSizes) -> tuple[float, float]:
    """(pinned host->device bytes/s, seconds of one small copy). The bandwidth is the fastest of
    several copies: a disturbance only slows a copy down (session 13: a profile read 24.6 GB/s where
    the benchmark beside it read 54.8, and the plan and the prediction followed the low reading)."""
    pinned = torch.empty(sizes.pcie_bytes, dtype=torch.uint8, pin_memory=True).fill_(1)
    device = torch.empty_like(pinned, device="cuda")
    bytes_s = pinned.nbytes / _events_s(lambda: device.copy_(pinned, non_blocking=True), max(8, sizes.repeat),
                                        statistic=min)
    small, small_device = pinned[:4096], device[:4096]
    latency_s = _events_s(lambda: small_device.copy_(small, non_blocking=True), 5, inner=20)
    return bytes_s, latency_s


def measure_cpu_with_pcie(sizes: ProfileSizes, slices: CpuSlices, window_s: float = 0.15) -> tuple[float, float]:
    """(CPU bytes/s at 1 token, PCIe bytes/s) while both read host memory at once: copies are
    queued on a side stream for about `window_s`, and the CPU runs calls until they are done."""
    pinned = torch.empty(sizes.pcie_bytes, dtype=torch.uint8, pin_memory=True).fill_(1)
    device = torch.empty_like(pinned, device="cuda")
    stream = torch.cuda.Stream()
    call = slices.caller(1)
    call(0)
    cpu_rates, pcie_rates, i = [], [], 1
    for _ in range(max(3, sizes.repeat)):
        num_copies = max(2, round(window_s * 50e9 / pinned.nbytes))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record()
            for _ in range(num_copies):
                device.copy_(pinned, non_blocking=True)
            end.record()
        num_bytes, t0 = 0, time.perf_counter()
        while not end.query():
            num_bytes += call(i)
            i += 1
        cpu_rates.append(num_bytes / (time.perf_counter() - t0))
        end.synchronize()
        pcie_rates.append(num_copies * pinned.nbytes / (start.elapsed_time(end) / 1e3))
    return statistics.median(cpu_rates), statistics.median(pcie_rates)


def measure_gpu_ffn(sizes: ProfileSizes, bar: tqdm) -> LinearTimeTable:
    """GPU time of one whole FFN unit vs tokens, computed like the executor (fp32 partial sums)."""
    from engine.executor.accelerator import Accelerator

    acc = Accelerator.for_device("cuda")
    h, n = sizes.hidden, sizes.gpu_rows
    gate_up = torch.randn(2 * n, h, device="cuda", dtype=torch.bfloat16)
    down = torch.randn(h, n, device="cuda", dtype=torch.bfloat16)
    num_bytes = gate_up.nbytes + down.nbytes
    rates = []
    with torch.inference_mode():
        for num_tokens in sizes.gpu_tokens:
            x = torch.randn(num_tokens, h, device="cuda", dtype=torch.bfloat16)

            def unit(x=x) -> torch.Tensor:
                gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
                return acc.linear_fp32(F.silu(gate) * up, down)

            rates.append(_events_s(unit, max(5, sizes.repeat)) / num_bytes)
            bar.update(1)
    return LinearTimeTable(tuple(sizes.gpu_tokens), tuple(rates))


def measure_gpu_sync_s() -> float:
    """A small kernel, an event and the host waiting for it: the round trip a routing sync costs."""
    flag = torch.zeros(1, device="cuda")
    times = []
    for i in range(51):
        start = time.perf_counter()
        flag.add_(1)
        event = torch.cuda.Event()
        event.record()
        event.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


# -- the whole profile ---------------------------------------------------------------------------

@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to `count` inside the block, restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def measure_profile(sizes: ProfileSizes | None = None, progress: bool = True, source: str = "") -> HardwareProfile:
    """Measures this machine (CPU only without a GPU)."""
    sizes = sizes or ProfileSizes()
    start_s = time.perf_counter()
    fingerprint = current_fingerprint()
    has_gpu = torch.cuda.is_available()
    steps = 2 * len(sizes.cpu_tokens) + 2 + (len(sizes.gpu_tokens) + 3 if has_gpu else 0)
    gpu: dict = {}
    with tqdm(total=steps, desc="profiling", unit="reading", disable=not progress, leave=False) as bar:
        if has_gpu:
            free_bytes, total_bytes = torch.cuda.mem_get_info()  # before anything of ours is allocated
            gpu["gpu_free_bytes"], gpu["gpu_total_bytes"] = int(free_bytes), int(total_bytes)
        buffer = torch.empty(cpu_buffer_bytes(sizes) // 2, dtype=torch.bfloat16).fill_(0.01)
        dram_bytes_s = measure_dram_read(buffer, sizes)
        bar.update(1)
        slices = CpuSlices(sizes, buffer)
        with torch_threads(slices.num_threads):  # the torch path runs with the CPU pool's threads
            cpu = measure_cpu_ffn(sizes, slices, bar)
            sync_s = measure_handover_s()
            job_s = measure_cpu_job_latency_s(slices, has_gpu)
            bar.update(1)
            if has_gpu:
                gpu["pcie_h2d_bytes_s"], gpu["pcie_latency_s"] = measure_pcie(sizes)
                bar.update(1)
                gpu["cpu_with_pcie_bytes_s"], gpu["pcie_with_cpu_bytes_s"] = measure_cpu_with_pcie(sizes, slices)
                # PCIe alone no slower than while the CPU read host memory beside it: a lower reading
                # alone was disturbed
                gpu["pcie_h2d_bytes_s"] = max(gpu["pcie_h2d_bytes_s"], gpu["pcie_with_cpu_bytes_s"])
                bar.update(1)
                gpu["gpu_ffn"] = measure_gpu_ffn(sizes, bar)
                sync_s += measure_gpu_sync_s()
                bar.update(1)
                torch.cuda.empty_cache()
            # last: it overwrites the bf16 slices
            compact = measure_cpu_ffn(sizes, slices, bar) if compact_slices(slices) else None
        slices_path, slices_threads = slices.path, slices.num_threads
        del slices, buffer
    return HardwareProfile(
        fingerprint=fingerprint, cpu_ffn=cpu.table, cpu_ffn_compact=compact.table if compact else None,
        cpu_torch_from_tokens=cpu.torch_from_tokens,
        cpu_torch_from_tokens_compact=compact.torch_from_tokens if compact else None, cpu_threads=slices_threads,
        cpu_path=slices_path, dram_read_bytes_s=dram_bytes_s, sync_s=sync_s, cpu_job_latency_s=job_s, slice_hidden=sizes.hidden,
        slice_rows=sizes.slice_rows,
        created=time.strftime("%Y-%m-%dT%H:%M:%S"), measure_s=time.perf_counter() - start_s,
        profile_format=PROFILE_FORMAT,
        source=source or "measured by engine.placement.profiler", **gpu)


def remeasure_cpu(profile: HardwareProfile, sizes: ProfileSizes, source: str) -> HardwareProfile:
    """`profile` with its CPU readings taken again through the CPU path in force now (after a
    switch of the CPU kernel path, say) and its PCIe and GPU readings kept. Small enough to run
    beside a loaded engine under a GPU budget (32 MiB on the GPU for the CPU-with-PCIe reading)."""
    buffer = torch.empty(cpu_buffer_bytes(sizes) // 2, dtype=torch.bfloat16).fill_(0.01)
    slices = CpuSlices(sizes, buffer)
    with torch_threads(slices.num_threads):
        cpu = measure_cpu_ffn(sizes, slices, tqdm(disable=True))
        has_gpu = profile.pcie_h2d_bytes_s is not None and torch.cuda.is_available()
        job_s = measure_cpu_job_latency_s(slices, has_gpu)
        gpu = {}
        if has_gpu:
            cpu_with_pcie, pcie_with_cpu = measure_cpu_with_pcie(replace(sizes, pcie_bytes=32 * MIB), slices)
            gpu = {"cpu_with_pcie_bytes_s": cpu_with_pcie, "pcie_with_cpu_bytes_s": pcie_with_cpu}
        compact = measure_cpu_ffn(sizes, slices, tqdm(disable=True)) if compact_slices(slices) else None
    return replace(profile, cpu_ffn=cpu.table, cpu_ffn_compact=compact.table if compact else None,
                   cpu_torch_from_tokens=cpu.torch_from_tokens,
                   cpu_torch_from_tokens_compact=compact.torch_from_tokens if compact else None,
                   profile_format=PROFILE_FORMAT,
                   cpu_threads=slices.num_threads, cpu_path=slices.path,
                   cpu_job_latency_s=job_s, source=source, created=time.strftime("%Y-%m-%dT%H:%M:%S"), **gpu)


def load_or_profile(reprofile: bool = False, cache_dir: str | Path | None = None,
                    sizes: ProfileSizes | None = None, progress: bool = True) -> HardwareProfile:
    """This machine's cached profile; measured (and cached) when absent, stale or `reprofile`.

    A cached profile is reused only when its fingerprint is this machine's (CPU model and cores,
    GPU name, torch version). Its rates are per weight byte, so one profile serves every model."""
    fingerprint = current_fingerprint()
    if not reprofile:
        cached = load_cached(fingerprint, cache_dir)
        if cached is not None:
            return cached
    profile = with_committed_calibration(measure_profile(sizes, progress))
    profile.save(cached_profile_path(fingerprint, cache_dir))
    return profile


def with_committed_calibration(profile: HardwareProfile, directory: Path = HARDWARE_CONFIGS_DIR) -> HardwareProfile:
    """`profile` with the calibrated overheads of a committed profile of the same machine (same
    fingerprint) under configs/hardware/, if there is one: those come from benchmarks of the
    whole engine, which the profiler cannot run."""
    for path in sorted(directory.glob("*.json")):
        try:
            committed = HardwareProfile.from_file(path)
        except (OSError, ValueError, TypeError, KeyError):
            continue
        calibrated = calibration_of(committed)
        if committed.fingerprint == profile.fingerprint and any(calibrated.values()):
            return replace(profile, **calibrated,
                           notes={**profile.notes, "calibration": f"overheads from configs/hardware/{path.name}"})
    return profile


def use_measured_crossover(profile: HardwareProfile) -> bool:
    """Hands the CPU path the torch crossover `profile` measured (runner.set_measured_torch_tokens),
    where it was measured on this machine's CPU; whether it did."""
    if profile.cpu_torch_from_tokens is None:
        return False
    here, there = current_fingerprint(), profile.fingerprint
    if (here.cpu_model, here.num_cpu_cores) != (there.cpu_model, there.num_cpu_cores):
        return False
    from engine.cpu_kernels.runner import set_measured_torch_tokens

    set_measured_torch_tokens(profile.cpu_torch_from_tokens, profile.cpu_torch_from_tokens_compact)
    logger.info("cpu kernels: torch's GEMMs from %s tokens (bf16) / %s (compact), as profiled here (0: never)",
                profile.cpu_torch_from_tokens, profile.cpu_torch_from_tokens_compact)
    return True


def engine_profile(config: ModelConfig, host_chunk_rows: int = 1024, reprofile: bool = False,
                   profile_path: str | Path | None = None) -> HardwareProfile:
    """The profile an engine plans with: `profile_path` if given, else this machine's cached
    profile, measured with the model's slice shapes when there is none (or on `reprofile`)."""
    if profile_path is not None:
        profile = HardwareProfile.from_file(profile_path)
    else:
        profile = load_or_profile(reprofile, sizes=ProfileSizes.for_model(config, host_chunk_rows), progress=False)
    use_measured_crossover(profile)
    return profile


def main() -> None:  # pragma: no cover - for machines without typer (the GPU machine)
    parser = argparse.ArgumentParser(description="Measure this machine's hardware profile.")
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default=None, help="use this model's slice shapes")
    parser.add_argument("--source", default="")
    args = parser.parse_args()
    sizes = ProfileSizes()
    if args.model:
        from engine.model.factory import resolve_model_config

        sizes = ProfileSizes.for_model(resolve_model_config(args.model)[0])
    if args.quick:
        sizes = ProfileSizes.quick()
    profile = measure_profile(sizes, progress=sys.stderr.isatty(), source=args.source)
    print(profile.describe())
    if args.out:
        profile.save(args.out)


if __name__ == "__main__":  # pragma: no cover
    main()
