"""Where torch's GEMMs overtake the CPU kernels (runner.torch_from_tokens): one host piece of an
expert (gate_up [2n, hidden], down [hidden, n]) at several token counts, bf16 and compact, through
the kernels (forced: SCHEINFER_CPU_TORCH_TOKENS=0) and through the torch path (compact rows
decoded by the kernels' decoder), and what the default routing gives.

    PYTHONPATH=. python3 benchmarks/cpu_torch_crossover.py [--hidden 4096 --rows 1024] [--out FILE]

Both paths get the same threads (the engine's CPU pool sets torch's to the kernels' count).
GFLOP/s, best of 3 after a warm-up; the weights stay in cache on small machines (a compute
comparison: decode-sized rows here say nothing about DRAM rates, see cpu_kernel_bench.py).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from array import array
from collections.abc import Callable

import torch

from engine.cpu_kernels import SliceJob, kernel_info, run_slice_jobs
from engine.cpu_kernels.compact import compact_piece
from engine.cpu_kernels.runner import TORCH_TOKENS_ENV, num_threads, set_num_threads, submit_records
from engine.cpu_kernels.slice_job import activation_fields, compact_weight_fields, record, weight_fields
from engine.cpu_kernels.torch_path import run_torch_jobs
from engine.model.compact_weights import max_region_bytes


def best_s(run: Callable[[], object], repeat: int = 3) -> float:
    run()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=1024, help="intermediate rows of the piece (a host chunk)")
    parser.add_argument("--tokens", default="1,4,8,16,32,64,128,256")
    parser.add_argument("--out", default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="threads of both paths (default: the kernels' pool size, as the engine's CPU pool sets torch's)")
    args = parser.parse_args()
    if args.threads:
        set_num_threads(args.threads)
    torch.set_num_threads(num_threads())  # the engine's CPU pool gives torch the kernels' thread count
    h, n = args.hidden, args.rows
    gen = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(2 * n, h, generator=gen) * 0.02).bfloat16()
    down = (torch.randn(h, n, generator=gen) * 0.02).bfloat16()
    region = torch.empty(max_region_bytes(gate_up.numel() + down.numel()), dtype=torch.uint8)
    piece = compact_piece(gate_up.clone(), down.clone(), region)
    meta = [torch.empty(t.shape, dtype=t.dtype, device="meta") for t in (gate_up, down)]
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(tokens, h, generator=gen).bfloat16()
        out = torch.empty(tokens, h)

        def kernel(fields: tuple[int, ...], x: torch.Tensor = x, out: torch.Tensor = out) -> Callable[[], object]:
            records = array("q", record(activation_fields(x), fields, out.data_ptr(), h))
            return lambda: submit_records(records, 1).wait()

        plain, compact = SliceJob(x, gate_up, down, out), SliceJob(x, meta[0], meta[1], out, piece)
        timings = {"kernel_bf16": best_s(kernel(weight_fields(gate_up, down))),
                   "torch_bf16": best_s(lambda j=plain: run_torch_jobs([j], "silu"))}
        if piece is not None:
            timings["kernel_compact"] = best_s(kernel(compact_weight_fields(piece)))
            timings["torch_compact"] = best_s(lambda j=compact: run_torch_jobs([j], "silu"))
            timings["default_compact"] = best_s(lambda j=compact: run_slice_jobs([j], "silu", check=False))
        timings["default_bf16"] = best_s(lambda j=plain: run_slice_jobs([j], "silu", check=False))
        flops = 2 * tokens * 3 * n * h
        row = {"tokens": tokens, **{k: round(flops / s / 1e9, 1) for k, s in timings.items()}}
        rows.append(row)
        print(f"{tokens:4d} tokens, GFLOP/s: " + "  ".join(f"{k} {v}" for k, v in row.items() if k != "tokens"), flush=True)
    info = kernel_info()
    result = {"date": time.strftime("%Y-%m-%d"), "cpu": info["cpu"], "path": info["path"],
              "threads": info["num_threads"], "torch_threads": torch.get_num_threads(),
              "torch_from_tokens": info["torch_from_tokens"], "env": os.environ.get(TORCH_TOKENS_ENV),
              "hidden": h, "rows": n, "rows_by_tokens": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
