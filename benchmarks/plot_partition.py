"""Draws docs/partition_24GiB.svg from a partition_bench.py JSON result: decode and prefill
tokens/s per policy next to the floor. Plain SVG, no plotting library.

    python benchmarks/plot_partition.py benchmarks/results/2026-11-24_s5_side_by_side_scheinfer_mixtral_h100.json \
        --llamacpp benchmarks/results/2026-11-24_s5_side_by_side_llamacpp_mixtral_h100.json \
        --hf benchmarks/results/2026-11-24_hf_offload_mixtral-8x7b_24GiB_h100.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

WIDTH, BAR_H, GAP, LEFT = 640, 18, 6, 190


def _panel(title: str, rows: list[tuple[str, float]], top: int) -> tuple[list[str], int]:
    peak = max(v for _, v in rows) or 1.0
    parts = [f'<text x="10" y="{top + 14}" font-weight="bold">{title}</text>']
    y = top + 24
    for label, value in rows:
        width = (WIDTH - LEFT - 60) * value / peak
        color = "#999" if label == "floor" else "#3b7dd8"
        parts += [f'<text x="{LEFT - 6}" y="{y + 13}" text-anchor="end">{label}</text>',
                  f'<rect x="{LEFT}" y="{y}" width="{width:.1f}" height="{BAR_H}" fill="{color}"/>',
                  f'<text x="{LEFT + width + 4:.1f}" y="{y + 13}">{value:.1f}</text>']
        y += BAR_H + GAP
    return parts, y + 10


def llamacpp_best(llamacpp: dict, phase: str) -> float:
    """The best scaled tokens/s over thread counts of a llamacpp_bench.py result; phase "pp512"
    (prefill-512) or "tg" (decode)."""
    values = [fit["tok_per_s_scaled"] for name, fit in llamacpp["fit"].items() if name.startswith(phase)]
    if not values:
        raise ValueError(f"the llama.cpp result has no {phase} fit")
    return max(values)


def render(result: dict, hf: dict | None = None, llamacpp: dict | None = None) -> str:
    """`hf`: an hf_offload_bench.py result for the same model and budget; `llamacpp`: a
    llamacpp_bench.py result for the same model (one more bar per phase each)."""
    policies = result["policies"]
    decode = [(name, r["decode_tok_s"]) for name, r in policies.items()]
    prefill = [(name, r["prefill_tok_s"]) for name, r in policies.items()]
    if llamacpp is not None:
        decode.append(("llama.cpp", llamacpp_best(llamacpp, "tg")))
        prefill.append(("llama.cpp", llamacpp_best(llamacpp, "pp512")))
    if hf is not None:
        first = hf["by_prompt"][min(hf["by_prompt"], key=int)]
        decode.append(("HF device_map", first["decode_tok_s"]))
        prefill.append(("HF device_map", first["prefill_tok_s"]))
    decode.append(("floor", result["floor"]["decode_floor_tok_s"]))
    prefill.append(("floor", result["floor"]["prefill_floor_tok_s"]))
    head = f"{result['model']} at {result['budget']}, batch 1, {result['date']} ({result['device']})"
    parts, y = _panel(f"decode tokens/s — {head}", decode, 0)
    more, y = _panel("prefill-512 tokens/s", prefill, y)
    body = "\n".join(parts + more)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{y}" font-family="sans-serif" '
            f'font-size="12">\n<rect width="100%" height="100%" fill="white"/>\n{body}\n</svg>\n')


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("result")
    parser.add_argument("--out", default="docs/partition_24GiB.svg")
    parser.add_argument("--hf", default=None, help="hf_offload_bench.py JSON of the same model and budget")
    parser.add_argument("--llamacpp", default=None, help="llamacpp_bench.py JSON of the same model")
    args = parser.parse_args()
    hf = json.loads(Path(args.hf).read_text()) if args.hf else None
    llamacpp = json.loads(Path(args.llamacpp).read_text()) if args.llamacpp else None
    Path(args.out).write_text(render(json.loads(Path(args.result).read_text()), hf, llamacpp))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
