"""Decode and prefill speed of each partition policy on one model under one GPU budget, side by
side in one run, next to the floor computed from rates measured in the same run.

    python benchmarks/partition_bench.py --model mixtral-8x7b --budget 24GiB --prompt-len 512 \\
        --new-tokens 32 --final-tokens 128 --sweep 0.3,0.4,0.5,0.6,0.8 --out results.json

The planner's validation (issue 4) runs it per model and budget with the adaptive build:

    python benchmarks/partition_bench.py --model mixtral-8x7b --budget 12GiB --build-policy adaptive \\
        --policies adaptive,cpu-experts,stream,fiddler --prompt-len 512,2048 --new-tokens 24 \\
        --sweep-policy balanced --sweep 0.2,0.35,0.5,0.65 --sweep-tokens 24 --final-tokens 0

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
from dataclasses import replace

import torch
import torch.nn.functional as F

from engine import LLM, SamplingParams
from engine.executor.lookahead import LOOKAHEAD_PIECES
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


def _timed_generation(engine, prompt: list[int], new_tokens: int) -> tuple[float, list[float]]:
    """(seconds until the first token: every prefill step, chunked or not; seconds of each decode step)."""
    engine.add_request("bench", prompt, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True))
    prefill_s, decode_s, has_token = 0.0, [], False
    while engine.has_unfinished_requests():
        torch.cuda.synchronize()
        start = time.perf_counter()
        outputs = engine.step()
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if has_token:
            decode_s.append(elapsed)
        else:
            prefill_s += elapsed
            has_token = any(o.token_ids for o in outputs)
    return prefill_s, decode_s


def run_policy(llm: LLM, prompts: list[list[int]], new_tokens: int, traced_tokens: int = 8) -> dict:
    """Prefill time of each prompt and decode speed after it (median step after the first decode
    step); the top-level prefill/decode keys are the first prompt's. Then a short traced run for
    busy fractions."""
    engine = llm.engine
    warm = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    llm.generate(prompt_token_ids=[prompts[0][:32]], params=warm)
    by_prompt = {}
    engine.runner.executor.lookahead_stats.reset()
    for prompt in prompts:
        prefill_s, decode_s = _timed_generation(engine, prompt, new_tokens)
        decode = statistics.median(decode_s[1:] or decode_s)  # the first decode step warms the decode path
        by_prompt[str(len(prompt))] = {"prefill_s": prefill_s, "prefill_tok_s": len(prompt) / prefill_s,
                                       "decode_s_per_token": decode, "decode_tok_s": 1 / decode,
                                       "decode_tokens_timed": len(decode_s[1:] or decode_s)}
    engine.runner.trace = TraceRecorder()  # a short traced run for busy fractions
    llm.generate(prompt_token_ids=[prompts[0][:64]], params=SamplingParams(max_tokens=traced_tokens, ignore_eos=True))
    decode_steps = [s for s in engine.runner.trace.steps if s.kind == "decode"]
    trace = TraceRecorder(decode_steps).summary()
    engine.runner.trace = TraceRecorder()  # and the first prompt's prefill, traced
    llm.generate(prompt_token_ids=[prompts[0]], params=SamplingParams(max_tokens=1, ignore_eos=True))
    prefill_trace = _prefill_anatomy([s for s in engine.runner.trace.steps if s.kind == "prefill"])
    engine.runner.trace = None
    first = by_prompt[str(len(prompts[0]))]
    return {**{k: first[k] for k in ("prefill_s", "prefill_tok_s", "decode_s_per_token", "decode_tok_s")},
            "by_prompt": by_prompt, "cg_share": _cg_share(llm),
            "decode_cpu_busy": trace["cpu_busy"], "decode_pcie_busy": trace["pcie_busy"],
            "decode_gpu_busy": trace["gpu_busy"], "decode_overlap": trace["overlap"],
            "decode_feedback": engine.runner.executor.feedback.summary(), "prefill_traced": prefill_trace,
            "lookahead": {**engine.runner.executor.lookahead_stats.summary(),
                          "pieces": engine.runner.executor.lookahead_pieces}}


def _prefill_anatomy(steps: list) -> dict[str, float]:
    """Busy fractions of a traced prefill (each resource, and the host thread inside the executor),
    its traced seconds, and the streamed pieces and CPU jobs it ran."""
    out = TraceRecorder(steps).summary()
    total = out["seconds"] or 1.0
    out["host_busy"] = sum(s.busy_s("host") for s in steps) / total
    out["streamed_pieces"] = sum(1 for s in steps for i in s.intervals if i.resource == "pcie")
    out["cpu_jobs"] = sum(1 for s in steps for i in s.intervals if i.resource == "cpu")
    return out


def _cg_share(llm: LLM) -> float:
    """CG rows over all host rows of the plan in force."""
    rows = llm.engine.partition.plan.rows_by_kind()
    host = rows["CG"] + rows["CC"]
    return rows["CG"] / host if host else 0.0


def floors(llm: LLM, rates: dict[str, float], prompt_len: int) -> dict[str, float]:
    """Decode: the routed experts' host bytes read by the CPU and streamed over PCIe at once, each
    at its own rate measured alone (`decode_floor_tok_s`, as in every session's tables) and, where
    the engine's profile measured them reading at once, no faster together than host DRAM gave
    them then (`decode_floor_shared_tok_s`).
    Prefill: every host byte moved once, split between PCIe and CPU GEMM at the measured rates."""
    config = llm.engine.model_config
    plan = llm.engine.partition.plan
    row = bytes_per_row(config, 2)
    compaction = llm.engine.partition.compaction
    read_row = row * (compaction.ratio if compaction is not None else 1.0)  # host bytes read per row
    host_rows = sum(s.cg + s.cc for s in plan.splits.values())
    num_units = len(plan.splits)
    moe = config.moe
    active_units = config.num_layers * (moe.num_experts_per_tok if moe else 1)
    active_host_bytes = host_rows / num_units * active_units * read_row
    if host_rows == 0:
        return {"decode_floor_tok_s": float("inf"), "prefill_floor_tok_s": float("inf"), "active_host_bytes_per_token": 0}
    decode_s = active_host_bytes / (rates["dram_read_bytes_s"] + rates["pcie_pinned_bytes_s"])
    tokens_per_unit = prompt_len * (moe.num_experts_per_tok / moe.num_experts if moe else 1)
    cpu_bytes_s = rates["cpu_gemm64_flops"] / tokens_per_unit  # 2 flops per weight (2 bytes) per token
    prefill_s = host_rows * row / (rates["pcie_pinned_bytes_s"] + cpu_bytes_s)
    profile = llm.engine.partition.profile
    shared = profile.host_read_bytes_s if profile is not None else None
    if shared:  # a disturbed reading below one side alone bounds nothing: that side can run alone
        shared = max(shared, rates["dram_read_bytes_s"], rates["pcie_pinned_bytes_s"])
    shared_s = active_host_bytes / shared if shared else decode_s
    return {"decode_floor_tok_s": 1 / decode_s, "decode_floor_shared_tok_s": 1 / max(decode_s, shared_s),
            "host_read_bytes_s": shared, "prefill_floor_tok_s": prompt_len / prefill_s,
            "active_host_bytes_per_token": active_host_bytes}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mixtral-8x7b")
    parser.add_argument("--budget", default="24GiB")
    parser.add_argument("--prompt-len", default="512", help="prompt length(s), comma list: e.g. 512,2048")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode tokens generated after each prompt")
    parser.add_argument("--final-tokens", type=int, default=128,
                        help="decode tokens for the best split and its balanced twin (0: skip them)")
    parser.add_argument("--sweep", default="0.2,0.3,0.4,0.5,0.6")
    parser.add_argument("--sweep-policy", default="manual", choices=("manual", "balanced"),
                        help="sweep manual:cg=F (static kinds) or balanced:cg=F (with token assignment)")
    parser.add_argument("--sweep-tokens", type=int, default=32)
    parser.add_argument("--policies", default="cpu-experts,stream,fiddler",
                        help="'adaptive' re-applies the build plan when --build-policy is adaptive; "
                             "'adaptive@torch' (or another kernel path) re-profiles the CPU on that path and re-plans; "
                             "a '#N' suffix runs the CPU kernels with N threads; a '%%N' suffix (after the others, before '^') has "
                             "prefill's balance count N us of host work a streamed piece; a '~eager' suffix decodes "
                             "without the per-layer CUDA graphs; a '~copied' suffix (last of the '~' ones: '~eager~copied') copies "
                             "the CPU's output rows to the GPU (default: read in place); a '~perplan' suffix (after all: "
                             "'~copied~perplan') splits decode layers by each expert's plan kinds, not alike for all "
                             "(engine/executor/token_assignment.py); a '~period' suffix (after all, '~perplan' too) "
                             "turns on the decode feedback's period rule (engine/executor/decode_feedback.py); then '~headlate' "
                             "enqueues the model's head after the last CPU job is collected and '~rotarycomputed' computes "
                             "rotary cos/sin each step (both A/B switches of session 19); a last '^N' suffix copies N pieces of the "
                             "next layer's likely experts ahead (0: no look-ahead)")
    parser.add_argument("--build-policy", default="manual:cg=0",
                        help="plan the model is built with (sets the resident share every policy shares)")
    parser.add_argument("--host-chunk-rows", type=int, default=1024,
                        help="rows of the host pieces the experts are cut into (what a decode move shifts)")
    parser.add_argument("--no-compact", action="store_true",
                        help="keep host pieces bf16 (default: stored compact, engine/model/compact_weights.py)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from engine.model.factory import resolve_model_config
    model_config, _ = resolve_model_config(args.model)
    prompt_lens = [int(n) for n in args.prompt_len.split(",")]
    widest = max(model_config.intermediate_size, model_config.moe.expert_intermediate_size if model_config.moe else 0)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    rates = measure_rates(model_config.hidden_size, 2 * widest)
    print("rates", json.dumps(rates), flush=True)
    start = time.perf_counter()
    longest = max(prompt_lens)  # every prompt prefilled in one step: host weights move once per prompt
    llm = LLM(args.model, device="cuda", random_weights=True, gpu_memory_budget=args.budget, policy=args.build_policy,
              kv_cache_tokens=max(4096, 2 * longest), max_num_seqs=8, max_prefill_chunk=longest,
              max_num_batched_tokens=max(2048, longest), host_chunk_rows=args.host_chunk_rows, show_progress=False,
              compact_host_weights=not args.no_compact)
    build_s = time.perf_counter() - start
    partition = llm.engine.partition
    config = llm.engine.model_config
    result = {"date": time.strftime("%Y-%m-%d"), "model": args.model, "budget": args.budget,
              "device": torch.cuda.get_device_name(), "build_s": build_s, "memory": partition.memory.describe(),
              "resident_fraction": partition.plan.rows_by_kind()["GG"] / sum(s.size for s in partition.plan.splits.values()),
              "prompt_lens": prompt_lens, "new_tokens": args.new_tokens, "rates": rates,
              "host_chunk_rows": args.host_chunk_rows,
              "compact": partition.compaction.describe() if partition.compaction is not None else None,
              "floor": floors(llm, rates, prompt_lens[0]),
              "floor_by_prompt": {str(n): floors(llm, rates, n) for n in prompt_lens}, "policies": {}}
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=generator).tolist() for n in prompt_lens]
    build_plan = partition.plan
    if "adaptive" in args.policies.split(","):  # predicted before anything is measured
        result["predicted_adaptive"] = _prediction(llm, prompt_lens)
        if partition.profile is not None:  # the profile the plan and the prediction came from
            result["profile"] = json.loads(partition.profile.to_json())
    # warm-up: first touches of the host weights, kernel build and thread start-up, attention kernels
    # (the first policy measured after a short warm-up ran up to 25% slower than its repeat at the end)
    for prompt, tokens in ((prompts[0], 24), (prompts[-1], 8)):
        llm.generate(prompt_token_ids=[prompt], params=SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
    build_profile = partition.profile
    user_threads = os.environ.get("SCHEINFER_CPU_THREADS")
    graphs = llm.engine.runner.model.decode_graphs
    for policy in args.policies.split(","):
        # adaptive^0: N pieces of the next layer's likely experts copied ahead (engine/executor/lookahead.py)
        core, _, lookahead = policy.partition("^")
        pieces = int(lookahead) if lookahead else LOOKAHEAD_PIECES
        if pieces != llm.engine.runner.executor.lookahead_pieces and graphs is not None:
            graphs.reset()  # the graphs compute the guesses only when look-ahead is on
        llm.engine.runner.executor.lookahead_pieces = pieces
        # adaptive%150: prefill's balance counts 150 us of the driving thread's work a streamed piece
        core, _, stream_host_us = core.partition("%")
        # adaptive~headlate / ~rotarycomputed (the last suffixes, in this order): the model's head
        # enqueued after the last CPU job is collected; rotary cos/sin computed each step, no tables
        model = llm.engine.runner.model
        model.rotary_tables = not core.endswith("~rotarycomputed")
        core = core.removesuffix("~rotarycomputed")
        model.head_before_collect = not core.endswith("~headlate")
        core = core.removesuffix("~headlate")
        # adaptive~period: the decode feedback's period rule on (engine/executor/decode_feedback.py)
        llm.engine.runner.executor.feedback.by_period = core.endswith("~period")
        core = core.removesuffix("~period")
        # adaptive~perplan: decode splits by each expert's plan kinds, not one count for every expert
        llm.engine.runner.executor.uniform_decode_split = not core.endswith("~perplan")
        core = core.removesuffix("~perplan")
        # adaptive~copied: the CPU's output rows copied over, not read in place (engine/executor/host_rows.py)
        llm.engine.runner.executor.read_cpu_rows_in_place = not core.endswith("~copied")
        core = core.removesuffix("~copied")
        # adaptive~eager: decode without the per-layer CUDA graphs (engine/model/decode_graphs.py)
        llm.engine.runner.model.decode_graphs = None if core.endswith("~eager") else graphs
        spec, _, threads = core.removesuffix("~eager").partition("#")  # stream#12: the CPU kernels' pool at 12 threads
        base, _, kernel_path = spec.partition("@")  # adaptive@torch: re-profiled and re-planned on that path
        os.environ["SCHEINFER_CPU_KERNEL"] = kernel_path or "auto"
        _set_env("SCHEINFER_CPU_THREADS", threads or user_threads)
        predicted = result.get("predicted_adaptive")
        if base == "adaptive" and kernel_path:
            profile = replanned_profile(llm, build_profile, kernel_path)
            partition.replan(profile)
            predicted = _prediction(llm, prompt_lens)
            result.setdefault("profiles_by_kernel_path", {})[kernel_path] = json.loads(profile.to_json())
        elif base == "adaptive" and build_profile is not None:
            partition.replan(build_profile)
        else:
            partition.repartition(build_plan if base == "adaptive" else base)
        executor = llm.engine.runner.executor
        executor.rates = replace(executor.rates, stream_host_s=float(stream_host_us or 0) * 1e-6)
        name = policy if policy not in result["policies"] else f"{policy} (again)"  # a policy may run twice
        result["policies"][name] = run_policy(llm, prompts, args.new_tokens)
        if base == "adaptive":
            result["policies"][name]["predicted"] = predicted
        print(name, json.dumps(result["policies"][name]), flush=True)
    os.environ["SCHEINFER_CPU_KERNEL"] = "auto"
    _set_env("SCHEINFER_CPU_THREADS", user_threads)
    sweep = {}
    for share in filter(None, args.sweep.split(",")):
        policy = f"{args.sweep_policy}:cg={share}"
        partition.repartition(policy)
        sweep[policy] = run_policy(llm, prompts, args.sweep_tokens)
        print(policy, json.dumps(sweep[policy]), flush=True)
    result["sweep"] = sweep
    if sweep:
        best = max(sweep, key=lambda p: sweep[p]["decode_tok_s"])
        best_prefill = max(sweep, key=lambda p: sweep[p]["prefill_tok_s"])
        result["best_decode_split"], result["best_prefill_split"] = best, best_prefill
        if args.final_tokens:
            partition.repartition(best)
            result["policies"][f"best {best}"] = run_policy(llm, prompts, args.final_tokens)
            balanced = "balanced:" + best.split(":", 1)[1]  # the decode-best split, token assignment each step
            if balanced != best:
                partition.repartition(balanced)
                result["policies"][balanced] = run_policy(llm, prompts, args.final_tokens)
    _save_and_print(args, result, rates, build_s)
    if sweep:
        print(f"best split for decode: {result['best_decode_split']}; for prefill: {result['best_prefill_split']}")


def _set_env(name: str, value: str | None) -> None:
    if value:
        os.environ[name] = value
    else:
        os.environ.pop(name, None)


def replanned_profile(llm: LLM, build_profile, kernel_path: str):
    """The build's hardware profile with its CPU readings taken again on `kernel_path` (the
    environment's SCHEINFER_CPU_KERNEL is already set to it): the planner re-profiled."""
    from engine.placement.profiler import ProfileSizes, remeasure_cpu

    if build_profile is None:
        raise SystemExit("adaptive@PATH needs --build-policy adaptive (a profile to re-measure)")
    partition = llm.engine.partition
    sizes = ProfileSizes.for_model(llm.engine.model_config, partition.request.host_chunk_rows)
    profile = remeasure_cpu(build_profile, sizes, source=f"partition_bench: CPU re-measured on {kernel_path}")
    print(f"re-profiled on {kernel_path}: cpu path {profile.cpu_path}, 1-token CPU "
          f"{1 / profile.cpu_ffn.s_per_byte[0] / 1e9:.1f} GB/s", flush=True)
    return profile


def _prediction(llm: LLM, prompt_lens: list[int]) -> dict:
    """What the adaptive planner predicts for the plan in force (engine/placement/planner.py), from
    the engine's hardware profile, before any measurement of this run."""
    from engine.placement.planner import predict
    from engine.placement.profiler import engine_profile

    partition = llm.engine.partition
    config = llm.engine.model_config
    profile = partition.profile or engine_profile(config)
    prediction = predict(partition.plan, config, profile, partition.request)
    by_prompt = {str(n): {"prefill_tok_s": n / prediction.prefill_s(n)} for n in prompt_lens}
    return {"decode_tok_s": prediction.decode_tok_s, "prefill_tok_s": by_prompt[str(prompt_lens[0])]["prefill_tok_s"],
            "by_prompt": by_prompt}


def _save_and_print(args: argparse.Namespace, result: dict, rates: dict[str, float], build_s: float) -> None:
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    fl = result["floor"]
    print(f"\n{args.model} @ {args.budget}, prompt {args.prompt_len} (table: the first), {args.new_tokens} new tokens; "
          f"resident {result['resident_fraction']:.0%}; built in {build_s:.0f} s")
    print(f"rates: PCIe {rates['pcie_pinned_bytes_s'] / 1e9:.1f} GB/s, DRAM {rates['dram_read_bytes_s'] / 1e9:.1f} GB/s, "
          f"torch GEMV {rates['cpu_gemv_bytes_s'] / 1e9:.1f} GB/s, GEMM64 {rates['cpu_gemm64_flops'] / 1e12:.2f} TFLOP/s")
    print(f"{'policy':24} {'decode tok/s':>12} {'prefill tok/s':>13} {'cpu':>5} {'pcie':>5} {'gpu':>5}")
    for name, r in result["policies"].items():
        print(f"{name:24} {r['decode_tok_s']:12.2f} {r['prefill_tok_s']:13.1f} {r['decode_cpu_busy']:5.2f} "
              f"{r['decode_pcie_busy']:5.2f} {r['decode_gpu_busy']:5.2f}")
    print(f"{'floor':24} {fl['decode_floor_tok_s']:12.2f} {fl['prefill_floor_tok_s']:13.1f}")
    if fl.get("host_read_bytes_s"):
        print(f"{'floor, shared DRAM':24} {fl['decode_floor_shared_tok_s']:12.2f}   (CPU + PCIe together "
              f"{fl['host_read_bytes_s'] / 1e9:.1f} GB/s, the profile's reading)")
    for name, r in result["policies"].items():
        if "predicted" in r:
            print(f"{'predicted ' + name:24} {r['predicted']['decode_tok_s']:12.2f} {r['predicted']['prefill_tok_s']:13.1f}")
    for name, r in result.get("sweep", {}).items():
        print(f"  sweep {name:18} {r['decode_tok_s']:12.2f} {r['prefill_tok_s']:13.1f}")


if __name__ == "__main__":
    main()
