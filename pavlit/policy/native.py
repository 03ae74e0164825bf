"""The grouped decoder's layers as one compiled call per token (``native_decode.cpp``), built on first use.

:class:`~pavlit.policy.fast_decode.GroupedDecoder` runs about forty tensor operations per layer and token; for a
small model most of a step's time is their Python and dispatch overhead, and the loops between the matrix
products (RMSNorm, RoPE and the KV write, the suffix attention and joint softmax, SiLU-and-multiply) read the
same small tensors again and again. The extension keeps the products as ATen calls and does the rest in one
loop each, and releases the GIL, so :class:`~pavlit.policy.sampler.Sampler` threads decode truly in parallel.
The token loop's sampling side (draw, sample, record, the EOS and step-limit stop) is one more call per token
(``sample_and_record``), so two decoding threads hand the GIL back and forth a few times per token, not ~twenty.

It is compiled with ``torch.utils.cpp_extension`` (a C++ compiler and ``ninja``; ~40 s once, cached under
torch's extension folder, one build per source, torch version and CPU feature set). Without a compiler, or with
``PAVLIT_NATIVE=0``, :func:`load` returns ``None`` and the decoder stays on its plain-torch path, which computes
the same values (tested to float32 rounding, tokens identical).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path
from types import ModuleType

import torch

from pavlit.policy.precision import cpu_flags, env_switch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native_decode.cpp")
_lock = threading.Lock()
_state: dict[str, ModuleType | str | None] = {}


def _flags() -> list[str]:
    flags = cpu_flags()
    extra = ["-O3", "-fno-math-errno", "-fno-trapping-math"]  # lets the exp and softmax loops vectorize
    if "avx2" in flags and "fma" in flags:
        extra += ["-mavx2", "-mfma"]
    return extra


def enabled() -> bool:
    """``False`` when ``PAVLIT_NATIVE=0`` (or ``false``/``no``/``off``) turns the extension off."""
    return env_switch("PAVLIT_NATIVE") is not False


def load() -> ModuleType | None:
    """The compiled extension, building it the first time; ``None`` if it is turned off or cannot be built
    (the reason is logged once and kept in :func:`unavailable_reason`)."""
    if not enabled():
        return None
    with _lock:
        if "module" not in _state:
            _state["module"], _state["reason"] = _build()
        return _state["module"]  # type: ignore[return-value]


def unavailable_reason() -> str | None:
    """Why :func:`load` gave ``None`` (after it was called), or ``None`` when the extension is loaded."""
    if not enabled():
        return "PAVLIT_NATIVE=0"
    return _state.get("reason")  # type: ignore[return-value]


def _build() -> tuple[ModuleType | None, str | None]:
    flags = _flags()
    source = SOURCE.read_text()
    digest = hashlib.sha256("\n".join([source, torch.__version__, *flags]).encode()).hexdigest()[:12]
    name = f"pavlit_native_decode_{digest}"
    try:
        from torch.utils.cpp_extension import load_inline

        log.info("building pavlit's native decode step (once per machine type, ~40 s): %s", name)
        module = load_inline(name=name, cpp_sources=[source], extra_cflags=flags, verbose=False)
    except Exception as error:  # no compiler, no ninja, headers missing: the plain-torch path still works
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
        log.warning("pavlit's native decode step is unavailable (%s); decoding with plain torch", reason)
        return None, reason
    return module, None
