"""Batched generation over the paged KV cache gives what each prompt gives alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import LLM, SamplingParams

PROMPTS = [[5, 9, 13, 22, 40, 41, 42, 7, 8, 100, 3], [3, 4], [17] * 20, [250, 251, 6, 1, 77]]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_batch_of_different_lengths_matches_each_prompt_alone(arch: str, tiny_checkpoints: dict[str, Path]) -> None:
    llm = LLM(str(tiny_checkpoints[arch]), dtype="float32", show_progress=False, block_size=4, max_prefill_chunk=6)
    alone = [llm.generate(prompt_token_ids=[p], params=GREEDY)[0].token_ids for p in PROMPTS]
    together = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, params=GREEDY)]
    assert together == alone
    assert all(len(t) == 24 for t in together)
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks  # every KV block returned to the pool


def test_seeded_sampling_is_independent_of_the_batch(tiny_checkpoints: dict[str, Path]) -> None:
    llm = LLM(str(tiny_checkpoints["qwen2"]), dtype="float32", show_progress=False)
    seeded = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    other = SamplingParams(max_tokens=16, temperature=0.8, ignore_eos=True)
    alone = llm.generate(prompt_token_ids=[PROMPTS[0]], params=seeded)[0].token_ids
    mixed = llm.generate(prompt_token_ids=[PROMPTS[1], PROMPTS[0], PROMPTS[2]], params=[other, seeded, other])
    assert mixed[1].token_ids == alone


def test_preemption_under_kv_pressure_keeps_results(tiny_checkpoints: dict[str, Path]) -> None:
    """A KV cache too small for every sequence at once forces preemption and recomputation."""
    path = str(tiny_checkpoints["llama"])
    roomy = LLM(path, dtype="float32", show_progress=False, block_size=4)
    tight = LLM(path, dtype="float32", show_progress=False, block_size=4, kv_cache_tokens=64)
    expected = [o.token_ids for o in roomy.generate(prompt_token_ids=PROMPTS, params=GREEDY)]
    got = [o.token_ids for o in tight.generate(prompt_token_ids=PROMPTS, params=GREEDY)]
    assert got == expected
    assert tight.engine.stats().num_preemptions > 0
    assert tight.engine.block_manager.num_free_blocks == tight.engine.block_manager.num_blocks


def test_abort_frees_blocks_at_once(tiny_checkpoints: dict[str, Path]) -> None:
    llm = LLM(str(tiny_checkpoints["llama"]), dtype="float32", show_progress=False, block_size=4)
    engine = llm.engine
    engine.add_request("a", PROMPTS[0], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    final = engine.abort_request("a")
    assert final is not None and final.finished and final.finish_reason == "abort"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.has_unfinished_requests()


def test_failing_step_fails_only_its_requests(tiny_checkpoints: dict[str, Path], monkeypatch) -> None:
    llm = LLM(str(tiny_checkpoints["llama"]), dtype="float32", show_progress=False)
    engine = llm.engine
    original = engine.runner.execute

    def explode(chunks):
        raise RuntimeError("boom")

    monkeypatch.setattr(engine.runner, "execute", explode)
    engine.add_request("bad", PROMPTS[1], SamplingParams(max_tokens=4))
    outputs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outputs] == [("bad", "error")]
    assert "boom" in (outputs[0].error or "")
    monkeypatch.setattr(engine.runner, "execute", original)
    good = llm.generate(prompt_token_ids=[PROMPTS[1]], params=GREEDY)[0]
    assert good.finish_reason == "length" and len(good.token_ids) == 24
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
