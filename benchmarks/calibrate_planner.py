"""Fits the planner's serial overheads (per layer, per layer with CPU work, per piece, per unit in
prefill) and the driving thread's work per streamed prefill piece to one or more partition_bench.py
results, and shows the model's error on every point before and after.

    python benchmarks/calibrate_planner.py benchmarks/results/RESULT.json [MORE.json ...] \\
        --profile configs/hardware/h100-16core.json [--write]

Each result's plans are rebuilt with the request its benchmark used (budget, KV cache, batched
tokens, 8 sequences, its host chunk rows): fixed policies and the sweep from their names, the
adaptive plan from the machine profile the run stored (`profile`, with `--build-policy adaptive`;
kept only when it gives the run's CG share; its PCIe reading alone raised to the one beside the CPU
where that is higher, as the profiler now does; a compact CPU table from the --profile's compact / bf16
ratio where it has none). A result's points are predicted with its own machine's
rates where it stored them (its overheads replaced by the fitted ones), so runs of several models
and machines fit together. `--write` saves the fitted overheads into the profile file. See
docs/PLANNER.md, "Calibrating".
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from engine.model.factory import resolve_model_config
from engine.placement.hardware import HardwareProfile, LinearTimeTable, calibration_of
from engine.placement.memory import parse_bytes
from engine.placement.planner import (
    MeasuredStep,
    build_plan_request,
    calibrate_overheads,
    make_adaptive_plan,
    predict,
)
from engine.placement.policies import make_plan


def compact_table_like(profile: HardwareProfile, reference: HardwareProfile) -> LinearTimeTable | None:
    """A compact CPU table for a profile measured before the profiler read one: its own bf16 table
    times the reference's compact / bf16 ratio at each of the reference's token counts (None when
    the reference has no compact table)."""
    ref = reference.cpu_ffn_compact
    if ref is None:
        return None
    return LinearTimeTable(ref.num_tokens, tuple(
        profile.cpu_ffn.s_per_byte_at(n) * ref.s_per_byte_at(n) / reference.cpu_ffn.s_per_byte_at(n)
        for n in ref.num_tokens))


def _consistent(profile: HardwareProfile, reference: HardwareProfile) -> HardwareProfile:
    """A stored profile read as the profiler now reads it: PCIe alone no slower than beside the CPU
    (profiler.measure_profile; older profiles could hold a disturbed reading alone), and a compact
    CPU table (`compact_table_like` the reference's) where it has none."""
    if profile.pcie_h2d_bytes_s and profile.pcie_with_cpu_bytes_s:
        profile = replace(profile, pcie_h2d_bytes_s=max(profile.pcie_h2d_bytes_s, profile.pcie_with_cpu_bytes_s))
    if profile.cpu_ffn_compact is None:
        profile = replace(profile, cpu_ffn_compact=compact_table_like(profile, reference))
    return profile


def _cg_share(plan) -> float:
    rows = plan.rows_by_kind()
    host = rows["CG"] + rows["CC"]
    return rows["CG"] / host if host else 0.0


def measured_points(result: dict, reference: HardwareProfile, skip: tuple[str, ...] = ()) -> list[tuple[str, MeasuredStep]]:
    """The result's points, each with its model, request and (where stored) machine rates."""
    config, _ = resolve_model_config(result["model"])
    longest = max(result.get("prompt_lens", [512]))
    # the run's own storage: a bf16 run (--no-compact) planned as compact would skew the fit
    request = build_plan_request(config, parse_bytes(result["budget"]), kv_cache_tokens=max(4096, 2 * longest),
                                 max_num_batched_tokens=max(2048, longest), max_num_seqs=8,
                                 host_chunk_rows=result.get("host_chunk_rows", 1024),
                                 compact_host=bool(result.get("compact")))
    stored = HardwareProfile.from_json(json.dumps(result["profile"])) if result.get("profile") else None
    adaptive = make_adaptive_plan(request, stored)[0] if stored is not None else None  # the plan as run
    rates = _consistent(stored, reference) if stored is not None else None
    entries = {**result["policies"], **result.get("sweep", {})}
    prompt = str(result.get("prompt_lens", [512])[0])
    points = []
    for name, entry in entries.items():
        if name.startswith("best ") or name in skip:
            continue
        if name.startswith("adaptive"):
            if adaptive is None or name.partition(" ")[0] != "adaptive":
                continue  # no stored profile, or another kernel path / suffix: its plan is not rebuilt here
            if abs(_cg_share(adaptive) - entry.get("cg_share", -1.0)) > 1e-3:
                print(f"  {result['model']} {name}: the rebuilt adaptive plan differs from the run's (left out)")
                continue
            plan = adaptive
        else:
            plan, _ = make_plan(name, request)
        prefill_s = entry["by_prompt"][prompt]["prefill_s"] if "by_prompt" in entry else entry["prefill_s"]
        points.append((f"{result['model']} {name}", MeasuredStep(
            plan, decode_s=entry["decode_s_per_token"], prefill_s=prefill_s, prompt_len=int(prompt),
            config=config, request=request, rates=rates)))
    return points


def errors(points: list[tuple[str, MeasuredStep]], profile: HardwareProfile) -> list[str]:
    """Predicted over measured for every point, with `profile`'s overheads (on the point's rates)."""
    lines = []
    overheads = calibration_of(profile)
    for name, point in points:
        assert point.config is not None and point.request is not None
        rates = replace(point.rates, **overheads) if point.rates is not None else profile
        p = predict(point.plan, point.config, rates, point.request)
        lines.append(f"  {name:34} decode predicted/measured {point.decode_s and p.decode_step_s / point.decode_s:5.2f}"
                     f"   prefill-{point.prompt_len} {p.prefill_s(point.prompt_len) / point.prefill_s:5.2f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results", nargs="+")
    parser.add_argument("--profile", default="configs/hardware/h100-16core.json")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--skip", default="", help="policies of the results to leave out (comma list), e.g. ones "
                                                  "measured before a change of their rule")
    args = parser.parse_args()
    profile = HardwareProfile.from_file(args.profile)
    skip = tuple(filter(None, args.skip.split(",")))
    points = [point for path in args.results
              for point in measured_points(json.loads(Path(path).read_text()), profile, skip)]
    if not points:
        raise SystemExit("no point to fit")
    print("before:", calibration_of(profile))
    print("\n".join(errors(points, profile)))
    first = points[0][1]
    assert first.config is not None and first.request is not None
    fitted = calibrate_overheads(profile, first.config, first.request, [p for _, p in points])
    print("after:", {f: round(v, 7) for f, v in calibration_of(fitted).items()})
    print("\n".join(errors(points, fitted)))
    if args.write:
        names = ", ".join(Path(path).name for path in args.results)
        source = f"overheads calibrated on {names} with benchmarks/calibrate_planner.py"
        replace(fitted, notes={**fitted.notes, "calibration": source}).save(args.profile)
        print(f"wrote {args.profile}")


if __name__ == "__main__":
    main()
