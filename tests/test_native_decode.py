"""The compiled decode step (pavlit/policy/native_decode.cpp) computes what the plain-torch grouped decoder
computes: the same tokens under a fixed seed, logits and log-probs to float32 rounding, in every layout the
decoder uses (padded prompts, prompts over several groups, holes after compaction, grouped-query attention)."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from conftest import DECODE_PROMPTS as PROMPTS
from test_fast_decode import small_llama

from pavlit.policy import fast_decode, native
from pavlit.policy.sampler import Sampler

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
needs_native = pytest.mark.skipif(
    not native.enabled() or shutil.which("c++") is None, reason="no C++ compiler here (or PAVLIT_NATIVE=0)"
)


@pytest.fixture(scope="module")
def gqa_model(tokenizer):
    """Grouped-query attention (4 query heads share 2 key/value heads), no projection biases: what the step takes."""
    return small_llama(tokenizer, 2, num_attention_heads=4, num_key_value_heads=2)


def _decoders(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every GroupedDecoder the sampler builds from now on."""
    built = []
    original = fast_decode.GroupedDecoder.__init__

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(fast_decode.GroupedDecoder, "__init__", record)
    return built


def _assert_same(plain, compiled) -> None:
    assert compiled.token_ids == plain.token_ids
    assert compiled.texts == plain.texts and compiled.stop_reasons == plain.stop_reasons
    for plain_rows, compiled_rows in zip(plain.logprobs, compiled.logprobs):
        for a, b in zip(plain_rows, compiled_rows):
            assert torch.allclose(torch.tensor(b), torch.tensor(a), rtol=0.0, atol=1e-5)


@needs_native
def test_the_step_builds_where_a_compiler_exists() -> None:
    assert native.load() is not None, native.unavailable_reason()


@needs_native
@pytest.mark.parametrize("onednn", ["0", pytest.param("1", marks=needs_onednn)])  # BLAS or prepacked products
@pytest.mark.parametrize("which", ["sharp", "gqa"])
@pytest.mark.parametrize(
    "options",
    [
        {"n": 5},  # padded prompts, one group each
        {"n": 40, "max_batch": 64},  # a prompt's samples over several groups, compaction re-packing with holes
        {"n": 3, "max_steps": 1},
        {"n": 6, "temperature": 0.7, "top_p": 0.9},
    ],
)
def test_compiled_step_gives_the_plain_torch_samples(
    model, gqa_model, tokenizer, monkeypatch, onednn: str, which: str, options: dict
) -> None:
    policy = model if which == "sharp" else gqa_model
    monkeypatch.setenv("PAVLIT_ONEDNN", onednn)
    options = dict(options)
    n, max_steps = options.pop("n"), options.pop("max_steps", None)
    outputs, used = [], []
    for compiled in (False, True):
        decoders = _decoders(monkeypatch)
        sampler = Sampler(policy, tokenizer, max_new_tokens=24, native=compiled, **options)
        outputs.append(sampler.complete(PROMPTS, n=n, seed=3, max_steps=max_steps, return_logprobs=True))
        used.append({decoder.native is not None for decoder in decoders})
        monkeypatch.undo()
        monkeypatch.setenv("PAVLIT_ONEDNN", onednn)
    assert used == [{False}, {True}]  # the comparison really ran both paths
    _assert_same(*outputs)


@needs_native
@pytest.mark.parametrize("compact_fraction", [0.25, 0.01])  # the default; a compaction at almost every stop
def test_compiled_step_logits_match_step_by_step(gqa_model, tokenizer, monkeypatch, compact_fraction) -> None:
    """Drive two decoders over the same prefill and tokens; every step's logits agree to float32 rounding, also
    across compactions (where the compiled step keeps its caches in place and re-maps the slots)."""
    logits: dict[bool, list[torch.Tensor]] = {}
    for compiled in (False, True):
        decoders = _decoders(monkeypatch)
        seen, selects = [], []
        step, select = fast_decode.GroupedDecoder.step, fast_decode.GroupedDecoder.select

        def keep(self, tokens, step=step, seen=seen):
            out = step(self, tokens)
            seen.append(out.clone())
            return out

        def watch(self, rows, select=select, selects=selects):
            caches = [t.data_ptr() for t in self.suffix_keys + self.suffix_values]
            select(self, rows)
            selects.append(caches == [t.data_ptr() for t in self.suffix_keys + self.suffix_values])

        monkeypatch.setattr(fast_decode.GroupedDecoder, "step", keep)
        monkeypatch.setattr(fast_decode.GroupedDecoder, "select", watch)
        sampler = Sampler(gqa_model, tokenizer, max_new_tokens=16, native=compiled)
        sampler.compact_fraction = compact_fraction
        sampler.complete(PROMPTS, n=4 if compact_fraction > 0.1 else 12, seed=1)
        assert {d.native is not None for d in decoders} == {compiled}
        if compact_fraction < 0.1:
            assert len(selects) >= 2 and set(selects) == {compiled}  # compiled: no KV moved; plain: copied
        logits[compiled] = seen
        monkeypatch.undo()
    assert len(logits[True]) == len(logits[False]) > 5
    for plain, compiled in zip(logits[False], logits[True]):
        assert torch.allclose(compiled, plain, rtol=0.0, atol=1e-5)


def test_without_the_step_the_sampler_decodes_with_plain_torch(model, tokenizer, monkeypatch, caplog) -> None:
    """No compiler (the build raises): one warning naming why, and the same samples from plain torch."""
    reference = Sampler(model, tokenizer, max_new_tokens=12, native=False).complete(PROMPTS, n=3, seed=2)

    def no_compiler():
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr("torch.utils.cpp_extension.load_inline", lambda **_: no_compiler())
    decoders = _decoders(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="pavlit.policy.native"):
        out = Sampler(model, tokenizer, max_new_tokens=12).complete(PROMPTS, n=3, seed=2)
    assert out.token_ids == reference.token_ids
    assert decoders and all(decoder.native is None for decoder in decoders)
    assert "Ninja is required" in native.unavailable_reason()
    assert any("unavailable" in record.message for record in caplog.records)


def test_the_environment_variable_turns_the_step_off(model, tokenizer, monkeypatch) -> None:
    monkeypatch.setenv("PAVLIT_NATIVE", "0")
    assert native.load() is None and native.unavailable_reason() == "PAVLIT_NATIVE=0"
    decoders = _decoders(monkeypatch)
    Sampler(model, tokenizer, max_new_tokens=4).complete(PROMPTS, n=2)
    assert decoders and all(decoder.native is None for decoder in decoders)


def test_models_the_step_does_not_compute_stay_on_plain_torch(tokenizer, monkeypatch) -> None:
    """Projection biases and bfloat16 are the plain-torch decoder's (the step takes neither)."""
    biased = small_llama(tokenizer, 3, attention_bias=True)
    bf16 = small_llama(tokenizer, 4).to(torch.bfloat16)
    for policy in (biased, bf16):
        decoders = _decoders(monkeypatch)
        out = Sampler(policy, tokenizer, max_new_tokens=6).complete(PROMPTS, n=2, seed=0)
        assert out.generated_tokens > 0
        assert decoders and all(decoder.native is None for decoder in decoders)
        monkeypatch.undo()


def _both_samplers(logits: torch.Tensor, temperature: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from pavlit.policy.sampling import sample_tokens

    module = native.load()
    drawn = [
        sample_tokens(logits, temperature, 1.0, torch.Generator().manual_seed(seed), kernel)
        for kernel in (None, module)
    ]
    return drawn[0], drawn[1]


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [36, 1000, 49_152])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_compiled_sampling_draws_the_tokens_of_the_cumulative_sum(dtype, vocab: int, temperature: float) -> None:
    """Same draws, same rule: the blocked float64 sums pick the tokens the sequential cumulative sum picks."""
    generator = torch.Generator().manual_seed(vocab)
    logits = (3.0 * torch.randn(64, vocab, generator=generator)).to(dtype)
    logits[::3, 5::7] = -torch.inf  # masked tokens: zero mass, never drawn
    plain, compiled = _both_samplers(logits, temperature, seed=11)
    assert torch.equal(compiled, plain)
    masked = (logits[::3] == -torch.inf).gather(1, compiled[::3, None])
    assert not masked.any()
    assert len(set(compiled.tolist())) > 10  # really random draws, not one token


@needs_native
def test_compiled_sampling_follows_the_softmax() -> None:
    """Chi-square against softmax(logits / T) over 20,000 draws of a 6-token distribution."""
    from pavlit.policy.sampling import sample_tokens

    logits = torch.tensor([[2.0, 0.5, -1.0, 1.0, -torch.inf, 0.0]]).repeat(20_000, 1)
    tokens = sample_tokens(logits, 0.8, 1.0, torch.Generator().manual_seed(0), native.load())
    counts = torch.bincount(tokens, minlength=6).double()
    expected = (logits[0] / 0.8).softmax(-1).double() * 20_000
    assert counts[4] == 0
    keep = expected > 0
    chi2 = (((counts - expected) ** 2)[keep] / expected[keep]).sum().item()
    assert chi2 < 20.5  # 5 degrees of freedom: p = 0.001


@needs_native
def test_compiled_sampling_of_rows_without_mass_and_one_token() -> None:
    module = native.load()
    draw = torch.tensor([[0.5], [0.999999]], dtype=torch.float64)
    nothing = torch.full((2, 9), -torch.inf)
    assert module.sample_rows(nothing, draw, 1.0).tolist() == [8, 8]
    one = torch.full((2, 9), -torch.inf)
    one[:, 3] = 0.0
    assert module.sample_rows(one, draw, 1.0).tolist() == [3, 3]


def test_cache_buffers_reuse_their_memory_up_to_the_limit() -> None:
    buffers = fast_decode.CacheBuffers(limit_bytes=4 * 2 * 3 * 5 * 4)
    first = buffers.take(4, (2, 3, 5), torch.float32, torch.device("cpu"))
    again = buffers.take(2, (3, 5), torch.float32, torch.device("cpu"))  # smaller: the same memory
    assert [t.shape for t in first] == [(2, 3, 5)] * 4 and all(t.is_contiguous() for t in first)
    assert len({t.data_ptr() for t in first}) == 4  # disjoint views
    assert again[0].data_ptr() == first[0].data_ptr()
    over = buffers.take(5, (2, 3, 5), torch.float32, torch.device("cpu"))  # over the limit: fresh tensors
    assert over[0].data_ptr() != first[0].data_ptr()
    assert buffers.take(1, (2,), torch.float32, torch.device("cpu"))[0].data_ptr() == first[0].data_ptr()


@needs_native
def test_reused_cache_memory_leaves_samples_unchanged(gqa_model, tokenizer, monkeypatch) -> None:
    """A batch's caches reuse the previous batch's memory (its KV still in it): the samples must be those of a
    sampler that allocates fresh caches, call after call."""
    reused = Sampler(gqa_model, tokenizer, max_new_tokens=20)
    taken = []
    take = fast_decode.CacheBuffers.take

    def record(self, *args):
        out = take(self, *args)
        taken.append(out[0].data_ptr())
        return out

    monkeypatch.setattr(fast_decode.CacheBuffers, "take", record)
    first = [reused.complete(PROMPTS, n=6, seed=seed, return_logprobs=True) for seed in (1, 2)]
    assert len(taken) == 2 and taken[0] == taken[1]  # the second call ran in the first call's memory
    monkeypatch.setattr(fast_decode, "REUSE_LIMIT_BYTES", 0)
    fresh = Sampler(gqa_model, tokenizer, max_new_tokens=20)
    for seed, got in zip((1, 2), first):
        _assert_same(fresh.complete(PROMPTS, n=6, seed=seed, return_logprobs=True), got)
    assert [buffers._flat for buffers in fresh._free_buffers] == [None]  # it kept no memory: fresh caches each call


def _row_state(rows: int, width: int, generator: torch.Generator) -> dict:
    """A decode loop's row state part-way through: some rows already stopped, some steps already counted."""
    alive = torch.rand(rows, generator=generator) > 0.3
    return {
        "tokens": torch.randint(0, 9, (rows, width), generator=generator),
        "lengths": torch.randint(0, 5, (rows,), generator=generator),
        "codes": torch.where(alive, 0, torch.randint(1, 3, (rows,), generator=generator)),
        "logprobs": torch.zeros(rows, width),
        "steps_done": torch.randint(0, 2, (rows,), generator=generator),
        "alive": alive,
    }


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_steps", [None, 2])
def test_compiled_record_and_stop_match_the_python_loop(dtype, max_steps) -> None:
    """``record_rows`` writes the same tokens, lengths, stop codes, alive rows and step counts as the Python
    ``stop`` bookkeeping and the same log-probs, over EOS tokens, delimiters and dead rows."""
    from types import SimpleNamespace

    from pavlit.policy import decode
    from pavlit.policy.records import Request

    generator = torch.Generator().manual_seed(5)
    vocab, rows, width, t = 12, 200, 6, 3
    is_eos = torch.zeros(vocab, dtype=torch.bool)
    is_eos[[2, 7]] = True
    table = torch.tensor([0, 1, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0])  # delimiter counts per token (0 for EOS)
    sampler = SimpleNamespace(is_eos=is_eos, _delimiter_table=lambda delimiter: (table, True))
    request = Request(step_reason="max_steps", n=1, max_new_tokens=width, max_steps=max_steps, delimiter="\n")
    logits = (2.0 * torch.randn(rows, vocab, generator=generator)).to(dtype)
    tokens = torch.randint(0, vocab, (rows,), generator=generator)
    start = _row_state(rows, width, generator)

    py = {key: value.clone() for key, value in start.items()}
    expected = decode.Rows(row_ids=None, **py)
    expected.tokens[:, t] = tokens
    expected.logprobs[:, t] = decode.token_logprobs(logits, tokens)
    expected.lengths += expected.alive
    decode.stop(sampler, expected, tokens, request)

    got = {key: value.clone() for key, value in start.items()}
    n_alive = native.load().record_rows(
        tokens, t, got["tokens"], got["lengths"], got["codes"], got["alive"], is_eos, logits, got["logprobs"],
        got["steps_done"], table, max_steps or 0,
    )  # fmt: skip
    assert n_alive == int(expected.alive.sum())
    assert 0 < n_alive < int(start["alive"].sum())  # some rows stopped here, some go on
    for key in ("tokens", "lengths", "codes", "alive"):
        assert torch.equal(got[key], getattr(expected, key)), key
    if max_steps:
        assert torch.equal(got["steps_done"], expected.steps_done)
        assert (got["codes"] == 2).sum() > (start["codes"] == 2).sum()  # the step limit stopped rows
    assert torch.equal(got["logprobs"], expected.logprobs)


@needs_native
def test_compiled_draws_come_from_the_generator_as_in_python() -> None:
    """``sample_and_record`` takes its uniforms from the generator exactly as ``sample_tokens`` does: the same
    tokens, and the generator left in the same state."""
    from pavlit.policy.sampling import sample_tokens

    module = native.load()
    logits = 2.0 * torch.randn(64, 50, generator=torch.Generator().manual_seed(1))
    python_gen, native_gen = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    expected = sample_tokens(logits, 0.9, 1.0, python_gen)
    state = _row_state(64, 4, torch.Generator().manual_seed(2))
    tokens, _ = module.sample_and_record(
        logits, native_gen, 0.9, 0, state["tokens"], state["lengths"], state["codes"], state["alive"],
        torch.zeros(50, dtype=torch.bool), None, None, None, 0,
    )  # fmt: skip
    assert torch.equal(tokens, expected) and torch.equal(state["tokens"][:, 0], expected)
    assert torch.equal(torch.rand(3, generator=native_gen), torch.rand(3, generator=python_gen))


@needs_native
def test_compiled_record_rejects_a_token_outside_the_vocabulary() -> None:
    state = _row_state(2, 3, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="token 40 outside the vocabulary of 12"):
        native.load().record_rows(
            torch.tensor([1, 40]), 0, state["tokens"], state["lengths"], state["codes"], state["alive"],
            torch.zeros(12, dtype=torch.bool), None, None, None, None, 0,
        )  # fmt: skip
