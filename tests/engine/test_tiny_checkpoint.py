"""Tiny random checkpoints: load back with transformers, sharding, determinism, useful logits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.tools.tiny_checkpoint import (
    ARCHS,
    _trained_tokenizer_json,
    build_tokenizer,
    main,
    write_tiny_checkpoint,
)

MOE_ARCHS = ("mixtral", "qwen2_moe", "phimoe")


def load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_tokenizer_vocab_and_specials() -> None:
    tok = build_tokenizer()
    assert 300 <= len(tok) <= 500
    assert [tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token] == ["<s>", "</s>", "<unk>", "<pad>"]
    for text in ["Hello, world!", "naïve café", "日本語 你好", "🙂👍🏽🇫🇷", "\ttabs\nand  spaces "]:
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    assert tok.chat_template and "add_generation_prompt" in tok.chat_template


def test_tokenizer_is_deterministic_across_processes() -> None:
    # load the module file alone (not the `engine` package) so that the child process starts fast
    source = Path(__file__).resolve().parents[2] / "engine" / "tools" / "tiny_checkpoint.py"
    code = (
        "import importlib.util as u, sys; s = u.spec_from_file_location('tc', sys.argv[1]);"
        "m = u.module_from_spec(s); s.loader.exec_module(m); print(m._trained_tokenizer_json())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(source)], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == _trained_tokenizer_json()
    assert json.loads(out.stdout)["model"]["vocab"] == build_tokenizer().backend_tokenizer.get_vocab(False)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_loads_back(arch: str, tmp_path: Path) -> None:
    path = write_tiny_checkpoint(tmp_path, arch)
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    model = load(path)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    cfg = model.config
    assert cfg.model_type == arch
    assert cfg.vocab_size == len(tok)
    assert (cfg.bos_token_id, cfg.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    assert cfg.hidden_size == 64 and cfg.num_attention_heads == 4 and cfg.num_key_value_heads == 2
    ids = torch.tensor([tok.encode("Once upon a time there was a little town")])
    with torch.no_grad():
        logits = model(ids).logits[0]
    assert torch.isfinite(logits).all()
    assert logits.std(dim=-1).min() > 0.5  # far from uniform
    greedy = model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1] :]
    assert len(set(greedy.tolist())) >= 4  # greedy decoding is not stuck on one token


def test_phimoe_has_biases(tmp_path: Path) -> None:
    weights = tensors(write_tiny_checkpoint(tmp_path, "phimoe"))
    assert "lm_head.bias" in weights
    assert "model.layers.0.self_attn.q_proj.bias" in weights
    assert weights["lm_head.bias"].abs().max() > 0


def test_qwen2_moe_shared_expert_and_mlp_only_layers(tmp_path: Path) -> None:
    path = write_tiny_checkpoint(tmp_path, "qwen2_moe", num_hidden_layers=3, mlp_only_layers=[1])
    weights = tensors(path)
    assert "model.layers.0.mlp.shared_expert.up_proj.weight" in weights
    assert "model.layers.1.mlp.up_proj.weight" in weights  # dense layer
    assert "model.layers.1.mlp.gate.weight" not in weights
    assert json.loads((path / "config.json").read_text())["mlp_only_layers"] == [1]
    assert load(path).config.num_hidden_layers == 3


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_routers_pick_distinct_experts(arch: str, tmp_path: Path) -> None:
    model = load(write_tiny_checkpoint(tmp_path, arch))
    mlp = model.model.layers[0].mlp
    router = mlp.router if hasattr(mlp, "router") else mlp.gate
    n_experts = router.weight.shape[0]
    assert 4 <= n_experts <= 8
    seen: list[torch.Tensor] = []
    handle = router.register_forward_hook(
        lambda _m, _i, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    ids = torch.tensor([build_tokenizer().encode("The quick brown fox jumps over the lazy dog again")])
    with torch.no_grad():
        model(ids)
    handle.remove()
    logits = seen[0].reshape(-1, n_experts)
    top = logits.topk(2, dim=-1)
    assert len(set(top.indices[:, 0].tolist())) >= 2
    assert (top.values[:, 0] - top.values[:, 1]).median() > 0.05


def test_sharded_checkpoint_writes_index(tmp_path: Path) -> None:
    path = write_tiny_checkpoint(tmp_path, "mixtral", max_shard_size="50KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((path / s).is_file() for s in shards)
    single = write_tiny_checkpoint(tmp_path / "single", "mixtral")
    a, b = tensors(path), tensors(single)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load(path).config.model_type == "mixtral"


def test_seed_and_dtype(tmp_path: Path) -> None:
    a = tensors(write_tiny_checkpoint(tmp_path / "a", "llama", seed=1))
    b = tensors(write_tiny_checkpoint(tmp_path / "b", "llama", seed=1))
    c = tensors(write_tiny_checkpoint(tmp_path / "c", "llama", seed=2))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])
    half = tensors(write_tiny_checkpoint(tmp_path / "h", "llama", dtype="bfloat16"))
    assert half[key].dtype == torch.bfloat16


def test_tied_embeddings(tmp_path: Path) -> None:
    path = write_tiny_checkpoint(tmp_path, "qwen2", tie_word_embeddings=True)
    assert "lm_head.weight" not in tensors(path)
    model = load(path)
    assert model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_unknown_arch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown arch"):
        write_tiny_checkpoint(tmp_path, "gpt2")


def test_cli_writes_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main([str(tmp_path / "cli"), "--arch", "qwen2", "--max-shard-size", "50KB"])
    assert str(tmp_path / "cli") in capsys.readouterr().out
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["model_type"] == "qwen2"
    assert (tmp_path / "cli" / "model.safetensors.index.json").is_file()
