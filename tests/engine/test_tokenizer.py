"""Tokenizer wrapper: local loading, clear errors, chat template, eos ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.tokenizer import ChatTemplateError, Tokenizer, TokenizerLoadError, load_tokenizer
from engine.tools.tiny_checkpoint import build_tokenizer, write_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "llama")


@pytest.fixture(scope="module")
def tok(ckpt: Path) -> Tokenizer:
    return Tokenizer.from_dir(ckpt)


def test_loads_from_checkpoint_dir_with_local_files_only(tok: Tokenizer) -> None:
    hf = build_tokenizer()
    assert tok.vocab_size == len(hf)
    assert tok.bos_token_id == hf.convert_tokens_to_ids("<s>")
    text = "Hello world! café 日本語 🙂"
    assert tok.encode(text) == list(hf.encode(text))
    assert tok.decode(tok.encode(text)) == text


def test_encode_adds_bos_only_when_asked(tok: Tokenizer) -> None:
    with_bos = tok.encode("hello")
    without = tok.encode("hello", add_special_tokens=False)
    assert with_bos[0] == tok.bos_token_id
    assert with_bos[1:] == without
    assert tok.decode(with_bos, skip_special_tokens=False).startswith("<s>")
    assert tok.convert_ids_to_tokens(without)[0].startswith("h")


def test_load_tokenizer_alias(ckpt: Path) -> None:
    assert load_tokenizer(ckpt).encode("abc") == Tokenizer.from_dir(ckpt).encode("abc")


def test_missing_tokenizer_names_the_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(TokenizerLoadError, match=str(tmp_path)) as info:
        Tokenizer.from_dir(tmp_path)
    assert isinstance(info.value, ValueError)
    with pytest.raises(TokenizerLoadError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nope")


def test_broken_tokenizer_file_is_a_load_error(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    with pytest.raises(TokenizerLoadError, match=str(tmp_path)):
        Tokenizer.from_dir(tmp_path)


def test_chat_template_contains_messages(tok: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour 🙂"},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Another one?"},
    ]
    ids = tok.apply_chat_template(messages)
    text = tok.decode(ids, skip_special_tokens=False)
    for m in messages:
        assert m["content"] in text
    assert text.index("You are terse.") < text.index("Name a colour") < text.index("Another one?")
    assert text.rstrip("\n").endswith("<|assistant|>")
    user_id = tok.hf.convert_tokens_to_ids("<|user|>")
    assert ids.count(user_id) == 2  # markers are single special tokens, not split text
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def test_chat_template_without_generation_prompt(tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": "hi"}]
    with_prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    without = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert with_prompt[: len(without)] == without
    assert len(with_prompt) > len(without)
    assert "<|assistant|>" not in tok.decode(without, skip_special_tokens=False)


def test_chat_template_none_content_is_empty(tok: Tokenizer) -> None:
    text = tok.render_chat([{"role": "user", "content": None}])
    assert "<|user|>\n<|end|>" in text


def test_no_chat_template_is_a_clear_error(tmp_path: Path) -> None:
    hf = build_tokenizer()
    hf.chat_template = None
    hf.save_pretrained(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    assert not tok.has_chat_template
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_bad_messages_are_a_chat_template_error(tok: Tokenizer) -> None:
    with pytest.raises(ChatTemplateError):
        tok.apply_chat_template([{"content": "no role"}])


def test_eos_ids_union_of_tokenizer_and_configs(ckpt: Path, tmp_path: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tmp_path / name).write_bytes((ckpt / name).read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.eos_token_ids == frozenset({2, 5, 7})


def test_eos_ids_of_written_checkpoint(tok: Tokenizer) -> None:
    assert tok.eos_token_ids == frozenset({tok.hf.convert_tokens_to_ids("</s>")})
