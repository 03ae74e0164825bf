"""The plain-torch grouped decoder computes what the Hugging Face forward computes, token for token."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DECODE_PROMPTS as PROMPTS
from conftest import sharpened

from pavlit.policy import fast_decode
from pavlit.policy.fast_decode import GroupedDecoder, supports_fast_decode
from pavlit.policy.sampler import Sampler


def small_llama(tokenizer, seed: int, **config) -> torch.nn.Module:
    """A 2-layer, width-32 Llama with ``config`` overrides, :func:`sharpened`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return sharpened(LlamaForCausalLM(LlamaConfig(**{**settings, **config})))


@pytest.fixture(scope="module")
def gqa_model(tokenizer):
    """Grouped-query attention (4 query heads share 2 key/value heads) and projection biases."""
    return small_llama(tokenizer, 1, num_attention_heads=4, num_key_value_heads=2, attention_bias=True)


def run_both(model, tokenizer, call: str = "complete", n: int = 5, **options):
    """The same seeded call through the Hugging Face path and the grouped decoder."""
    outputs = []
    for fast in (False, True):
        sampler = Sampler(model, tokenizer, fast_decode=fast, **options)
        assert sampler._fast_decode is fast
        outputs.append(getattr(sampler, call)(PROMPTS, n=n, seed=7, return_logprobs=True))
    return outputs


def assert_same(slow, fast) -> None:
    assert fast.token_ids == slow.token_ids
    assert fast.texts == slow.texts and fast.stop_reasons == slow.stop_reasons
    assert (fast.generated_tokens, fast.prompt_tokens) == (slow.generated_tokens, slow.prompt_tokens)
    for slow_rows, fast_rows in zip(slow.logprobs, fast.logprobs):
        for slow_lp, fast_lp in zip(slow_rows, fast_rows):
            assert torch.allclose(torch.tensor(fast_lp), torch.tensor(slow_lp), atol=1e-5)


@pytest.mark.parametrize(
    "options",
    [
        {"max_new_tokens": 24},  # left-padded prompts, rows finishing at different times (ragged compaction)
        {"max_new_tokens": 24, "max_batch": 3},  # a prompt's samples split over batches
        {"max_new_tokens": 24, "share_prefix": False},  # one group per row
        {"max_new_tokens": 24, "temperature": 0.0},
        {"max_new_tokens": 12, "top_p": 0.9},
    ],
)
def test_sampled_tokens_equal_the_hf_path(model, tokenizer, options) -> None:
    slow, fast = run_both(model, tokenizer, **options)
    if options.get("temperature") != 0.0:  # rows really ended at different steps (greedy rows all run on)
        assert len({len(ids) for rows in slow.token_ids for ids in rows}) > 2
    assert_same(slow, fast)


def test_compaction_leaves_ragged_groups(model, tokenizer) -> None:
    """Dropping finished rows at every step leaves prompts with unequal sample counts; still exact."""
    outputs = []
    for fast in (False, True):
        sampler = Sampler(model, tokenizer, fast_decode=fast, max_new_tokens=24)
        sampler.compact_fraction = 1e-9
        outputs.append(sampler.complete(PROMPTS, n=6, seed=3, return_logprobs=True))
    assert_same(*outputs)


def test_next_step_equals_the_hf_path(model, tokenizer) -> None:
    assert_same(*run_both(model, tokenizer, call="next_step", n=4, max_new_tokens=16))


def test_grouped_query_attention_and_biases(gqa_model, tokenizer) -> None:
    assert_same(*run_both(gqa_model, tokenizer, max_new_tokens=20))


def test_lora_adapter_is_applied(model, tokenizer) -> None:
    """A LoRA-wrapped policy decodes through its adapters (the projections are called as modules)."""
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    )
    with torch.no_grad():
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # a non-zero adapter, so ignoring it would change the text
    assert supports_fast_decode(lora)
    slow, fast = run_both(lora, tokenizer, max_new_tokens=16, temperature=0.0, n=1)
    assert_same(slow, fast)
    plain = Sampler(model, tokenizer, max_new_tokens=16, temperature=0.0).complete(PROMPTS, n=1)
    assert plain.token_ids != fast.token_ids


def test_unsupported_architectures_use_the_hf_path(tokenizer) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=16,
            n_layer=1,
            n_head=2,
            n_positions=64,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    ).eval()
    assert not supports_fast_decode(gpt2)
    sampler = Sampler(gpt2, tokenizer, max_new_tokens=4)
    assert sampler._fast_decode is False
    assert sampler.complete(PROMPTS[:1], n=2).num_samples == 2
    with pytest.raises(ValueError, match="fast_decode=True needs a model of architecture LlamaForCausalLM"):
        Sampler(gpt2, tokenizer, fast_decode=True)


def test_position_dependent_rope_is_recomputed_each_step(tokenizer) -> None:
    """Dynamic NTK RoPE changes with the sequence length: no table, the model's rotary module runs per step.

    HF's dynamic RoPE is stateful (the module keeps the frequencies of the longest sequence seen), so each path
    gets its own copy of the model, starting from the same state.
    """
    dynamic = small_llama(
        tokenizer,
        2,
        max_position_embeddings=16,  # short, so decoding passes it and the scaling kicks in
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    )
    assert dynamic.model.rotary_emb.rope_type == "dynamic"
    outputs = []
    for fast in (False, True):
        sampler = Sampler(copy.deepcopy(dynamic), tokenizer, fast_decode=fast, max_new_tokens=24)
        assert sampler._fast_decode is fast
        outputs.append(sampler.complete(PROMPTS, n=3, seed=7, return_logprobs=True))
    assert_same(*outputs)


def test_slot_packing_trades_holes_for_groups() -> None:
    assert GroupedDecoder.slots_for([16] * 8) == 16  # uniform: one group per prompt, no holes
    assert GroupedDecoder.slots_for([14, 2, 3, 1]) < 14  # one big prompt: split it rather than pad the others
    assert GroupedDecoder.slots_for([14, 2, 3, 1], group_cost=0.0) == 1  # free groups: no holes at all
    assert GroupedDecoder.slots_for([14, 2, 3, 1], group_cost=100.0) == 14


@pytest.mark.parametrize("group_cost", [0.0, 0.5, 100.0])
def test_any_slot_packing_is_exact(model, tokenizer, monkeypatch, group_cost: float) -> None:
    """One row per group, prompts split over several groups, one padded group per prompt: all token-identical."""
    monkeypatch.setattr(fast_decode, "GROUP_COST", group_cost)
    outputs = []
    for fast in (False, True):
        sampler = Sampler(model, tokenizer, fast_decode=fast, max_new_tokens=20, max_batch=7)
        sampler.compact_fraction = 0.1
        outputs.append(sampler.complete(PROMPTS, n=5, seed=11, return_logprobs=True))
    assert_same(*outputs)


def test_fused_weights_follow_in_place_updates(model, tokenizer) -> None:
    """The fused QKV / gate-up copies are rebuilt after an optimizer-style in-place update (RL)."""
    policy = copy.deepcopy(model)
    sampler = Sampler(policy, tokenizer, max_new_tokens=16, temperature=0.0)
    before = sampler.complete(PROMPTS, n=1).token_ids
    with torch.no_grad():
        for layer in policy.model.layers:
            layer.self_attn.v_proj.weight.mul_(-3.0)
            layer.mlp.up_proj.weight.add_(0.5)
    after = sampler.complete(PROMPTS, n=1).token_ids
    reference = Sampler(policy, tokenizer, max_new_tokens=16, temperature=0.0, fast_decode=False)
    assert after == reference.complete(PROMPTS, n=1).token_ids
    assert after != before


@pytest.mark.parametrize("fixture", ["model", "gqa_model"])
def test_bfloat16_logprobs_match_a_full_forward_pass(request, tokenizer, fixture: str) -> None:
    """The bf16 path scores tokens like one uncached pass: head_dim 16 folds the attention scale into W_q
    exactly; the grouped-query model's head_dim 8 cannot, so its queries are scaled per step."""
    policy = copy.deepcopy(request.getfixturevalue(fixture)).to(torch.bfloat16)
    sampler = Sampler(policy, tokenizer, max_new_tokens=16, seed=4)
    assert sampler._fast_decode
    out = sampler.complete(PROMPTS, n=3, return_logprobs=True)
    worst = 0.0
    for prompt, per_prompt_ids, per_prompt_logprobs in zip(PROMPTS, out.token_ids, out.logprobs):
        prompt_ids = tokenizer(prompt)["input_ids"]
        for ids, logprobs in zip(per_prompt_ids, per_prompt_logprobs):
            with torch.no_grad():
                logits = policy(torch.tensor([prompt_ids + ids])).logits[0, len(prompt_ids) - 1 : -1]
            expected = logits.float().log_softmax(-1).gather(1, torch.tensor(ids)[:, None]).squeeze(1)
            worst = max(worst, (torch.tensor(logprobs) - expected).abs().max().item())
    # bf16 rounding moves log-probs by ~1e-2 on this sharpened model; a wrong position, mask or head is >> 1.
    assert worst < 0.15


def test_weights_made_under_inference_mode_are_rebuilt_each_batch(model, tokenizer) -> None:
    """Inference tensors have no version counter: the fused copies cannot be trusted, so they are rebuilt."""
    with torch.inference_mode():
        policy = copy.deepcopy(model)
        for parameter in policy.parameters():
            parameter.data = parameter.data.clone()  # now inference tensors
    sampler = Sampler(policy, tokenizer, max_new_tokens=8, temperature=0.0)
    first = sampler.complete(PROMPTS, n=1).token_ids
    built = sampler._decode_weights
    with torch.inference_mode():
        policy.model.layers[0].self_attn.v_proj.weight.mul_(-3.0)
    assert sampler._decode_weights.current() is built and built._key != built._fingerprint()
    reference = Sampler(policy, tokenizer, max_new_tokens=8, temperature=0.0, fast_decode=False)
    assert sampler.complete(PROMPTS, n=1).token_ids == reference.complete(PROMPTS, n=1).token_ids
    assert first == Sampler(model, tokenizer, max_new_tokens=8, temperature=0.0).complete(PROMPTS, n=1).token_ids
