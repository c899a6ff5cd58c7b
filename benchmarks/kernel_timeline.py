"""Prints the GPU's events (kernels, copies, stream memory operations) of a stretch of a Chrome trace
written by `decode_profile.py --kernel-trace`, one line each: start (us from the first printed),
duration, stream, name. What a decode layer's chain is made of on the GPU.

    python benchmarks/kernel_timeline.py TRACE.json[.gz] --after _sparsemixer_kernel --skip 40 --count 300
"""

from __future__ import annotations

import argparse
import gzip
import json

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def gpu_events(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES]
    return sorted(events, key=lambda e: e["ts"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace")
    parser.add_argument("--after", default="", help="start at the first event whose name contains this")
    parser.add_argument("--skip", type=int, default=0, help="then skip this many of those events")
    parser.add_argument("--count", type=int, default=200)
    args = parser.parse_args()
    events = gpu_events(args.trace)
    marks = [i for i, e in enumerate(events) if args.after in e["name"]]
    begin = marks[min(args.skip, len(marks) - 1)] if marks else 0
    shown = events[begin : begin + args.count]
    origin = shown[0]["ts"] if shown else 0.0
    previous_end = origin
    for e in shown:
        gap = e["ts"] - previous_end
        stream = e.get("args", {}).get("stream", "?")
        print(f"{e['ts'] - origin:9.1f} {e['dur']:7.1f} gap {gap:6.1f}  s{stream:<3} {e['name'][:80]}")
        previous_end = max(previous_end, e["ts"] + e["dur"])


if __name__ == "__main__":
    main()
