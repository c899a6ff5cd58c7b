"""Compact host weights (engine/model/compact_weights.py) against bf16, per resource, side by side.

    python benchmarks/compact_bench.py --out results.json

CPU: the kernels on Mixtral-shaped pieces (1024 rows of a 4096 x 14336 expert), 8 pieces a call as
in one decode layer, rotated over more memory than the last-level cache: time per call, bytes read
per second and bf16 bytes per second (what the same weights would move as bf16). GPU: the pinned
copy of a piece and the decoder in its slot. Both formats in one process, alternating.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from engine.cpu_kernels import SliceJob, run_slice_jobs
from engine.cpu_kernels.compact import compact_piece
from engine.cpu_kernels.runner import get_tuning, num_threads, set_tuning
from engine.model.compact_weights import max_region_bytes


def make_pieces(count: int, hidden: int, rows: int) -> list[tuple[torch.Tensor, torch.Tensor, object]]:
    pieces = []
    for i in range(count):
        gen = torch.Generator().manual_seed(i)
        gate_up = (torch.randn(2 * rows, hidden, generator=gen) * 0.02).bfloat16()
        down = (torch.randn(hidden, rows, generator=gen) * 0.02).bfloat16()
        region = torch.empty(max_region_bytes(gate_up.numel() + down.numel()), dtype=torch.uint8)
        pieces.append((gate_up, down, compact_piece(gate_up, down, region)))
    return pieces


def time_cpu(pieces, per_call: int, tokens: int, compact: bool, repeats: int) -> list[float]:
    hidden = pieces[0][0].shape[1]
    x = torch.randn(tokens, hidden).bfloat16()
    outs = [torch.empty(tokens, hidden) for _ in range(per_call)]
    times = []
    for r in range(repeats):
        start = (r * per_call) % len(pieces)
        chosen = [pieces[(start + i) % len(pieces)] for i in range(per_call)]
        jobs = []
        for (gu, dn, cp), out in zip(chosen, outs, strict=True):
            if compact:
                jobs.append(SliceJob(x, torch.empty(gu.shape, dtype=gu.dtype, device="meta"),
                                     torch.empty(dn.shape, dtype=dn.dtype, device="meta"), out, cp))
            else:
                jobs.append(SliceJob(x, gu, dn, out))
        t0 = time.perf_counter()
        run_slice_jobs(jobs, check=False)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pieces", type=int, default=64)  # 64 x 25 MB bf16: well over the LLC
    parser.add_argument("--per-call", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--item-bytes", default="", help="also time compact jobs with these work-item sizes (comma list)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    hidden, rows = 4096, 1024
    pieces = make_pieces(args.pieces, hidden, rows)
    bf16_bytes = pieces[0][0].nbytes + pieces[0][1].nbytes
    compact_bytes = pieces[0][2].num_bytes
    result = {"date": time.strftime("%Y-%m-%d"), "threads": num_threads(), "piece_bf16_bytes": bf16_bytes,
              "piece_compact_bytes": compact_bytes, "cpu": {}, "gpu": {}}
    for tokens in (1, 2, 4):
        for fmt in ("bf16", "compact", "bf16", "compact"):
            t = statistics.median(time_cpu(pieces, args.per_call, tokens, fmt == "compact", args.repeats))
            moved = args.per_call * (compact_bytes if fmt == "compact" else bf16_bytes)
            entry = {"call_ms": t * 1e3, "read_gb_s": moved / t / 1e9, "bf16_gb_s": args.per_call * bf16_bytes / t / 1e9}
            result["cpu"].setdefault(f"{tokens}:{fmt}", []).append(entry)
            print(f"cpu tokens={tokens} {fmt:8} {t * 1e3:7.3f} ms/call  read {entry['read_gb_s']:6.1f} GB/s  "
                  f"bf16-equivalent {entry['bf16_gb_s']:6.1f} GB/s", flush=True)
    default_item = get_tuning("item_bytes")
    for item in [int(v) for v in args.item_bytes.split(",") if v]:
        set_tuning("item_bytes", item)
        for tokens in (1, 4):
            t = statistics.median(time_cpu(pieces, args.per_call, tokens, True, args.repeats))
            gbs = args.per_call * bf16_bytes / t / 1e9
            result["cpu"][f"{tokens}:compact:item={item}"] = gbs
            print(f"cpu tokens={tokens} compact item_bytes={item:7d} {t * 1e3:7.3f} ms/call  bf16-equivalent "
                  f"{gbs:6.1f} GB/s", flush=True)
    set_tuning("item_bytes", default_item)
    if torch.cuda.is_available():
        from engine.executor.gpu_unpack import unpack_piece

        gu, dn, cp = pieces[0]
        host_bf16 = torch.cat((gu.reshape(-1), dn.reshape(-1))).pin_memory()
        host_compact = cp.region.pin_memory()
        dev_bf16 = torch.empty_like(host_bf16, device="cuda")
        dev_compact = torch.empty_like(host_compact, device="cuda")
        for name, fn in (("copy_bf16", lambda: dev_bf16.copy_(host_bf16, non_blocking=True)),
                         ("copy_compact", lambda: dev_compact.copy_(host_compact, non_blocking=True)),
                         ("decode", lambda: unpack_piece(dev_compact, cp, dev_bf16))):
            for _ in range(3):
                fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                fn()
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / 20
            result["gpu"][name] = ms
            print(f"gpu {name:13} {ms:7.3f} ms per piece", flush=True)
        t0 = time.perf_counter()
        for _ in range(200):
            unpack_piece(dev_compact, cp, dev_bf16)
        result["gpu"]["decode_launch_us"] = (time.perf_counter() - t0) / 200 * 1e6
        torch.cuda.synchronize()
        print(f"gpu decode launch {result['gpu']['decode_launch_us']:.1f} us (host)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
