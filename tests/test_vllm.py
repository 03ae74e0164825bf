"""The vLLM backend: reached from label / search / RL configs, same records as pavlit's sampler.

The CPU tests replace the ``vllm`` module with a fake engine that answers ``LLM.generate`` the way vLLM does
(``n`` samples per request, a ``stop`` string kept in the text, ``finish_reason``/``stop_reason``), drawing the
samples with pavlit's own :class:`Sampler` on the saved model folder under the request's seed. With that engine a
job run through :class:`VLLMBackend` must write exactly the records the default backend writes, which checks the
wiring and the record semantics (step ends, EOS, token counts) at once. The last test runs the real vLLM and is
skipped where it cannot be imported.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml

from pavlit.jobs.args import SamplerArgs
from pavlit.jobs.shards import ShardStore
from pavlit.labeling.job import label, label_command
from pavlit.labeling.mc import LabelArgs
from pavlit.policy.backends import PavlitBackend, SamplingSettings, VLLMBackend, backend_fingerprint
from pavlit.policy.loading import load_policy
from pavlit.policy.sampler import STOP_DELIMITER, STOP_EOS, STOP_LENGTH, STOP_MAX_STEPS, Sampler, VLLMSampler
from pavlit.policy.sources import Pretrained, TinyPolicy
from pavlit.tasks.arithmetic import ALPHABET, ArithmeticTask

PROMPTS = ["Compute 3+4.\n", "Compute 12-5.\n", "Compute (2*3)+1.\n"]
POLICY = {"n_layer": 1, "n_embd": 32, "n_head": 2, "max_position": 128, "alphabet": ALPHABET, "seed": 3}


class FakeSamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)


class FakeLLM:
    """``vllm.LLM`` as far as pavlit uses it; samples with pavlit's Sampler on the folder's model."""

    instances: list[FakeLLM] = []

    def __init__(self, model: str, seed: int = 0, **kwargs: Any) -> None:
        self.model_path, self.seed, self.kwargs = model, seed, kwargs
        self.model, self.tokenizer = load_policy(model)  # float32 whatever dtype was asked: the samples must match
        self.requests: list[FakeSamplingParams] = []
        self.prefix_cache_resets = 0
        runner = SimpleNamespace(model=SimpleNamespace(load_weights=self._load_weights))
        self.llm_engine = SimpleNamespace(
            model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=runner))
        )
        FakeLLM.instances.append(self)

    def _load_weights(self, items: list[tuple[str, torch.Tensor]]) -> None:
        self.model.load_state_dict(dict(items), strict=True)  # HF names, every weight, no adapter leftovers

    def reset_prefix_cache(self) -> None:
        self.prefix_cache_resets += 1

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def generate(self, prompts: list[str], params: FakeSamplingParams, use_tqdm: bool = False) -> list[Any]:
        assert params.include_stop_str_in_output and not use_tqdm
        self.requests.append(params)
        sampler = Sampler(self.model, self.tokenizer, max_batch=self.kwargs["max_num_seqs"])
        stop = params.stop[0] if params.stop else None
        out = sampler.complete(
            prompts,
            n=params.n,
            max_new_tokens=params.max_tokens,
            max_steps=1 if stop else None,
            delimiter=stop or "\n",
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
            return_logprobs=params.logprobs is not None,
        )
        results = []
        for i, prompt in enumerate(prompts):
            completions = []
            for j, text in enumerate(out.texts[i]):
                reason = out.stop_reasons[i][j]
                logprobs = None
                if out.logprobs is not None:
                    logprobs = [
                        {token: SimpleNamespace(logprob=lp)}
                        for token, lp in zip(out.token_ids[i][j], out.logprobs[i][j])
                    ]
                completions.append(
                    SimpleNamespace(
                        text=text,
                        token_ids=out.token_ids[i][j],
                        finish_reason="length" if reason == STOP_LENGTH else "stop",
                        stop_reason=stop if reason == STOP_MAX_STEPS else None,
                        logprobs=logprobs,
                    )
                )
            results.append(SimpleNamespace(prompt_token_ids=self.tokenizer(prompt)["input_ids"], outputs=completions))
        return results


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> type[FakeLLM]:
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    FakeLLM.instances = []
    return FakeLLM


def _records(out: Path) -> list[dict]:
    return list(ShardStore(out, json.loads((out / "job.json").read_text())["settings"]).records())


def test_label_config_selects_vllm_and_writes_the_default_backends_records(fake_vllm, tmp_path: Path) -> None:
    task = {"class_path": "pavlit.tasks.arithmetic.ArithmeticTask", "init_args": {"difficulty": 1, "n_train": 4}}
    common = {
        "task": task,
        "policy": {"class_path": "TinyPolicy", "init_args": POLICY},
        "label": {"n_cov": 2, "n_mc": 4, "max_new_tokens": 24, "max_steps": 16},
        "sampler": {"max_batch": 32},
        "chunk_size": 2,
        "seed": 1,
    }
    backend = {
        "class_path": "pavlit.policy.backends.VLLMBackend",
        "init_args": {"gpu_memory_utilization": 0.3, "tensor_parallel_size": 1, "enforce_eager": True},
    }
    (tmp_path / "vllm.yaml").write_text(
        yaml.safe_dump({**common, "output_dir": str(tmp_path / "vllm"), "backend": backend})
    )
    (tmp_path / "pavlit.yaml").write_text(yaml.safe_dump({**common, "output_dir": str(tmp_path / "pavlit")}))
    assert label_command(["--config", str(tmp_path / "vllm.yaml")]) == 0
    assert label_command(["--config", str(tmp_path / "pavlit.yaml")]) == 0

    (engine,) = fake_vllm.instances
    assert (Path(engine.model_path) / "config.json").is_file()  # the in-memory TinyPolicy, saved for the engine
    assert engine.kwargs["gpu_memory_utilization"] == 0.3 and engine.kwargs["tensor_parallel_size"] == 1
    assert engine.kwargs["enable_prefix_caching"] is True and engine.kwargs["enforce_eager"] is True
    assert engine.kwargs["max_num_seqs"] == 32 and engine.kwargs["dtype"] in ("float32", "bfloat16")
    # One request per prompt and phase: n = n_cov seed rollouts, then n = n_mc Monte-Carlo completions per prefix.
    assert {r.n for r in engine.requests} == {2, 4} and all(r.stop is None for r in engine.requests)

    records = _records(tmp_path / "vllm")
    assert records and records == _records(tmp_path / "pavlit")
    assert all(step.endswith("\n") for r in records for step in r["steps"][:-1])  # the last may end at EOS
    vllm_metrics = json.loads((tmp_path / "vllm" / "metrics.json").read_text())
    pavlit_metrics = json.loads((tmp_path / "pavlit" / "metrics.json").read_text())
    assert vllm_metrics["this_run"]["generated_tokens"] == pavlit_metrics["this_run"]["generated_tokens"] > 0
    settings = json.loads((tmp_path / "vllm" / "job.json").read_text())["settings"]
    assert settings["backend"]["class"] == "pavlit.policy.backends.VLLMBackend"
    assert "backend" not in json.loads((tmp_path / "pavlit" / "job.json").read_text())["settings"]


def test_resuming_a_label_run_with_another_backend_is_refused(fake_vllm, tmp_path: Path) -> None:
    kwargs = dict(
        task=ArithmeticTask(difficulty=1, n_train=2),
        policy=TinyPolicy(**POLICY),
        output_dir=str(tmp_path / "labels"),
        label=LabelArgs(n_cov=1, n_mc=2, max_new_tokens=8),
        sampler=SamplerArgs(max_batch=16),
    )
    label(**kwargs)
    with pytest.raises(ValueError, match="backend"):
        label(**kwargs, backend=VLLMBackend())


def test_search_config_selects_vllm(fake_vllm, tmp_path: Path) -> None:
    from pavlit.search.job import search_command

    task = {"class_path": "pavlit.tasks.arithmetic.ArithmeticTask", "init_args": {"difficulty": 1, "n_test": 3}}
    config = {
        "task": task,
        "policy": {"class_path": "TinyPolicy", "init_args": POLICY},
        "output_dir": str(tmp_path / "search"),
        "num_problems": 3,
        "budgets": [1, 2],
        "max_new_tokens": 24,
        "methods": [{"name": "bon", "search": {"class_path": "BestOfN", "init_args": {"pick": "majority"}}}],
        "bootstrap": 200,
        "backend": {"class_path": "pavlit.policy.backends.VLLMBackend", "init_args": {"dtype": "float32"}},
    }
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(config))
    assert search_command(["--config", str(tmp_path / "search.yaml")]) == 0
    (engine,) = fake_vllm.instances
    assert engine.kwargs["dtype"] == "float32" and engine.requests
    results = json.loads((tmp_path / "search" / "results.json").read_text())
    assert {p["budget"] for p in results["points"]} == {1, 2}


def test_rl_pushes_the_trained_weights_to_the_engine_before_each_rollout(fake_vllm, tmp_path: Path) -> None:
    from lightning import Callback, Trainer

    from pavlit.data.prompts import PromptDataModule
    from pavlit.modules.policy_rl import PolicyRLModule
    from pavlit.policy.backends import merged_state_dict

    task = ArithmeticTask(difficulty=1, n_train=8, n_validation=2)
    module = PolicyRLModule(
        policy=TinyPolicy(**POLICY),
        task=task,
        backend=VLLMBackend(dtype="float32"),
        samples_per_prompt=2,
        baseline="leave_one_out",
        kl_coef=0.0,
        lr=1e-2,
        warmup_steps=0,
        max_new_tokens=16,
        export=False,
    )
    snapshots: list[dict[str, torch.Tensor]] = []

    class Perturb(Callback):
        """Random tiny-model rewards are all 0 (no gradient), so change the weights by hand after each step."""

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            with torch.no_grad():
                for parameter in pl_module.model.parameters():
                    parameter.add_(0.01 * torch.randn_like(parameter))
            snapshots.append({name: t.clone() for name, t in merged_state_dict(pl_module.model).items()})

    trainer = Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
        callbacks=[Perturb()],
    )
    trainer.fit(module, PromptDataModule(task, batch_size=2, eval_problems=0))
    (engine,) = fake_vllm.instances
    assert engine.prefix_cache_resets == 2  # built at step 0, refreshed before the rollouts of steps 1 and 2
    # The rollouts of step 2 were drawn from the weights as they were after step 1, not the initial or the last.
    held = engine.model.state_dict()
    assert set(held) == set(snapshots[1])
    assert all(torch.equal(held[name], snapshots[1][name]) for name in held)
    assert not all(torch.equal(held[name], snapshots[2][name]) for name in held)


def test_merged_state_dict_of_a_lora_model_is_the_merged_model(tmp_path: Path) -> None:
    from pavlit.models.adapters import LoRAArgs, apply_lora
    from pavlit.policy.backends import merged_state_dict, save_merged

    model, tokenizer = TinyPolicy(**POLICY).load()
    # Seeded: the LoRA weights must not depend on which tests ran before (the round-off checked below does).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        adapted = apply_lora(model, LoRAArgs(enabled=True, r=4)).eval()
        with torch.no_grad():
            for name, parameter in adapted.named_parameters():
                if "lora_B" in name:
                    parameter.normal_()
    ids = torch.tensor([tokenizer("Compute 1+2.\n")["input_ids"]])
    with torch.no_grad():
        expected = adapted(ids).logits
    state = merged_state_dict(adapted)
    assert not any("lora" in name or "base_layer" in name for name in state)
    with torch.no_grad():
        assert torch.allclose(adapted(ids).logits, expected, atol=1e-6)  # the module itself is left unmerged
    reloaded, _ = load_policy(save_merged(adapted, tokenizer, tmp_path / "merged"))
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, expected, atol=1e-5)


def test_vllm_outputs_become_sampler_records(fake_vllm, tmp_path: Path) -> None:
    """``complete(max_steps=k)``: vLLM generates on; the text, its token ids and the counts are cut at step k."""
    model, tokenizer = TinyPolicy(**POLICY).load()
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    sampler = VLLMSampler(str(tmp_path / "m"), SamplingSettings(max_new_tokens=60), max_num_seqs=8)
    (engine,) = fake_vllm.instances
    assert sampler.tokenizer is engine.tokenizer and sampler.config.max_position_embeddings == 128
    # What the engine generated (it stops only at EOS or the length), drawn the same way the fake engine draws.
    uncut = Sampler(engine.model, engine.tokenizer, max_batch=8).complete(
        PROMPTS, n=3, max_new_tokens=60, seed=4, return_logprobs=True
    )
    # The engine's generation does not depend on the delimiter (no stop string): cut at its most frequent character.
    delimiter = Counter("".join(t for row in uncut.texts for t in row)).most_common(1)[0][0]
    out = sampler.complete(PROMPTS, n=3, max_steps=2, delimiter=delimiter, seed=4, return_logprobs=True)
    n_cut = 0
    for i in range(len(PROMPTS)):
        for j in range(3):
            text, ids, reason = out.texts[i][j], out.token_ids[i][j], out.stop_reasons[i][j]
            whole = uncut.texts[i][j]
            assert uncut.token_ids[i][j][: len(ids)] == ids and uncut.logprobs[i][j][: len(ids)] == out.logprobs[i][j]
            if whole.count(delimiter) >= 2:
                n_cut += 1
                assert reason == STOP_MAX_STEPS and not out.finished[i][j]
                assert text == whole[: whole.index(delimiter, whole.index(delimiter) + 1) + 1]
                # The fewest tokens whose text holds both delimiters: Sampler would have stopped right there.
                decode = engine.tokenizer.decode
                assert decode(ids).count(delimiter) == 2 > decode(ids[:-1]).count(delimiter)
            else:
                assert (text, ids, reason) == (whole, uncut.token_ids[i][j], uncut.stop_reasons[i][j])
                assert out.finished[i][j] == (reason == STOP_EOS)
    assert n_cut > 0  # the case under test happened
    assert out.generated_tokens == sum(len(ids) for row in out.token_ids for ids in row) < uncut.generated_tokens
    steps = sampler.next_step(PROMPTS, n=2, max_new_tokens=6, seed=2)
    assert engine.requests[-1].stop == ["\n"] and engine.requests[-1].n == 2
    for texts, reasons in zip(steps.texts, steps.stop_reasons):
        for text, reason in zip(texts, reasons):
            assert reason in (STOP_DELIMITER, STOP_EOS, STOP_LENGTH)
            assert (reason == STOP_DELIMITER) == text.endswith("\n")


def test_backend_fingerprint_is_empty_for_the_default_engine() -> None:
    assert backend_fingerprint(None) == {} and backend_fingerprint(PavlitBackend()) == {}
    assert backend_fingerprint(PavlitBackend(share_prefix=False))["backend"]["share_prefix"] is False
    assert backend_fingerprint(VLLMBackend(gpu_memory_utilization=0.8))["backend"]["gpu_memory_utilization"] == 0.8
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        VLLMBackend(gpu_memory_utilization=1.5)


def test_missing_vllm_names_the_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match="pip install vllm"):
        VLLMBackend().build(TinyPolicy(**POLICY), SamplingSettings(), "cpu")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (pip install vllm, on a GPU)")
def test_real_vllm_steps_and_completions(tmp_path: Path) -> None:
    from pavlit.policy.loading import tiny_policy
    from pavlit.policy.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer(ALPHABET)
    tiny_policy(tokenizer, n_layer=2, n_embd=64, n_head=2, max_position=256).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    backend = VLLMBackend(dtype="float32", gpu_memory_utilization=0.2, enforce_eager=True)
    sampler = backend.build(
        Pretrained(str(tmp_path / "m")),
        SamplingSettings(max_new_tokens=24, max_batch=64),
        "cuda" if torch.cuda.is_available() else "cpu",
    )
    prompts = ["Compute 3+4.\n", "Compute (12*3)-5.\n"]
    steps = sampler.next_step(prompts, n=4, seed=0)
    assert [len(t) for t in steps.texts] == [4, 4]
    for texts, reasons in zip(steps.texts, steps.stop_reasons):
        for text, reason in zip(texts, reasons):
            assert (reason == STOP_DELIMITER) == (text.endswith("\n") and text.count("\n") == 1)
    full = sampler.complete(prompts, n=8, max_steps=2, seed=1)
    assert all(t.count("\n") <= 2 for row in full.texts for t in row)
    assert full.generated_tokens == sum(len(i) for row in full.token_ids for i in row) > 0


# --- benchmarks/gpu_smoke.py --------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def _gpu_smoke() -> dict[str, Any]:
    import runpy

    return runpy.run_path(str(REPO / "benchmarks" / "gpu_smoke.py"), run_name="not_main")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_gpu_smoke_stops_at_once_without_cuda(capsys) -> None:
    assert _gpu_smoke()["main"]([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_gpu_smoke_stage_configs_select_vllm_and_parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    from pavlit.cli import PavlitCLI, main

    configs = _gpu_smoke()["stage_configs"](tmp_path, "vllm", 0.4)
    monkeypatch.setattr(sys, "argv", ["pavlit"])

    class ParseOnly(PavlitCLI):
        def before_instantiate_classes(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

    for stage in ("sft", "orm", "pav", "rl"):
        cli = ParseOnly(args=["--config", str(configs[stage])], run=False)
        assert cli.config.trainer.precision == "bf16-mixed", stage
    assert cli.config.model.init_args.backend.class_path == "pavlit.policy.backends.VLLMBackend"
    for stage, command in (("label", "label"), ("search", "search")):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--config", str(configs[stage]), "--print_config"])
        assert exit_info.value.code in (0, None), capsys.readouterr().err
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["backend"]["class_path"] == "pavlit.policy.backends.VLLMBackend", stage
        assert printed["backend"]["init_args"]["dtype"] == "bfloat16"
        assert str(tmp_path) in printed["policy"]["init_args"]["path"]
