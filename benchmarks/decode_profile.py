"""Where a decode step's host time goes: cProfile of decode steps of a partitioned model, and the
host/GPU time of each SDPA backend at decode shapes (q_len 1, growing context).

    PYTHONPATH=. python3 benchmarks/decode_profile.py --model mixtral-8x7b --budget 24GiB \\
        --policy balanced:cg=0.4 --steps 16 --out decode_profile.txt
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine import LLM, SamplingParams
from engine.model.factory import resolve_model_config


@dataclass(frozen=True)
class BooleanSwitch:
    """An engine setting traced off, on, off, on with `--FLAG-ab`: `attribute` of the object at
    `owner` (a path from the engine's executor, the decode graphs or the compact decode launcher)."""

    flag: str
    label: str
    owner: str
    attribute: str
    help: str  # "also trace with ..., alternating"


BOOLEAN_SWITCHES = (
    BooleanSwitch("one-graph", "one graph per layer", "graphs", "one_graph_layers",
                  "attention between two graphs per layer and inside one"),
    BooleanSwitch("fused-kernels", "fused kernels", "graphs", "fused_kernels",
                  "the decode graphs' routing, rotary and combine in torch's kernels and in Triton's"),
    BooleanSwitch("host-routing", "host routing", "graphs", "host_routing",
                  "routing ids read by a kernel + sync, and copied to the host"),
    BooleanSwitch("driver", "C++ driver", "executor.cpu_pool", "use_driver",
                  "CPU jobs on the Python worker and on the C++ driver"),
    BooleanSwitch("feedback", "decode feedback", "executor", "use_feedback",
                  "decode steps on the plan's kinds and balanced by measured rates"),
    BooleanSwitch("gpu-end", "feedback to the GPU's end", "executor", "meter_gpu_end",
                  "the decode feedback balancing the CPU against the last copy and the last streamed piece's compute"),
    BooleanSwitch("band", "asymmetric feedback band", "executor.feedback", "asymmetric",
                  "the decode feedback's band symmetric and asymmetric (a late GPU side moves sooner)"),
    BooleanSwitch("signal", "stream signal", "executor", "use_signal",
                  "the GPU stream waiting for decode CPU jobs off and on"),
    BooleanSwitch("launch", "direct Triton launch", "launcher", "direct",
                  "the compact decode kernel launched through Triton's path and past it"),
    BooleanSwitch("routed", "routed jobs", "executor", "use_routed",
                  "one-token CPU jobs submitted after the routing and started by the GPU"),
    BooleanSwitch("uniform-split", "uniform decode split", "executor", "uniform_decode_split",
                  "decode layers split by each expert's plan kinds and alike for every expert"),
    BooleanSwitch("rows-in-place", "CPU rows read in place", "executor", "read_cpu_rows_in_place",
                  "the CPU's output rows copied to the GPU and read there from pinned memory"),
    BooleanSwitch("routing-written", "routing written by the graph", "graphs", "routing_written",
                  "the routing's ids and activations copied to the host and stored there by the graph's kernel"),
    BooleanSwitch("gate-copies", "gate copies", "executor", "use_gate_copies",
                  "routed layers' streamed copies enqueued by the driving thread and at the gate"),
    BooleanSwitch("partial-graphs", "partial graphs", "executor.partial_graphs", "enabled",
                  "decode pieces' partials eager and replayed as graphs"),
)


def _owner(roots: dict[str, object], path: str) -> object | None:
    first, *rest = path.split(".")
    owner = roots[first]
    for name in rest:
        owner = getattr(owner, name, None) if owner is not None else None
    return owner

BACKENDS = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def sdpa_backends(num_heads: int, num_kv_heads: int, head_dim: int, context: int, calls: int = 64) -> list[str]:
    """Host and GPU microseconds per decode SDPA call for each backend; each call sees one more key,
    as decode does. Outputs compared bit for bit with the default backend's."""
    device = "cuda"
    q = torch.randn(1, num_heads, 1, head_dim, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, num_kv_heads, context + calls, head_dim, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    lines, reference = [], None
    for name, backend in BACKENDS.items():
        def call(n: int) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n], scale=head_dim**-0.5, enable_gqa=True)

        try:
            with sdpa_kernel([backend]) if backend is not None else nullcontext():
                call(context)
                torch.cuda.synchronize()
                host, outputs = [], []
                start_all = time.perf_counter()
                for i in range(calls):
                    start = time.perf_counter()
                    outputs.append(call(context + i))
                    host.append(time.perf_counter() - start)
                torch.cuda.synchronize()
                total = time.perf_counter() - start_all
        except RuntimeError as exc:
            lines.append(f"sdpa {name:9} unavailable: {str(exc).splitlines()[0][:100]}")
            continue
        out = torch.stack(outputs)
        if reference is None:
            reference = out
        same = bool(torch.equal(out, reference))
        max_diff = (out.float() - reference.float()).abs().max().item()
        lines.append(f"sdpa {name:9} host {statistics.median(host) * 1e6:7.1f} us/call, wall {total / calls * 1e6:7.1f} "
                     f"us/call, equal to default: {same} (max diff {max_diff:.2e})")
    return lines


def _start_decoding(llm: LLM, prompt_len: int, max_tokens: int) -> None:
    """A warm-up request, then one request of `prompt_len` random tokens prefilled and two steps in."""
    engine = llm.engine
    prompt = torch.randint(0, engine.model_config.vocab_size, (prompt_len,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    llm.generate(prompt_token_ids=[prompt[:32]], params=SamplingParams(max_tokens=4, ignore_eos=True))
    engine.add_request("p", prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    engine.step()  # prefill
    engine.step()
    engine.step()


def _timed_steps(llm: LLM, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        llm.engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def plain_decode(llm: LLM, prompt_len: int, steps: int) -> list[str]:
    """Untraced decode steps, each timed from host to synchronised GPU."""
    _start_decoding(llm, prompt_len, steps + 4)
    plain = _timed_steps(llm, steps)
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    median = statistics.median(plain)
    feedback = llm.engine.runner.executor.feedback
    anatomy = feedback.anatomy.summary()
    by_layer = " ".join(f"{v:+.2f}" for v in feedback.anatomy.by_layer_ms().values())
    return [f"plain decode: {steps} steps, median {median * 1e3:.1f} ms ({1 / median:.2f} tok/s), "
            f"quartiles {statistics.quantiles(plain, n=4)[0] * 1e3:.1f} / {statistics.quantiles(plain, n=4)[2] * 1e3:.1f} ms; "
            "gated layers, median ms: " + ", ".join(f"{k} {v:.3f}" for k, v in anatomy.items())
            + f"; shift {feedback.shift}, piece effect {feedback.piece_effect_s * 1e3:.2f} ms",
            f"  imbalance by layer, ms (copies minus CPU job): {by_layer}"]


def profile_decode(llm: LLM, prompt_len: int, steps: int, top: int) -> list[str]:
    engine = llm.engine
    config = engine.model_config
    _start_decoding(llm, prompt_len, 2 * steps + 4)
    plain = _timed_steps(llm, steps)
    profiler = cProfile.Profile()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        profiler.enable()
        engine.step()
        torch.cuda.synchronize()
        profiler.disable()
        times.append(time.perf_counter() - start)
    while engine.has_unfinished_requests():
        engine.step()
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    per_layer_ms = statistics.median(times) / config.num_layers * 1e3
    return [f"decode step median {statistics.median(plain) * 1e3:.1f} ms without a profiler; "
            f"{statistics.median(times) * 1e3:.1f} ms ({per_layer_ms:.2f} ms per layer) under cProfile", stream.getvalue()]


HOST_PHASES = ("combine", "attend", "routing_read")  # host work between two executors, timed in traced steps


def wrap_timed(owner: object, name: str, record: Callable[[float, float], None]) -> Callable[[], None]:
    """Replaces `owner.name` by a wrapper that calls `record(start_s, end_s)` (perf_counter) after
    each call; returns the call that puts the original back."""
    fn = getattr(owner, name)

    def run(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        record(start, time.perf_counter())
        return out
    setattr(owner, name, run)
    return lambda: setattr(owner, name, fn)


def time_host_phases(llm: LLM) -> None:
    """Wraps the host work between two executors so that traced steps record it: the expert
    combination where it is eager (after the executor returns, until the MoE block returns; at one
    token the decode graphs combine, so the row reads 0), eager attention, and
    reading the routing (waiting for its copy to the host, grouping tokens by expert)."""
    from engine.model import decode_graphs, moe

    executor = llm.engine.runner.executor

    def interval(name: str, after_executor: bool = False) -> Callable[[float, float], None]:
        def record(start: float, end: float) -> None:
            timeline = executor.timeline
            if timeline is not None:
                if after_executor:  # the combination: from the executor's return to here
                    start = timeline.last_end("host") or start
                timeline.cpu_interval(name, start, end)
        return record

    wrap_timed(decode_graphs, "attend", interval("attend"))
    wrap_timed(moe.Routing, "tokens_of", interval("routing_read"))
    wrap_timed(moe.MoEBlock, "__call__", interval("combine", after_executor=True))


def time_step_phases(llm: LLM, prompt_len: int, steps: int) -> list[str]:
    """Where an untraced decode step's wall time goes around its gated layers: the host phases of
    `LLMEngine.step` (scheduling, the batch's build, the forward's host time, sampling, the
    outputs; the batch's build is execute minus forward), and on the CPU jobs' clock the step's start to layer 0's gate, the gates' span (first
    to last), and the last gate to the step's end. Medians in ms."""
    from engine.model import decoder

    engine, executor, model = llm.engine, llm.engine.runner.executor, llm.engine.runner.model
    phases: dict[str, list[float]] = {}
    gates: list[float] = []
    submits: list[float] = []  # when the host submitted each layer's routed job (returned)

    def timed(owner: object, name: str, label: str) -> Callable[[], None]:
        return wrap_timed(owner, name, lambda start, end: phases.setdefault(label, []).append(end - start))

    def gate(end_s: float, start_s: float | None = None, enqueued_s: float | None = None) -> None:
        if start_s:
            gates.append(start_s)
        cpu_done(end_s, start_s, enqueued_s)

    cpu_done = executor._meter.cpu_done
    executor._meter.cpu_done = gate
    undo = [timed(engine.scheduler, "schedule", "schedule"), timed(engine.runner, "execute", "execute (host)"),
            timed(model, "forward", "forward (host)"), timed(engine, "sampler", "sample"),
            timed(engine, "_apply", "outputs"), timed(model.rotary, "cos_sin", "  rotary cos_sin"),
            timed(decoder, "decode_keys", "  decode_keys"), timed(executor, "flush", "  executor flush (each call)"),
            wrap_timed(executor, "prepare_routed", lambda start, end: submits.append(end))]
    if model.decode_graphs is not None:
        undo += [timed(model.decode_graphs, "_fill", "  graphs' inputs filled"), timed(model.decode_graphs, "_step", "  graphs' step")]
    rows: list[tuple[float, ...]] = []  # (step, to first gate, gates' span, after last gate, gates)
    try:
        _start_decoding(llm, prompt_len, steps + 4)
        for _ in range(steps):
            torch.cuda.synchronize()
            gates.clear()
            submits.clear()
            start = time.perf_counter()
            engine.step()
            torch.cuda.synchronize()
            end = time.perf_counter()
            if gates:
                rows.append((end - start, gates[0] - start, gates[-1] - gates[0], end - gates[-1], len(gates),
                             submits[0] - start if submits else 0.0))
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        executor._meter.cpu_done = cpu_done
        for restore in undo:
            restore()
    lines = [f"decode step phases over {steps} steps (median ms):"]
    for name, values in phases.items():
        lines.append(f"  {name:28} {statistics.median(values[-steps:]) * 1e3:8.3f}")
    if rows:
        for k, name in enumerate(("step", "step start to layer 0's gate", "first to last gate", "last gate to step end")):
            lines.append(f"  {name:28} {statistics.median(r[k] for r in rows) * 1e3:8.3f}")
        lines.append(f"  step start to layer 0's job submitted {statistics.median(r[5] for r in rows) * 1e3:.3f}")
        lines.append(f"  gated layers a step: {statistics.median(r[4] for r in rows):.0f}")
    return lines


def time_prologue_parts(llm: LLM, prompt_len: int, steps: int) -> list[str]:
    """Median host time of each part of the executor's prologue (before the CPU job is submitted),
    and of its per-piece GPU work, over untraced decode steps: each part wrapped with a
    perf_counter pair."""
    from engine.executor import cpu_pool, decode_feedback, partitioned

    executor = llm.engine.runner.executor
    times: dict[str, list[float]] = {}

    def timed(owner: object, name: str, label: str | None = None) -> Callable[[], None]:
        label = label or f"{getattr(owner, '__name__', type(owner).__name__)}.{name}"
        return wrap_timed(owner, name, lambda start, end: times.setdefault(label, []).append(end - start))

    undo = [timed(partitioned, "assign"), timed(executor, "_ship_cpu_inputs"), timed(executor, "_submit_cpu"),
            timed(executor, "_begin_streaming"), timed(executor.cpu_pool, "submit"),
            timed(executor.cpu_pool._kernels, "start"), timed(executor._meter, "enter"),
            timed(executor._cpu_buffers, "output"), timed(executor._cpu_buffers, "destination"),
            timed(cpu_pool, "submit_records"), timed(executor, "_partial"), timed(executor, "_finish_streaming"),
            timed(executor, "_add_cpu_results"), timed(executor, "flush"),
            timed(decode_feedback, "host_mark"), timed(partitioned.torch, "zeros", "torch.zeros (all calls)"),
            timed(executor.partial_graphs, "add_partial")]
    if executor.ring is not None:  # a streamed piece's copy and decode
        undo += [timed(executor.ring, "stage"), timed(executor.ring, "unpack")]
    try:
        prompt = list(range(1, prompt_len + 1))
        llm.generate(prompt_token_ids=[prompt], params=SamplingParams(max_tokens=steps + 2, ignore_eos=True))
    finally:
        for restore in undo:
            restore()
    lines = [f"executor prologue parts over {steps} decode steps (median us per call, calls):"]
    for name, values in times.items():
        lines.append(f"  {name:40} {statistics.median(values) * 1e6:8.1f}   {len(values)}")
    return lines


def time_layer_graphs(llm: LLM, repeats: int = 20) -> list[str]:
    """GPU time of one decode layer's graph (pre, attention, post: everything of a layer but its FFN),
    replayed back to back over all layers for one token and each captured key bound. The replays
    rewrite the last step's K/V slots with the same values; run after a generation."""
    graphs = llm.engine.runner.model.decode_graphs
    step = graphs._steps.get(1) if graphs is not None else None
    if step is None or not step.layers:
        return ["layer graphs: none captured for one token"]
    lines = []
    for bound, layers in sorted(step.layers.items()):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for replay in layers:  # warm
            replay()
        start.record()
        for _ in range(repeats):
            for replay in layers:
                replay()
        end.record()
        end.synchronize()
        per_layer_us = start.elapsed_time(end) * 1e3 / (repeats * len(layers))
        lines.append(f"layer graph (one token, key bound {bound}): {per_layer_us:.1f} us of GPU time a layer")
    return lines


def trace_decode(llm: LLM, prompt_len: int, steps: int, trace_path: str | None) -> list[str]:
    """Per-layer anatomy of traced decode steps (median over layers and steps, ms): the executor's
    host time, the gap between executors (attention, routing, combining), when the CPU job starts
    after the executor is entered, CPU and PCIe busy inside the layer, the GPU FFN span, and when the
    last copy and the GPU's FFN work end relative to the executor's return (pcie_end, gpu_end: a
    positive value is time the next layer's host work waits behind), and for the layer's last
    streamed piece the time from the last copy's end to its compute's start (last_wait) and the
    compute itself (last_run)."""
    from engine.executor.timeline import TraceRecorder

    engine = llm.engine
    prompt = list(range(1, prompt_len + 1))
    engine.runner.trace = TraceRecorder()
    llm.generate(prompt_token_ids=[prompt], params=SamplingParams(max_tokens=steps + 2, ignore_eos=True))
    recorder = engine.runner.trace
    engine.runner.trace = None
    if trace_path:
        recorder.write(trace_path)
    rows: dict[str, list[float]] = {k: [] for k in (
        "executor", "between", *(f"  {name}" for name in HOST_PHASES), "cpu_start", "  to_submit", "  submit_call",
        "  driver_wake", "cpu", "pcie_start", "pcie", "copies", "gpu", "tail", "pcie_end", "gpu_end", "last_wait", "last_run")}
    decode = [s for s in recorder.steps if s.kind == "decode"][2:]
    for step in decode:
        hosts = sorted((i for i in step.intervals if i.resource == "host"), key=lambda i: i.start_s)
        for n, h in enumerate(hosts):
            # this layer's work: what starts while its executor runs, and copies (and their compute)
            # that start after it returned but before the next layer's executor is entered
            until = hosts[n + 1].start_s if n + 1 < len(hosts) else float("inf")
            inside = [i for i in step.intervals if i.resource != "host" and (h.start_s <= i.start_s < h.end_s or (
                i.resource in ("pcie", "gpu_piece") and h.start_s <= i.start_s < until))]
            cpu = [i for i in inside if i.resource == "cpu"]
            pcie = [i for i in inside if i.resource == "pcie"]
            gpu = [i for i in inside if i.resource == "gpu"]
            rows["executor"].append(h.end_s - h.start_s)
            if n:
                rows["between"].append(h.start_s - hosts[n - 1].end_s)
                for name in HOST_PHASES:  # the parts of the gap before this executor
                    rows[f"  {name}"].append(sum(i.end_s - i.start_s for i in step.intervals if i.resource == name
                                                 and hosts[n - 1].end_s <= i.start_s < h.start_s))
            for name, key in (("cpu_submit", "  submit_call"), ("cpu_queue", "  driver_wake")):
                rows[key].extend(i.end_s - i.start_s for i in inside if i.resource == name)
            rows["  to_submit"].extend(i.start_s - h.start_s for i in inside if i.resource == "cpu_submit")
            if cpu:
                rows["cpu_start"].append(cpu[0].start_s - h.start_s)
                rows["cpu"].append(sum(i.end_s - i.start_s for i in cpu))
                rows["tail"].append(h.end_s - max(i.end_s for i in cpu))
            if pcie:
                rows["copies"].append(len(pcie) / 1e3)  # printed as a count (rows are shown in ms)
                rows["pcie"].append(sum(i.end_s - i.start_s for i in pcie))
                rows["pcie_start"].append(min(i.start_s for i in pcie) - h.start_s)
                rows["pcie_end"].append(max(i.end_s for i in pcie) - h.end_s)  # > 0: copies outlast the executor
            if gpu:
                rows["gpu"].append(sum(i.end_s - i.start_s for i in gpu))
                rows["gpu_end"].append(max(i.end_s for i in gpu) - h.end_s)
            pieces = [i for i in inside if i.resource == "gpu_piece"]
            if pieces and pcie:  # the last streamed piece: its copy's end -> its compute's start, and the compute
                last = max(pieces, key=lambda i: i.start_s)
                rows["last_wait"].append(last.start_s - max(i.end_s for i in pcie))
                rows["last_run"].append(last.end_s - last.start_s)
    step_ms = statistics.median(s.duration_s for s in decode) * 1e3 if decode else float("nan")
    feedback = engine.runner.executor.feedback.summary()
    out = [f"traced decode: {len(decode)} steps, median step {step_ms:.1f} ms; decode feedback "
           + ", ".join(f"{k} {v:.3g}" for k, v in feedback.items()) + "; per layer, median ms:"]
    for name, values in rows.items():
        if values:
            out.append(f"  {name:10} {statistics.median(values) * 1e3:7.3f}   (mean {statistics.fmean(values) * 1e3:7.3f})")
    return out


def kernel_profile(llm: LLM, prompt_len: int, steps: int, path: str) -> list[str]:
    """torch.profiler over `steps` decode steps (after a warm-up): every CUDA kernel and copy on its
    stream, and the host's ops, written gzipped as a Chrome trace; returns the top GPU kernels."""
    from torch.profiler import ProfilerActivity, profile

    engine = llm.engine
    prompt = list(range(1, prompt_len + 1))
    engine.add_request("k", prompt, SamplingParams(max_tokens=steps + 6, temperature=0.0, ignore_eos=True))
    for _ in range(4):  # prefill and warm-up steps
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    while engine.has_unfinished_requests():
        engine.step()
    prof.export_chrome_trace(path)
    if not path.endswith(".gz"):
        import gzip
        import shutil

        with open(path, "rb") as src, gzip.open(path + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
    layers = len(engine.runner.model.layers)
    return [f"kernel profile of {steps} decode steps -> {path}", table,
            *per_layer_kernels(prof.key_averages(), steps * layers)]


def per_layer_kernels(averages, layer_steps: int) -> list[str]:
    """The GPU kernels launched at least once a layer: launches per layer and mean time, most
    launched first (what a decode layer's graph is made of)."""
    rows = []
    for event in averages:
        total_us = getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0))
        if event.count < layer_steps or total_us <= 0 or event.key.startswith(("aten::", "cuda", "Memcpy", "Memset")):
            continue
        rows.append((event.count / layer_steps, total_us / event.count, event.key[:90]))
    rows.sort(reverse=True)
    launches = sum(per_layer for per_layer, _, _ in rows)
    gpu_us = sum(per_layer * mean for per_layer, mean, _ in rows)
    lines = [f"kernels launched every layer: {launches:.1f} a layer, {gpu_us:.1f} us of GPU time a layer"]
    lines += [f"  {per_layer:5.2f} x {mean:7.2f} us  {name}" for per_layer, mean, name in rows]
    return lines


def variants(llm: LLM, args: argparse.Namespace) -> list[tuple[str, Callable[[], None]]]:
    """(label, setter) for every engine setting to trace as asked on the command line; a setting's
    values come in alternating order, and an unlabelled setter after them restores the default."""
    import sys

    from engine.cpu_kernels.runner import get_tuning, set_tuning
    from engine.executor import gpu_unpack, partitioned

    model = llm.engine.runner.model
    out: list[tuple[str, Callable[[], None]]] = []

    def add(values: list, label: Callable[[object], str], set_value: Callable[[object], None], default: object) -> None:
        out.extend((label(v), lambda v=v: set_value(v)) for v in values)
        out.append(("", lambda: set_value(default)))

    if args.graphs_ab:  # the same engine without and with decode graphs
        graphs = model.decode_graphs
        add([False, True, False, True], lambda v: f"decode graphs {'on' if v else 'off'}",
            lambda v: setattr(model, "decode_graphs", graphs if v else None), True)

    def switch(asked: bool, label: str, owner: object | None, attribute: str) -> None:
        """A boolean attribute off, on, off, on, then back to its value now (asked and present)."""
        if asked and owner is not None:
            add([False, True, False, True], lambda v: f"{label} {'on' if v else 'off'}",
                lambda v: setattr(owner, attribute, v), getattr(owner, attribute))

    executor = llm.engine.runner.executor
    roots = {"executor": executor, "graphs": model.decode_graphs, "launcher": gpu_unpack._launch_unpack}
    for setting in BOOLEAN_SWITCHES:
        switch(getattr(args, setting.flag.replace("-", "_") + "_ab"), setting.label, _owner(roots, setting.owner),
               setting.attribute)
    if args.shifts:  # the decode feedback held at these shifts (it measures, never moves)
        feedback = executor.feedback

        def hold(shift: int | None) -> None:
            feedback.reset()
            feedback.frozen = shift is not None
            feedback.shift = shift or 0

        add([int(v) for v in args.shifts.split(",")], lambda v: f"decode shift held at {v}", hold, None)
    if args.period_rule_ab:  # each variant starts from the plan's split, the period rule off / on
        feedback = executor.feedback

        def period_rule(on: bool) -> None:
            feedback.by_period = on
            feedback.reset()

        add([False, True, False, True], lambda v: f"the feedback's period rule {'on' if v else 'off'}", period_rule,
            feedback.by_period)
    if args.first_copies:  # copies enqueued before the CPU job is prepared
        add([int(v) for v in args.first_copies.split(",")] * 2, lambda v: f"first copies {v}",
            lambda v: setattr(partitioned, "FIRST_COPIES", v), partitioned.FIRST_COPIES)
    if args.switch_interval:
        add([float(v) for v in args.switch_interval.split(",")], lambda v: f"GIL switch interval {v} s",
            sys.setswitchinterval, sys.getswitchinterval())
    if args.copies_in_job_ab:  # routed jobs' gate copies before the CPU job, or from its thread 0
        add([0, 1, 0, 1], lambda v: f"copies_in_job={v}", lambda v: set_tuning("copies_in_job", v),
            get_tuning("copies_in_job"))
    if args.spin_us:
        add([int(v) for v in args.spin_us.split(",")], lambda v: f"spin_us={v}",
            lambda v: set_tuning("spin_us", v), get_tuning("spin_us"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mixtral-8x7b")
    parser.add_argument("--budget", default="24GiB")
    parser.add_argument("--policy", default="balanced:cg=0.4")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--top", type=int, default=35)
    parser.add_argument("--out", default=None)
    parser.add_argument("--trace", default=None, help="write a Chrome trace of the traced decode steps here")
    parser.add_argument("--cpu-threads", type=int, default=None, help="CPU kernel threads (default: the engine's)")
    parser.add_argument("--spin-us", default="", help="also trace with these CPU-kernel worker spin times (comma list)")
    parser.add_argument("--copies-in-job-ab", action="store_true",
                        help="also trace with routed jobs' gate copies enqueued before the CPU job and by its "
                             "thread 0 after the pack phase, alternating")
    parser.add_argument("--switch-interval", default="",
                        help="also trace with these Python GIL switch intervals in seconds (comma list)")
    parser.add_argument("--graphs-ab", action="store_true", help="also trace without and with decode graphs, alternating")
    for setting in BOOLEAN_SWITCHES:
        parser.add_argument(f"--{setting.flag}-ab", action="store_true", help=f"also trace with {setting.help}, alternating")
    parser.add_argument("--profile", default=None, help="hardware profile to plan with (default: measure this machine)")
    parser.add_argument("--plain-steps", type=int, default=0,
                        help="first time this many untraced decode steps (median ms and tok/s)")
    parser.add_argument("--step-phases", type=int, default=0,
                        help="also time N untraced decode steps' phases around their gated layers")
    parser.add_argument("--prologue-parts", action="store_true",
                        help="first time each part of the executor's prologue (untraced decode steps)")
    parser.add_argument("--layer-graphs", action="store_true",
                        help="also time the decode layer graphs' GPU time (everything of a layer but its FFN)")
    parser.add_argument("--shifts", default="",
                        help="also trace with the decode feedback held at these shifts (comma list; it measures only)")
    parser.add_argument("--period-rule-ab", action="store_true",
                        help="also trace with the decode feedback's period rule off and on, alternating (each "
                             "variant from the plan's split: engine/executor/decode_feedback.py)")
    parser.add_argument("--first-copies", default="",
                        help="also trace with these counts of copies enqueued before the CPU job (comma list, "
                             "each twice, alternating; 0 = the CPU job first)")
    parser.add_argument("--kernel-trace", default=None,
                        help="also run torch.profiler over a few decode steps and write its Chrome trace here")
    parser.add_argument("--kernel-steps", type=int, default=3)
    parser.add_argument("--lookahead", type=int, default=None,
                        help="pieces of the next layer's likely experts copied ahead a layer (engine/executor/lookahead.py)")
    parser.add_argument("--host-chunk-rows", type=int, default=1024, help="rows of a host piece (the engine's default 1024)")
    parser.add_argument("--no-compact", action="store_true", help="keep host pieces bf16 (default: compact)")
    parser.add_argument("--skip-sdpa", action="store_true")
    parser.add_argument("--skip-cprofile", action="store_true")
    args = parser.parse_args()
    config, _ = resolve_model_config(args.model)
    lines = [] if args.skip_sdpa else sdpa_backends(config.num_heads, config.num_kv_heads, config.head_dim,
                                                    args.prompt_len)
    print("\n".join(lines), flush=True)
    llm = LLM(args.model, device="cuda", random_weights=True, gpu_memory_budget=args.budget, policy=args.policy,
              kv_cache_tokens=4096, max_num_seqs=8, cpu_threads=args.cpu_threads, show_progress=False,
              profile_path=args.profile, compact_host_weights=not args.no_compact, host_chunk_rows=args.host_chunk_rows)
    partition = llm.engine.partition
    rows = partition.plan.rows_by_kind()
    lines.append(f"plan: {partition.memory.describe()}; rows GG {rows['GG']} CG {rows['CG']} CC {rows['CC']}")
    if args.lookahead is not None:
        llm.engine.runner.executor.lookahead_pieces = args.lookahead
        if llm.engine.runner.model.decode_graphs is not None:
            llm.engine.runner.model.decode_graphs.reset()  # they compute the guesses only with look-ahead on
        lines.append(f"look-ahead: {args.lookahead} pieces a layer")
    if args.plain_steps:
        lines += plain_decode(llm, args.prompt_len, args.plain_steps)
        print("\n".join(lines), flush=True)
    if args.step_phases:
        lines += time_step_phases(llm, args.prompt_len, args.step_phases)
        print("\n".join(lines), flush=True)
    if args.prologue_parts:
        lines += time_prologue_parts(llm, args.prompt_len, args.steps)
        print("\n".join(lines), flush=True)
    if args.layer_graphs:
        lines += time_layer_graphs(llm)
    time_host_phases(llm)
    lines += trace_decode(llm, args.prompt_len, args.steps, args.trace)
    print("\n".join(lines[-24:]), flush=True)
    for label, apply in variants(llm, args):
        apply()
        if label:
            plain = plain_decode(llm, args.prompt_len, args.plain_steps) if args.plain_steps else []
            lines += [label, *plain, *trace_decode(llm, args.prompt_len, args.steps, None)]
            print("\n".join(lines[-24:]), flush=True)
    if args.kernel_trace:
        lines += kernel_profile(llm, args.prompt_len, args.kernel_steps, args.kernel_trace)
    if not args.skip_cprofile:
        lines += profile_decode(llm, args.prompt_len, args.steps, args.top)
    text = "\n".join(lines)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text[:4000] if len(text) < 8000 else text[:2000] + "\n...\n" + text[-6000:])


if __name__ == "__main__":
    main()
