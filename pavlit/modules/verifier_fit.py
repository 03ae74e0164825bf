"""The Lightning side PAVModule and ORMModule share (plain functions, no base class): FSDP2 sharding, a full
state dict of sharded weights, restoring the best checkpoint, and the export when training ends."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pavlit.jobs.atomic import atomic_write_text
from pavlit.models.adapters import LoRAArgs, QuantArgs, check_compatible
from pavlit.models.backbone import as_group
from pavlit.models.export import export_init_args, load_export_weights, read_export
from pavlit.models.heads import TokenHead
from pavlit.models.scoring import decoder_of
from pavlit.models.verifier import Verifier

__all__ = [
    "accelerator_name",
    "export_on_train_end",
    "full_state_dict",
    "is_sharded",
    "restore_best_checkpoint",
    "shard_fsdp2",
]

log = logging.getLogger(__name__)


def accelerator_name(trainer: Any) -> str:
    """``"cpu"``, ``"cuda"``, ``"mps"``, ... for ``check_compatible``."""
    return type(trainer.accelerator).__name__.removesuffix("Accelerator").lower()


def shard_fsdp2(backbone: nn.Module, head: nn.Module, device_mesh: Any) -> None:
    """FSDP2 (``fully_shard``) over the data-parallel mesh: one unit per decoder layer, the decoder, the head.

    Used by ``configure_model`` under ``ModelParallelStrategy`` (CPU-capable, unlike ``strategy: fsdp``). The
    decoder (not the whole causal LM) is the root unit because :func:`score_positions` calls the decoder directly;
    the LM head is never run by the linear head, so it stays outside the shards. The scoring-token head reads the
    LM head's weight directly and is therefore not supported here (use DDP or ``strategy: fsdp``).
    """
    from torch.distributed.fsdp import fully_shard

    if isinstance(head, TokenHead):
        raise ValueError("FSDP2 sharding supports head_type='linear' only; use DDP for the scoring-token head")
    if "tensor_parallel" in (device_mesh.mesh_dim_names or ()) and device_mesh["tensor_parallel"].size() > 1:
        raise ValueError("the verifiers support data-parallel sharding only: set tensor_parallel_size=1")
    mesh = device_mesh["data_parallel"] if device_mesh.mesh_dim_names else device_mesh
    decoder = decoder_of(backbone)
    for layer in decoder.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(decoder, mesh=mesh)
    fully_shard(head, mesh=mesh)


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` holds DTensor (FSDP2-sharded) parameters."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def full_state_dict(module: nn.Module, strategy: Any) -> dict[str, torch.Tensor] | None:
    """A full, CPU state dict of a sharded LightningModule (collective: call on every rank); None when unsharded."""
    if is_sharded(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if type(strategy).__name__ == "FSDPStrategy":
        return strategy.lightning_module_state_dict()
    return None


def restore_best_checkpoint(module: Any) -> dict[str, Any] | None:
    """Load the weights of the best checkpoint a monitoring ``ModelCheckpoint`` kept, if there is one.

    Verifiers trained on small label sets overfit; exporting the last step's weights would ship the overfit
    model. With a ``ModelCheckpoint(monitor=...)`` in the trainer's callbacks the export uses its best checkpoint
    instead (read with ``weights_only=True``). Sharded (FSDP) modules keep their final weights.

    Returns:
        ``{"checkpoint", "monitor", "score"}`` of what was restored, or ``None``.
    """
    callback = getattr(module.trainer, "checkpoint_callback", None)
    path = getattr(callback, "best_model_path", "") if getattr(callback, "monitor", None) else ""
    if not path or is_sharded(module):
        return None
    from pavlit.callbacks import load_checkpoint  # weights only, one clear line for a pickled or broken file

    checkpoint = load_checkpoint(path, "the best checkpoint")
    upgrade_state_dict(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    score = callback.best_model_score
    return {"checkpoint": str(path), "monitor": callback.monitor, "score": None if score is None else float(score)}


def export_on_train_end(module: Any, kind: str) -> Path | None:
    """Write ``<default_root_dir>/verifier`` (:func:`save_verifier`) and ``<default_root_dir>/metrics.json``.

    ``metrics.json`` holds the last logged metrics (``trainer.callback_metrics``), the DataModule's ``stats`` and,
    when a monitoring checkpoint callback kept a best checkpoint, which one was exported
    (:func:`restore_best_checkpoint`). Every rank must call this (gathering a sharded model is collective);
    rank 0 writes.
    """
    trainer = module.trainer
    best = restore_best_checkpoint(module)
    state = full_state_dict(module, trainer.strategy)
    out = Path(trainer.default_root_dir) / "verifier"
    if trainer.is_global_zero:
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
        stats = dict(getattr(trainer.datamodule, "stats", {}) or {})
        payload = {"kind": kind, "metrics": metrics, "data": stats, "global_step": trainer.global_step}
        payload["exported"] = best or {"checkpoint": "last step"}
        atomic_write_text(Path(trainer.default_root_dir) / "metrics.json", json.dumps(payload, indent=2) + "\n")
        # The export's pavlit_verifier.json is written last of all: it marks the run as finished.
        module.verifier.save_pretrained(out, state_dict=verifier_state_dict(state))
        log.info("exported the %s verifier to %s", kind, out)
    trainer.strategy.barrier()
    return out


# --- what PAVModule and ORMModule do alike, one function per hook ----------------------------------------------


def init_verifier_module(
    module: Any,
    kind: str,
    source: Any,
    head_type: str,
    score_token: str | None,
    lora: Any,
    quant: Any,
) -> None:
    """Build ``module.verifier`` and keep plain-typed settings in ``module.hparams`` (call after
    ``save_hyperparameters``), so that checkpoints load with ``torch.load(weights_only=True)``."""
    lora, quant = as_group(lora, LoRAArgs), as_group(quant, QuantArgs)
    module.verifier = Verifier.build(kind, source, head_type, score_token, lora, quant)
    settings = module.verifier.settings
    module.hparams.update(source=settings["source"], lora=settings["lora"], quant=settings["quant"])
    module.lora, module.quant = lora, quant
    module._sharded = False


def check_setup(module: Any, stage: str) -> None:
    """LoRA / 4-bit settings against the trainer's precision and accelerator."""
    trainer = module.trainer
    check_compatible(
        module.lora,
        module.quant,
        precision=trainer.precision,
        training=stage == "fit",
        accelerator=accelerator_name(trainer),
    )


def shard_verifier(module: Any) -> None:
    """``configure_model``: FSDP2 over the module's device mesh, once (no mesh: nothing to do)."""
    if module.device_mesh is None or module._sharded:
        return
    if module.quant.enabled:
        raise ValueError("FSDP2 sharding of a 4/8-bit backbone is not supported; use DDP with quant.mode")
    shard_fsdp2(module.verifier.backbone, module.verifier.value_head, module.device_mesh)
    module._sharded = True


def upgrade_state_dict(checkpoint: dict[str, Any]) -> None:
    """Checkpoints written before the modules held a :class:`~pavlit.models.verifier.Verifier` keep ``backbone.*``,
    ``value_head.*`` and ``reference.*`` at the top: move them under ``verifier.``."""
    state = checkpoint.get("state_dict")
    if not state:
        return
    old = ("backbone.", "value_head.", "reference.")
    for key in [k for k in state if k.startswith(old)]:
        state[f"verifier.{key}"] = state.pop(key)


def verifier_state_dict(state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """A module's full state dict with the ``verifier.`` prefix removed (what ``Verifier.save_pretrained`` takes)."""
    if state is None:
        return None
    return {k.removeprefix("verifier."): v for k, v in state.items() if k.startswith("verifier.")}


def load_verifier_module(cls: type, kind: str, path: Any, overrides: dict[str, Any]) -> Any:
    """A LightningModule of class ``cls`` rebuilt from an exported folder (to train further), in eval mode."""
    meta = read_export(path, kind)
    module = cls(**{**export_init_args(path, meta), **overrides})
    verifier = module.verifier
    load_export_weights(path, meta, verifier.backbone, verifier.value_head, verifier.reference)
    return module.eval()
