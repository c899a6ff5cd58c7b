"""Fits the planner's three serial overheads (per layer, per layer with CPU work, per piece) to a
partition_bench.py result, and shows the model's error on every point before and after.

    python benchmarks/calibrate_planner.py benchmarks/results/RESULT.json \\
        --profile configs/hardware/h100-16core.json [--write]

The plans of the fixed policies and of the sweep are rebuilt from their names with the request the
benchmark used (budget, 4096-token KV cache, 2048 batched tokens, 8 sequences); the adaptive point
is left out (its plan came from the machine's own profile, not stored). `--write` saves the fitted
overheads into the profile file. See docs/PLANNER.md, "Calibrating".
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from engine.model.factory import resolve_model_config
from engine.placement.hardware import HardwareProfile
from engine.placement.memory import parse_bytes
from engine.placement.planner import (
    OVERHEAD_FIELDS,
    MeasuredStep,
    build_plan_request,
    calibrate_overheads,
    predict,
)
from engine.placement.policies import make_plan


def measured_points(result: dict, request, skip: tuple[str, ...] = ()) -> list[tuple[str, MeasuredStep]]:
    entries = {**result["policies"], **result.get("sweep", {})}
    points = []
    for name, entry in entries.items():
        if name.startswith(("adaptive", "best ")) or name in skip:
            continue
        plan, _ = make_plan(name, request)
        prompt = str(result.get("prompt_lens", [512])[0])
        prefill_s = entry["by_prompt"][prompt]["prefill_s"] if "by_prompt" in entry else entry["prefill_s"]
        points.append((name, MeasuredStep(plan, decode_s=entry["decode_s_per_token"], prefill_s=prefill_s,
                                          prompt_len=int(prompt))))
    return points


def errors(points: list[tuple[str, MeasuredStep]], config, profile: HardwareProfile, request) -> list[str]:
    lines = []
    for name, point in points:
        p = predict(point.plan, config, profile, request)
        lines.append(f"  {name:22} decode measured/predicted {point.decode_s and p.decode_step_s / point.decode_s:5.2f}"
                     f"   prefill-{point.prompt_len} {p.prefill_s(point.prompt_len) / point.prefill_s:5.2f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("result")
    parser.add_argument("--profile", default="configs/hardware/h100-16core.json")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--skip", default="", help="policies of the result to leave out (comma list), e.g. ones "
                                                  "measured before a change of their rule")
    args = parser.parse_args()
    result = json.loads(Path(args.result).read_text())
    config, _ = resolve_model_config(result["model"])
    longest = max(result.get("prompt_lens", [512]))
    # the run's own storage: a bf16 run (--no-compact) planned as compact would skew the fit
    request = build_plan_request(config, parse_bytes(result["budget"]), kv_cache_tokens=max(4096, 2 * longest),
                                 max_num_batched_tokens=max(2048, longest), max_num_seqs=8,
                                 compact_host=bool(result.get("compact")))
    profile = HardwareProfile.from_file(args.profile)
    points = measured_points(result, request, tuple(filter(None, args.skip.split(","))))
    print("before:", {f: getattr(profile, f) for f in OVERHEAD_FIELDS})
    print("\n".join(errors(points, config, profile, request)))
    fitted = calibrate_overheads(profile, config, request, [p for _, p in points])
    print("after:", {f: round(getattr(fitted, f), 7) for f in OVERHEAD_FIELDS})
    print("\n".join(errors(points, config, fitted, request)))
    if args.write:
        source = f"overheads calibrated on {Path(args.result).name} with benchmarks/calibrate_planner.py"
        replace(fitted, notes={**fitted.notes, "calibration": source}).save(args.profile)
        print(f"wrote {args.profile}")


if __name__ == "__main__":
    main()
