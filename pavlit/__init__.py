"""pavlit: process advantage verifiers (Setlur et al., 2024) on PyTorch Lightning.

The public API is importable from here; the heavy parts (Lightning modules, the sampler) load on first use,
so ``import pavlit`` and ``pavlit plugins`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from pavlit.interfaces import Problem, Prover, Reward, Search, Task

__version__ = "0.1.0"

_LAZY = {
    "PAVModule": "pavlit.modules.pav",
    "ORMModule": "pavlit.modules.orm",
    "SFTModule": "pavlit.modules.sft",
    "PolicyRLModule": "pavlit.modules.policy_rl",
    "Verifier": "pavlit.models.verifier",
    "PAVAdvantages": "pavlit.advantages",
    "MCAdvantages": "pavlit.advantages",
    "StepLabelDataModule": "pavlit.data.step_labels",
    "OutcomeDataModule": "pavlit.data.outcomes",
    "SFTDataModule": "pavlit.data.sft",
    "PromptDataModule": "pavlit.data.prompts",
    "Sampler": "pavlit.policy.sampler",
    "TinyPolicy": "pavlit.policy.sources",
    "Pretrained": "pavlit.policy.sources",
    "Gemma3_270M": "pavlit.policy.sources",
    "SmolLM2_135M": "pavlit.policy.sources",
    "BestOfK": "pavlit.provers.best_of_k",
    "CheckpointProver": "pavlit.provers.checkpoint",
    "LabelArgs": "pavlit.labeling.mc",
    "LoRAArgs": "pavlit.models.adapters",
    "QuantArgs": "pavlit.models.adapters",
}

__all__ = ["Problem", "Prover", "Reward", "Search", "Task", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pavlit' has no attribute {name!r}")
