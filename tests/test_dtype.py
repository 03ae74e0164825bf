"""``dtype: auto``: both branches of the rule forced on any machine, the override, the once-only log."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from pavlit.policy import precision
from pavlit.policy.loading import load_policy, resolve_dtype, tiny_policy
from pavlit.policy.sources import Gemma3_270M, Pretrained, SmolLM2_135M
from pavlit.policy.tokenizer import build_char_tokenizer

AMX_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
"""
AVX2_CPUINFO = """processor\t: 0
flags\t\t: fpu vme sse sse2 avx avx2 fma
"""


@pytest.fixture(autouse=True)
def fresh_decision(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(precision.AUTO_DTYPE_ENV, raising=False)
    precision.auto_dtype.cache_clear()
    yield
    precision.auto_dtype.cache_clear()


def test_cpu_flags_reads_the_flags_line(tmp_path: Path) -> None:
    (tmp_path / "amx").write_text(AMX_CPUINFO)
    (tmp_path / "avx2").write_text(AVX2_CPUINFO)
    assert {"amx_bf16", "avx512_bf16"} <= precision.cpu_flags(tmp_path / "amx")
    assert "avx2" in precision.cpu_flags(tmp_path / "avx2") and "avx512_bf16" not in precision.cpu_flags(
        tmp_path / "avx2"
    )
    assert precision.cpu_flags(tmp_path / "missing") == frozenset()


def test_cpu_vendor_reads_the_vendor_line(tmp_path: Path) -> None:
    (tmp_path / "amd").write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: avx2\n")
    (tmp_path / "avx2").write_text(AVX2_CPUINFO)
    assert precision.cpu_vendor(tmp_path / "amd") == "AuthenticAMD"
    assert precision.cpu_vendor(tmp_path / "avx2") == ""
    assert precision.cpu_vendor(tmp_path / "missing") == ""


@pytest.mark.parametrize(
    ("cuda", "flags", "expected"),
    [
        (True, set(), torch.bfloat16),
        (False, {"avx2", "amx_bf16"}, torch.bfloat16),
        (False, {"avx2", "avx512_bf16"}, torch.bfloat16),
        (False, {"avx2", "avx512f"}, torch.float32),  # AVX-512 without its bf16 instructions: emulated
        (False, set(), torch.float32),
    ],
)
def test_choose_dtype_rule(cuda: bool, flags: set[str], expected: torch.dtype) -> None:
    dtype, reason = precision.choose_dtype(cuda, flags)
    assert dtype == expected and reason


@pytest.mark.parametrize(("cpuinfo", "expected"), [(AMX_CPUINFO, torch.bfloat16), (AVX2_CPUINFO, torch.float32)])
def test_auto_forced_each_branch_through_a_pretrained_source(
    cpuinfo: str, expected: torch.dtype, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    (tmp_path / "cpuinfo").write_text(cpuinfo)
    flags = precision.cpu_flags(tmp_path / "cpuinfo")
    monkeypatch.setattr(precision, "_cuda_bf16", lambda: False)
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    tokenizer = build_char_tokenizer("0123456789+=\n")
    model = tiny_policy(tokenizer, n_layer=1, n_embd=16, n_head=2)
    model.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    with caplog.at_level(logging.INFO, logger="pavlit.policy.precision"):
        first, _ = Pretrained(str(tmp_path / "policy"), dtype="auto").load()
        second, _ = load_policy(tmp_path / "policy", dtype="auto")
    assert first.dtype == second.dtype == expected
    assert caplog.text.count("dtype auto ->") == 1  # decided and logged once per process


def test_auto_on_cuda_is_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "_cuda_bf16", lambda: True)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset())
    assert resolve_dtype("auto") == torch.bfloat16


def test_environment_overrides_the_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "_cuda_bf16", lambda: True)
    monkeypatch.setenv(precision.AUTO_DTYPE_ENV, "float32")
    assert resolve_dtype("auto") == torch.float32
    precision.auto_dtype.cache_clear()
    monkeypatch.setenv(precision.AUTO_DTYPE_ENV, "fp8")
    with pytest.raises(ValueError, match="PAVLIT_AUTO_DTYPE must be float32 or bfloat16"):
        resolve_dtype("auto")


def test_unknown_dtype_names_the_choices() -> None:
    with pytest.raises(ValueError, match="'auto'"):
        resolve_dtype("fp16")


def test_pretrained_model_sources_default_to_auto() -> None:
    assert Gemma3_270M().dtype == "auto"
    assert SmolLM2_135M().dtype == "auto"
