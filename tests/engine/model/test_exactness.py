"""Every architecture matches `transformers` on a tiny random checkpoint saved by `transformers`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from engine.tools.tiny_checkpoint import write_tiny_checkpoint
from tests.conftest import ARCHS

PROMPT = [11, 57, 203, 9, 140, 33, 78, 250, 19, 4, 96, 121]


def _reference(path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype).to(device).eval()


def _hf_greedy(model, prompt: list[int], num_tokens: int, device: str = "cpu") -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt], device=device), max_new_tokens=num_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_logits_and_greedy_tokens_match_transformers(arch: str, tiny_checkpoints: dict[str, Path]) -> None:
    path = tiny_checkpoints[arch]
    reference = _reference(path)
    llm = LLM(str(path), dtype="float32", show_progress=False)
    with torch.no_grad():
        expected = reference(torch.tensor([PROMPT])).logits[0, -1].float()
    for chunk in (None, 5):  # one prefill, and a chunked prefill reading the paged cache
        logits = llm.engine.prompt_logits(PROMPT, max_chunk=chunk)
        assert _relative_error(logits, expected) < 1e-4
        assert torch.allclose(logits, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    tokens = llm.generate(prompt_token_ids=[PROMPT], params=params)[0].token_ids
    assert tokens == _hf_greedy(reference, PROMPT, 32)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_sharded_checkpoint_loads_identically(arch: str, tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    sharded = write_tiny_checkpoint(tmp_path / arch, arch=arch, seed=1, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    single = LLM(str(tiny_checkpoints[arch]), dtype="float32", show_progress=False)
    split = LLM(str(sharded), dtype="float32", show_progress=False)
    assert torch.equal(single.engine.prompt_logits(PROMPT), split.engine.prompt_logits(PROMPT))


def test_tied_embeddings_and_dtype_conversion(tmp_path: Path) -> None:
    path = write_tiny_checkpoint(tmp_path / "tied", arch="llama", seed=2, tie_word_embeddings=True)
    llm = LLM(str(path), dtype="bfloat16", show_progress=False)
    model = llm.engine.runner.model
    assert model.lm_head is model.embed_tokens
    assert model.dtype == torch.bfloat16
    reference = _reference(path)
    with torch.no_grad():
        expected = reference(torch.tensor([PROMPT])).logits[0, -1]
    assert _relative_error(llm.engine.prompt_logits(PROMPT), expected) < 3e-2  # bf16 weights


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernels", ["torch", "flash"])
def test_bf16_cuda_greedy_tokens_match_transformers(arch: str, kernels: str, tmp_path: Path) -> None:
    """With torch's own SDPA choice (the one transformers gets) tokens are identical; with flash
    attention (the default, engine/model/attention_kernels.py) they may differ only where
    transformers' own logits are within bf16 rounding of a tie."""
    path = write_tiny_checkpoint(tmp_path / arch, arch=arch, seed=1, dtype="bfloat16")
    reference = _reference(path, "cuda", torch.bfloat16)
    llm = LLM(str(path), device="cuda", dtype="bfloat16", show_progress=False, attention_kernels=kernels)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    tokens = llm.generate(prompt_token_ids=[PROMPT], params=params)[0].token_ids
    expected = _hf_greedy(reference, PROMPT, 16, "cuda")
    if kernels == "torch":
        assert tokens == expected
        return
    k = next((i for i, (a, b) in enumerate(zip(expected, tokens, strict=True)) if a != b), None)
    if k is not None:
        with torch.no_grad():
            logits = reference(torch.tensor([PROMPT + expected[:k]], device="cuda")).logits[0, -1].float()
        ulp = 2.0 ** (int(torch.log2(logits.abs().max()).floor().item()) - 7)
        assert abs(logits[expected[k]] - logits[tokens[k]]).item() <= 4 * ulp, f"diverged at {k}, not a tie"
