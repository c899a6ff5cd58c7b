"""Decode and prefill speed of each partition policy on one model under one GPU budget, side by
side in one run, next to the floor computed from rates measured in the same run.

    python benchmarks/partition_bench.py --model mixtral-8x7b --budget 24GiB --prompt-len 512 \\
        --new-tokens 32 --final-tokens 128 --sweep 0.3,0.4,0.5,0.6,0.8 --out results.json

The model is built once (random weights, resident share fixed by the budget); policies switch by
re-labelling host pieces (no weight moves), so every policy runs on the same weights and GG share.
"""

from __future__ import annotations

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from engine import LLM, SamplingParams
from engine.executor.timeline import TraceRecorder
from engine.placement.memory import bytes_per_row


def _median_s(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _pinned_copy_s(numel: int, dtype: torch.dtype) -> float:
    pinned = torch.empty(numel, dtype=dtype, pin_memory=True).fill_(0.5)
    dst = torch.empty_like(pinned, device="cuda")
    return _median_s(lambda: dst.copy_(pinned, non_blocking=True))


def measure_rates(hidden: int, rows: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """Pinned host->device bandwidth, DRAM read bandwidth and torch's CPU GEMV/GEMM rates, on
    buffers much larger than the last-level cache (measured before the model takes the memory)."""
    gib = (1 << 30) // torch.empty((), dtype=dtype).element_size()
    pcie_s = _pinned_copy_s(gib, dtype)
    big = torch.empty(8 * gib, dtype=dtype).fill_(0.5)
    big_fp32 = big.view(torch.float32)  # same bytes; fp32 sum is a vectorised streaming read
    dram_s = _median_s(lambda: big_fp32.sum(), repeat=3)
    piece = rows * hidden  # one expert's gate+up sized matrix, rotated over the buffer
    weights = [big[i * piece : (i + 1) * piece].view(rows, hidden) for i in range(min(16, big.numel() // piece))]
    x1 = torch.randn(1, hidden, dtype=dtype)
    x64 = torch.randn(64, hidden, dtype=dtype)
    gemv_s = _median_s(lambda: [F.linear(x1, w) for w in weights], repeat=3) / len(weights)
    gemm_s = _median_s(lambda: [F.linear(x64, w) for w in weights[:4]], repeat=3) / 4
    return {"pcie_pinned_bytes_s": gib * 2 / pcie_s, "dram_read_bytes_s": big.nbytes / dram_s,
            "cpu_gemv_bytes_s": weights[0].nbytes / gemv_s, "cpu_gemm64_flops": 2 * 64 * piece / gemm_s}


def run_policy(llm: LLM, prompt: list[int], new_tokens: int, traced_tokens: int = 8) -> dict[str, float]:
    engine = llm.engine
    warm = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    llm.generate(prompt_token_ids=[prompt[:32]], params=warm)
    engine.add_request("bench", prompt, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True))
    step_s = []
    while engine.has_unfinished_requests():
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        step_s.append(time.perf_counter() - start)
    prefill_s, decode_s = step_s[0], step_s[2:]  # the first decode step warms the decode path
    engine.runner.trace = TraceRecorder()  # a short traced run for busy fractions
    llm.generate(prompt_token_ids=[prompt[:64]], params=SamplingParams(max_tokens=traced_tokens, ignore_eos=True))
    decode_steps = [s for s in engine.runner.trace.steps if s.kind == "decode"]
    trace = TraceRecorder(decode_steps).summary()
    engine.runner.trace = None
    return {"prefill_s": prefill_s, "prefill_tok_s": len(prompt) / prefill_s,
            "decode_s_per_token": statistics.median(decode_s), "decode_tok_s": 1 / statistics.median(decode_s),
            "decode_cpu_busy": trace["cpu_busy"], "decode_pcie_busy": trace["pcie_busy"],
            "decode_gpu_busy": trace["gpu_busy"], "decode_overlap": trace["overlap"]}


def floors(llm: LLM, rates: dict[str, float], prompt_len: int) -> dict[str, float]:
    """Decode: the routed experts' host bytes read by the CPU and streamed over PCIe at once.
    Prefill: every host byte moved once, split between PCIe and CPU GEMM at the measured rates."""
    config = llm.engine.model_config
    plan = llm.engine.partition.plan
    row = bytes_per_row(config, 2)
    host_rows = sum(s.cg + s.cc for s in plan.splits.values())
    num_units = len(plan.splits)
    moe = config.moe
    active_units = config.num_layers * (moe.num_experts_per_tok if moe else 1)
    active_host_bytes = host_rows / num_units * active_units * row
    decode_s = active_host_bytes / (rates["dram_read_bytes_s"] + rates["pcie_pinned_bytes_s"])
    tokens_per_unit = prompt_len * (moe.num_experts_per_tok / moe.num_experts if moe else 1)
    cpu_bytes_s = rates["cpu_gemm64_flops"] / tokens_per_unit  # 2 flops per weight (2 bytes) per token
    prefill_s = host_rows * row / (rates["pcie_pinned_bytes_s"] + cpu_bytes_s)
    return {"decode_floor_tok_s": 1 / decode_s, "prefill_floor_tok_s": prompt_len / prefill_s,
            "active_host_bytes_per_token": active_host_bytes}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mixtral-8x7b")
    parser.add_argument("--budget", default="24GiB")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32, help="decode tokens measured per fixed policy")
    parser.add_argument("--final-tokens", type=int, default=128, help="decode tokens for the best split and balanced")
    parser.add_argument("--sweep", default="0.2,0.3,0.4,0.5,0.6")
    parser.add_argument("--sweep-tokens", type=int, default=32)
    parser.add_argument("--policies", default="cpu-experts,stream,fiddler",
                        help="'adaptive' re-applies the build plan when --build-policy is adaptive")
    parser.add_argument("--build-policy", default="manual:cg=0",
                        help="plan the model is built with (sets the resident share every policy shares)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from engine.model.factory import resolve_model_config
    model_config, _ = resolve_model_config(args.model)
    widest = max(model_config.intermediate_size, model_config.moe.expert_intermediate_size if model_config.moe else 0)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    rates = measure_rates(model_config.hidden_size, 2 * widest)
    print("rates", json.dumps(rates), flush=True)
    start = time.perf_counter()
    llm = LLM(args.model, device="cuda", random_weights=True, gpu_memory_budget=args.budget, policy=args.build_policy,
              kv_cache_tokens=4096, max_num_seqs=8, show_progress=False)
    build_s = time.perf_counter() - start
    partition = llm.engine.partition
    config = llm.engine.model_config
    result = {"date": time.strftime("%Y-%m-%d"), "model": args.model, "budget": args.budget,
              "device": torch.cuda.get_device_name(), "build_s": build_s, "memory": partition.memory.describe(),
              "resident_fraction": partition.plan.rows_by_kind()["GG"] / sum(s.size for s in partition.plan.splits.values()),
              "rates": rates, "floor": floors(llm, rates, args.prompt_len), "policies": {}}
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (args.prompt_len,), generator=generator).tolist()
    build_plan = partition.plan
    # warm-up: first touches of the host weights, kernel build and thread start-up, cuDNN/flash setup
    llm.generate(prompt_token_ids=[prompt], params=SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    for policy in args.policies.split(","):
        partition.repartition(build_plan if policy == "adaptive" else policy)
        result["policies"][policy] = run_policy(llm, prompt, args.new_tokens)
        if policy == "adaptive":
            result["policies"][policy]["predicted"] = _prediction(llm, args.prompt_len)
        print(policy, json.dumps(result["policies"][policy]), flush=True)
    sweep = {}
    for share in filter(None, args.sweep.split(",")):
        policy = f"manual:cg={share}"
        partition.repartition(policy)
        sweep[policy] = run_policy(llm, prompt, args.sweep_tokens)
        print(policy, json.dumps(sweep[policy]), flush=True)
    result["sweep"] = sweep
    if not sweep:
        _save_and_print(args, result, rates, build_s)
        return
    best = max(sweep, key=lambda p: sweep[p]["decode_tok_s"])
    best_prefill = max(sweep, key=lambda p: sweep[p]["prefill_tok_s"])
    result["best_decode_split"], result["best_prefill_split"] = best, best_prefill
    partition.repartition(best)
    result["policies"][f"best {best}"] = run_policy(llm, prompt, args.final_tokens)
    balanced = "balanced:" + best.split(":", 1)[1]  # the decode-best split, token assignment each step
    partition.repartition(balanced)
    result["policies"][balanced] = run_policy(llm, prompt, args.final_tokens)
    _save_and_print(args, result, rates, build_s)
    print(f"best split for decode: {best}; for prefill: {best_prefill}")


def _prediction(llm: LLM, prompt_len: int) -> dict[str, float]:
    """What the adaptive planner predicted for the plan in force (engine/placement/planner.py)."""
    from engine.placement.planner import predict
    from engine.placement.profiler import engine_profile

    partition = llm.engine.partition
    config = llm.engine.model_config
    prediction = predict(partition.plan, config, engine_profile(config), partition.request)
    return {"decode_tok_s": prediction.decode_tok_s, "prefill_tok_s": prompt_len / prediction.prefill_s(prompt_len)}


def _save_and_print(args: argparse.Namespace, result: dict, rates: dict[str, float], build_s: float) -> None:
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    fl = result["floor"]
    print(f"\n{args.model} @ {args.budget}, prompt {args.prompt_len}, {args.new_tokens}/{args.final_tokens} new tokens; "
          f"resident {result['resident_fraction']:.0%}; built in {build_s:.0f} s")
    print(f"rates: PCIe {rates['pcie_pinned_bytes_s'] / 1e9:.1f} GB/s, DRAM {rates['dram_read_bytes_s'] / 1e9:.1f} GB/s, "
          f"torch GEMV {rates['cpu_gemv_bytes_s'] / 1e9:.1f} GB/s, GEMM64 {rates['cpu_gemm64_flops'] / 1e12:.2f} TFLOP/s")
    print(f"{'policy':24} {'decode tok/s':>12} {'prefill tok/s':>13} {'cpu':>5} {'pcie':>5} {'gpu':>5}")
    for name, r in result["policies"].items():
        print(f"{name:24} {r['decode_tok_s']:12.2f} {r['prefill_tok_s']:13.1f} {r['decode_cpu_busy']:5.2f} "
              f"{r['decode_pcie_busy']:5.2f} {r['decode_gpu_busy']:5.2f}")
    print(f"{'floor':24} {fl['decode_floor_tok_s']:12.2f} {fl['prefill_floor_tok_s']:13.1f}")
    for name, r in result["policies"].items():
        if "predicted" in r:
            print(f"{'predicted ' + name:24} {r['predicted']['decode_tok_s']:12.2f} {r['predicted']['prefill_tok_s']:13.1f}")
    for name, r in result.get("sweep", {}).items():
        print(f"  sweep {name:18} {r['decode_tok_s']:12.2f} {r['prefill_tok_s']:13.1f}")


if __name__ == "__main__":
    main()
