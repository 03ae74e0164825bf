"""Bad input at every entry point ends with a clear, specific error — never a traceback or a silently wrong number.

One table, one row per malformed input, across stages: ``pavlit label``, ``pavlit fit`` (PAV and ORM on step labels
and outcomes, SFT/RFT on rollouts), ``pavlit search``, ``pavlit pipeline``, dataset files, configs, plugins, model
folders and tokenizers. A row builds its inputs in a fresh folder and says how it runs:

* ``cli``: ``pavlit.cli.main`` in this process (what the ``pavlit`` command runs): the exit status must be non-zero
  and stderr must hold no traceback;
* ``process``: a real ``python -m pavlit`` subprocess (a few rows: the path a user actually takes);
* ``library``: a call that must raise the row's exception type.

Every row lists the parts the message must contain: the file (and line or row) or the field, and what was expected.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pavlit import registry
from pavlit.cli import RUN_DIR_ENV, main
from pavlit.registry import PluginError, PluginInfo

REPO = Path(__file__).parents[1]
TINY = {"n_layer": 1, "n_embd": 16, "n_head": 2}


@dataclass
class Ctx:
    """What a row's ``make`` gets: its own empty folder (also the working directory) and pytest's monkeypatch."""

    tmp: Path
    monkeypatch: pytest.MonkeyPatch

    def write(self, name: str, text: str) -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return str(path)

    def jsonl(self, name: str, rows: list[Any]) -> str:
        return self.write(name, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))

    def config(self, name: str, config: dict[str, Any]) -> str:
        return self.write(name, json.dumps(config, indent=1))  # JSON is YAML

    def module(self, name: str, source: str) -> str:
        """An importable module (``tmp/mods`` is on ``sys.path`` for every row)."""
        self.write(f"mods/{name}.py", textwrap.dedent(source))
        return name


@dataclass
class Case:
    """One bad input.

    Args:
        id: The row's test id.
        make: Builds the inputs; returns the ``pavlit`` argv (``cli``/``process``) or a zero-argument callable
            (``library``).
        expect: Substrings the message must contain; ``{tmp}`` is the row's folder.
        how: ``"cli"``, ``"process"`` or ``"library"``.
        raises: For ``library`` rows, the exception type.
        after: What must hold of the row's folder afterwards (e.g. a running job's files left untouched).
    """

    id: str
    make: Callable[[Ctx], Any]
    expect: tuple[str, ...]
    how: str = "cli"
    raises: type[BaseException] | None = None
    after: Callable[[Path], bool] | None = None


# --- inputs ------------------------------------------------------------------------------------------------------

GSM_ROWS = [{"question": "What is 1+1?", "answer": "1+1=2\n#### 2"}, {"question": "What is 2+3?", "answer": "#### 5"}]


def label_argv(ctx: Ctx, train_rows: list[Any] | None = None, **overrides: Any) -> list[str]:
    """``pavlit label`` on a JSONL task with a tiny in-code policy; ``overrides`` replace config keys."""
    train_path = ctx.jsonl("task.jsonl", train_rows or GSM_ROWS)
    config: dict[str, Any] = {
        "task": {"class_path": "JsonlTask", "init_args": {"train_path": train_path}},
        "policy": {"class_path": "TinyPolicy", "init_args": dict(TINY)},
        "output_dir": str(ctx.tmp / "labels"),
        "label": {"n_cov": 1, "n_mc": 2, "max_new_tokens": 4},
        "chunk_size": 1,
    }
    config.update(overrides)
    return ["label", "--config", ctx.config("label.yaml", config)]


def step_label(problem: str = "p0", steps: tuple[str, ...] = ("ok\n",), n_correct: int = 3, **extra: Any) -> dict:
    record = {
        "problem_id": problem, "prompt": f"Q{problem}:", "steps": list(steps), "step_index": len(steps),
        "n_rollouts": 4, "n_correct": n_correct, "q_mc": n_correct / 4, "policy": "pi", "seed_outcome": 1,
        "answer": "1", "seed_index": 0, "source": "seed",
    }  # fmt: skip
    record.update(extra)
    return record


def good_labels() -> list[dict]:
    return [step_label(f"p{i}", ("ok\n", "no\n")[:h], n_correct=2 + h % 2) for i in range(4) for h in range(3)]


def fit_argv(ctx: Ctx, data_path: str, kind: str = "pav", model_args: dict | None = None, **data_args: Any) -> list:
    """``pavlit fit`` of a tiny PAV (step labels) or ORM (outcomes) on ``data_path``."""
    module, data = {
        "pav": ("pavlit.modules.pav.PAVModule", "pavlit.data.step_labels.StepLabelDataModule"),
        "orm": ("pavlit.modules.orm.ORMModule", "pavlit.data.outcomes.OutcomeDataModule"),
    }[kind]
    config = {
        "model": {"class_path": module, "init_args": {"source": {"class_path": "TinyPolicy", "init_args": TINY},
                                                      **(model_args or {})}},
        "data": {"class_path": data, "init_args": {"path": data_path, "batch_size": 4, **data_args}},
        "trainer": {"max_steps": 1, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(ctx.tmp / "run")},
    }  # fmt: skip
    return ["fit", "--config", ctx.config("fit.yaml", config)]


def sft_argv(ctx: Ctx, rollouts: list[Any] | None, **data_args: Any) -> list[str]:
    """``pavlit fit`` of the tiny SFT config as RFT on a rollouts file (or on references when ``rollouts`` is None)."""
    argv = ["fit", "--config", str(REPO / "configs/tiny/sft.yaml"), "--trainer.max_steps=1"]
    argv += ["--trainer.default_root_dir", str(ctx.tmp / "run"), "--trainer.logger=false"]
    argv += [f"--model.init_args.source.init_args.{k}={v}" for k, v in TINY.items()]
    argv += ["--data.init_args.task.init_args.n_train=4", "--data.init_args.task.init_args.n_validation=2"]
    if rollouts is not None:
        argv += ["--data.init_args.response_source=rollouts"]
        argv += ["--data.init_args.rollouts_path", ctx.jsonl("rollouts.jsonl", rollouts)]
    return argv + [f"--data.init_args.{k}={v}" for k, v in data_args.items()]


def search_argv(ctx: Ctx, methods: list[dict] | None = None, **overrides: Any) -> list[str]:
    config: dict[str, Any] = {
        "task": {"class_path": "ArithmeticTask", "init_args": {"n_train": 2, "n_validation": 2, "n_test": 2}},
        "policy": {"class_path": "TinyPolicy", "init_args": {**TINY, "max_position": 128}},
        "methods": methods or [{"name": "vote", "search": {"class_path": "BestOfN"}}],
        "output_dir": str(ctx.tmp / "search"),
        "budgets": [1],
        "max_new_tokens": 4,
        "bootstrap": 10,
    }
    config.update(overrides)
    return ["search", "--config", ctx.config("search.yaml", config)]


def pipeline_argv(ctx: Ctx, stages: list[dict]) -> list[str]:
    return ["pipeline", "--config", ctx.config("pipeline.yaml", {"run_dir": str(ctx.tmp / "run"), "stages": stages})]


# --- inputs for issue 19's cases ---------------------------------------------------------------------------------

NAN, INF = "__yaml_nan__", "__yaml_inf__"  # written into a config as YAML's .nan / .inf (JSON has neither)


def with_yaml_floats(argv: list[str]) -> list[str]:
    """Rewrite the row's config file so that the NAN / INF markers become YAML's ``.nan`` / ``.inf``."""
    path = Path(argv[argv.index("--config") + 1])
    text = path.read_text(encoding="utf-8").replace(f'"{NAN}"', ".nan").replace(f'"{INF}"', ".inf")
    path.write_text(text, encoding="utf-8")
    return argv


def model_folder(ctx: Ctx, name: str = "model", alphabet: str = "0123456789+-*=?#:.\n What is", **config: Any) -> str:
    """A saved tiny causal-LM folder; ``config`` keys overwrite its config.json (the weights stay as saved)."""
    from pavlit.policy.loading import tiny_policy
    from pavlit.policy.tokenizer import build_char_tokenizer

    folder = ctx.tmp / name
    tokenizer = build_char_tokenizer(alphabet)
    tiny_policy(tokenizer, n_layer=1, n_embd=16, n_head=2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if config:
        saved = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        (folder / "config.json").write_text(json.dumps({**saved, **config}), encoding="utf-8")
    return str(folder)


def pretrained(path: str) -> dict[str, Any]:
    return {"class_path": "Pretrained", "init_args": {"path": path}}


def bert_folder(ctx: Ctx) -> str:
    from transformers import BertConfig, BertModel

    from pavlit.policy.tokenizer import build_char_tokenizer

    folder = ctx.tmp / "bert"
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(config).save_pretrained(folder)
    build_char_tokenizer("0123456789+-*=?#:.\n What is").save_pretrained(folder)
    return str(folder)


def truncated_weights_folder(ctx: Ctx) -> str:
    folder = Path(model_folder(ctx))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return str(folder)


def vocabulary_mismatch_folder(ctx: Ctx) -> str:
    """A model saved for a 4-character vocabulary beside the tokenizer of a much larger one."""
    from pavlit.policy.tokenizer import build_char_tokenizer

    folder = model_folder(ctx, alphabet="0123")
    build_char_tokenizer("0123456789+-*=?#:.\n What is").save_pretrained(folder)
    return folder


def disk_full(ctx: Ctx) -> list[str]:
    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    argv = label_argv(ctx)
    ctx.monkeypatch.setattr(os, "fsync", no_space)
    return argv


def locked_output_dir(ctx: Ctx) -> list[str]:
    from pavlit.jobs.lock import LOCK_FILE

    holder = {"pid": os.getppid(), "host": socket.gethostname(), "command": "pavlit label"}  # a live process
    ctx.write(f"labels/{LOCK_FILE}", json.dumps(holder))
    ctx.write("labels/config.yaml", "the running job's config\n")  # which the refused job must not overwrite
    return label_argv(ctx)


def not_utf8(ctx: Ctx, name: str, good: list[Any], bad_line: bytes) -> str:
    path = ctx.tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(json.dumps(r) + "\n" for r in good).encode() + bad_line + b"\n")
    return str(path)


def rollouts_not_utf8(ctx: Ctx) -> list[str]:
    rollout = {"problem_id": "a", "prompt": "Q", "response": "1\n", "correct": True}
    argv = sft_argv(ctx, [rollout])
    not_utf8(ctx, "rollouts.jsonl", [rollout], b'{"problem_id": "\xfe"}')
    return argv


def label_folder(ctx: Ctx) -> Path:
    """A `pavlit label` output folder (two committed shards with their integrity records)."""
    from pavlit.jobs.shards import ShardStore

    store = ShardStore(ctx.tmp / "labels", {"seed": 0})
    labels = good_labels()
    store.commit(0, labels[:6])
    store.commit(1, labels[6:])
    return store.root


def label_folder_with_a_broken_shard(ctx: Ctx) -> list[str]:
    folder = label_folder(ctx)
    shard = folder / "chunk-000001.jsonl"
    shard.write_bytes(shard.read_bytes()[:-40])  # a copy cut short, after the job had finished
    return fit_argv(ctx, str(folder))


def label_folder_being_written(ctx: Ctx) -> list[str]:
    from pavlit.jobs.lock import LOCK_FILE

    folder = label_folder(ctx)
    (folder / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    return fit_argv(ctx, str(folder))


def conflicting_duplicate_labels(ctx: Ctx) -> list[str]:
    # good_labels() holds this rollout's prefix 1 (line 5) as 3/4 correct; another job labelled it 1/4.
    return fit_argv(ctx, ctx.jsonl("l.jsonl", [*good_labels(), step_label("p1", ("ok\n",), n_correct=1)]))


def validate_argv(ctx: Ctx) -> list[str]:
    argv = fit_argv(ctx, ctx.jsonl("l.jsonl", good_labels()), val_fraction=0.0)
    return ["validate", *argv[1:]]


def recursive_pipeline(ctx: Ctx) -> list[str]:
    config = str(ctx.tmp / "pipeline.yaml")
    return pipeline_argv(ctx, [{"name": "again", "command": ["pipeline", "--config", config], "output": "x"}])


def corrupt_job_json(ctx: Ctx) -> list[str]:
    ctx.write("labels/job.json", '{"fingerprint": "ab')  # a run killed while an old pavlit wrote it
    return label_argv(ctx)


def rerun_with_other_settings(ctx: Ctx) -> list[str]:
    assert main(label_argv(ctx)) == 0
    return label_argv(ctx, label={"n_cov": 1, "n_mc": 3, "max_new_tokens": 4})


def empty_delimiter_task(ctx: Ctx) -> list[str]:
    name = ctx.module(
        "bad_inputs_undelimited",
        """
        from pavlit.interfaces import Problem, Task

        class Undelimited(Task):
            step_delimiter = ""

            def problems(self, split):
                return [Problem(id="a", prompt="1+1=", answer="2")]

            def score(self, problem, response):
                return 0.0
        """,
    )
    return label_argv(ctx, task={"class_path": f"{name}.Undelimited"})


def truncated_parquet(ctx: Ctx) -> Callable[[], Any]:
    import datasets

    from pavlit.data.step_labels import StepLabelDataModule
    from pavlit.policy.tokenizer import build_char_tokenizer

    path = ctx.tmp / "labels.parquet"
    datasets.Dataset.from_list(good_labels()).to_parquet(str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return lambda: StepLabelDataModule(str(path)).prepare(build_char_tokenizer("Qp0123:okn\n"))


def nan_label_via_reader(ctx: Ctx) -> Callable[[], Any]:
    from pavlit.labeling.records import read_jsonl

    nan_line = json.dumps(step_label()).replace('"q_mc": 0.75', '"q_mc": NaN')
    path = ctx.jsonl("chunk-000000.jsonl", [step_label(), nan_line])
    return lambda: list(read_jsonl(path))


def tokenizer_without_pad_or_eos():
    from pavlit.policy.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer("Qp0123:okn\n")
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    return tokenizer


def no_pad_tokenizer_in_a_datamodule(ctx: Ctx) -> Callable[[], Any]:
    from pavlit.data.step_labels import StepLabelDataModule

    path = ctx.jsonl("labels.jsonl", good_labels())
    return lambda: StepLabelDataModule(path).prepare(tokenizer_without_pad_or_eos())


def model_folder_without_pad_or_eos(ctx: Ctx) -> Callable[[], Any]:
    from pavlit.policy.loading import load_policy, tiny_policy
    from pavlit.policy.tokenizer import build_char_tokenizer

    folder = ctx.tmp / "model"
    tiny_policy(build_char_tokenizer("Qp0123:okn\n"), n_layer=1, n_embd=16, n_head=2).save_pretrained(folder)
    tokenizer_without_pad_or_eos().save_pretrained(folder)  # the same vocabulary, without pad and eos
    return lambda: load_policy(folder)


def folder_without_config(ctx: Ctx) -> Callable[[], Any]:
    from pavlit.policy.loading import load_policy

    ctx.write("model/weights.txt", "not a model")
    return lambda: load_policy(ctx.tmp / "model")


def plugin_argv(ctx: Ctx) -> list[str]:
    """A third-party plugin whose class is not a Task, installed in a site folder the subprocess sees."""
    site = ctx.tmp / "site"
    ctx.write("site/acme_tasks.py", "class HalfTask:\n    def problems(self, split):\n        return []\n")
    ctx.write("site/acme_tasks-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: acme-tasks\nVersion: 1.0\n")
    ctx.write("site/acme_tasks-1.0.dist-info/entry_points.txt", "[pavlit.tasks]\nhalf = acme_tasks:HalfTask\n")
    ctx.monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), str(REPO)]))
    return label_argv(ctx, task={"class_path": "HalfTask"})


def unknown_plugin_by_name(ctx: Ctx) -> Callable[[], Any]:
    return lambda: registry.load("pavlit.provers", "tempered")


def abstract_plugin_in_the_registry(ctx: Ctx) -> Callable[[], Any]:
    source = "from pavlit.interfaces import Prover\n\n\nclass Half(Prover):\n    pass\n"
    name = ctx.module("bad_inputs_half_prover", source)
    plugin = PluginInfo("pavlit.provers", "half", f"{name}:Half", "acme-provers", "0.1")
    ctx.monkeypatch.setattr(registry, "discover", lambda: [plugin])
    return lambda: registry.load("provers", "half")


CASES = [
    # --- pavlit label: the task's JSONL files ---------------------------------------------------------------
    Case("label-task-empty-file", lambda c: label_argv(c, train_rows=[""]),
         ("{tmp}/task.jsonl: empty file", "expected one JSON object per line")),
    Case("label-task-truncated-jsonl", lambda c: label_argv(c, train_rows=[GSM_ROWS[0], '{"question": "What is 2+']),
         ("{tmp}/task.jsonl:2: invalid JSON", "expected one JSON object per line")),
    Case("label-task-missing-field", lambda c: label_argv(c, train_rows=[{"q": "1+1?", "answer": "#### 2"}]),
         ("{tmp}/task.jsonl:1: missing field 'question' or 'problem'", "row has ['answer', 'q']")),
    Case("label-task-mistyped-field", lambda c: label_argv(c, train_rows=[{"question": ["1+1?"], "answer": "#### 2"}]),
         ("{tmp}/task.jsonl:1: field 'question' should be a string, got list",)),
    Case("label-task-problem-without-answer",
         lambda c: label_argv(c, train_rows=[{"question": "1+1?", "answer": "First add.\nThen stop."}]),
         ("{tmp}/task.jsonl:1: no extractable answer", "expected a '#### <answer>' line")),
    Case("label-task-file-missing", lambda c: label_argv(c, task={"class_path": "JsonlTask",
                                                                  "init_args": {"train_path": "gone.jsonl"}}),
         ("JsonlTask train_path: 'gone.jsonl' is no such file", "expected a JSON Lines file")),
    Case("label-split-without-a-file", lambda c: label_argv(c, split="validation"),
         ("JsonlTask has no validation file: set validation_path",)),
    Case("label-prompt-longer-than-the-context",
         lambda c: label_argv(c, train_rows=[{"question": "What is " + "1+" * 40 + "1?", "answer": "#### 41"}],
                              policy={"class_path": "TinyPolicy", "init_args": {**TINY, "max_position": 32}}),
         ("problem 'train-0' (from {tmp}/task.jsonl): its prompt is 92 tokens", "context holds 32 positions")),
    Case("label-task-with-empty-step-delimiter", empty_delimiter_task,
         ("task Undelimited has step_delimiter ''", "must set a non-empty string")),
    Case("label-policy-path-missing", lambda c: label_argv(c, policy={"class_path": "Pretrained",
                                                                      "init_args": {"path": "no/model"}}),
         ("no Hugging Face model folder at 'no/model'", "expected a config.json")),
    Case("label-config-typo-key", lambda c: label_argv(c, label={"n_cov": 1, "n_mcc": 2}),
         ("n_mcc", "LabelArgs")),
    Case("label-config-bad-value", lambda c: label_argv(c, label={"n_cov": 1, "n_mc": 0}),
         ("LabelArgs.n_mc must be >= 1, got 0",)),
    Case("label-config-mistyped-value", lambda c: label_argv(c, chunk_size="many"), ("chunk_size", "many")),
    Case("label-unknown-task-plugin", lambda c: label_argv(c, task={"class_path": "NoSuchTask"}),
         ('Parser key "task"', "NoSuchTask")),
    Case("label-resume-with-other-settings", rerun_with_other_settings,
         ("{tmp}/labels holds shards of a job with other settings (changed: label)", "use a new output folder")),
    Case("label-corrupt-job-json", corrupt_job_json, ("{tmp}/labels/job.json: not valid JSON", "delete the folder")),
    Case("label-output-dir-is-a-file", lambda c: label_argv(c, output_dir=c.write("taken", "x")),
         ("File exists", "{tmp}/taken")),
    # --- pavlit fit: PAV on step labels -----------------------------------------------------------------------
    Case("fit-pav-labels-empty-file", lambda c: fit_argv(c, c.write("labels/chunk-000000.jsonl", "")),
         ("{tmp}/labels/chunk-000000.jsonl: holds no step-label records", "expected `pavlit label` output")),
    Case("fit-pav-labels-truncated-jsonl",
         lambda c: fit_argv(c, c.jsonl("l.jsonl", [*good_labels(), json.dumps(step_label())[:40]])),
         ("{tmp}/l.jsonl:13: not valid JSON", "is the file truncated?")),
    Case("fit-pav-label-above-one", lambda c: fit_argv(c, c.jsonl("l.jsonl", [step_label(q_mc=1.5), *good_labels()])),
         ("{tmp}/l.jsonl:1: q_mc must be in [0, 1], got 1.5",)),
    Case("fit-pav-label-nan",
         lambda c: fit_argv(c, c.jsonl("l.jsonl", [json.dumps(step_label()).replace("0.75", "NaN"), *good_labels()])),
         ("{tmp}/l.jsonl:1: q_mc must be in [0, 1], got nan",)),
    Case("fit-pav-label-nan-process",
         lambda c: fit_argv(c, c.jsonl("l.jsonl", [*good_labels(), json.dumps(step_label()).replace("0.75", "NaN")])),
         ("pavlit fit: error:", "{tmp}/l.jsonl:13: q_mc must be in [0, 1], got nan"), how="process"),
    Case("fit-pav-label-missing-field",
         lambda c: fit_argv(c, c.jsonl("l.jsonl", [{k: v for k, v in step_label().items() if k != "n_rollouts"}])),
         ("{tmp}/l.jsonl:1: missing field 'n_rollouts'",)),
    Case("fit-pav-label-mistyped-field", lambda c: fit_argv(c, c.jsonl("l.jsonl", [step_label(n_rollouts="4")])),
         ("{tmp}/l.jsonl:1: field 'n_rollouts' should be int, got '4'",)),
    Case("fit-pav-steps-without-delimiter",
         lambda c: fit_argv(c, c.jsonl("l.jsonl", [*good_labels(), step_label("p9", ("ok", "no\n"))])),
         ("{tmp}/l.jsonl:13: field 'steps': step 0 ('ok') does not end with the step delimiter '\\n'",)),
    Case("fit-pav-step-longer-than-the-context",
         lambda c: fit_argv(c, c.jsonl("l.jsonl", [*good_labels(), step_label("long", prompt="Q" * 40)]),
                            max_length=16),
         ("{tmp}/l.jsonl:13: the prompt alone is 41 tokens, longer than max_length=16",)),
    Case("fit-pav-labels-path-missing", lambda c: fit_argv(c, "runs/nowhere/labels"),
         ("cannot read a step-label dataset from 'runs/nowhere/labels': no such file or folder",)),
    Case("fit-pav-backbone-path-missing",
         lambda c: fit_argv(c, c.jsonl("l.jsonl", good_labels()),
                            model_args={"source": {"class_path": "Pretrained", "init_args": {"path": "no/sft"}}}),
         ("no Hugging Face model folder at 'no/sft'",)),
    Case("fit-pav-config-typo-key", lambda c: fit_argv(c, c.jsonl("l.jsonl", good_labels()),
                                                       model_args={"head_typ": "linear"}),
         ("head_typ",)),
    Case("fit-config-mistyped-trainer-value",
         lambda c: [*fit_argv(c, c.jsonl("l.jsonl", good_labels())), "--trainer.max_steps", "many"],
         ("trainer.max_steps", "many")),
    # --- pavlit fit: ORM on outcomes, SFT / RFT on rollouts ------------------------------------------------------
    Case("fit-orm-outcome-not-binary",
         lambda c: fit_argv(c, c.jsonl("o.jsonl", [{"problem_id": "a", "prompt": "Q", "response": "ok\n",
                                                    "correct": 0.5}]), kind="orm"),
         ("{tmp}/o.jsonl:1: field 'correct' should be 0/1 or a bool, got 0.5",)),
    Case("fit-orm-outcome-missing-response",
         lambda c: fit_argv(c, c.jsonl("o.jsonl", [{"problem_id": "a", "prompt": "Q", "correct": 1}]), kind="orm"),
         ("{tmp}/o.jsonl:1: neither an outcome record (problem_id, prompt, response, correct) nor a step label",)),
    Case("fit-orm-empty-file", lambda c: fit_argv(c, c.write("o.jsonl", "\n"), kind="orm"),
         ("{tmp}/o.jsonl: holds no records", "expected outcome records")),
    Case("fit-rft-rollouts-truncated",
         lambda c: sft_argv(c, [{"problem_id": "a", "prompt": "Q", "response": "1\n", "correct": True}, '{"prob']),
         ("{tmp}/rollouts.jsonl:2: not valid JSON",)),
    Case("fit-rft-rollouts-mistyped-correct",
         lambda c: sft_argv(c, [{"problem_id": "a", "prompt": "Q", "response": "1\n", "correct": "yes"}]),
         ("{tmp}/rollouts.jsonl:1: 'correct' must be true/false (or 0/1), got 'yes'",)),
    Case("fit-rft-no-correct-rollouts",
         lambda c: sft_argv(c, [{"problem_id": "a", "prompt": "Q", "response": "1\n", "correct": False}]),
         ("no training examples left from the correct rollouts of {tmp}/rollouts.jsonl",)),
    Case("fit-sft-example-longer-than-the-context", lambda c: sft_argv(c, None, max_length=8, on_too_long="error"),
         ("train example 'train-", "over max_length=8", "raise max_length or set on_too_long='skip'")),
    # --- pavlit search --------------------------------------------------------------------------------------------
    Case("search-duplicate-method-names",
         lambda c: search_argv(c, [{"name": "m", "search": {"class_path": "BestOfN"}}] * 2),
         ("method names must be unique, got ['m', 'm']",)),
    Case("search-budget-zero", lambda c: search_argv(c, budgets=[0]), ("method 'vote': budgets must be >= 1",)),
    Case("search-alpha-sweep-of-an-unknown-method", lambda c: search_argv(c, alpha_sweep={"method": "pav"}),
         ("alpha_sweep names method 'pav', which is not among ['vote']",)),
    Case("search-unknown-strategy",
         lambda c: search_argv(c, [{"name": "m", "search": {"class_path": "TreeOfThoughts"}}]), ("TreeOfThoughts",)),
    Case("search-split-without-a-file",
         lambda c: search_argv(c, task={"class_path": "JsonlTask", "init_args": {"train_path": c.jsonl("t.jsonl",
                                                                                                      GSM_ROWS)}}),
         ("JsonlTask has no test file: set test_path",)),
    # --- pavlit pipeline ------------------------------------------------------------------------------------------
    Case("pipeline-no-stages", lambda c: pipeline_argv(c, []), ("the pipeline config lists no stages",)),
    Case("pipeline-duplicate-stage-names",
         lambda c: pipeline_argv(c, [{"name": "a", "command": ["plugins"], "output": "x"}] * 2),
         ("stage names must be unique, got ['a', 'a']",)),
    Case("pipeline-stage-without-output", lambda c: pipeline_argv(c, [{"name": "a", "command": ["plugins"]}]),
         ("stages", "output")),
    Case("pipeline-stage-with-unknown-command",
         lambda c: pipeline_argv(c, [{"name": "sft", "command": ["fitt"], "output": str(c.tmp / "done")}]),
         ("stage 'sft' failed (exit 2)", "{tmp}/run/logs/sft.log")),
    Case("pipeline-config-missing", lambda c: ["pipeline", "--config", "nowhere.yaml"], ("nowhere.yaml",)),
    # --- issue 19: numeric and string options, validated where they are parsed ----------------------------------
    Case("label-num-problems-negative", lambda c: label_argv(c, num_problems=-1),
         ("num_problems must be >= 1 (or null for the whole split), got -1",)),
    Case("label-temperature-nan", lambda c: with_yaml_floats(label_argv(c, sampler={"temperature": NAN})),
         ("SamplerArgs.temperature must be finite and >= 0", "got nan")),
    Case("label-temperature-inf", lambda c: with_yaml_floats(label_argv(c, sampler={"temperature": INF})),
         ("SamplerArgs.temperature must be finite and >= 0", "got inf")),
    Case("label-max-new-tokens-past-the-context", lambda c: label_argv(c, label={"n_cov": 1, "max_new_tokens": 10**12}),
         ("max_new_tokens must be at most 256, the policy's context (max_position_embeddings); got 1000000000000",)),
    Case("label-tiny-n-head-zero", lambda c: label_argv(c, policy={"class_path": "TinyPolicy",
                                                                   "init_args": {**TINY, "n_head": 0}}),
         ("TinyPolicy.n_head must be a positive integer, got 0",)),
    Case("label-tiny-n-embd-zero", lambda c: label_argv(c, policy={"class_path": "TinyPolicy",
                                                                   "init_args": {**TINY, "n_embd": 0}}),
         ("TinyPolicy.n_embd must be a positive integer, got 0",)),
    Case("fit-tiny-backbone-n-head-zero",
         lambda c: fit_argv(c, c.jsonl("l.jsonl", good_labels()),
                            model_args={"source": {"class_path": "TinyPolicy", "init_args": {**TINY, "n_head": 0}}}),
         ("pavlit fit: error: ValueError: TinyPolicy.n_head must be a positive integer, got 0\n(set",)),
    Case("fit-max-steps-negative",
         lambda c: [*fit_argv(c, c.jsonl("l.jsonl", good_labels())), "--trainer.max_steps=-5"],
         ("pavlit fit: error: ValueError: trainer: `max_steps` must be a non-negative integer or -1", "passed in -5")),
    Case("fit-pav-warmup-steps-negative",
         lambda c: fit_argv(c, c.jsonl("l.jsonl", good_labels()), model_args={"warmup_steps": -1}),
         ("PAVModule.warmup_steps must be >= 0, got -1",)),
    Case("validate-without-validation-data", validate_argv,
         ("{tmp}/l.jsonl: no validation examples for `pavlit validate`", "data.val_fraction is 0.0")),
    Case("search-num-problems-negative", lambda c: search_argv(c, num_problems=-1),
         ("num_problems must be >= 1 (or null for the whole split), got -1",)),
    Case("search-max-new-tokens-zero", lambda c: search_argv(c, max_new_tokens=0),
         ("max_new_tokens must be >= 1, got 0",)),
    Case("search-max-new-tokens-past-the-context", lambda c: search_argv(c, max_new_tokens=10**12),
         ("max_new_tokens must be at most 128, the policy's context",)),
    Case("search-temperature-inf", lambda c: with_yaml_floats(search_argv(c, sampler={"temperature": INF})),
         ("SamplerArgs.temperature must be finite and >= 0", "got inf")),
    Case("search-bootstrap-zero", lambda c: search_argv(c, bootstrap=0),
         ("bootstrap must be >= 10 resamples for a 95% CI, got 0",)),
    Case("search-duplicate-budgets", lambda c: search_argv(c, budgets=[1, 2, 1]),
         ("method 'vote': budgets must be distinct, got [1, 2, 1] ([1] repeated)",)),
    Case("search-method-with-empty-budgets",
         lambda c: search_argv(c, [{"name": "vote", "search": {"class_path": "BestOfN"}, "budgets": []}]),
         ("method 'vote': budgets is empty; give budgets, or leave it out to use the job's",)),
    Case("search-efficiency-names-an-unknown-method", lambda c: search_argv(c, efficiency={"baseline": "orm_bon"}),
         ("efficiency.baseline names 'orm_bon', which is not among the methods ['vote']",)),
    Case("search-reward-alpha-not-finite",
         lambda c: with_yaml_floats(search_argv(c, [{"name": "mc", "search": {"class_path": "BestOfN"}, "reward": {
             "class_path": "MCReward", "init_args": {"n_rollouts": 4, "alpha": INF}}}])),
         ("method 'mc': reward alpha must be a finite number, got inf",)),
    Case("search-alpha-sweep-not-finite",
         lambda c: with_yaml_floats(search_argv(c, alpha_sweep={"method": "vote", "alphas": [0.5, NAN]})),
         ("AlphaSweep.alphas must be finite numbers, got [nan]",)),
    # --- issue 19: model folders and tokenizers, checked before use ---------------------------------------------
    Case("label-policy-folder-is-bert", lambda c: label_argv(c, policy=pretrained(bert_folder(c))),
         ("{tmp}/bert/config.json: the weights in {tmp}/bert do not hold this model", "newly initialised at random",
          "PAVLIT_ALLOW_NEW_WEIGHTS")),
    Case("label-policy-folder-declares-more-layers",
         lambda c: label_argv(c, policy=pretrained(model_folder(c, num_hidden_layers=3))),
         ("{tmp}/model/config.json: the weights in {tmp}/model do not hold this model", "model.layers.")),
    Case("fit-backbone-folder-declares-more-layers",
         lambda c: fit_argv(c, c.jsonl("l.jsonl", good_labels()),
                            model_args={"source": pretrained(model_folder(c, num_hidden_layers=2))}),
         ("{tmp}/model/config.json: the weights in {tmp}/model do not hold this model",)),
    Case("label-policy-weights-truncated", lambda c: label_argv(c, policy=pretrained(truncated_weights_folder(c))),
         ("{tmp}/model/model.safetensors: cannot read the weights", "is the file truncated?")),
    Case("label-policy-vocabulary-mismatch", lambda c: label_argv(c, policy=pretrained(vocabulary_mismatch_folder(c))),
         ("{tmp}/model: the tokenizer has", "tokens but the model's embedding holds 8")),
    Case("label-tokenizer-lacks-the-prompts-characters",
         lambda c: label_argv(c, policy={"class_path": "TinyPolicy",
                                         "init_args": {**TINY, "alphabet": "0123456789+=#"}}),
         ("problem 'train-0' (from {tmp}/task.jsonl): its prompt has characters the policy's tokenizer does not know",
          " ?Wahist'", "add them to TinyPolicy.alphabet")),
    Case("search-prompt-longer-than-the-context",
         lambda c: search_argv(c, policy={"class_path": "TinyPolicy", "init_args": {**TINY, "max_position": 8}},
                               max_new_tokens=4),
         ("problem 'test-00000': its prompt is 25 tokens, but the policy's context holds 8 positions",)),
    # --- issue 19: task and label files ---------------------------------------------------------------------------
    Case("label-task-answer-marker-without-value",
         lambda c: label_argv(c, train_rows=[{"question": "What is 1+1?", "answer": "1+1=2\n#### "}]),
         ("{tmp}/task.jsonl:1: the solution's answer marker has no value ('1+1=2\\n####')",)),
    Case("label-task-bare-answer-marker-without-value",
         lambda c: label_argv(c, train_rows=[{"question": "What is 1+1?", "answer": "#### "}]),
         ("{tmp}/task.jsonl:1: the solution's answer marker has no value",)),
    Case("label-task-answer-json-nan",
         lambda c: label_argv(c, train_rows=['{"question": "What is 1+1?", "answer": NaN}']),
         ("{tmp}/task.jsonl:1: field 'answer' is nan (a JSON NaN or Infinity); expected a string",)),
    Case("label-task-empty-question", lambda c: label_argv(c, train_rows=[{"question": "  ", "answer": "#### 2"}]),
         ("{tmp}/task.jsonl:1: field 'question' is empty",)),
    Case("label-task-not-utf8",
         lambda c: label_argv(c, task={"class_path": "JsonlTask", "init_args": {"train_path": not_utf8(
             c, "latin1.jsonl", GSM_ROWS, b'{"question": "caf\xe9?", "answer": "#### 1"}')}}),
         ("{tmp}/latin1.jsonl:3: not UTF-8 text (byte 0xe9 at column 18)", "expected a UTF-8 encoded file")),
    Case("fit-pav-labels-not-utf8",
         lambda c: fit_argv(c, not_utf8(c, "l.jsonl", good_labels(), b'{"problem_id": "\xff"}')),
         ("{tmp}/l.jsonl:13: not UTF-8 text (byte 0xff",)),
    Case("fit-rft-rollouts-not-utf8", rollouts_not_utf8, ("{tmp}/rollouts.jsonl:2: not UTF-8 text (byte 0xfe",)),
    Case("label-disk-full", disk_full, ("No space left on device", "{tmp}/labels/"),
         after=lambda tmp: not list((tmp / "labels").glob(".*.tmp"))),
    # --- issue 19: resumable work ---------------------------------------------------------------------------------
    Case("label-output-dir-locked-by-a-running-job", locked_output_dir,
         ("{tmp}/labels: another pavlit job is writing here (pid", "{tmp}/labels/.pavlit.lock"),
         after=lambda tmp: (tmp / "labels/config.yaml").read_text() == "the running job's config\n"),
    Case("fit-pav-labels-shard-fails-its-integrity-record", label_folder_with_a_broken_shard,
         ("{tmp}/labels/chunk-000001.jsonl: not trusted: its content does not match its integrity record",
          "rerun the job that wrote {tmp}/labels")),
    Case("fit-pav-labels-folder-still-being-written", label_folder_being_written,
         ("{tmp}/labels: another pavlit job is writing here (pid",)),
    Case("fit-pav-conflicting-duplicate-labels", conflicting_duplicate_labels,
         ("{tmp}/l.jsonl:13: the same rollout's prefix 1 appears earlier with other labels ({tmp}/l.jsonl:5: 3/4",
          "here 1/4", "two label jobs mixed?")),
    # --- issue 19: pipelines --------------------------------------------------------------------------------------
    Case("pipeline-stage-name-with-a-path",
         lambda c: pipeline_argv(c, [{"name": "../../x", "command": ["plugins"], "output": "x"}]),
         ("stages: name '../../x' must be a plain name", "no '/' or '..'")),
    Case("pipeline-stage-runs-its-own-config", recursive_pipeline,
         ("stage 'again' runs the pipeline config {tmp}/pipeline.yaml that it is part of",)),
    # --- dataset files (library) ----------------------------------------------------------------------------------
    Case("dataset-parquet-truncated", truncated_parquet,
         ("{tmp}/labels.parquet: cannot read it as Parquet", "is the file truncated"), how="library",
         raises=ValueError),
    Case("dataset-reader-nan-label", nan_label_via_reader, ("{tmp}/chunk-000000.jsonl:2: q_mc must be in [0, 1]",),
         how="library", raises=ValueError),
    Case("dataset-empty-folder", lambda c: (c.tmp / "labels").mkdir() or fit_argv(c, str(c.tmp / "labels")),
         ("cannot read a step-label dataset from '{tmp}/labels': the folder is empty",)),
    # --- plugins --------------------------------------------------------------------------------------------------
    Case("plugin-unknown-name", unknown_plugin_by_name,
         ("no pavlit.provers plugin named 'tempered' is installed", "available: "), how="library", raises=PluginError),
    Case("plugin-not-implementing-its-interface", abstract_plugin_in_the_registry,
         ("'half' (pavlit.provers = bad_inputs_half_prover:Half) from distribution 'acme-provers 0.1'",
          "does not implement the abstract method(s) q_values"), how="library", raises=PluginError),
    Case("plugin-class-not-a-task-process", plugin_argv,
         ("skipping plugin: 'half' (pavlit.tasks = acme_tasks:HalfTask) from distribution 'acme-tasks 1.0'",
          "not a subclass of pavlit.interfaces.Task", "HalfTask"), how="process"),
    # --- model folders and tokenizers (library) -------------------------------------------------------------------
    Case("model-folder-without-config", folder_without_config,
         ("no Hugging Face model folder at '{tmp}/model'", "expected a config.json"), how="library",
         raises=FileNotFoundError),
    Case("tokenizer-without-pad-or-eos-in-a-model-folder", model_folder_without_pad_or_eos,
         ("the tokenizer at '{tmp}/model' has neither a pad nor an eos token",), how="library", raises=ValueError),
    Case("tokenizer-without-pad-or-eos-in-a-datamodule", no_pad_tokenizer_in_a_datamodule,
         ("has neither a pad nor an eos token, so batches cannot be padded",), how="library", raises=ValueError),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_fails_with_a_clear_message(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["pavlit"])
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    monkeypatch.delenv("PAVLIT_TRACEBACK", raising=False)
    (tmp_path / "mods").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    made = case.make(Ctx(tmp_path, monkeypatch))
    capsys.readouterr()

    if case.how == "library":
        assert case.raises is not None
        with pytest.raises(case.raises) as excinfo:
            made()
        message = str(excinfo.value)
    elif case.how == "process":
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.setdefault("PYTHONPATH", str(REPO))
        done = subprocess.run([sys.executable, "-m", "pavlit", *made], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=300)  # fmt: skip
        status, message = done.returncode, done.stderr
        assert status not in (0, None), message[-3000:]
    else:
        _log_to_the_current_stderr(monkeypatch)
        try:
            status = main(made)
        except SystemExit as exit:  # argument and config errors: jsonargparse / LightningCLI exit with status 2
            status = exit.code
        message = capsys.readouterr().err
        assert status not in (0, None), message[-3000:]
    if case.how != "library":
        assert "Traceback" not in message, message[-3000:]
    for part in case.expect:
        assert part.format(tmp=tmp_path) in message, f"{part!r} not in:\n{message[-3000:]}"
    if case.after is not None:
        assert case.after(tmp_path), f"{case.id}: the folder is not as it must be afterwards"


def _log_to_the_current_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    # Lightning's loggers keep the stderr of the test that first imported them, which pytest has closed since;
    # writing to it would print a logging error ("--- Logging error --- Traceback ...") that is not pavlit's.
    # The same holds for any library logger (transformers') whose handler kept a stream pytest has closed since.
    for name in list(logging.Logger.manager.loggerDict):
        for handler in getattr(logging.getLogger(name), "handlers", []):
            if not isinstance(handler, logging.StreamHandler) or type(handler).__module__.startswith("_pytest"):
                continue
            if name.startswith(("lightning", "transformers")) or getattr(handler.stream, "closed", False):
                monkeypatch.setattr(handler, "stream", sys.stderr)


def test_the_table_covers_every_stage():
    stages = {case.id.split("-")[0] for case in CASES}
    assert {"label", "fit", "validate", "search", "pipeline", "dataset", "plugin", "model", "tokenizer"} <= stages
    assert len(CASES) >= 90 and len({case.id for case in CASES}) == len(CASES)
    assert sum(case.how == "process" for case in CASES) >= 2


def test_traceback_opt_in_keeps_the_exception(tmp_path, monkeypatch):
    """``PAVLIT_TRACEBACK=1``: the same bad input raises, for debugging."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PAVLIT_TRACEBACK", "1")
    argv = label_argv(Ctx(tmp_path, monkeypatch), train_rows=[""])
    with pytest.raises(ValueError, match="empty file"):
        main(argv)
