"""Lightning plumbing that ``pavlit fit`` adds to every run: a NaN guard and safe checkpoint files.

:class:`FiniteGuard` stops training at the first step whose loss or gradients are NaN or infinite, naming the step
and the quantity, instead of letting a run spend hours updating weights with NaN. ``PavlitCLI`` adds it to every
Lightning subcommand (``--finite_guard.enabled false`` turns it off; listing it in ``trainer.callbacks`` replaces the
default one, so it never runs twice).

Checkpoints are local files read without running code. :func:`load_checkpoint` refuses a URL, reads with
``torch.load(weights_only=True)`` only, and turns a pickled, truncated or foreign file into one ``ValueError`` line
naming it; :func:`check_checkpoint` also verifies every record's CRC (a truncated or half-copied file fails).
:class:`LocalCheckpointIO` is the Trainer's checkpoint I/O under ``PavlitCLI``: Lightning's own loads (``--ckpt_path``,
resuming) go through :func:`load_checkpoint`, and every save is written to a temporary file in the checkpoint's own
folder, fsynced and renamed over the target (:func:`atomic_save_checkpoint`), never staged in the system's temp
folder and copied across filesystems.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = [
    "FiniteGuard",
    "LocalCheckpointIO",
    "NonFiniteError",
    "atomic_save_checkpoint",
    "check_checkpoint",
    "load_checkpoint",
    "local_checkpoint_path",
]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class NonFiniteError(FloatingPointError):
    """Training produced a NaN or infinite loss or gradient; the message names the step and the quantity."""


class FiniteGuard(Callback):
    """Stop training with :class:`NonFiniteError` on a NaN/inf loss (before its backward) or gradient (before the
    optimizer step), so the weights are never updated with it.

    Under fp16 mixed precision the gradient scaler already skips steps with infinite gradients and lowers its
    scale, so there only a NaN loss stops the run. With several processes the decision is reduced over all ranks,
    so every rank stops together rather than the others waiting forever in the next collective.

    Args:
        enabled: Off turns the guard into a no-op (``pavlit fit --finite_guard.enabled false``).
        check_gradients: Also check every parameter's gradient before each optimizer step (one reduction per
            step); off checks the loss only.
    """

    def __init__(self, enabled: bool = True, check_gradients: bool = True) -> None:
        self.enabled = enabled
        self.check_gradients = check_gradients

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if not self.enabled:
            return
        detached = loss.detach()
        bad = torch.isnan(detached) if _has_scaler(trainer) else ~torch.isfinite(detached)
        local = bool(bad.any())
        if not trainer.strategy.reduce_boolean_decision(local, all=False):
            return
        if local:
            values = detached.flatten()[:4].tolist()
            shown = values[0] if detached.numel() == 1 else values
            raise NonFiniteError(f"{_where(trainer)}: the training loss is {shown} (not finite); {_HINT}")
        raise NonFiniteError(f"{_where(trainer)}: another rank's training loss is not finite; {_HINT}")

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if not (self.enabled and self.check_gradients) or _has_scaler(trainer):
            return
        named = [(name, p.grad) for name, p in pl_module.named_parameters() if p.grad is not None]
        finite = torch.stack([torch.isfinite(_local(grad)).all() for _, grad in named]) if named else None
        local = finite is not None and not bool(finite.all())
        if not trainer.strategy.reduce_boolean_decision(local, all=False):
            return
        if local:
            bad = [name for (name, _), ok in zip(named, finite.tolist()) if not ok]
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            grad = _local(dict(named)[bad[0]])
            kind = "NaN" if torch.isnan(grad).any() else "inf"
            raise NonFiniteError(f"{_where(trainer)}: the gradient of parameter {bad[0]!r}{more} holds {kind}; {_HINT}")
        raise NonFiniteError(f"{_where(trainer)}: another rank holds a non-finite gradient; {_HINT}")


_HINT = (
    "training stopped before the weights were updated with it (lower the learning rate, clip gradients with "
    "--trainer.gradient_clip_val, or check the data for bad labels)"
)


def _where(trainer: Trainer) -> str:
    rank = f", rank {trainer.global_rank}" if trainer.world_size > 1 else ""
    return f"global step {trainer.global_step} (epoch {trainer.current_epoch}{rank})"


def _has_scaler(trainer: Trainer) -> bool:
    return getattr(trainer.precision_plugin, "scaler", None) is not None


def _local(tensor: torch.Tensor) -> torch.Tensor:
    # A sharded (FSDP2) gradient is a DTensor: each rank checks its own shard, and the ranks' answers are reduced.
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


# --- checkpoint files --------------------------------------------------------------------------------------------


def local_checkpoint_path(path: str | os.PathLike[str], what: str = "checkpoint") -> Path:
    """``path`` as a local file path, or ``ValueError`` for a URL (``http://``, ``s3://``, Lightning's ``registry``).

    Args:
        path: The checkpoint path.
        what: How the message names the setting, e.g. ``"--ckpt_path"``.
    """
    text = os.fspath(path)
    if _URL.match(text) or text == "registry" or text.startswith("registry:"):
        raise ValueError(
            f"{what} {text!r} is not a local file: pavlit loads checkpoints from local files only (a remote "
            "checkpoint would be fetched and cached outside the run folder); download it and pass its path"
        )
    return Path(text).expanduser()


def _unpickling_detail(err: BaseException) -> str:
    found = re.search(r"WeightsUnpickler error: *\n?\s*([^\n]+)", str(err))
    return found.group(1).strip()[:200] if found else "not a plain tensor checkpoint"


def load_checkpoint(
    path: str | os.PathLike[str], what: str = "checkpoint", map_location: Any = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """Read a local checkpoint with ``torch.load(weights_only=True)``: tensors and plain containers, never code.

    Args:
        path: A local ``.ckpt`` / ``.pt`` file.
        what: How messages name the file's setting (``"--ckpt_path"``).
        map_location: Passed to ``torch.load``.
        mmap: Map the tensors instead of reading them (a quick structural check of a large file).

    Raises:
        ValueError: a URL; a file holding pickled objects (refused: unpickling them could run code); a truncated
            or foreign file. One line, naming the file.
        FileNotFoundError: no such file.
    """
    file = local_checkpoint_path(path, what)
    if not file.is_file():
        raise FileNotFoundError(errno.ENOENT, f"{what}: no such checkpoint file", str(file))
    # mmap needs the zip format; an old-style (or foreign) file is read whole, to report what it is.
    mmap = mmap and zipfile.is_zipfile(file)
    try:
        checkpoint = torch.load(file, map_location=map_location, weights_only=True, mmap=mmap)
    except OSError:
        raise
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, KeyError, ... for what it refuses
        raise _unreadable(err, what, file) from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{what} {file}: expected a checkpoint dictionary, got a {type(checkpoint).__name__}")
    return checkpoint


def _unreadable(err: Exception, what: str, file: Path) -> ValueError:
    if type(err).__name__ == "UnpicklingError":  # what the weights-only unpickler raises for what it refuses
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if found:
            return ValueError(
                f"{what} {file}: refused: the checkpoint holds pickled Python objects besides tensors (it names "
                f"{found.group(1)}), and loading those could run code; pavlit loads checkpoints with "
                "torch.load(weights_only=True) only"
            )
        return ValueError(
            f"{what} {file}: not a weights-only PyTorch checkpoint ({_unpickling_detail(err)}): it is truncated, "
            "another kind of file, or a pickle that torch.load(weights_only=True) refuses"
        )
    first = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else ""
    detail = f"{type(err).__name__}: {first}" if first else type(err).__name__
    return ValueError(
        f"{what} {file}: not a readable PyTorch checkpoint ({detail[:200]}); is it truncated or another kind of file?"
    )


def check_checkpoint(path: str | os.PathLike[str], what: str = "checkpoint") -> None:
    """Verify that ``path`` is a complete checkpoint, without loading its tensors.

    Every record's CRC is checked (a truncated, half-copied or bit-flipped file fails) and the pickled structure is
    read with ``weights_only=True`` (see :func:`load_checkpoint`).

    Raises:
        ValueError: The file is not a complete, weights-only checkpoint; one line naming it.
    """
    file = local_checkpoint_path(path, what)
    try:
        with zipfile.ZipFile(file) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"{what} {file}: not a complete checkpoint ({err}); is it truncated?") from None
    except OSError:
        raise
    if bad is not None:
        raise ValueError(f"{what} {file}: the record {bad!r} fails its CRC check; the file is corrupt")
    load_checkpoint(file, what, mmap=True)


def atomic_save_checkpoint(checkpoint: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync it, rename it over ``path``, fsync the folder.

    A crash, a kill or a full disk at any moment leaves either the previous file or the new one, complete, plus at
    most a ``.<name>.*.tmp`` file that nothing reads. The temporary file is in the same folder, so the rename is
    atomic (never a copy across filesystems).
    """
    target = local_checkpoint_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "xb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.filename is None:  # a full disk: the write itself names no file
            raise OSError(err.errno, f"{err.strerror or err} while writing", str(target)) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(target.parent)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform (Windows); the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class LocalCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O for local files: saves atomically in place, loads weights-only.

    ``PavlitCLI`` gives it to the Trainer's strategy (in place of Lightning's default ``TorchCheckpointIO``), so
    that ``--ckpt_path``, resuming and every ``ModelCheckpoint`` go through :func:`load_checkpoint` and
    :func:`atomic_save_checkpoint`. ``weights_only=False`` is refused rather than honoured.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_save_checkpoint(checkpoint, path)

    def load_checkpoint(
        self, path: str | os.PathLike[str], map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError(
                f"weights_only=False asked for loading {os.fspath(path)!r}: pavlit loads checkpoints with "
                "weights_only=True only (unpickling arbitrary objects could run code)"
            )
        location = map_location if map_location is not None else (lambda storage, loc: storage)
        return load_checkpoint(path, "checkpoint", map_location=location)
