"""Issue-4 report from partition_bench.py results (adaptive build, one JSON per model and budget)
and hf_offload_bench.py results: the planner's blind predictions against the measurements, the
adaptive plan against every fixed policy, the best manual split and HF device_map offloading, and
the share of the floor reached.

    python benchmarks/planner_report.py benchmarks/results/2026-11-24_validation_*.json \\
        --hf benchmarks/results/2026-11-24_hf_offload_*.json > report.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

FIXED = ("cpu-experts", "stream", "fiddler")


def _load(paths: list[str]) -> list[dict]:
    return [json.loads(Path(p).read_text()) for p in paths]


def _hf_index(results: list[dict]) -> dict[tuple[str, str], dict]:
    return {(r["model"], r["budget"]): r for r in results}


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def prediction_rows(results: list[dict]) -> list[str]:
    lines = ["| model | budget | phase | predicted tok/s | measured tok/s | measured / predicted |",
             "|---|---|---|---:|---:|---:|"]
    for r in results:
        adaptive = r["policies"].get("adaptive")
        predicted = r.get("predicted_adaptive")
        if not adaptive or not predicted:
            continue
        lines.append(f"| {r['model']} | {r['budget']} | decode | {predicted['decode_tok_s']:.2f} | "
                     f"{adaptive['decode_tok_s']:.2f} | {_ratio(adaptive['decode_tok_s'], predicted['decode_tok_s'])} |")
        for n, p in predicted["by_prompt"].items():
            m = adaptive["by_prompt"][n]
            lines.append(f"| {r['model']} | {r['budget']} | prefill-{n} | {p['prefill_tok_s']:.1f} | "
                         f"{m['prefill_tok_s']:.1f} | {_ratio(m['prefill_tok_s'], p['prefill_tok_s'])} |")
    return lines


def comparison_rows(results: list[dict], hf: dict[tuple[str, str], dict], metric: str, prompt: str) -> list[str]:
    """One row per model and budget: adaptive, each fixed policy, best manual split, HF, floor."""
    header = ["model", "budget", "adaptive", *FIXED, "best manual", "HF device_map", "floor",
              "adaptive / best fixed", "adaptive / best manual", "adaptive / floor", "adaptive / shared-DRAM floor"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
    key = "decode_tok_s" if metric == "decode" else "prefill_tok_s"
    floor_key = "decode_floor_tok_s" if metric == "decode" else "prefill_floor_tok_s"
    fmt = "{:.2f}" if metric == "decode" else "{:.0f}"
    for r in results:
        policies = r["policies"]
        if "adaptive" not in policies:
            continue

        def value(entry: dict) -> float:
            return entry["by_prompt"][prompt][key] if prompt in entry.get("by_prompt", {}) else entry[key]

        adaptive = value(policies["adaptive"])
        fixed = {p: value(policies[p]) for p in FIXED if p in policies}
        sweep = {p: value(v) for p, v in r.get("sweep", {}).items()}
        best_manual = max(sweep.values(), default=0.0)
        best_fixed = max(fixed.values(), default=0.0)
        floors = r["floor_by_prompt"].get(prompt, r["floor"])
        floor = floors[floor_key]
        shared = floors.get("decode_floor_shared_tok_s") if metric == "decode" else None
        h = hf.get((r["model"], r["budget"]))
        hf_value = h["by_prompt"][prompt][key] if h and prompt in h["by_prompt"] else None
        cells = [r["model"], r["budget"], fmt.format(adaptive), *(fmt.format(fixed[p]) if p in fixed else "-" for p in FIXED),
                 fmt.format(best_manual) if sweep else "-", fmt.format(hf_value) if hf_value else "-",
                 fmt.format(floor), _ratio(adaptive, best_fixed), _ratio(adaptive, best_manual) if sweep else "-",
                 f"{adaptive / floor:.0%}", f"{adaptive / shared:.0%}" if shared else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render(results: list[dict], hf_results: list[dict]) -> str:
    hf = _hf_index(hf_results)
    prompts = sorted({n for r in results for n in r.get("floor_by_prompt", {})}, key=int) or ["512"]
    out = ["## Predicted (blind) vs measured, adaptive plan", "", *prediction_rows(results), "",
           f"## Decode tok/s (batch 1, after a {prompts[0]}-token prompt)", "",
           *comparison_rows(results, hf, "decode", prompts[0]), ""]
    for n in prompts:
        out += [f"## Prefill tok/s, {n}-token prompt", "", *comparison_rows(results, hf, "prefill", n), ""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results", nargs="+", help="partition_bench.py JSON files (adaptive build)")
    parser.add_argument("--hf", nargs="*", default=[], help="hf_offload_bench.py JSON files")
    args = parser.parse_args()
    print(render(_load(args.results), _load(args.hf)))


if __name__ == "__main__":
    main()
