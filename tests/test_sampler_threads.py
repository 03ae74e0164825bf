"""``Sampler(threads=k)``: batches decoded concurrently give exactly the samples of the same batches decoded in
order, are reproducible, keep the model's distribution, and leave torch's thread count as it was."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import DECODE_PROMPTS as PROMPTS
from test_sampler import _exact_two_token_marginals, chi2_critical, chi2_statistic

from pavlit.policy.backends import PavlitBackend, backend_fingerprint
from pavlit.policy.decode import plan
from pavlit.policy.sampler import STOP_DELIMITER, Sampler


def _sampler(model, tokenizer, concurrent: bool = True, **kwargs) -> Sampler:
    sampler = Sampler(model, tokenizer, max_new_tokens=12, seed=5, **kwargs)
    sampler._concurrent = concurrent
    return sampler


def _same(a, b, logprob_atol: float = 0.0) -> None:
    assert a.token_ids == b.token_ids
    assert a.stop_reasons == b.stop_reasons
    assert a.texts == b.texts
    assert a.generated_tokens == b.generated_tokens and a.prompt_tokens == b.prompt_tokens
    if a.logprobs is not None:
        for x, y in zip(a.logprobs, b.logprobs):
            for u, v in zip(x, y):
                assert torch.allclose(torch.tensor(u), torch.tensor(v), rtol=0.0, atol=logprob_atol)


@pytest.mark.parametrize("fast_decode", [True, False])
@pytest.mark.parametrize("threads", [2, 3])
def test_threads_give_the_samples_of_the_same_batches_in_order(model, tokenizer, threads: int, fast_decode) -> None:
    """Concurrency changes nothing: every batch draws from its own generator (complete, max_steps, next_step,
    log-probs, padded prompts, a multi-character delimiter on the host path)."""
    calls = [
        lambda s: s.complete(PROMPTS, n=5),
        lambda s: s.complete(PROMPTS, n=4, max_steps=1, return_logprobs=True),
        lambda s: s.next_step(PROMPTS, n=3),
        lambda s: s.next_step(PROMPTS[:2], n=4, delimiter="+4"),
    ]
    concurrent = _sampler(model, tokenizer, threads=threads, fast_decode=fast_decode)
    in_order = _sampler(model, tokenizer, concurrent=False, threads=threads, fast_decode=fast_decode)
    for call in calls:
        _same(call(concurrent), call(in_order))


def test_threads_grouped_decoder_equals_the_hf_forward(model, tokenizer) -> None:
    fast = _sampler(model, tokenizer, threads=2)
    hf = _sampler(model, tokenizer, threads=2, fast_decode=False)
    # Tokens identical; log-probs to float32 rounding (the two engines sum in different orders).
    _same(fast.complete(PROMPTS, n=6, return_logprobs=True), hf.complete(PROMPTS, n=6, return_logprobs=True), 1e-4)


def test_threads_are_reproducible_and_restore_the_thread_count(model, tokenizer) -> None:
    before = torch.get_num_threads()
    first = _sampler(model, tokenizer, threads=2).complete(PROMPTS, n=6)
    again = _sampler(model, tokenizer, threads=2).complete(PROMPTS, n=6)
    _same(first, again)
    assert torch.get_num_threads() == before
    sampler = _sampler(model, tokenizer, threads=2)
    assert sampler.complete(PROMPTS, n=6, seed=3).token_ids == sampler.complete(PROMPTS, n=6, seed=3).token_ids
    # A different split is a different (equally valid) draw, not the one-thread stream.
    one = _sampler(model, tokenizer, threads=1).complete(PROMPTS, n=6)
    assert one.token_ids != first.token_ids


def test_threads_keep_the_model_distribution(model, tokenizer) -> None:
    """First- and second-token frequencies over several concurrently decoded batches match the exact model."""
    temperature, n = 0.7, 3000
    target_prompt = PROMPTS[2]
    sampler = Sampler(model, tokenizer, max_new_tokens=2, temperature=temperature, seed=11, threads=3)
    out = sampler.complete([PROMPTS[3], target_prompt], n=n)
    samples = out.token_ids[1]
    first_probs, second_probs = _exact_two_token_marginals(model, tokenizer, target_prompt, temperature)
    stat, dof = chi2_statistic(Counter(ids[0] for ids in samples), first_probs, n)
    assert stat < chi2_critical(dof), (stat, dof)
    seconds = [ids[1] for ids in samples if len(ids) == 2]
    stat, dof = chi2_statistic(Counter(seconds), second_probs, len(seconds))
    assert stat < chi2_critical(dof), (stat, dof)


def test_threads_see_weight_updates(model, tokenizer) -> None:
    """The fused weights are rebuilt before the threads start when the model changed in place (an RL step)."""
    sampler = _sampler(model, tokenizer, threads=2, temperature=0.0)
    before = sampler.complete(PROMPTS, n=2).token_ids
    lm_head = model.lm_head.weight
    saved = lm_head.detach().clone()
    try:
        with torch.no_grad():
            lm_head.copy_(torch.randn(lm_head.shape, generator=torch.Generator().manual_seed(9)))
        after = sampler.complete(PROMPTS, n=2).token_ids
        reference = _sampler(model, tokenizer, threads=1, temperature=0.0, fast_decode=False)
        assert after == reference.complete(PROMPTS, n=2).token_ids
        assert after != before
    finally:
        with torch.no_grad():
            lm_head.copy_(saved)


def test_plan_splits_rows_into_at_least_parts_batches() -> None:
    encoded = [[1] * length for length in (3, 9, 5, 7)]
    for parts in (1, 2, 3, 4, 8):
        batches = plan(encoded, 4, 256, parts=parts)
        rows = [sum(job.count for job in batch) for batch in batches]
        assert sum(rows) == 16
        assert len(batches) >= min(parts, 16)
        assert max(rows) <= -(-16 // parts)
        per_prompt = Counter()
        for batch in batches:
            for job in batch:
                per_prompt[job.prompt_index] += job.count
        assert per_prompt == {0: 4, 1: 4, 2: 4, 3: 4}


def test_threads_argument_and_backend(model, tokenizer) -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="threads"):
            Sampler(model, tokenizer, threads=bad)
    assert backend_fingerprint(PavlitBackend()) == {}
    assert backend_fingerprint(PavlitBackend(fast_decode=False))["backend"] == {
        "class": "pavlit.policy.backends.PavlitBackend",
        "share_prefix": True,
        "fast_decode": False,
    }  # a run made before `threads` existed keeps its fingerprint
    assert backend_fingerprint(PavlitBackend(threads=2))["backend"]["threads"] == 2
    sampler = PavlitBackend(threads=2).build((model, tokenizer), _settings(), "cpu")
    assert sampler.threads == 2
    assert sampler.next_step(PROMPTS, n=2).stop_reasons[0][0] in (STOP_DELIMITER, "eos", "length")


def _settings():
    from pavlit.policy.records import SamplingSettings

    return SamplingSettings(max_new_tokens=8)


def test_label_job_with_sampler_threads_from_the_command_line(tmp_path) -> None:
    """``--backend.threads 2`` reaches the sampler; the run's fingerprint records it, so resuming it with the
    one-thread default (other samples) is refused while resuming it as it was is a no-op."""
    import json

    import yaml

    from pavlit.jobs.shards import ShardStore
    from pavlit.labeling.job import label_command
    from pavlit.tasks.arithmetic import ALPHABET

    config = {
        "task": {"class_path": "pavlit.tasks.arithmetic.ArithmeticTask", "init_args": {"difficulty": 1, "n_train": 4}},
        "policy": {
            "class_path": "TinyPolicy",
            "init_args": {"n_layer": 1, "n_embd": 32, "n_head": 2, "max_position": 128, "alphabet": ALPHABET},
        },
        "label": {"n_cov": 2, "n_mc": 4, "max_new_tokens": 24, "max_steps": 16},
        "chunk_size": 2,
        "seed": 1,
        "output_dir": str(tmp_path / "labels"),
    }
    path = tmp_path / "label.yaml"
    path.write_text(yaml.safe_dump(config))
    threaded = ["--config", str(path), "--backend", "pavlit.policy.backends.PavlitBackend", "--backend.threads", "2"]
    assert label_command(threaded) == 0
    settings = json.loads((tmp_path / "labels" / "job.json").read_text())["settings"]
    assert settings["backend"]["threads"] == 2
    records = list(ShardStore(tmp_path / "labels", settings).records())
    assert records and all(0.0 <= r["q_mc"] <= 1.0 and r["n_rollouts"] == 4 for r in records)
    assert label_command(threaded) == 0  # resumes: nothing left to do
    with pytest.raises((ValueError, SystemExit)):
        label_command(["--config", str(path)])
