"""Reads a torch.profiler Chrome trace of decode steps (decode_profile.py --kernel-trace) and prints
one stretch of it as a time-ordered list: every GPU kernel and copy (with its stream) and the host's
CUDA runtime calls that wait (event and stream synchronizations), relative to the first event shown.

    python3 benchmarks/trace_layers.py TRACE.json[.gz] [--skip-ms 30] [--span-ms 6]

What it is for: seeing where a decode layer's serial chain goes (the CPU job's results copied in,
the sum, the next layer's graph, the routing copied out, the host waking up).
"""

from __future__ import annotations

import argparse
import gzip
import json


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("trace")
    parser.add_argument("--skip-ms", type=float, default=30.0, help="start this far into the GPU activity")
    parser.add_argument("--span-ms", type=float, default=6.0)
    args = parser.parse_args()
    events = [e for e in load(args.trace) if e.get("ph") == "X" and "ts" in e and "dur" in e]
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    waits = [e for e in events if e.get("cat") == "cuda_runtime" and "Synchronize" in e.get("name", "")]
    if not gpu:
        print("no GPU events in the trace")
        return
    origin = min(e["ts"] for e in gpu) + args.skip_ms * 1e3
    end = origin + args.span_ms * 1e3
    shown = sorted((e for e in gpu + waits if origin <= e["ts"] < end), key=lambda e: e["ts"])
    for e in shown:
        where = "host" if e.get("cat") == "cuda_runtime" else f"stream {e.get('args', {}).get('stream', '?')}"
        print(f"{(e['ts'] - origin):9.1f} {e['dur']:8.1f}  {where:10} {e['name'][:90]}")


if __name__ == "__main__":
    main()
