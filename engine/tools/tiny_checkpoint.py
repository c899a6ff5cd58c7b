"""Tiny random Hugging Face checkpoints (model + tokenizer) for tests and demos, built offline.

`python -m engine.tools.tiny_checkpoint DIR --arch mixtral` writes one.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

if TYPE_CHECKING:  # torch and transformers are imported on use: the tokenizer alone stays fast
    import torch
    from transformers import PreTrainedTokenizerFast

ARCHS: tuple[str, ...] = ("llama", "mixtral", "qwen2", "qwen2_moe", "phimoe")
VOCAB_SIZE_TARGET = 400
SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>")
CHAT_TOKENS: tuple[str, ...] = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A small engine reads the prompt, runs the model
and writes the answer one token at a time. Every token is a short piece of text: a letter, a
part of a word, a whole word, or a space followed by a word.

Once upon a time there was a little town by the sea. The people of the town were fishermen,
bakers and teachers. In the morning the boats went out, and in the evening they came back
with fish. The children played on the beach and the old men told stories about the storm.

Large language models do not fit in the memory of a small graphics card. The weights stay in
the main memory of the computer; some parts are copied to the card, some parts are computed by
the processor, and the rest stays where it is. A good plan keeps every part of the machine busy.

Hello! How are you today? I am fine, thank you. What is your name? My name is Ada. Where do you
live? I live in a house with a red door, near the river. Would you like a cup of tea or coffee?

The answer is 42. One, two, three, four, five, six, seven, eight, nine, ten. The year 2024 had
366 days. Please write a short poem about the moon, the stars and the night sky.
"""


@functools.lru_cache(maxsize=1)
def _trained_tokenizer_json() -> str:
    """Train the byte-level BPE once per process; returns its JSON (deterministic)."""
    tok = RawTokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE_TARGET,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    tok.add_special_tokens(list(CHAT_TOKENS))
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return tok.to_str()


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh byte-level BPE tokenizer (~400 tokens) with bos/eos/unk/pad and a chat template."""

    return wrap_tokenizer(RawTokenizer.from_str(_trained_tokenizer_json()))


def wrap_tokenizer(raw: RawTokenizer) -> PreTrainedTokenizerFast:
    """A `tokenizers` tokenizer as a transformers tokenizer with the project's special tokens and
    chat template (shared by the tiny test checkpoints and the demo model)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=list(CHAT_TOKENS),
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )


_CONFIG_CLASSES = {
    "llama": "LlamaConfig",
    "mixtral": "MixtralConfig",
    "qwen2": "Qwen2Config",
    "qwen2_moe": "Qwen2MoeConfig",
    "phimoe": "PhimoeConfig",
}

_ARCH_KWARGS: dict[str, dict[str, Any]] = {
    "llama": dict(intermediate_size=96),
    "mixtral": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    "qwen2": dict(intermediate_size=96),
    "qwen2_moe": dict(
        intermediate_size=96,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        num_experts=8,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=False,
    ),
    "phimoe": dict(
        intermediate_size=48,
        num_local_experts=4,
        num_experts_per_tok=2,
        attention_bias=True,
        lm_head_bias=True,
    ),
}


def tiny_config(arch: str, vocab_size: int, **overrides: Any) -> Any:
    """The transformers config of a tiny model of architecture `arch` (overrides win)."""
    import transformers as tf

    if arch not in _CONFIG_CLASSES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.1,
    )
    kwargs.update(_ARCH_KWARGS[arch])
    kwargs.update(overrides)
    return getattr(tf, _CONFIG_CLASSES[arch])(**kwargs)


_MODEL_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "phimoe": "PhimoeForCausalLM",
}


_ROUTER_SUFFIXES = ("mlp.gate.weight", "mlp.router.weight", "block_sparse_moe.gate.weight")


def _randomize(model: torch.nn.Module, seed: int, std: float) -> None:
    """Re-draw every parameter with a fixed seed: N(0, std), norms near 1, routers with std 1.

    Routers get a wide spread so that each token has clearly distinct top experts.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith(_ROUTER_SUFFIXES):
                p.copy_(noise)
            else:
                p.copy_(std * noise)


def write_tiny_checkpoint(
    path: str | Path,
    arch: str = "mixtral",
    *,
    seed: int = 0,
    dtype: str = "float32",
    max_shard_size: str | None = None,
    tie_word_embeddings: bool = False,
    **config_overrides: Any,
) -> Path:
    """Write a tiny random `arch` checkpoint (config, safetensors, tokenizer) to `path`.

    `config_overrides` go to the transformers config constructor (e.g. num_hidden_layers=3).
    With `max_shard_size` (e.g. "100KB") the weights are sharded with an index file.
    """
    import torch
    import transformers as tf
    from transformers.utils import logging as hf_logging

    tokenizer = build_tokenizer()
    overrides: dict[str, Any] = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    overrides.update(config_overrides)
    config = tiny_config(arch, len(tokenizer), **overrides)
    torch_dtype = getattr(torch, dtype)
    model_cls = getattr(tf, _MODEL_CLASSES[arch])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).eval()
    _randomize(model, seed, std=0.15)
    if config.tie_word_embeddings:
        model.tie_weights()
    model = model.to(torch_dtype)
    model.config.dtype = torch_dtype
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out, **kwargs)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: write a tiny checkpoint to DIR."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dir", type=Path)
    parser.add_argument("--arch", default="mixtral", choices=ARCHS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--max-shard-size", default=None, help="e.g. 100KB: write sharded safetensors")
    parser.add_argument("--tie-word-embeddings", action="store_true")
    args = parser.parse_args(argv)
    out = write_tiny_checkpoint(
        args.dir,
        args.arch,
        seed=args.seed,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        tie_word_embeddings=args.tie_word_embeddings,
    )
    print(out)


if __name__ == "__main__":
    main()
