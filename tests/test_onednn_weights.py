"""Prepacked oneDNN projections (pavlit/policy/decode_weights.py): where they are chosen, and that they compute
what the BLAS products compute, in both decoders, whatever this machine's default is (``PAVLIT_ONEDNN`` forces
each branch)."""

from __future__ import annotations

import shutil

import pytest
import torch
from test_fast_decode import small_llama

from pavlit.policy import decode_weights, native
from pavlit.policy.decode_weights import PACK_MIN_OUTPUT, PACK_WIDE_OUTPUT, DecodeWeights, packs_weights
from pavlit.policy.sampler import Sampler

PROMPTS = ["Compute 3+4.\n", "Compute (8+9)*3-11.\n", "Compute 12*(7-5).\n"]

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
needs_native = pytest.mark.skipif(
    not native.enabled() or shutil.which("c++") is None, reason="no C++ compiler here (or PAVLIT_NATIVE=0)"
)


@pytest.fixture
def rule(monkeypatch: pytest.MonkeyPatch):
    """Set the CPU flags the default rule sees (and clear its per-process cache around the test)."""

    def with_flags(*flags: str, vendor: str = "AuthenticAMD") -> None:
        monkeypatch.setattr(decode_weights, "cpu_flags", lambda: frozenset(flags))
        monkeypatch.setattr(decode_weights, "cpu_vendor", lambda: vendor)
        decode_weights._onednn_faster.cache_clear()

    monkeypatch.delenv("PAVLIT_ONEDNN", raising=False)
    yield with_flags
    decode_weights._onednn_faster.cache_clear()


@needs_onednn
def test_float32_packs_on_avx512_cpus_only(rule) -> None:
    rule("avx2", "fma")
    assert not packs_weights(torch.float32)
    rule("avx2", "fma", "avx512f")
    assert packs_weights(torch.float32)


@needs_onednn
def test_float32_on_intel_packs_only_wide_output_layers(rule) -> None:
    """MKL's own AVX-512 kernels win the layers' products on Intel; oneDNN still wins a 49k-token output layer."""
    rule("avx2", "avx512f", vendor="GenuineIntel")
    assert not packs_weights(torch.float32)
    assert not packs_weights(torch.float32, out_features=PACK_WIDE_OUTPUT - 1)
    assert packs_weights(torch.float32, out_features=PACK_WIDE_OUTPUT)
    rule("avx2", vendor="GenuineIntel")
    assert not packs_weights(torch.float32, out_features=PACK_WIDE_OUTPUT)
    rule("avx2", "avx512f")
    assert packs_weights(torch.float32, out_features=PACK_MIN_OUTPUT)
    assert not packs_weights(torch.float32, out_features=PACK_MIN_OUTPUT - 1)


@needs_onednn
def test_the_environment_variable_forces_either_branch(rule, monkeypatch: pytest.MonkeyPatch) -> None:
    rule("avx2", "avx512f")
    monkeypatch.setenv("PAVLIT_ONEDNN", "0")
    assert not packs_weights(torch.float32) and not packs_weights(torch.bfloat16)
    rule("avx2")
    monkeypatch.setenv("PAVLIT_ONEDNN", "1")
    assert packs_weights(torch.float32) and packs_weights(torch.bfloat16)


def test_other_devices_and_dtypes_never_pack(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAVLIT_ONEDNN", "1")
    assert not packs_weights(torch.float16)
    assert not packs_weights(torch.float32, "cuda")
    assert not packs_weights(torch.bfloat16, torch.device("meta"))


def _weights(model, monkeypatch: pytest.MonkeyPatch, setting: str) -> DecodeWeights:
    monkeypatch.setenv("PAVLIT_ONEDNN", setting)
    return DecodeWeights(model)


def _packed(tensors) -> list[bool]:
    return [t.is_mkldnn for t in tensors]


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_projections_compute_the_blas_products(tokenizer, monkeypatch, dtype) -> None:
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("oneDNN has no bf16 kernels on this CPU")
    model = small_llama(tokenizer, 4, num_attention_heads=4, num_key_value_heads=2, vocab_size=PACK_MIN_OUTPUT + 44)
    model = model.to(dtype).eval()
    packed, blas = _weights(model, monkeypatch, "1"), _weights(model, monkeypatch, "0")
    if dtype == torch.float32:  # the native step's weight lists: packed projections (output layer too: 300 wide)
        assert _packed(packed.native_weights) == [False, False, True] + [False, False, True, True, True, True] * 2
        assert not any(_packed(blas.native_weights))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(7, 32, generator=generator).to(dtype)
    residual = torch.randn(7, 32, generator=generator).to(dtype)
    inner = torch.randn(7, 64, generator=generator).to(dtype)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for a, b in zip(packed.layers, blas.layers):
        torch.testing.assert_close(a.qkv(x), b.qkv(x), **tolerance)
        torch.testing.assert_close(a.gate_up(x), b.gate_up(x), **tolerance)
        torch.testing.assert_close(a.o(residual, x), b.o(residual, x), **tolerance)
        torch.testing.assert_close(a.down(residual, inner), b.down(residual, inner), **tolerance)
    torch.testing.assert_close(packed.lm_head(x), blas.lm_head(x), **tolerance)
    assert not torch.equal(packed.lm_head(x), packed.lm_head(2 * x))  # a real product, not a constant


@needs_onednn
def test_narrow_output_layers_stay_on_the_blas(model, monkeypatch) -> None:
    assert model.lm_head.out_features < PACK_MIN_OUTPUT
    weights = _weights(model, monkeypatch, "1")
    assert weights.native_weights is not None
    assert _packed(weights.native_weights[:3]) == [False, False, False]
    assert all(_packed(weights.native_weights[3:])[2:6])  # the first layer's four projections are packed


@needs_onednn
@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=needs_native)])
def test_packed_weights_give_the_blas_samples(tokenizer, monkeypatch, compiled: bool) -> None:
    model = small_llama(tokenizer, 5, num_attention_heads=4, num_key_value_heads=2).eval()
    outputs = []
    for setting in ("0", "1"):
        monkeypatch.setenv("PAVLIT_ONEDNN", setting)
        sampler = Sampler(model, tokenizer, max_new_tokens=24, native=compiled)
        outputs.append(sampler.complete(PROMPTS, n=6, seed=3, return_logprobs=True))
        assert any(_packed(sampler._decode_weights.native_weights)) == (setting == "1")
    blas, packed = outputs
    assert packed.token_ids == blas.token_ids
    for blas_rows, packed_rows in zip(blas.logprobs, packed.logprobs):
        for a, b in zip(blas_rows, packed_rows):
            assert torch.allclose(torch.tensor(b), torch.tensor(a), rtol=0.0, atol=1e-5)


@needs_onednn
def test_packed_weights_are_rebuilt_after_an_update(tokenizer, monkeypatch) -> None:
    """An RL step updates the parameters in place: the next call must sample from the new weights."""
    model = small_llama(tokenizer, 6).eval()
    monkeypatch.setenv("PAVLIT_ONEDNN", "1")
    sampler = Sampler(model, tokenizer, max_new_tokens=16)
    before = sampler.complete(PROMPTS, n=4, seed=1)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(-3.0)
            layer.self_attn.o_proj.weight.add_(0.5)
    after = sampler.complete(PROMPTS, n=4, seed=1)
    monkeypatch.setenv("PAVLIT_ONEDNN", "0")
    fresh = Sampler(model, tokenizer, max_new_tokens=16, fast_decode=False).complete(PROMPTS, n=4, seed=1)
    assert after.token_ids == fresh.token_ids
    assert after.token_ids != before.token_ids
