"""Sampler invariants: seeds, step boundaries, padding, prefix sharing, token accounting, top-p."""

from __future__ import annotations

import math
import sys
from collections import Counter

import pytest
import torch
from conftest import DECODE_PROMPTS as PROMPTS

from pavlit.policy.sampler import (
    STOP_DELIMITER,
    STOP_EOS,
    STOP_LENGTH,
    STOP_MAX_STEPS,
    Sampler,
    VLLMSampler,
    cut_after,
    sample_tokens,
)


def chi2_critical(dof: int, z: float = 3.719) -> float:
    """Upper critical value of chi-square (Wilson-Hilferty), p ~ 1e-4 at the default z."""
    h = 2.0 / (9.0 * dof)
    return dof * (1.0 - h + z * math.sqrt(h)) ** 3


def chi2_statistic(counts: Counter, probs: torch.Tensor, total: int) -> tuple[float, int]:
    """Pearson chi-square of observed ``counts`` against ``probs``, pooling cells expected below 5."""
    expected = (probs.double() * total).tolist()
    stat, dof, pool_obs, pool_exp = 0.0, -1, 0.0, 0.0
    for token, exp in enumerate(expected):
        if exp < 5:
            pool_obs += counts.get(token, 0)
            pool_exp += exp
            continue
        stat += (counts.get(token, 0) - exp) ** 2 / exp
        dof += 1
    if pool_exp > 0:
        stat += (pool_obs - pool_exp) ** 2 / max(pool_exp, 1e-9)
        dof += 1
    return stat, dof


# ------------------------------------------------------------------------------------------ pure helpers


def testcut_after() -> None:
    assert cut_after("a\nb\nc", "\n", 1) == "a\n"
    assert cut_after("a\nb\nc", "\n", 2) == "a\nb\n"
    assert cut_after("a\nb", "\n", 3) == "a\nb"
    assert cut_after("x::y::", "::", 2) == "x::y::"
    assert cut_after("::", "::", 1) == "::"


def test_sample_tokens_greedy_and_top_p() -> None:
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]]))
    assert sample_tokens(logits, 0.0, 1.0, None).tolist() == [1, 0]
    generator = torch.Generator().manual_seed(0)
    # top_p = 0.5: the top token alone already has mass 0.5 -> greedy.
    for _ in range(20):
        assert sample_tokens(logits, 1.0, 0.5, generator).tolist() == [1, 0]
    # top_p = 0.6 keeps {0.5, 0.3} in row 0 -> renormalised 0.625 / 0.375, never token 0.
    draws = sample_tokens(logits[:1].expand(20000, 3), 1.0, 0.6, generator)
    counts = torch.bincount(draws, minlength=3).tolist()
    assert counts[0] == 0
    assert abs(counts[1] / 20000 - 0.625) < 0.015


def test_sample_tokens_matches_softmax_distribution() -> None:
    generator = torch.Generator().manual_seed(1)
    probs = torch.tensor([0.05, 0.15, 0.3, 0.5])
    for temperature in (1.0, 0.5):
        target = torch.softmax(probs.log() / temperature, dim=-1)
        draws = sample_tokens(probs.log().expand(40000, 4), temperature, 1.0, generator)
        stat, dof = chi2_statistic(Counter(draws.tolist()), target, 40000)
        assert stat < chi2_critical(dof)


# ------------------------------------------------------------------------------------------ the sampler


def test_reproducible_under_seed(model, tokenizer) -> None:
    first = Sampler(model, tokenizer, max_new_tokens=24, seed=7).complete(PROMPTS, n=3)
    second = Sampler(model, tokenizer, max_new_tokens=24, seed=7).complete(PROMPTS, n=3)
    other = Sampler(model, tokenizer, max_new_tokens=24, seed=8).complete(PROMPTS, n=3)
    assert first.texts == second.texts and first.token_ids == second.token_ids
    assert first.texts != other.texts
    sampler = Sampler(model, tokenizer, max_new_tokens=24, seed=0)
    assert sampler.next_step(PROMPTS, n=2, seed=5).texts == sampler.next_step(PROMPTS, n=2, seed=5).texts


def test_next_step_stops_exactly_at_the_delimiter(model, tokenizer) -> None:
    sampler = Sampler(model, tokenizer, max_new_tokens=12, seed=0)
    out = sampler.next_step(PROMPTS, n=32)
    reasons = Counter(r for per_prompt in out.stop_reasons for r in per_prompt)
    assert reasons[STOP_DELIMITER] > 0 and set(reasons) <= {STOP_DELIMITER, STOP_EOS, STOP_LENGTH}
    for texts, ids, stops, finished in zip(out.texts, out.token_ids, out.stop_reasons, out.finished):
        for text, token_ids, stop, done in zip(texts, ids, stops, finished):
            assert done == (stop == STOP_EOS)
            assert text == tokenizer.decode(token_ids, skip_special_tokens=True)
            if stop == STOP_DELIMITER:
                assert text.endswith("\n") and text.count("\n") == 1
            else:
                assert "\n" not in text
            if stop == STOP_EOS:
                assert token_ids[-1] == tokenizer.eos_token_id
            if stop == STOP_LENGTH:
                assert len(token_ids) == 12


def test_complete_max_steps_and_eos(model, tokenizer) -> None:
    sampler = Sampler(model, tokenizer, max_new_tokens=40, seed=1)
    out = sampler.complete(PROMPTS, n=16, max_steps=2)
    for texts, stops in zip(out.texts, out.stop_reasons):
        for text, stop in zip(texts, stops):
            assert stop in (STOP_MAX_STEPS, STOP_EOS, STOP_LENGTH)
            assert text.count("\n") == 2 if stop == STOP_MAX_STEPS else text.count("\n") < 2
            if stop == STOP_MAX_STEPS:
                assert text.endswith("\n")
    free = sampler.complete(PROMPTS, n=16, seed=1)
    assert all(stop in (STOP_EOS, STOP_LENGTH) for stops in free.stop_reasons for stop in stops)
    assert any(text.count("\n") >= 2 for texts in free.texts for text in texts)


def test_token_accounting(model, tokenizer) -> None:
    prompt_lengths = [len(tokenizer(p)["input_ids"]) for p in PROMPTS]
    for share_prefix in (True, False):
        sampler = Sampler(model, tokenizer, max_new_tokens=20, seed=0, share_prefix=share_prefix)
        for call in (sampler.complete, sampler.next_step):
            out = call(PROMPTS, n=5)
            assert out.generated_tokens == sum(len(ids) for per_prompt in out.token_ids for ids in per_prompt)
            assert all(len(ids) <= 20 for per_prompt in out.token_ids for ids in per_prompt)
            # Shared: each prefix is prefilled once; unshared: once per sample.
            assert out.prompt_tokens == sum(prompt_lengths) * (1 if share_prefix else 5)
            assert out.num_samples == 20 and all(len(texts) == 5 for texts in out.texts)


@pytest.mark.parametrize("fast_decode", [True, False])
@pytest.mark.parametrize("share_prefix", [True, False])
def test_logprobs_match_a_full_forward_pass(model, tokenizer, share_prefix: bool, fast_decode: bool) -> None:
    """Cached, padded, prefix-expanded, compacted decoding scores every token exactly like one uncached pass."""
    sampler = Sampler(
        model, tokenizer, max_new_tokens=16, seed=2, share_prefix=share_prefix, max_batch=8, fast_decode=fast_decode
    )
    out = sampler.complete(PROMPTS, n=4, return_logprobs=True)
    assert any(stop == STOP_EOS for stops in out.stop_reasons for stop in stops)  # rows were dropped mid-batch
    for prompt, per_prompt_ids, per_prompt_logprobs in zip(PROMPTS, out.token_ids, out.logprobs):
        prompt_ids = tokenizer(prompt)["input_ids"]
        for ids, logprobs in zip(per_prompt_ids, per_prompt_logprobs):
            full = torch.tensor([prompt_ids + ids])
            with torch.no_grad():
                reference = model(full).logits[0, len(prompt_ids) - 1 : -1].log_softmax(-1)
            expected = reference.gather(1, torch.tensor(ids)[:, None]).squeeze(1)
            assert len(logprobs) == len(ids)
            assert torch.allclose(torch.tensor(logprobs), expected, atol=1e-4), (prompt, ids)
    assert sampler.complete(PROMPTS, n=1).logprobs is None


def test_left_padding_invariance_greedy(model, tokenizer) -> None:
    sampler = Sampler(model, tokenizer, max_new_tokens=30, temperature=0.0)
    short = "C"
    alone = sampler.complete([short], n=1)
    batched = sampler.complete([PROMPTS[3], short, PROMPTS[1]], n=2)
    assert batched.texts[1] == alone.texts[0] * 2
    assert batched.token_ids[1][0] == alone.token_ids[0][0]
    assert len(alone.token_ids[0][0]) > 5  # the comparison covers a real continuation
    step_alone = sampler.next_step([short], n=1)
    assert sampler.next_step([PROMPTS[3], short], n=1).texts[1] == step_alone.texts[0]


def test_greedy_shared_equals_unshared_and_max_batch(model, tokenizer) -> None:
    shared = Sampler(model, tokenizer, max_new_tokens=25, temperature=0.0).complete(PROMPTS, n=3)
    unshared = Sampler(model, tokenizer, max_new_tokens=25, temperature=0.0, share_prefix=False).complete(PROMPTS, n=3)
    small = Sampler(model, tokenizer, max_new_tokens=25, temperature=0.0, max_batch=2).complete(PROMPTS, n=3)
    assert shared.token_ids == unshared.token_ids == small.token_ids
    assert all(len(set(texts)) == 1 for texts in shared.texts)


def test_tiny_top_p_behaves_like_greedy(model, tokenizer) -> None:
    greedy = Sampler(model, tokenizer, max_new_tokens=20, temperature=0.0).complete(PROMPTS, n=1)
    nucleus = Sampler(model, tokenizer, max_new_tokens=20, temperature=1.0, top_p=1e-6, seed=3).complete(PROMPTS, n=4)
    for greedy_texts, nucleus_texts in zip(greedy.texts, nucleus.texts):
        assert nucleus_texts == greedy_texts * 4


def test_n_larger_than_max_batch(model, tokenizer) -> None:
    out = Sampler(model, tokenizer, max_new_tokens=6, max_batch=4, seed=0).next_step(PROMPTS[:2], n=10)
    assert [len(texts) for texts in out.texts] == [10, 10]
    assert out.prompt_tokens == sum(len(tokenizer(p)["input_ids"]) for p in PROMPTS[:2]) * 3  # ceil(10 / 4) prefills


def _exact_two_token_marginals(model, tokenizer, prompt: str, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """P(first new token) and P(second new token) (marginalised over the first) by brute force."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        first = torch.softmax(model(ids).logits[0, -1].double() / temperature, dim=-1)
        vocab = first.shape[0]
        extended = torch.cat([ids.expand(vocab, -1), torch.arange(vocab)[:, None]], dim=1)
        second_given = torch.softmax(model(extended).logits[:, -1].double() / temperature, dim=-1)
    # Samples stop at EOS, so "second token" exists only after a non-EOS first token.
    eos = tokenizer.eos_token_id
    weights = first.clone()
    weights[eos] = 0.0
    second = (weights[:, None] * second_given).sum(0) / weights.sum()
    return first, second


@pytest.mark.parametrize(("share_prefix", "fast_decode"), [(True, True), (False, True), (True, False)])
def test_sampling_distribution_matches_the_model(model, tokenizer, share_prefix: bool, fast_decode: bool) -> None:
    """First- and second-token frequencies match the exact model distribution (shared and unshared)."""
    temperature, n = 0.7, 3000
    target_prompt = PROMPTS[2]  # the shortest: left-padded next to the others
    sampler = Sampler(
        model,
        tokenizer,
        max_new_tokens=2,
        temperature=temperature,
        seed=11,
        share_prefix=share_prefix,
        fast_decode=fast_decode,
    )
    out = sampler.complete([PROMPTS[3], target_prompt], n=n)
    samples = out.token_ids[1]
    first_probs, second_probs = _exact_two_token_marginals(model, tokenizer, target_prompt, temperature)
    first = Counter(ids[0] for ids in samples)
    stat, dof = chi2_statistic(first, first_probs, n)
    assert stat < chi2_critical(dof), (stat, dof)
    seconds = [ids[1] for ids in samples if len(ids) == 2]
    stat, dof = chi2_statistic(Counter(seconds), second_probs, len(seconds))
    assert stat < chi2_critical(dof), (stat, dof)


def test_shared_and_unshared_step_lengths_agree_in_distribution(model, tokenizer) -> None:
    n = 1500
    lengths = {}
    for share_prefix in (True, False):
        sampler = Sampler(model, tokenizer, max_new_tokens=10, seed=21, share_prefix=share_prefix)
        out = sampler.next_step([PROMPTS[0]], n=n)
        lengths[share_prefix] = Counter(len(ids) for ids in out.token_ids[0])
    support = set(lengths[True]) | set(lengths[False])
    tv = 0.5 * sum(abs(lengths[True][k] - lengths[False][k]) / n for k in support)
    assert tv < 0.08, tv


@pytest.mark.parametrize("offset", [0, 1])
def test_other_delimiters_stop_where_greedy_text_has_them(model, tokenizer, offset: int) -> None:
    """One-character (device path) and two-character (host path) delimiters stop at their first occurrence."""
    sampler = Sampler(model, tokenizer, max_new_tokens=40, temperature=0.0)
    prompt = PROMPTS[0]
    text = sampler.complete([prompt], n=1).texts[0][0]
    assert len(text) > 8
    # A delimiter taken from inside the greedy text, so greedy decoding must meet it.
    delimiter = text[5 : 6 + offset]
    out = sampler.next_step([prompt], n=2, delimiter=delimiter)
    expected = text[: text.find(delimiter) + len(delimiter)]
    assert out.texts[0] == [expected, expected]
    assert out.stop_reasons[0] == [STOP_DELIMITER] * 2
    assert sampler.complete([prompt], n=1, max_steps=1, delimiter=delimiter).texts[0][0] == expected


def test_rejects_bad_arguments(model, tokenizer) -> None:
    sampler = Sampler(model, tokenizer, max_new_tokens=4)
    with pytest.raises(TypeError):
        sampler.complete("one string", n=1)
    with pytest.raises(ValueError):
        sampler.complete(PROMPTS, n=0)
    with pytest.raises(ValueError):
        sampler.complete(PROMPTS, max_steps=0)
    with pytest.raises(ValueError):
        Sampler(model, tokenizer, max_batch=0)
    empty = sampler.complete([], n=3)
    assert empty.texts == [] and empty.generated_tokens == 0


def test_vllm_sampler_without_vllm_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match="pip install vllm"):
        VLLMSampler("some/model")
