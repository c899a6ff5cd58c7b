"""The embedded demo model (engine/demo_model): loads, is small, chats, and matches transformers."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine import LLM, SamplingParams
from engine.demo_model import DEMO_MODEL_DIR

MAX_BYTES = 30 * 1024 * 1024


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(str(DEMO_MODEL_DIR), dtype="float32", show_progress=False)


def test_demo_model_is_a_small_mixtral() -> None:
    config = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert config["num_local_experts"] == 4 and config["num_experts_per_tok"] == 2
    size = sum(p.stat().st_size for p in DEMO_MODEL_DIR.rglob("*") if p.is_file())
    assert size <= MAX_BYTES, f"demo model is {size / 2**20:.1f} MiB"


def test_demo_model_has_a_chat_template() -> None:
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR, local_files_only=True)
    assert tokenizer.chat_template
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True
    )
    assert "Hello" in text and text.endswith("<|assistant|>\n")


def test_demo_model_generates_with_the_engine(llm: LLM) -> None:
    out = llm.generate(["The"], SamplingParams(max_tokens=12, temperature=0.7, seed=0))[0]
    assert out.token_ids and out.text.strip()


def test_greedy_tokens_match_transformers(llm: LLM) -> None:
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR, local_files_only=True)
    prompt = tokenizer("The default value of the")["input_ids"]
    reference = AutoModelForCausalLM.from_pretrained(
        DEMO_MODEL_DIR, local_files_only=True, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        expected = reference.generate(
            torch.tensor([prompt]),
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=tokenizer.pad_token_id,
        )[0, len(prompt) :].tolist()
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    tokens = llm.generate(prompt_token_ids=[prompt], params=params)[0].token_ids
    assert tokens == expected


def test_serve_without_a_model_serves_the_demo_model() -> None:
    from server.settings import DEMO_MODEL_NAME, load_settings

    settings = load_settings(None)
    assert settings.model == str(DEMO_MODEL_DIR)
    assert settings.model_name == DEMO_MODEL_NAME
    assert load_settings(None, model="/elsewhere").model == "/elsewhere"
