"""CPU kernel benchmark: engine.cpu_kernels against torch's bf16 path and the measured DRAM read rate.

    python benchmarks/cpu_kernel_bench.py --out results.json [--sweep] [--pinned]

Decode (1, 2, 4, 8 tokens per expert) reports effective weight bandwidth: weight bytes of the call
over its time. Each call is one layer's CC work: two experts (top-2), a different pair every call,
rotating over more than 2 GB of experts so that no weight is in the last-level cache. Prefill
(64..512 tokens per expert) reports TFLOP/s. The torch baseline is the engine's own slice math
(UnitSlice.partial: F.linear in bf16) with torch's default threads. DRAM read bandwidth is measured
in the same run: torch.sum over a 4 GiB buffer (all threads) and a plain streaming read by the
kernels' own thread pool; the larger is the reference.
"""

from __future__ import annotations

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # before torch allocates: huge pages, like the engine

import argparse
import ctypes
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from engine.cpu_kernels import SliceJob, kernel_info, run_slice_jobs
from engine.cpu_kernels import runner as kernel_runner

MODELS = {  # name: (hidden, n = expert intermediate size, experts in the rotation)
    "mixtral-8x7b": (4096, 14336, 8),
    "phi-3.5-moe": (4096, 6400, 16),
}
DECODE_TOKENS = (1, 2, 4, 8)
PREFILL_TOKENS = (64, 128, 256, 512)
EXPERTS_PER_CALL = 2

Expert = tuple[torch.Tensor, torch.Tensor]  # gate_up [2n, hidden], down [hidden, n]


def _fill(tensor: torch.Tensor, base: torch.Tensor, salt: int) -> None:
    """Random-looking values fast: slices of one random block at shifting offsets."""
    flat = tensor.view(-1)
    chunk = base.numel() // 2
    for i, start in enumerate(range(0, flat.numel(), chunk)):
        end = min(flat.numel(), start + chunk)
        offset = (salt * 7919 + i * 104729) % chunk
        flat[start:end].copy_(base[offset : offset + end - start])


def make_experts(hidden: int, n: int, count: int, pinned: bool) -> list[Expert]:
    base = (torch.randn(1 << 25) * 0.02).bfloat16()
    experts = []
    for e in range(count):
        gate_up = torch.empty(2 * n, hidden, dtype=torch.bfloat16, pin_memory=pinned)
        down = torch.empty(hidden, n, dtype=torch.bfloat16, pin_memory=pinned)
        _fill(gate_up, base, 2 * e)
        _fill(down, base, 2 * e + 1)
        experts.append((gate_up, down))
    return experts


def median_time(call: Callable[[int], None], warmup: int, min_reps: int, min_s: float) -> float:
    """Median seconds of call(i) for i = 0, 1, ... (each i may use other weights)."""
    for i in range(warmup):
        call(i)
    times: list[float] = []
    start = time.perf_counter()
    i = warmup
    while len(times) < min_reps or time.perf_counter() - start < min_s:
        t0 = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - t0)
        i += 1
        if len(times) >= 200:
            break
    return statistics.median(times)


def torch_jobs(jobs: list[SliceJob]) -> None:
    """The engine's torch slice math (UnitSlice.partial), one job after another."""
    for job in jobs:
        gate, up = F.linear(job.x, job.gate_up).chunk(2, dim=-1)
        job.out.copy_(F.linear(F.silu(gate) * up, job.down))


def layer_calls(experts: list[Expert], tokens: int) -> Callable[[int], list[SliceJob]]:
    """i -> the jobs of call i: experts 2i, 2i + 1 (mod count), `tokens` tokens each."""
    hidden = experts[0][0].shape[1]
    xs = [torch.randn(tokens, hidden).bfloat16() for _ in range(EXPERTS_PER_CALL)]
    outs = [torch.empty(tokens, hidden) for _ in range(EXPERTS_PER_CALL)]

    def jobs(i: int) -> list[SliceJob]:
        chosen = [experts[(EXPERTS_PER_CALL * i + k) % len(experts)] for k in range(EXPERTS_PER_CALL)]
        return [SliceJob(xs[k], gu, down, outs[k]) for k, (gu, down) in enumerate(chosen)]

    return jobs


def call_bytes(experts: list[Expert]) -> int:
    gate_up, down = experts[0]
    return EXPERTS_PER_CALL * (gate_up.nbytes + down.nbytes)


def call_flops(experts: list[Expert], tokens: int) -> int:
    gate_up, down = experts[0]
    return EXPERTS_PER_CALL * 2 * tokens * (gate_up.numel() + down.numel())


def run_variant(jobs_of: Callable[[int], list[SliceJob]], variant: str, warmup: int, min_reps: int,
                min_s: float) -> float:
    """Median seconds per call; warmup should cover a whole rotation (every weight touched once)."""
    if variant == "torch":
        return median_time(lambda i: torch_jobs(jobs_of(i)), warmup, min_reps, min_s)
    os.environ["SCHEINFER_CPU_KERNEL"] = variant
    try:
        return median_time(lambda i: run_slice_jobs(jobs_of(i)), warmup, min_reps, min_s)
    finally:
        os.environ["SCHEINFER_CPU_KERNEL"] = "auto"


def compare(jobs_of: Callable[[int], list[SliceJob]], variants: list[str], decode: bool, warmup: int,
            rounds: int = 3) -> dict[str, float]:
    """Median seconds per variant, measured in alternating rounds so that drifts of the shared
    machine hit every variant alike; each round's median is taken, then the median of rounds."""
    per_round: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(rounds):
        for variant in variants:
            per_round[variant].append(run_variant(jobs_of, variant, warmup=warmup if r == 0 else 2,
                                                  min_reps=8 if decode else 2, min_s=0.25 if decode else 0.2))
    return {v: statistics.median(times) for v, times in per_round.items()}


def measure_dram(num_threads: int) -> dict:
    """GB/s reading a 4 GiB buffer: torch.sum (torch's threads) and the kernels' pool."""
    buffer = torch.empty(1 << 30, dtype=torch.float32)
    buffer.fill_(1.5)  # values do not change a streaming read's speed
    torch_s = median_time(lambda i: buffer.sum(), 1, 5, 1.0)
    result = {"bytes": buffer.nbytes, "torch_sum_gbps": buffer.nbytes / torch_s / 1e9,
              "torch_threads": torch.get_num_threads()}
    kernel_runner.available_paths()  # builds the library
    built = kernel_runner._state.built
    if built is not None:
        lib = built.lib
        for threads in sorted({num_threads, os.cpu_count() or num_threads}):
            s = median_time(lambda i, t=threads: lib.scheinfer_stream_read(
                ctypes.c_void_p(buffer.data_ptr()), buffer.nbytes, t), 1, 5, 1.0)
            result[f"pool_read_{threads}t_gbps"] = buffer.nbytes / s / 1e9
    result["dram_read_gbps"] = max(v for k, v in result.items() if k.endswith("_gbps"))
    return result


def bench_model(name: str, pinned: bool, variants_decode: list[str], variants_prefill: list[str]) -> list[dict]:
    hidden, n, count = MODELS[name]
    start = time.perf_counter()
    experts = make_experts(hidden, n, count, pinned)
    print(f"{name}: {count} experts, {count * call_bytes(experts) / EXPERTS_PER_CALL / 1e9:.2f} GB "
          f"({'pinned' if pinned else 'pageable'}), filled in {time.perf_counter() - start:.1f} s", flush=True)
    rows = []
    for phase, token_counts, variants in (("decode", DECODE_TOKENS, variants_decode),
                                          ("prefill", PREFILL_TOKENS, variants_prefill)):
        for tokens in token_counts:
            jobs_of = layer_calls(experts, tokens)
            by_variant = compare(jobs_of, variants, decode=phase == "decode", warmup=count // EXPERTS_PER_CALL)
            for variant, s in by_variant.items():
                rows.append({"model": name, "phase": phase, "tokens": tokens, "variant": variant, "pinned": pinned,
                             "seconds": s, "gbps": call_bytes(experts) / s / 1e9,
                             "tflops": call_flops(experts, tokens) / s / 1e12})
                value = f"{rows[-1]['gbps']:7.1f} GB/s " if phase == "decode" else f"{rows[-1]['tflops']:7.2f} TFLOP/s"
                print(f"  {phase:7s} t={tokens:<4d} {variant:12s} {value} {s * 1e3:7.2f} ms", flush=True)
    return rows


TUNING_KEYS = ("item_bytes", "prefetch_bytes", "decode_rows", "amx_min_tokens", "amx_rows", "amx_prefill_rows",
               "amx_pack_min_tiles", "amx_k_block", "amx_prefetch", "amx_items_per_thread", "spin_us")
SETTING_KEYS = (*TUNING_KEYS, "threads")  # threads: the kernels' pool size for that setting
DEFAULT_SWEEP = ("base:", "no_prefetch:amx_prefetch=0", "rows128:amx_prefill_rows=128",
                 "rows256:amx_prefill_rows=256", "rows256+items4:amx_prefill_rows=256,amx_items_per_thread=4")


def parse_setting(text: str) -> tuple[str, dict[str, int]]:
    """'name:key=value,key=value' -> (name, {key: value}); 'name:' is the defaults."""
    name, _, body = text.partition(":")
    pairs = [item.split("=") for item in body.split(",") if item]
    for pair in pairs:
        if len(pair) != 2 or pair[0] not in SETTING_KEYS:
            raise SystemExit(f"--setting {text!r}: expected name:key=value,... with keys from {SETTING_KEYS}")
    return name, {key: int(value) for key, value in pairs}


def _token_list(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


def sweep(models: list[str], settings: list[tuple[str, dict[str, int]]], decode_tokens: list[int],
          prefill_tokens: list[int], rounds: int = 3) -> list[dict]:
    """Tuning settings against each other on each model, in alternating rounds (like compare())."""
    defaults = {key: kernel_runner.get_tuning(key) for key in TUNING_KEYS}
    default_threads = kernel_runner.num_threads()

    def apply(values: dict[str, int]) -> None:
        for key, value in {**defaults, **values}.items():
            if key != "threads":
                kernel_runner.set_tuning(key, value)
        kernel_runner.set_num_threads(values.get("threads", default_threads))

    rows = []
    for model in models:
        hidden, n, count = MODELS[model]
        experts = make_experts(hidden, n, count, pinned=False)
        for tokens in [*decode_tokens, *prefill_tokens]:
            decode = tokens in decode_tokens
            jobs_of = layer_calls(experts, tokens)
            per_round: dict[str, list[float]] = {name: [] for name, _ in settings}
            phases: dict[str, dict[str, float]] = {}
            for r in range(rounds):
                for name, values in settings:
                    apply(values)
                    kernel_runner.phase_seconds(reset=True)
                    variant = "torch" if name == "torch" else "auto"  # a setting named torch: torch's path
                    per_round[name].append(run_variant(jobs_of, variant, warmup=count // EXPERTS_PER_CALL if r == 0 else 2,
                                                       min_reps=8 if decode else 2, min_s=0.25 if decode else 0.2))
                    phases[name] = kernel_runner.phase_seconds(reset=True)
            apply({})
            for name, values in settings:
                s = statistics.median(per_round[name])
                share = phase_shares(phases[name])
                rows.append({"sweep": name, "settings": values, "model": model, "tokens": tokens, "seconds": s,
                             "rounds_s": per_round[name], "gbps": call_bytes(experts) / s / 1e9,
                             "tflops": call_flops(experts, tokens) / s / 1e12, "phase_share": share})
                print(f"  sweep {model:13s} {name:14s} t={tokens:<4d} {rows[-1]['gbps']:7.1f} GB/s "
                      f"{rows[-1]['tflops']:6.2f} TFLOP/s  phases " +
                      " ".join(f"{k} {v:.0%}" for k, v in share.items()), flush=True)
    return rows


def amx_probe(num_threads: int, iters: int = 200_000) -> list[dict]:
    """The TMUL's own rate on this machine: 4 tdpbf16ps per step with sources resident (mode 0),
    reloaded from L1 (1) or stepping through L1/L2 like the kernel (2); 1 thread and all threads."""
    lib = kernel_runner._library().lib  # type: ignore[union-attr]
    rows = []
    for mode in (0, 1, 2):
        for threads in sorted({1, num_threads}):
            lib.scheinfer_amx_probe(iters // 10, mode, threads)  # warm-up
            seconds = lib.scheinfer_amx_probe(iters, mode, threads)
            if seconds < 0:
                return []
            tflops = threads * iters * 4 * 16 * 16 * 32 * 2 / seconds / 1e12
            rows.append({"mode": mode, "threads": threads, "tflops": tflops, "tflops_per_thread": tflops / threads})
            print(f"amx probe mode {mode} threads {threads:2d}: {tflops:6.2f} TFLOP/s ({tflops / threads:.2f} per thread)",
                  flush=True)
    return rows


def phase_shares(seconds: dict[str, float]) -> dict[str, float]:
    """Share of the kernel calls' time in each phase (pack, gate_up, down), from phase_seconds()."""
    total = sum(v for k, v in seconds.items() if k != "calls")
    return {k: v / total for k, v in seconds.items() if k != "calls"} if total > 0 else {}


def summary(rows: list[dict], dram_gbps: float) -> list[str]:
    lines = [f"DRAM read: {dram_gbps:.1f} GB/s", "",
             f"{'model':14s} {'phase':8s} {'tok':>4s} {'kernel':>9s} {'torch':>8s} {'x torch':>8s} {'% DRAM':>7s}  path"]
    keys = sorted({(r["model"], r["phase"], r["tokens"]) for r in rows if not r["pinned"]},
                  key=lambda k: (k[0], k[1], k[2]))
    for model, phase, tokens in keys:
        by = {r["variant"]: r for r in rows if (r["model"], r["phase"], r["tokens"]) == (model, phase, tokens)
              and not r["pinned"]}
        kernel, base = by.get("auto"), by.get("torch")
        if kernel is None or base is None:
            continue
        unit = "gbps" if phase == "decode" else "tflops"
        dram = f"{100 * kernel['gbps'] / dram_gbps:6.1f}%" if phase == "decode" else "      -"
        lines.append(f"{model:14s} {phase:8s} {tokens:4d} {kernel[unit]:9.2f} {base[unit]:8.2f} "
                     f"{kernel['seconds'] and base['seconds'] / kernel['seconds']:8.2f} {dram}  "
                     f"{'GB/s' if unit == 'gbps' else 'TFLOP/s'}")
    return lines


SELF_CHECK = """
import torch, torch.nn.functional as F
from engine.cpu_kernels import SliceJob, run_slice_jobs, job_path
worst = 0.0
for i, (t, h, n) in enumerate([(1, 4096, 512), (8, 4096, 96), (64, 4096, 256), (200, 1024, 64)]):
    g = torch.Generator().manual_seed(i)
    x = torch.randn(t, h, generator=g).bfloat16()
    gu, d = (torch.randn(2 * n, h, generator=g) * 0.05).bfloat16(), (torch.randn(h, n, generator=g) * 0.05).bfloat16()
    job = SliceJob(x, gu, d, torch.full((t, h), float("nan")))
    run_slice_jobs([job])
    a, b = (x.double() @ gu.double().T).chunk(2, -1)
    ref = (F.silu(a) * b).float().bfloat16().double() @ d.double().T
    worst = max(worst, ((job.out.double() - ref).norm() / ref.norm()).item())
    print(job_path(job), t, h, n)
print("worst", worst)
"""


def self_check(paths: list[str]) -> dict[str, str]:
    """Each path on a few jobs in a child process (a crash there cannot take the benchmark down)."""
    results = {}
    for path in paths:
        env = dict(os.environ, SCHEINFER_CPU_KERNEL=path)
        done = subprocess.run([sys.executable, "-c", SELF_CHECK], env=env, capture_output=True, text=True,
                              timeout=300)
        worst = [line for line in done.stdout.splitlines() if line.startswith("worst")]
        ok = done.returncode == 0 and worst and float(worst[0].split()[1]) < 1e-4
        results[path] = ("ok " if ok else "FAILED ") + (worst[0] if worst else f"rc={done.returncode} "
                                                      + done.stderr[-300:])
        print(f"self-check {path}: {results[path]}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="cpu_kernel_bench.json")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--sweep", action="store_true", help="also sweep the tuning knobs (--setting, or a default set)")
    parser.add_argument("--sweep-only", action="store_true", help="only the sweep (no comparison with torch)")
    parser.add_argument("--setting", action="append", default=[],
                        help="a sweep setting 'name:key=value,...' ('name:' = the defaults; 'torch:' = torch's path, "
                             "for ratios taken side by side); repeatable")
    parser.add_argument("--tune", default="", help="tuning for the main comparison: key=value,... (see TUNING_KEYS)")
    parser.add_argument("--sweep-decode", default="4,8", help="token counts of the decode sweep")
    parser.add_argument("--sweep-prefill", default="128,256", help="token counts of the prefill sweep")
    parser.add_argument("--pinned", action="store_true", help="also run decode on pinned (cudaHostAlloc) weights")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script itself")
    parser.add_argument("--no-amx", action="store_true", help="never take the AMX path")
    parser.add_argument("--amx-probe", action="store_true", help="also measure the TMUL's own rate (amx_probe)")
    args = parser.parse_args()
    if args.smoke:
        MODELS.update({name: (512, 768, 3) for name in MODELS})

    info = kernel_info()
    print(json.dumps(info, indent=1), flush=True)
    checks = self_check(kernel_runner.available_paths())
    if args.no_amx or not checks.get("amx", "ok").startswith("ok"):
        kernel_runner.set_tuning("amx_min_tokens", 1 << 30)
    available = [p for p in kernel_runner.available_paths() if checks[p].startswith("ok")]
    if args.no_amx and "amx" in available:
        available.remove("amx")
    for key, value in parse_setting("tune:" + args.tune)[1].items():
        kernel_runner.set_tuning(key, value)
    dram = measure_dram(kernel_runner.num_threads())
    print(f"DRAM read bandwidth: {json.dumps(dram)}", flush=True)
    probe = amx_probe(kernel_runner.num_threads()) if args.amx_probe and "amx" in available else []
    decode_variants = ["auto", "torch"] + [p for p in ("avx512_bf16", "avx2") if p in available[:-1]]
    prefill_variants = ["auto", "torch"] + (["avx512_bf16"] if "amx" in available else [])
    rows: list[dict] = []
    for name in [] if args.sweep_only else args.models:
        rows += bench_model(name, False, decode_variants, prefill_variants)
    if args.pinned and torch.cuda.is_available() and not args.sweep_only:
        rows += bench_model(args.models[0], True, ["auto"], [])
    sweeps = []
    if args.sweep or args.sweep_only:
        settings = [parse_setting(text) for text in (args.setting or DEFAULT_SWEEP)]
        sweeps = sweep(args.models, settings, _token_list(args.sweep_decode), _token_list(args.sweep_prefill))
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "host": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                 "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "kernel_info": info,
        "self_check": checks,
        "tuning": {k: kernel_runner.get_tuning(k) for k in TUNING_KEYS},
        "dram": dram,
        "amx_probe": probe,
        "rows": rows,
        "sweeps": sweeps,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("\n".join(summary(rows, dram["dram_read_gbps"])))


if __name__ == "__main__":
    main()
