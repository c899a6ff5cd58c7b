"""The HF device_map offloading baseline: budget arithmetic, random model building and an end-to-end
CPU run on a tiny Mixtral (no GPU, no accelerate needed)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import hf_offload_bench as bench  # noqa: E402

GIB = 1 << 30
TINY_MIXTRAL = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                "num_key_value_heads": 2, "vocab_size": 128, "num_local_experts": 4, "num_hidden_layers": 8}
# One tiny layer: attention q,o 64x64 + k,v 32x64; experts 4 x (gate_up 256x64 + down 64x128);
# router 4x64; two RMSNorms. Non-layer: embeddings and lm_head 128x64, final norm, rotary inv_freq.
TINY_LAYER_BYTES = 2 * (2 * 64 * 64 + 2 * 32 * 64 + 4 * (256 * 64 + 64 * 128) + 4 * 64 + 2 * 64)
TINY_NONLAYER_BYTES = 2 * (2 * 128 * 64 + 64) + 2 * 4 * 8  # two fp32 buffers of head_dim / 2


def test_budget_too_small_puts_no_layer_on_gpu() -> None:
    assert bench.gpu_layers(32, 3 * GIB, GIB // 2, budget=2 * GIB, reserve=2 * GIB) == 0
    assert bench.gpu_layers(32, 3 * GIB, GIB // 2, budget=5 * GIB, reserve=2 * GIB) == 0  # 2.5 GiB left < a layer


def test_budget_bigger_than_model_puts_all_layers_on_gpu() -> None:
    assert bench.gpu_layers(32, 3 * GIB, GIB // 2, budget=1000 * GIB, reserve=2 * GIB) == 32


def test_gpu_layers_is_floor_of_what_is_left() -> None:
    layer, nonlayer, reserve = 1000, 300, 200
    assert bench.gpu_layers(32, layer, nonlayer, nonlayer + reserve + 7 * layer, reserve) == 7
    assert bench.gpu_layers(32, layer, nonlayer, nonlayer + reserve + 8 * layer - 1, reserve) == 7


def test_scaled_gpu_layers_keeps_the_fraction() -> None:
    assert bench.scaled_gpu_layers(0, 32, 4) == 0
    assert bench.scaled_gpu_layers(32, 32, 4) == 4
    assert bench.scaled_gpu_layers(16, 32, 4) == 2
    assert bench.scaled_gpu_layers(7, 32, 4) == 1  # 0.875 rounds to 1
    assert bench.scaled_gpu_layers(4, 32, 4) == 1  # 0.5 rounds half up
    assert bench.scaled_gpu_layers(3, 32, 4) == 0  # 0.375
    for n in range(33):
        assert bench.scaled_gpu_layers(n, 32, 32) == n
        assert abs(bench.scaled_gpu_layers(n, 32, 8) - n / 4) <= 0.5


def test_scaling_and_prompt_lens() -> None:
    assert bench.scale_to_full(0.5, 4, 32) == pytest.approx(4.0)
    assert bench.parse_prompt_lens("512,2048") == [512, 2048]
    assert bench.parse_prompt_lens("8") == [8]
    with pytest.raises(ValueError):
        bench.parse_prompt_lens("0")


def test_device_map_puts_first_layers_on_gpu() -> None:
    config, full_layers = bench.load_hf_config("mixtral-8x7b", 4, TINY_MIXTRAL)
    assert full_layers == 8 and config.num_hidden_layers == 4
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    device_map = bench.device_map_for(model, 1)
    assert device_map["model.embed_tokens"] == 0 and device_map["lm_head"] == 0
    assert device_map["model.norm"] == 0 and device_map["model.rotary_emb"] == 0
    assert [device_map[f"model.layers.{i}"] for i in range(4)] == [0, "cpu", "cpu", "cpu"]
    assert bench.model_bytes(model) == (TINY_NONLAYER_BYTES, TINY_LAYER_BYTES)


def test_random_model_has_real_rotary_and_norms_and_finite_logits() -> None:
    config, _ = bench.load_hf_config("mixtral-8x7b", 2, TINY_MIXTRAL)
    model = bench.build_random_model(config, seed=0)
    rotary = model.model.rotary_emb
    fresh = type(rotary)(config=config)
    assert torch.equal(rotary.inv_freq, fresh.inv_freq)
    assert torch.all(model.model.norm.weight == 1)
    weight = model.model.layers[0].self_attn.q_proj.weight.float()
    assert 0.01 < weight.std().item() < 0.03
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.inference_mode():
        logits = model(input_ids=torch.randint(128, (1, 8))).logits
    assert torch.isfinite(logits).all()


def test_end_to_end_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "hf_offload.json"
    bench.main(["--device", "cpu", "--model", "mixtral-8x7b", "--layers", "2", "--prompt-len", "8",
                "--new-tokens", "3", "--budget", "1MiB", "--reserve", "0MiB",
                "--config-overrides", json.dumps(TINY_MIXTRAL), "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["model"] == "mixtral-8x7b" and result["budget"] == "1MiB"
    assert result["layers_timed"] == 2 and result["full_layers"] == 8
    expected_full = bench.gpu_layers(8, TINY_LAYER_BYTES, TINY_NONLAYER_BYTES, 1 << 20, 0)
    assert result["gpu_layers_full"] == expected_full == 4
    assert result["gpu_layers_timed"] == 1
    assert result["transformers"] and "date" in result and "device" in result and "accelerate" in result
    numbers = result["by_prompt"]["8"]
    assert set(numbers) == {"prefill_s_timed", "decode_s_timed", "prefill_tok_s", "decode_tok_s"}
    for value in numbers.values():
        assert math.isfinite(value) and value > 0
    assert numbers["prefill_tok_s"] == pytest.approx(8 / (numbers["prefill_s_timed"] * 8 / 2))
    assert numbers["decode_tok_s"] == pytest.approx(1 / (numbers["decode_s_timed"] * 8 / 2))
