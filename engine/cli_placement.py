"""`scheinfer profile` and `scheinfer plan`: measure this machine, and plan a model on any machine
(a saved profile) without loading weights. `register(app)` adds both commands to the CLI."""

from __future__ import annotations

import json
from typing import Annotated

import typer

ITEMSIZES = {"bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "float32": 4, "fp32": 4}


def profile(
    reprofile: Annotated[bool, typer.Option(help="Measure again even if this machine has a cached profile")] = False,
    out: Annotated[str | None, typer.Option(help="Also write the profile (JSON) to this file")] = None,
    model: Annotated[str | None, typer.Option(help="Measure with this model's slice shapes (name or checkpoint dir)")] = None,
    quick: Annotated[bool, typer.Option(help="Small shapes: a rough profile in a second or two (not cached)")] = False,
    cache_dir: Annotated[str | None, typer.Option(help="Profile cache (default $SCHEINFER_PROFILE_DIR or ~/.cache/scheinfer/profiles)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the profile as JSON")] = False,
) -> None:
    """Measure this machine's hardware profile (cached per machine) and print it."""
    from engine.placement.hardware import cached_profile_path, current_fingerprint
    from engine.placement.profiler import ProfileSizes, load_or_profile, measure_profile

    if quick:  # rough: never cached, so that the engine does not plan with it
        result = measure_profile(ProfileSizes.quick(), source="quick profile (small shapes), not cached")
    else:
        sizes = ProfileSizes.for_model(_model_config(model)) if model is not None else None
        result = load_or_profile(reprofile=reprofile, cache_dir=cache_dir, sizes=sizes)
        typer.echo(f"[cache: {cached_profile_path(current_fingerprint(), cache_dir)}]", err=True)
    if out:
        result.save(out)
    typer.echo(result.to_json() if as_json else result.describe())


def plan(
    model: Annotated[str, typer.Option(help="Checkpoint directory or a name from configs/models/")],
    gpu_memory_budget: Annotated[str, typer.Option(help='GPU memory cap, e.g. "24GiB"')] = "24GiB",
    profile_file: Annotated[str | None, typer.Option("--profile", help="A saved profile (plan for that machine); default: this machine's")] = None,
    policy: Annotated[str, typer.Option(help="adaptive, or a fixed policy: cpu-experts, stream, fiddler, manual:cg=F")] = "adaptive",
    dtype: Annotated[str, typer.Option(help="Weight dtype: bfloat16, float16 or float32")] = "bfloat16",
    kv_cache_tokens: int = 16384,
    max_num_seqs: int = 64,
    max_num_batched_tokens: int = 2048,
    max_prefill_chunk: Annotated[int | None, typer.Option(help="Prefill step size (engine default 512); 0: whole prompt")] = 512,
    host_chunk_rows: int = 1024,
    staging_slots: int = 8,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences decoding at once")] = 1,
    new_tokens: Annotated[int, typer.Option(min=0, help="Typical generated tokens per request")] = 128,
    prompt_len: Annotated[list[int], typer.Option(help="Prompt lengths to predict (repeat)")] = [512, 2048],  # noqa: B006
    token_assignment: Annotated[bool | None, typer.Option(help="Assume per-step token assignment (default: as the policy's rule)")] = None,
    compact_host_weights: Annotated[bool | None, typer.Option(
        help="Plan host pieces stored compact (3/4 of the bytes; default: as the engine on the profiled machine, "
             "on with AVX512/AMX kernels)")] = None,
    reprofile: Annotated[bool, typer.Option(help="Measure this machine again (without --profile)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print plan summary and predictions as JSON")] = False,
) -> None:
    """Print the partition of a model under a GPU budget and its predicted speed, without loading weights."""
    from engine.placement.cost_model import WorkloadMix
    from engine.placement.hardware import HardwareProfile
    from engine.placement.memory import PlanDoesNotFitError, parse_bytes
    from engine.placement.plan_report import bytes_by_kind_per_layer, render_plan_report
    from engine.placement.planner import (
        ADAPTIVE_POLICY,
        build_plan_request,
        compact_by_default,
        make_adaptive_plan,
        predict,
    )
    from engine.placement.policies import make_plan
    from engine.placement.profiler import load_or_profile

    config = _model_config(model)
    if dtype not in ITEMSIZES:
        _fail(f"unsupported dtype {dtype!r}; choose one of {', '.join(ITEMSIZES)}")
    itemsize = ITEMSIZES[dtype]
    try:
        budget = parse_bytes(gpu_memory_budget)
        hardware = HardwareProfile.from_file(profile_file) if profile_file else load_or_profile(reprofile=reprofile)
        compact = compact_host_weights if compact_host_weights is not None else compact_by_default(hardware)
        request = build_plan_request(config, budget, itemsize, kv_cache_tokens, max_num_batched_tokens, max_num_seqs,
                                     staging_slots, host_chunk_rows, compact_host=compact)
        workload = WorkloadMix(prompt_len=prompt_len[0] if prompt_len else 512, new_tokens=new_tokens,
                               batch_size=batch_size, prefill_chunk_tokens=max_prefill_chunk or None)
        if policy == ADAPTIVE_POLICY:
            the_plan, memory = make_adaptive_plan(request, hardware, workload)
        else:
            the_plan, memory = make_plan(policy, request)
        prediction = predict(the_plan, config, hardware, request, workload, token_assignment)
    except (OSError, ValueError, TypeError, KeyError, PlanDoesNotFitError) as e:
        _fail(str(e))
    lens = tuple(prompt_len) or (512, 2048)
    if as_json:
        per_layer = bytes_by_kind_per_layer(the_plan, config, itemsize)
        typer.echo(json.dumps({
            "model": model, "policy": the_plan.policy, "gpu_memory_budget_bytes": budget,
            "host_bytes_ratio": the_plan.host_bytes_ratio,
            "gpu_memory": {"total": memory.total, "describe": memory.describe()},
            "bytes_by_kind_per_layer": [{"layer": i, "GG": v[0], "CG": v[1], "CC": v[2]} for i, v in per_layer.items()],
            "prediction": prediction.to_dict(lens), "profile_source": hardware.source}, indent=1))
        return
    typer.echo(render_plan_report(config, the_plan, memory, budget, itemsize, hardware, prediction, lens))


def _model_config(model: str):
    from engine.model.factory import resolve_model_config
    from engine.model.loader import CheckpointError

    try:
        return resolve_model_config(model)[0]
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        _fail(str(e))


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def register(app: typer.Typer) -> None:
    """Adds `profile` and `plan` to the `scheinfer` app."""
    app.command("profile")(profile)
    app.command("plan")(plan)


if __name__ == "__main__":  # pragma: no cover
    _app = typer.Typer(no_args_is_help=True)
    register(_app)
    _app()

