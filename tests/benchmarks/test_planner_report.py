"""The issue-4 report table: ratios computed from partition_bench-shaped results."""

from __future__ import annotations

from benchmarks.planner_report import render


def _entry(decode: float, prefill: dict[str, float]) -> dict:
    by_prompt = {n: {"decode_tok_s": decode, "prefill_tok_s": v} for n, v in prefill.items()}
    return {"decode_tok_s": decode, "prefill_tok_s": prefill["512"], "by_prompt": by_prompt}


def test_report_ratios_and_predictions() -> None:
    result = {
        "model": "mixtral-8x7b", "budget": "24GiB",
        "floor": {"decode_floor_tok_s": 10.0, "prefill_floor_tok_s": 500.0},
        "floor_by_prompt": {"512": {"decode_floor_tok_s": 10.0, "decode_floor_shared_tok_s": 8.0,
                                    "prefill_floor_tok_s": 500.0},
                            "2048": {"decode_floor_tok_s": 10.0, "prefill_floor_tok_s": 1000.0}},
        "predicted_adaptive": {"decode_tok_s": 8.0, "prefill_tok_s": 400.0,
                               "by_prompt": {"512": {"prefill_tok_s": 400.0}, "2048": {"prefill_tok_s": 800.0}}},
        "policies": {"adaptive": _entry(6.0, {"512": 450.0, "2048": 900.0}),
                     "cpu-experts": _entry(3.0, {"512": 150.0, "2048": 200.0}),
                     "stream": _entry(4.0, {"512": 300.0, "2048": 600.0})},
        "sweep": {"balanced:cg=0.5": _entry(6.5, {"512": 440.0, "2048": 880.0})},
    }
    hf = {"model": "mixtral-8x7b", "budget": "24GiB", "by_prompt": {"512": {"decode_tok_s": 0.5, "prefill_tok_s": 50.0}}}
    text = render([result], [hf])
    assert "| mixtral-8x7b | 24GiB | decode | 8.00 | 6.00 | 0.75 |" in text
    assert "| mixtral-8x7b | 24GiB | prefill-2048 | 800.0 | 900.0 | 1.12 |" in text
    decode_row = next(line for line in text.splitlines() if line.startswith("| mixtral-8x7b | 24GiB | 6.00"))
    # adaptive 6 vs best fixed 4 (stream), best manual 6.5, HF 0.5, floor 10 (8 with shared DRAM)
    assert decode_row.endswith("| 6.50 | 0.50 | 10.00 | 1.50 | 0.92 | 60% | 75% |")
    prefill_row = next(line for line in text.splitlines() if line.startswith("| mixtral-8x7b | 24GiB | 450"))
    assert prefill_row.endswith("| 90% | - |")  # the shared-DRAM floor is a decode floor
    assert "| 3.00 | 4.00 | - |" in decode_row  # fiddler was not run
