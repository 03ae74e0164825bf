"""Where a Lightning run writes and how ``pavlit fit`` resumes: the run folder (:func:`default_run_dir`,
``$PAVLIT_RUN_DIR``), :class:`ResumeArgs` (``--resume.*``), the settings a resumed run must share with the
interrupted one (:func:`resume_settings`, :func:`resume_checkpoint_for`), and setting a corrupt checkpoint aside.
The Lightning callback that writes the resume checkpoint is in :mod:`pavlit.cli.lightning`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

RUN_DIR_ENV = "PAVLIT_RUN_DIR"
RUNS_ROOT = "runs"
RESUME_CHECKPOINT = "checkpoints/resume.ckpt"
RESUME_SETTINGS = "checkpoints/resume.json"
#: Config keys that do not change what a fit computes (or, for ``seed_everything``, are drawn anew by every run
#: that sets none), left out of the settings a resumed run must share with the interrupted one.
RESUME_IGNORED_KEYS = ("config", "ckpt_path", "resume", "seed_everything", "trainer.default_root_dir")


def default_run_dir(command: str, root: str | os.PathLike[str] = RUNS_ROOT) -> str:
    """The folder a run writes into when no ``trainer.default_root_dir`` is given.

    ``$PAVLIT_RUN_DIR`` when set (which is how processes that Lightning launches for DDP find the folder their
    parent chose), else a new ``<root>/<command>/<YYYY-mm-dd_HH-MM-SS>`` (suffixed ``_1``, ``_2``, ... when a
    run in the same second already took that name).
    """
    if os.environ.get(RUN_DIR_ENV):
        return os.environ[RUN_DIR_ENV]
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    candidate = Path(root, command, stamp)
    suffix = 0
    while candidate.exists():
        suffix += 1
        candidate = Path(root, command, f"{stamp}_{suffix}")
    return str(candidate)


@dataclass
class ResumeArgs:
    """How ``pavlit fit`` survives interruptions (``--resume.*``).

    While a fit trains, ``<trainer.default_root_dir>/checkpoints/resume.ckpt`` holds its latest state (weights,
    optimizer, schedule, loop position, callbacks), and ``resume.json`` beside it the run's settings. Rerunning
    the same command into the same folder continues from the checkpoint; once the fit has finished (and exported
    what it exports) both files are deleted, so a rerun of a finished fit trains anew. A rerun whose settings
    differ from the interrupted run's is refused, naming the changed keys: it would silently mix two runs. An
    explicit ``--ckpt_path`` always wins.

    Args:
        enabled: Keep a resume checkpoint and resume from it (``false``: every run starts from scratch).
        every_n_train_steps: Optimizer steps between two resume checkpoints (an interruption loses at most these).
    """

    enabled: bool = True
    every_n_train_steps: int = 50

    def __post_init__(self) -> None:
        if self.every_n_train_steps < 1:
            raise ValueError(f"resume.every_n_train_steps must be >= 1, got {self.every_n_train_steps}")


def _flat_settings(settings: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(settings, dict):
        flat: dict[str, Any] = {}
        for key, value in settings.items():
            flat.update(_flat_settings(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): settings}


def resume_settings(config: Any) -> dict[str, Any]:
    """The settings of a fit that a resumed run must share with the interrupted one (flat, dotted keys)."""
    plain = json.loads(json.dumps(config.as_dict() if hasattr(config, "as_dict") else config, default=str))
    return {
        key: value
        for key, value in _flat_settings(plain).items()
        if not any(key == ignored or key.startswith(f"{ignored}.") for ignored in RESUME_IGNORED_KEYS)
    }


def resume_checkpoint_for(root: str | os.PathLike[str], settings: dict[str, Any]) -> str | None:
    """The checkpoint an interrupted fit in ``root`` left, checked against ``settings``; ``None`` when none.

    Raises:
        ValueError: The checkpoint belongs to a run with other settings (the message names the changed keys), or
            its settings record is missing.
    """
    checkpoint, record = Path(root, RESUME_CHECKPOINT), Path(root, RESUME_SETTINGS)
    if not checkpoint.exists():
        return None
    try:
        stored = json.loads(record.read_text(encoding="utf-8"))["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(
            f"{checkpoint} is an interrupted run's checkpoint, but {record} (its settings) is missing or unreadable; "
            "pass --ckpt_path to resume from it anyway, or --resume.enabled false (or a new trainer.default_root_dir) "
            "to start over"
        ) from None
    changed = sorted(key for key in set(stored) | set(settings) if stored.get(key) != settings.get(key))
    if changed:
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        raise ValueError(
            f"{checkpoint} is the checkpoint of an interrupted run with other settings (changed: {shown}); rerun "
            "with the same settings to resume it, or use a new trainer.default_root_dir (or --resume.enabled false) "
            "to start over"
        )
    return str(checkpoint)


@contextmanager
def _restored_env(name: str) -> Iterator[None]:
    before = os.environ.get(name)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _set_aside(path: Path) -> Path:
    """Rename a corrupt file to ``<name>.corrupt`` (``.corrupt-1``, ... when taken) in its folder; the new path."""
    aside = path.with_name(f"{path.name}.corrupt")
    suffix = 0
    while aside.exists():
        suffix += 1
        aside = path.with_name(f"{path.name}.corrupt-{suffix}")
    os.replace(path, aside)
    return aside
