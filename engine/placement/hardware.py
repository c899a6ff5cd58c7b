"""HardwareProfile: the measured rates the planner's cost model runs on, saved as JSON per machine.

A profile is keyed by a `Fingerprint` (CPU model and cores, GPU name, torch version) and cached as
`<profile dir>/<fingerprint hash>.json`; the profile dir is `$SCHEINFER_PROFILE_DIR`, else
`$XDG_CACHE_HOME/scheinfer/profiles` (default `~/.cache/scheinfer/profiles`). Measuring lives in
`engine.placement.profiler`; this module only describes, saves and loads.

Linear time (CPU or GPU) is a `LinearTimeTable`: seconds per weight byte of an FFN slice at a few
token counts, interpolated linearly in between and extrapolated along the last segment (compute
bound) beyond the last point.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)
# What the profiler measures: 2 since session 14 (the CPU on compact slices, `cpu_ffn_compact`), 3
# since session 20 (where torch's GEMMs beat the kernels without AMX, `cpu_torch_from_tokens`).
# A cached profile of an older format is measured again; files given by path are read as they are.
PROFILE_FORMAT = 3

PROFILE_DIR_ENV = "SCHEINFER_PROFILE_DIR"


@dataclass(frozen=True)
class Fingerprint:
    """What makes a profile valid for a machine: another value means other rates."""

    cpu_model: str
    num_cpu_cores: int  # logical CPUs usable by this process
    gpu_name: str  # "none" without a GPU
    torch_version: str

    @property
    def key(self) -> str:
        """Short stable hash: the cache file's name."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class LinearTimeTable:
    """Time of an FFN slice (gate/up and down products) vs the number of tokens it is applied to.

    `s_per_byte[i]` is seconds per weight byte at `num_tokens[i]` tokens (increasing token counts).
    """

    num_tokens: tuple[int, ...]
    s_per_byte: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.num_tokens or len(self.num_tokens) != len(self.s_per_byte):
            raise ValueError("a LinearTimeTable needs as many token counts as rates, at least one")
        if list(self.num_tokens) != sorted(set(self.num_tokens)) or self.num_tokens[0] < 1:
            raise ValueError(f"token counts must be increasing and >= 1, got {self.num_tokens}")
        if min(self.s_per_byte) <= 0:
            raise ValueError("seconds per byte must be positive")

    def s_per_byte_at(self, num_tokens: float) -> float:
        """Seconds per weight byte at `num_tokens` tokens (0 tokens: 0; below the first point: the first)."""
        if num_tokens <= 0:
            return 0.0
        xs, ys = self.num_tokens, self.s_per_byte
        if num_tokens <= xs[0]:
            return ys[0]
        if len(xs) == 1:
            return ys[0] * num_tokens / xs[0]  # one point: assume compute bound beyond it
        i = min(bisect.bisect_left(xs, num_tokens), len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        slope = (y1 - y0) / (x1 - x0)
        if num_tokens > x1:  # beyond the table: along the last segment, never decreasing
            slope = max(slope, 0.0)
        return max(y0 + slope * (num_tokens - x0), 1e-30)

    def seconds(self, num_tokens: float, num_bytes: float) -> float:
        """Time to apply `num_bytes` of weights to `num_tokens` tokens."""
        return num_bytes * self.s_per_byte_at(num_tokens)

    def bytes_s(self, num_tokens: float) -> float:
        """Weight bytes processed per second at `num_tokens` tokens."""
        return 1.0 / self.s_per_byte_at(max(num_tokens, 1e-9))

    def flops(self, num_tokens: float, itemsize: int = 2) -> float:
        """Equivalent flop/s at `num_tokens` tokens (2 flops per weight per token)."""
        return 2 * num_tokens * self.bytes_s(num_tokens) / itemsize


def roofline_table(bytes_s: float, flops: float, num_tokens: tuple[int, ...] = (1, 4, 16, 64, 256, 1024, 4096),
                   itemsize: int = 2) -> LinearTimeTable:
    """A table from two rates: weights read at `bytes_s`, or `flops` of compute (2 per weight per
    token), whichever is slower. For profiles assembled from separate readings, and for tests."""
    return LinearTimeTable(num_tokens, tuple(max(1.0 / bytes_s, 2.0 * n / itemsize / flops) for n in num_tokens))


@dataclass(frozen=True)
class HardwareProfile:
    """Rates of one machine. GPU fields are None on a machine without a GPU."""

    fingerprint: Fingerprint
    cpu_ffn: LinearTimeTable  # CC slices through the executor's CPU path (kernels or torch)
    cpu_threads: int
    cpu_path: str  # "amx", "avx512_bf16", "avx2", "torch", ...
    dram_read_bytes_s: float
    sync_s: float  # one CPU<->GPU synchronisation plus a hand-over to the CPU worker thread
    pcie_h2d_bytes_s: float | None = None  # pinned host -> device
    pcie_latency_s: float | None = None  # fixed cost of one host -> device copy
    gpu_ffn: LinearTimeTable | None = None
    # CC slices stored compact (engine/model/compact_weights.py) through the same CPU path, in
    # seconds per bf16 byte of the same weights (None: not measured; then compact is costed as its
    # bytes at `cpu_ffn`'s rate). In prefill the kernels decode compact rows into scratch first.
    cpu_ffn_compact: LinearTimeTable | None = None
    # Where the CPU path sends a batch to torch's GEMMs (engine/cpu_kernels/runner.torch_from_tokens:
    # CPUs whose best path is AVX512-BF16, no AMX): the token count of its largest job from which
    # torch was faster here, for bf16 and compact pieces (0: never; None: not measured, the default)
    cpu_torch_from_tokens: int | None = None
    cpu_torch_from_tokens_compact: int | None = None
    gpu_total_bytes: int | None = None
    gpu_free_bytes: int | None = None  # free when profiled (nothing of the engine allocated yet)
    cpu_with_pcie_bytes_s: float | None = None  # CPU FFN rate at 1 token while PCIe streams
    pcie_with_cpu_bytes_s: float | None = None  # PCIe rate meanwhile (both read host DRAM)
    cpu_job_latency_s: float = 0.0  # one CPU job's round trip: activations out, hand-over, partials back
    # Calibrated against a benchmark of the whole engine (0 when never calibrated): serial time
    # outside the three resources per layer of a step (decoder launches, attention, routing), per
    # layer that has CPU work, and per FFN piece the step uses (the host thread's work per piece).
    layer_overhead_s: float = 0.0
    cpu_layer_overhead_s: float = 0.0
    piece_overhead_s: float = 0.0
    # Calibrated too: the driving thread's work for one piece streamed in a prefill step (its copy,
    # unpack and partial launched eagerly), which PCIe and the GPU cannot hide once the pieces are
    # small (0: not counted). A resource beside PCIe and GPU compute, not serial time.
    stream_host_s: float = 0.0
    # Calibrated: serial time per FFN unit (expert) a prefill step uses (its tokens gathered,
    # packed for the CPU or the GPU, and their outputs added back: eager work of the driving thread).
    prefill_unit_overhead_s: float = 0.0
    slice_hidden: int = 4096  # shape of the measured CPU slices: [hidden] x [rows] (x3 matrices)
    slice_rows: int = 1024
    dtype: str = "bfloat16"
    created: str = ""  # ISO time of the measurement
    profile_format: int = 1  # PROFILE_FORMAT of the profiler that measured it (1: before the field)
    measure_s: float = 0.0  # how long the measurement took
    source: str = ""  # how it was obtained
    notes: dict[str, float | str] = field(default_factory=dict)  # extra readings, for people

    @property
    def has_gpu(self) -> bool:
        return self.gpu_ffn is not None and self.pcie_h2d_bytes_s is not None

    @property
    def host_read_bytes_s(self) -> float | None:
        """Host DRAM read rate shared by the CPU and PCIe when both read (None: not measured)."""
        if self.cpu_with_pcie_bytes_s is None or self.pcie_with_cpu_bytes_s is None:
            return None
        return self.cpu_with_pcie_bytes_s + self.pcie_with_cpu_bytes_s

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> HardwareProfile:
        raw = json.loads(text)
        raw["fingerprint"] = Fingerprint(**raw["fingerprint"])
        for key in ("cpu_ffn", "gpu_ffn", "cpu_ffn_compact"):
            if raw.get(key) is not None:
                table = raw[key]
                raw[key] = LinearTimeTable(tuple(table["num_tokens"]), tuple(table["s_per_byte"]))
        return cls(**raw)

    @classmethod
    def from_file(cls, path: str | Path) -> HardwareProfile:
        return cls.from_json(Path(path).read_text())

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)  # atomic: a concurrent reader never sees half a file
        return path

    def describe(self) -> str:
        """A few lines for people."""
        fp = self.fingerprint
        lines = [f"machine: {fp.cpu_model} ({fp.num_cpu_cores} CPUs), GPU {fp.gpu_name}, torch {fp.torch_version}",
                 f"CPU FFN path {self.cpu_path}, {self.cpu_threads} threads; DRAM read {self.dram_read_bytes_s / 1e9:.1f} GB/s"]
        lines.append("CPU FFN  " + _table_text(self.cpu_ffn))
        if self.cpu_ffn_compact is not None:
            lines.append("CPU FFN, compact (per bf16 byte)  " + _table_text(self.cpu_ffn_compact))
        if self.cpu_torch_from_tokens is not None:
            def since(n: int | None) -> str:
                return "never" if n == 0 else ("not measured" if n is None else f"from {n} tokens")

            lines.append(f"torch's GEMMs instead of the kernels: bf16 {since(self.cpu_torch_from_tokens)}, "
                         f"compact {since(self.cpu_torch_from_tokens_compact)}")
        if self.gpu_ffn is not None:
            lines.append("GPU FFN  " + _table_text(self.gpu_ffn))
        if self.pcie_h2d_bytes_s is not None:
            lines.append(f"PCIe pinned host->device {self.pcie_h2d_bytes_s / 1e9:.1f} GB/s, "
                         f"latency {1e6 * (self.pcie_latency_s or 0):.1f} us")
        if self.host_read_bytes_s is not None:
            lines.append(f"CPU and PCIe at once: CPU {self.cpu_with_pcie_bytes_s / 1e9:.1f} GB/s + PCIe "
                         f"{self.pcie_with_cpu_bytes_s / 1e9:.1f} GB/s = host DRAM {self.host_read_bytes_s / 1e9:.1f} GB/s")
        if self.gpu_total_bytes is not None:
            lines.append(f"GPU memory {(self.gpu_free_bytes or 0) / 2**30:.1f} GiB free of {self.gpu_total_bytes / 2**30:.1f} GiB")
        lines.append(f"CPU job round trip {1e6 * self.cpu_job_latency_s:.0f} us; calibrated overheads: per layer "
                     f"{1e3 * self.layer_overhead_s:.2f} ms, +{1e3 * self.cpu_layer_overhead_s:.2f} ms with CPU work, "
                     f"per piece {1e6 * self.piece_overhead_s:.0f} us, "
                     f"per unit in prefill {1e6 * self.prefill_unit_overhead_s:.0f} us, "
                     f"per streamed prefill piece {1e6 * self.stream_host_s:.0f} us (driving thread)")
        lines.append(f"sync {1e6 * self.sync_s:.1f} us; created {self.created} ({self.measure_s:.1f} s of measuring)"
                     + (f"; source: {self.source}" if self.source else ""))
        return "\n".join(lines)


# The fields a calibration against benchmarks of the whole engine sets (not measured by the profiler):
# the serial overheads (additive in the cost model), and the driving thread's streamed-piece work.
SERIAL_OVERHEAD_FIELDS = ("layer_overhead_s", "cpu_layer_overhead_s", "piece_overhead_s", "prefill_unit_overhead_s")
CALIBRATED_FIELDS = (*SERIAL_OVERHEAD_FIELDS, "stream_host_s")


def calibration_of(profile: HardwareProfile) -> dict[str, float]:
    return {name: getattr(profile, name) for name in CALIBRATED_FIELDS}


def _table_text(table: LinearTimeTable) -> str:
    cells = []
    for n in table.num_tokens:
        rate = table.bytes_s(n)
        cells.append(f"{n}: {rate / 1e9:.1f} GB/s" if n < 16 else f"{n}: {table.flops(n) / 1e12:.2f} TF/s")
    return ", ".join(cells)


def read_cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return "unknown"


def current_fingerprint() -> Fingerprint:
    """This machine's fingerprint (initialises CUDA when torch sees a GPU)."""
    import torch

    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return Fingerprint(read_cpu_model(), len(cpus), gpu, torch.__version__)


def profile_dir(cache_dir: str | Path | None = None) -> Path:
    """Where profiles are cached: `cache_dir`, else $SCHEINFER_PROFILE_DIR, else the user cache."""
    if cache_dir is not None:
        return Path(cache_dir)
    configured = os.environ.get(PROFILE_DIR_ENV)
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "scheinfer" / "profiles"


def cached_profile_path(fingerprint: Fingerprint, cache_dir: str | Path | None = None) -> Path:
    return profile_dir(cache_dir) / f"{fingerprint.key}.json"


def load_cached(fingerprint: Fingerprint, cache_dir: str | Path | None = None) -> HardwareProfile | None:
    """The cached profile of this machine, or None (absent, unreadable, or another fingerprint)."""
    path = cached_profile_path(fingerprint, cache_dir)
    try:
        profile = HardwareProfile.from_file(path)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if profile.fingerprint != fingerprint:
        return None
    if profile.profile_format < PROFILE_FORMAT:
        logger.info("cached hardware profile %s is of format %d (now %d): measuring again", path,
                    profile.profile_format, PROFILE_FORMAT)
        return None
    return profile
