"""llama.cpp as a peer baseline: llama-bench on random-weight GGUFs, scaled to the full model.

    python3 benchmarks/llamacpp_bench.py --out $OUT/llamacpp_mixtral.json            # GPU machine
    python3 benchmarks/llamacpp_bench.py --cpu-only --tiny --layers 1,2 --out t.json  # smoke test

Why: DESIGN.md compares ScheInfer with llama.cpp on the same machine and weights, with llama.cpp
set up the way its users run a MoE model bigger than the GPU: every layer on the GPU (`-ngl 99`)
except the experts of the first `--budget-fraction` of the layers, kept on the CPU
(`-ot 'blk\\.(0|1|..)\\.ffn_(up|down|gate)_exps=CPU'`), weights read into host buffers
(`-lm none`, i.e. no mmap: the CPU-resident experts land in pinned memory, which its large-batch
GPU offload reads fast). The full Mixtral (93 GB) does not fit on the GPU machine's 64 GB disk,
so the model is written with `--layers` = two counts (default 4 and 8) and the time per token is
fitted as a + b * layers, then evaluated at the full model's layer count, for decode (tg) and
prefill (pp) separately.

Steps: (1) build llama-bench from the carried source tarball with the build script kept next to
it (`.cache/llamacpp/build_llamacpp.sh`, not committed: the workplace forbids committing recipes
that build fetched code), or reuse one (`--skip-build DIR`); (2) per layer count: write the GGUF
(`llamacpp_gguf.py`), run llama-bench with JSON output, delete the GGUF; (3) fit and write
`--out` with the raw llama-bench output, the fit and the scaled tokens/s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llamacpp_gguf import REPO_ROOT, load_shape, tensor_plan, write_gguf

DEFAULT_TARBALL = REPO_ROOT / ".cache" / "llamacpp" / "llama.cpp-src.tar.gz"
DEFAULT_BUILD_SCRIPT = REPO_ROOT / ".cache" / "llamacpp" / "build_llamacpp.sh"


def log(msg: str) -> None:
    print(f"[llamacpp_bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build(args) -> tuple[Path, dict]:
    """Run the build script; return the llama-bench binary and what the build reported."""
    if not args.build_script.exists():
        raise SystemExit(f"no build script {args.build_script} (see benchmarks/README.md, llama.cpp baseline)")
    cmd = ["bash", str(args.build_script), str(args.tarball), str(args.work_dir), "--jobs", str(args.jobs)]
    cmd += ["--cpu-only"] if args.cpu_only else []
    cmd += ["--cuda-fa"] if args.cuda_fa else []
    log("build: " + " ".join(cmd))
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    elapsed_s = time.perf_counter() - start
    print(proc.stdout + proc.stderr, flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"build failed (rc {proc.returncode})")
    log(f"build took {elapsed_s:.1f} s")
    return args.work_dir / "build" / "bin" / "llama-bench", {"build_s": elapsed_s, "build_log": proc.stdout[-2000:]}


def find_binary(build_dir: Path) -> Path:
    for p in (build_dir / "bin" / "llama-bench", build_dir / "llama-bench"):
        if p.exists():
            return p
    raise SystemExit(f"no llama-bench under {build_dir}")


def build_info(binary: Path) -> dict:
    info = {"binary": str(binary)}
    for name in ("LLAMACPP_COMMIT", "BUILD_FLAGS"):
        p = binary.parent.parent / name
        if p.exists():
            info[name.lower()] = p.read_text().strip()
    return info


def cpu_expert_override(num_cpu_layers: int) -> str | None:
    """llama-bench -ot value keeping the experts of layers 0..num_cpu_layers-1 on the CPU."""
    if num_cpu_layers <= 0:
        return None
    layers = "|".join(str(i) for i in range(num_cpu_layers))
    return rf"blk\.({layers})\.ffn_(up|down|gate)_exps=CPU"


def bench_command(args, binary: Path, gguf: Path, num_layers: int) -> list[str]:
    cmd = [str(binary), "-m", str(gguf), "-p", args.prompt, "-n", args.gen, "-t", args.threads,
           "-r", str(args.reps), "-lm", args.load_mode, "-fa", args.fa, "-o", "json", "-v"]
    if args.cpu_only:
        cmd += ["-ngl", "0"]
    else:
        cmd += ["-ngl", "99"]
        override = cpu_expert_override(round(args.budget_fraction * num_layers))
        cmd += ["-ot", override] if override else []
    return cmd + args.extra_args.split()


def run_bench(cmd: list[str], timeout_s: float) -> tuple[list[dict], str]:
    log("run: " + " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        print(proc.stdout[-4000:] + proc.stderr[-8000:], flush=True)
        raise SystemExit(f"llama-bench failed (rc {proc.returncode})")
    return json.loads(proc.stdout), proc.stderr


def load_info(stderr: str) -> list[str]:
    """llama-bench -v lines saying where the weights went (first model load only)."""
    lines = [ln for ln in stderr.splitlines() if re.search(r"buffer size =|offload", ln)]
    return lines[:20]


def test_key(t: dict) -> str:
    kind = "pp" if t["n_gen"] == 0 else "tg"
    n = t["n_prompt"] if kind == "pp" else t["n_gen"]
    return f"{kind}{n}_t{t['n_threads']}_ub{t['n_ubatch']}_fa{t.get('flash_attn', '')}"


def seconds_per_token(t: dict) -> float:
    return statistics.median(t["samples_ns"]) / 1e9 / (t["n_prompt"] + t["n_gen"])


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x (exact through two points)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def fit_and_scale(runs: list[dict], target_layers: int) -> dict:
    by_key: dict[str, dict[int, float]] = {}
    for run in runs:
        for t in run["llama_bench"]:
            by_key.setdefault(test_key(t), {})[run["num_layers"]] = seconds_per_token(t)
    out = {}
    for key, points in by_key.items():
        if len(points) < 2:
            continue
        xs = sorted(points)
        a, b = fit_line(xs, [points[x] for x in xs])
        s = a + b * target_layers
        out[key] = {"layers": xs, "s_per_token": [points[x] for x in xs],
                    "tok_per_s_measured": [1 / points[x] for x in xs], "a_s": a, "b_s_per_layer": b,
                    "target_layers": target_layers, "s_per_token_scaled": s, "tok_per_s_scaled": 1 / s}
    return out


def machine_info() -> dict:
    info = {"host": platform.node(), "cpu_count": os.cpu_count()}
    cpuinfo = Path("/proc/cpuinfo")
    models = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
              if ln.startswith("model name")] if cpuinfo.exists() else []
    info["cpu"] = models[0] if models else None
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True)
        info["gpu"] = q.stdout.strip()
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="result JSON")
    ap.add_argument("--model", default="mixtral-8x7b", help="configs/models/<model>.json (mixtral-8x7b, phi-3.5-moe)")
    ap.add_argument("--layers", default="4,8", help="layer counts to time (comma list, at least two)")
    ap.add_argument("--target-layers", type=int, default=None, help="scale to this many layers (default: the model's)")
    ap.add_argument("--budget-fraction", type=float, default=0.75, help="fraction of layers whose experts stay on the CPU")
    ap.add_argument("--tiny", action="store_true", help="small dimensions (llamacpp_gguf.py --tiny), for tests")
    ap.add_argument("--cpu-only", action="store_true", help="CPU-only build and run (-ngl 0)")
    ap.add_argument("--threads", default="16", help="llama-bench -t (comma list)")
    ap.add_argument("--prompt", default="512", help="llama-bench -p (comma list)")
    ap.add_argument("--gen", default="128", help="llama-bench -n (comma list)")
    ap.add_argument("--reps", type=int, default=3, help="llama-bench -r")
    ap.add_argument("--fa", default=None, help="llama-bench -fa (default: on with --cuda-fa or --cpu-only, else off)")
    ap.add_argument("--load-mode", default="none", help="llama-bench -lm (none = no mmap, host buffers)")
    ap.add_argument("--extra-args", default="", help="more llama-bench arguments, e.g. '-ub 2048 -b 2048'")
    ap.add_argument("--tarball", type=Path, default=DEFAULT_TARBALL)
    ap.add_argument("--build-script", type=Path, default=DEFAULT_BUILD_SCRIPT)
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/llamacpp"), help="where the sources are extracted and built")
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--cuda-fa", action="store_true", help="build the CUDA FlashAttention kernels (longer build)")
    ap.add_argument("--skip-build", type=Path, default=None, metavar="DIR", help="use DIR/bin/llama-bench")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--gguf-dir", type=Path, default=Path("/tmp"))
    ap.add_argument("--keep-gguf", action="store_true")
    ap.add_argument("--bench-timeout-s", type=float, default=1200)
    args = ap.parse_args()
    if args.fa is None:
        args.fa = "on" if (args.cuda_fa or args.cpu_only) else "off"

    result: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine_info()}
    if args.skip_build:
        binary = find_binary(args.skip_build)
    else:
        binary, result["build"] = build(args)
    result["build_info"] = build_info(binary)
    if args.build_only:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        return

    gguf_py = args.work_dir / "llama.cpp" / "gguf-py"
    gguf_py = gguf_py if (gguf_py / "gguf").exists() else None
    layer_counts = [int(x) for x in args.layers.split(",")]
    target_layers = args.target_layers or load_shape(args.model).num_layers
    result["runs"] = []
    for num_layers in layer_counts:
        if not args.cpu_only and abs(args.budget_fraction * num_layers - round(args.budget_fraction * num_layers)) > 1e-9:
            log(f"warning: {args.budget_fraction} x {num_layers} layers is not whole; rounded")
        shape = load_shape(args.model, num_layers, args.tiny)
        need = sum(math.prod(t[1]) * (2 if t[2] == "bf16" else 4) for t in tensor_plan(shape))
        free = shutil.disk_usage(args.gguf_dir).free
        if need * 1.05 > free:
            raise SystemExit(f"{num_layers} layers need {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free in {args.gguf_dir}")
        gguf = args.gguf_dir / f"llamacpp_{shape.name}_{num_layers}l.gguf"
        try:
            log(f"writing {gguf} ({need / 1e9:.2f} GB)")
            written = write_gguf(gguf, shape, seed=num_layers, gguf_py_dir=gguf_py)
            log(f"wrote in {written['write_s']:.1f} s ({written['write_gb_per_s']:.2f} GB/s)")
            cmd = bench_command(args, binary, gguf, num_layers)
            start = time.perf_counter()
            tests, stderr = run_bench(cmd, args.bench_timeout_s)
            bench_s = time.perf_counter() - start
        finally:
            if not args.keep_gguf:
                gguf.unlink(missing_ok=True)
        num_cpu_layers = 0 if args.cpu_only else round(args.budget_fraction * num_layers)
        for t in tests:
            log(f"{num_layers} layers, {test_key(t)}: {t['avg_ts']:.2f} tok/s (median {1 / seconds_per_token(t):.2f})")
        result["runs"].append({"num_layers": num_layers, "num_cpu_expert_layers": num_cpu_layers,
                               "gguf": written, "command": cmd, "bench_s": bench_s, "llama_bench": tests,
                               "load_info": load_info(stderr)})
    result["fit"] = fit_and_scale(result["runs"], target_layers)
    result["summary_tok_per_s_scaled"] = {k: f["tok_per_s_scaled"] for k, f in result["fit"].items()}
    for key, f in result["fit"].items():
        log(f"{key}: {f['tok_per_s_scaled']:.2f} tok/s at {target_layers} layers "
            f"(a {f['a_s'] * 1e3:.3f} ms + {f['b_s_per_layer'] * 1e3:.3f} ms/layer per token)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
