"""``dtype: auto``: bfloat16 where the hardware computes it faster than float32, float32 elsewhere.

The rule, decided once per process and logged once:

* a CUDA device is available and supports bf16 → ``bfloat16`` (the jobs put their models on it);
* else the CPU has bf16 matrix units or instructions (AMX ``amx_bf16`` or ``avx512_bf16`` in its feature flags)
  → ``bfloat16``: oneDNN runs bf16 matmuls there several times faster than float32 (measured on a 2-core Xeon
  with AMX, one thread: 3.5–7x on SmolLM2-sized matmuls);
* else → ``float32``: without those units bf16 is emulated by conversions around fp32 kernels and is slower.

``PAVLIT_AUTO_DTYPE=float32`` (or ``bfloat16``) overrides the decision, e.g. to reproduce a run from another
machine bit for bit.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

#: CPU feature flags (as ``/proc/cpuinfo`` spells them) whose presence makes bf16 matmuls faster than float32.
FAST_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
AUTO_DTYPE_ENV = "PAVLIT_AUTO_DTYPE"


def env_switch(name: str) -> bool | None:
    """An on/off environment setting: ``True`` for ``1``/``true``/``yes``/``on``, ``False`` for
    ``0``/``false``/``no``/``off`` (any case), ``None`` when unset or anything else (the default applies)."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return None


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is no such file, e.g. macOS)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_vendor(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's ``vendor_id`` from ``/proc/cpuinfo`` (``GenuineIntel``, ``AuthenticAMD``; empty where unknown)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "vendor_id":
            return value.strip()
    return ""


def choose_dtype(cuda_bf16: bool, flags: frozenset[str] | set[str]) -> tuple[torch.dtype, str]:
    """The ``auto`` rule as a pure function: the dtype and the reason, from what the machine offers.

    Args:
        cuda_bf16: A CUDA device is available and supports bf16.
        flags: The CPU's feature flags.
    """
    if cuda_bf16:
        return torch.bfloat16, "a CUDA device with bf16 support is available"
    fast = sorted(set(FAST_BF16_CPU_FLAGS) & set(flags))
    if fast:
        return torch.bfloat16, f"the CPU has {' and '.join(fast)} (bf16 matmuls faster than float32)"
    return torch.float32, "no CUDA device and no AMX / AVX512-BF16 on the CPU (bf16 would be emulated, slower)"


def _cuda_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@functools.cache
def auto_dtype() -> torch.dtype:
    """What ``dtype: auto`` means on this machine (decided and logged once per process)."""
    forced = os.environ.get(AUTO_DTYPE_ENV)
    if forced:
        if forced not in ("float32", "bfloat16"):
            raise ValueError(f"{AUTO_DTYPE_ENV} must be float32 or bfloat16, got {forced!r}")
        dtype, reason = getattr(torch, forced), f"{AUTO_DTYPE_ENV}={forced}"
    else:
        dtype, reason = choose_dtype(_cuda_bf16(), cpu_flags())
    log.info("dtype auto -> %s: %s", str(dtype).removeprefix("torch."), reason)
    return dtype
