"""The public API of DESIGN.md and the `scheinfer generate` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine import LLM, SamplingParams
from engine.cli import app
from engine.sampling_params import SamplingParamsError


def test_generate_text_prompts_returns_text_and_token_ids(tiny_checkpoints: dict[str, Path]) -> None:
    llm = LLM(str(tiny_checkpoints["mixtral"]), device="cpu", show_progress=False)
    outs = llm.generate(["Hello", "The cat sat on the"], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    assert len(outs) == 2
    for out in outs:
        assert len(out.token_ids) == 8 and out.finish_reason == "length"
        assert out.text == llm.tokenizer.decode(out.token_ids)


def test_stop_strings_cut_the_text(tiny_checkpoints: dict[str, Path]) -> None:
    llm = LLM(str(tiny_checkpoints["llama"]), show_progress=False)
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    full = llm.generate(["Once upon a time"], greedy)[0].text
    stop = full[5:8]
    assert len(stop) == 3 and stop in full
    cut = llm.generate(["Once upon a time"], SamplingParams(max_tokens=24, temperature=0.0, stop=[stop],
                                                            ignore_eos=True))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]
    assert stop not in cut.text


def test_eos_stops_generation(tiny_checkpoints: dict[str, Path]) -> None:
    llm = LLM(str(tiny_checkpoints["llama"]), show_progress=False)
    free = llm.generate(prompt_token_ids=[[5, 6, 7]], params=SamplingParams(max_tokens=6, temperature=0.0,
                                                                            ignore_eos=True))[0]
    stopper = free.token_ids[2]
    out = llm.generate(prompt_token_ids=[[5, 6, 7]],
                       params=SamplingParams(max_tokens=6, temperature=0.0, stop_token_ids=[stopper]))[0]
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[: free.token_ids.index(stopper) + 1]


def test_bad_requests_are_clear(tiny_checkpoints: dict[str, Path]) -> None:
    llm = LLM(str(tiny_checkpoints["llama"]), show_progress=False, max_model_len=64)
    with pytest.raises(ValueError, match="maximum context length is 64 tokens"):
        llm.generate(prompt_token_ids=[[1] * 60], params=SamplingParams(max_tokens=10))
    with pytest.raises(SamplingParamsError, match="temperature must be >= 0"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="exactly one of prompts and prompt_token_ids"):
        llm.generate()


def test_cli_generate_prints_json(tiny_checkpoints: dict[str, Path]) -> None:
    result = CliRunner().invoke(app, ["generate", "--model", str(tiny_checkpoints["qwen2"]), "--prompt", "Hi",
                                      "--max-tokens", "5", "--json"])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stdout.splitlines() if x.startswith("{"))
    assert len(json.loads(line)["token_ids"]) <= 5


def test_cli_generate_takes_host_chunk_rows(tiny_checkpoints: dict[str, Path]) -> None:
    args = ["generate", "--model", str(tiny_checkpoints["mixtral"]), "--prompt-token-ids", "5,9,13", "--max-tokens", "3",
            "--policy", "manual:cg=0.5", "--json"]
    outputs = []
    for rows in ("32", "64"):
        result = CliRunner().invoke(app, [*args, "--host-chunk-rows", rows])
        assert result.exit_code == 0, result.output
        outputs.append(json.loads(next(x for x in result.stdout.splitlines() if x.startswith("{")))["token_ids"])
    assert outputs[0] == outputs[1]  # pieces of another size: the same greedy tokens (fp32, one device)
    result = CliRunner().invoke(app, [*args, "--host-chunk-rows", "8"])
    assert result.exit_code != 0


def test_cli_reports_a_missing_model_without_traceback(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"])
    assert result.exit_code == 2
    assert "neither a checkpoint directory nor a known model name" in result.output
