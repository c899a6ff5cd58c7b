"""Probe: host time of one decode FFN piece's partial, eager against a CUDA graph replay.

    PYTHONPATH=. python3 benchmarks/partial_graph_probe.py [--graphs 1024]

Phi-3.5-MoE decode shapes (one token, hidden 4096; a resident piece of 1450 rows, a streamed one
of 1024). Prints the host microseconds per call of: the eager partial (five torch calls, as the
executor), a graph replay of the same kernels, and the capture time and GPU memory of `--graphs`
graphs captured into one pool (each its own piece); checks the replays give the eager bits.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def partial_into(sums_row: torch.Tensor, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> None:
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    sums_row += torch.mm(F.silu(gate) * up, down.t(), out_dtype=torch.float32)


def host_us(run, calls: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        run()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--graphs", type=int, default=1024)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    torch.manual_seed(0)
    dev, hidden = torch.device("cuda"), 4096
    x = torch.randn(1, hidden, device=dev, dtype=torch.bfloat16)
    sums = torch.zeros(2, hidden, device=dev, dtype=torch.float32)
    row = sums[1:2]
    for rows in (1450, 1024):
        gate_up = torch.randn(2 * rows, hidden, device=dev, dtype=torch.bfloat16) * 0.02
        down = torch.randn(hidden, rows, device=dev, dtype=torch.bfloat16) * 0.02
        partial_into(row, x, gate_up, down)
        eager = host_us(lambda gate_up=gate_up, down=down: partial_into(row, x, gate_up, down), args.calls)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            graph.capture_begin()
            partial_into(row, x, gate_up, down)
            graph.capture_end()
        torch.cuda.current_stream().wait_stream(side)
        replay = host_us(graph.replay, args.calls)
        sums.zero_()
        partial_into(row, x, gate_up, down)
        expected = sums.clone()
        sums.zero_()
        graph.replay()
        same = torch.equal(sums, expected)
        print(f"rows {rows}: eager {eager:.1f} us a call, graph replay {replay:.1f} us; same bits {same}")

    # many graphs, one pool, each its own weights (the resident pieces of every layer and expert)
    rows, pieces = 1450, []
    for _ in range(min(args.graphs, 64)):
        pieces.append((torch.randn(2 * rows, hidden, device=dev, dtype=torch.bfloat16) * 0.02,
                       torch.randn(hidden, rows, device=dev, dtype=torch.bfloat16) * 0.02))
    pool = torch.cuda.graph_pool_handle()
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    before = torch.cuda.memory_reserved()
    start = time.perf_counter()
    graphs = []
    with torch.cuda.stream(side):
        for k in range(args.graphs):
            gate_up, down = pieces[k % len(pieces)]
            graph = torch.cuda.CUDAGraph()
            graph.capture_begin(pool=pool)
            partial_into(sums[k % 2 : k % 2 + 1], x, gate_up, down)
            graph.capture_end()
            graphs.append(graph)
    torch.cuda.synchronize()
    capture_s = time.perf_counter() - start
    grown = (torch.cuda.memory_reserved() - before) / 2**20
    print(f"{args.graphs} graphs captured in {capture_s:.2f} s ({capture_s / args.graphs * 1e3:.2f} ms each); "
          f"pool memory reserved +{grown:.1f} MiB")
    start = time.perf_counter()
    for graph in graphs:  # the first replay of each
        graph.replay()
    torch.cuda.synchronize()
    print(f"first replays: {(time.perf_counter() - start) / args.graphs * 1e6:.1f} us a graph (synchronized at the end)")
    order = torch.randint(0, args.graphs, (args.calls,)).tolist()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for k in order:
        graphs[k].replay()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    print(f"random replays among {args.graphs}: {elapsed / args.calls * 1e6:.1f} us a call")


if __name__ == "__main__":
    main()
