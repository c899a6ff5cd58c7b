"""The results plot is drawn from a benchmark JSON: one bar per policy and phase, plus the floor."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from plot_partition import render  # noqa: E402


def test_plot_has_a_bar_per_policy_and_the_floor() -> None:
    result = json.loads((ROOT / "benchmarks/results/2026-11-24_partition_mixtral-8x7b_24GiB_h100.json").read_text())
    svg = render(result)
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert svg.count("<rect") == 1 + 2 * (len(result["policies"]) + 1)
    for name in result["policies"]:
        assert f">{name}</text>" in svg
    assert f"{result['floor']['decode_floor_tok_s']:.1f}" in svg


def test_plot_adds_the_hf_baseline_bars() -> None:
    result = json.loads((ROOT / "benchmarks/results/2026-11-24_partition_mixtral-8x7b_24GiB_h100.json").read_text())
    hf = {"by_prompt": {"2048": {"decode_tok_s": 0.5, "prefill_tok_s": 9.0},
                        "512": {"decode_tok_s": 0.25, "prefill_tok_s": 42.5}}}
    svg = render(result, hf)
    assert svg.count(">HF device_map</text>") == 2
    assert ">0.2</text>" in svg or ">0.3</text>" in svg  # the 512-token prompt's numbers, 0.25 printed to .1f
    assert ">42.5</text>" in svg


def test_plot_adds_the_best_llamacpp_bars() -> None:
    result = json.loads((ROOT / "benchmarks/results/2026-11-24_partition_mixtral-8x7b_24GiB_h100.json").read_text())
    llamacpp = {"fit": {"pp512_t15": {"tok_per_s_scaled": 338.7}, "pp512_t16": {"tok_per_s_scaled": 373.2},
                        "tg128_t15": {"tok_per_s_scaled": 4.27}, "tg128_t16": {"tok_per_s_scaled": 4.84}}}
    svg = render(result, llamacpp=llamacpp)
    assert svg.count(">llama.cpp</text>") == 2
    assert ">373.2</text>" in svg and ">4.8</text>" in svg  # the faster thread count of each phase
    assert ">338.7</text>" not in svg
