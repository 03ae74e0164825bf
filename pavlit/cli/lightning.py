"""The Lightning side of ``pavlit``: :class:`PavlitCLI` (a LightningCLI with plugins, run folders, a
``FiniteGuard``, weights-only ``--ckpt_path`` and resumable fits), :class:`ResumeCheckpoint` and
:class:`RunFolderSaveConfigCallback`, and :func:`run_lightning`, which runs ``fit|validate|test|predict``.

Lightning takes seconds to import, so the classes are built by :func:`_lightning_classes` on first use, and are
importable (and picklable) as ``pavlit.cli.<name>`` through that package's ``__getattr__``."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from pavlit import registry
from pavlit.cli.resume import (
    RESUME_CHECKPOINT,
    RESUME_SETTINGS,
    RUN_DIR_ENV,
    ResumeArgs,
    _restored_env,
    _set_aside,
    default_run_dir,
    resume_checkpoint_for,
    resume_settings,
)

#: ``--ckpt_path`` keywords that Lightning resolves to local files itself (``registry`` would download).
CKPT_KEYWORDS = ("last", "best", "hpc")

log = logging.getLogger(__name__)


def run_lightning(subcommand: str, argv: list[str]) -> int:
    """Run one LightningCLI subcommand (``fit``, ``validate``, ``test``, ``predict``) through :class:`PavlitCLI`."""
    args = [subcommand, *argv]
    try:
        # Given the process's own command line, LightningCLI reads sys.argv itself (and does not warn that
        # both were given).
        cli_class = _lightning_classes()["PavlitCLI"]
        cli_class(args=None if args == sys.argv[1:] else args, parser_kwargs={"prog": "pavlit"})
    except registry.PluginError as err:
        print(f"pavlit {subcommand}: error: {err}", file=sys.stderr)
        return 1
    return 0


@cache
def _lightning_classes() -> dict[str, type]:
    from docstring_parser import DocstringStyle
    from jsonargparse import set_parsing_settings
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
    from lightning.pytorch.trainer.states import TrainerStatus
    from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from pavlit.callbacks import FiniteGuard, LocalCheckpointIO, check_checkpoint, load_checkpoint

    # pavlit reports a SIGTERM in one line itself (see main); Lightning's own "Received SIGTERM" would be a second.
    logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector").setLevel(logging.WARNING)
    # pavlit's docstrings are Google style (STYLE.md); naming the style skips docstring_parser's guessing.
    set_parsing_settings(docstring_parse_style=DocstringStyle.GOOGLE)

    class RunFolderSaveConfigCallback(SaveConfigCallback):
        """Saves the resolved config into the run folder, and never over one of the run's input config files.

        The run folder is fresh, so overwriting there is safe; but a user may point ``trainer.default_root_dir``
        at the folder holding their ``config.yaml``. Then the resolved config goes to ``config.resolved.yaml``.
        """

        def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
            if not self.already_saved and self.save_to_log_dir:
                target = os.path.realpath(os.path.join(trainer.log_dir or ".", self.config_filename))
                inputs = {os.path.realpath(os.fspath(path)) for path in (self.config.get("config") or [])}
                if target in inputs:
                    stem, ext = os.path.splitext(self.config_filename)
                    self.config_filename = f"{stem}.resolved{ext}"
                    rank_zero_warn(
                        f"{target} is an input config of this run; saving the resolved config as "
                        f"{self.config_filename} next to it instead"
                    )
            super().setup(trainer, pl_module, stage)

    class ResumeCheckpoint(ModelCheckpoint):
        """Keeps ``<root>/checkpoints/resume.ckpt``: the latest state of a fit, every ``every_n_train_steps`` steps.

        A ``ModelCheckpoint`` that saves only its "last" file (written atomically, the previous one replaced), under
        its own name so that it never collides with a user's ``last.ckpt``. See :class:`ResumeArgs`.

        Args:
            root: The run folder (``trainer.default_root_dir``).
            every_n_train_steps: Optimizer steps between two saves.
            settings: The run's settings (:func:`resume_settings`), recorded beside the checkpoint for a rerun to
                check against.
        """

        CHECKPOINT_NAME_LAST = Path(RESUME_CHECKPOINT).stem

        def __init__(self, root: str, every_n_train_steps: int, settings: dict[str, Any]) -> None:
            super().__init__(
                dirpath=str(Path(root, RESUME_CHECKPOINT).parent),
                save_last=True,
                save_top_k=0,
                every_n_train_steps=every_n_train_steps,
            )
            self.root = root
            self.settings = settings

        def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
            # Whatever checkpoint I/O the Trainer has: written beside the target, fsynced, then renamed over it.
            target = Path(filepath)
            tmp = target.parent / f".{target.name}.{os.getpid()}.tmp"
            super()._save_checkpoint(trainer, str(tmp))
            if trainer.is_global_zero:
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            self._last_checkpoint_saved = filepath

        def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
            super().setup(trainer, pl_module, stage)
            if stage == "fit" and trainer.is_global_zero:
                from pavlit.jobs.atomic import atomic_write_text

                record = json.dumps({"settings": self.settings}, indent=2, sort_keys=True) + "\n"
                atomic_write_text(Path(self.root, RESUME_SETTINGS), record)

    class PavlitCLI(LightningCLI):
        """LightningCLI over any LightningModule and LightningDataModule, with plugins loaded and a run folder.

        Before parsing, every registered plugin is imported (:func:`pavlit.registry.load_all`), so a YAML can
        select one by short class name (``class_path: TemperedProver``). Unless ``trainer.default_root_dir``
        is given, the run writes into :func:`default_run_dir`, and the resolved config is saved there.

        Every run gets a :class:`~pavlit.callbacks.FiniteGuard` (stop on a NaN/inf loss or gradient), set with
        ``--finite_guard.*``: ``--finite_guard.enabled false`` turns it off, and a ``FiniteGuard`` listed in
        ``trainer.callbacks`` takes the default one's place.

        Every ``fit`` is resumable (:class:`ResumeArgs`, ``--resume.*``): it keeps a :class:`ResumeCheckpoint`,
        resumes from the one an interrupted run into the same folder left, and deletes it once finished. Every
        ``ModelCheckpoint`` without a ``dirpath`` saves into ``<root>/checkpoints`` (not into the logger's
        per-process ``version_N`` folder), so that a resumed run finds, keeps and ranks the interrupted run's best
        checkpoints as an uninterrupted run would.

        Args:
            model_class: A LightningModule class (``None``: any, chosen with ``--model`` / ``model.class_path``).
            datamodule_class: A LightningDataModule class (``None``: any, chosen with ``--data``).
            save_config_callback: Saves the resolved config into the run folder.
            save_config_kwargs: Its arguments; default ``{"overwrite": True}``, safe because the folder is the
                run's own.
            subclass_mode_model: Accept subclasses of ``model_class``.
            subclass_mode_data: Accept subclasses of ``datamodule_class``.
            **kwargs: The other arguments of ``LightningCLI`` (``args``, ``run``, ``trainer_defaults``, ...).
        """

        def __init__(
            self,
            model_class: type | Callable[..., Any] | None = None,
            datamodule_class: type | Callable[..., Any] | None = None,
            save_config_callback: type[SaveConfigCallback] | None = RunFolderSaveConfigCallback,
            save_config_kwargs: dict[str, Any] | None = None,
            *,
            subclass_mode_model: bool = True,
            subclass_mode_data: bool = True,
            **kwargs: Any,
        ) -> None:
            registry.load_all()
            # The chosen run folder is exported for the duration of the run so that DDP worker processes,
            # which re-run this command, write into the same folder instead of picking a new timestamp.
            with _restored_env(RUN_DIR_ENV):
                super().__init__(
                    model_class,
                    datamodule_class,
                    save_config_callback,
                    {"overwrite": True} if save_config_kwargs is None else save_config_kwargs,
                    subclass_mode_model=subclass_mode_model,
                    subclass_mode_data=subclass_mode_data,
                    **kwargs,
                )

        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.add_lightning_class_args(FiniteGuard, "finite_guard")
            parser.add_class_arguments(ResumeArgs, "resume")

        def _parse_ckpt_path(self) -> None:
            """Check ``--ckpt_path`` (a local, weights-only checkpoint) and never merge its ``hyper_parameters``.

            LightningCLI's own version parses the checkpoint's ``hyper_parameters`` over the user's model config,
            so a file could switch the model's source (and ``trust_remote_code``) or its learning rate. Here the
            model is what the config and command line say; the checkpoint only provides the state to restore.
            """
            subcommand = self.config.get("subcommand")
            if not subcommand:
                return
            config = self.config[subcommand]
            if config.get("weights_only") is False:
                raise ValueError(
                    "--weights_only false is not supported: pavlit loads checkpoints with weights_only=True only "
                    "(unpickling arbitrary objects could run code)"
                )
            ckpt_path = config.get("ckpt_path")
            if ckpt_path is None or str(ckpt_path) in CKPT_KEYWORDS:
                return
            checkpoint = load_checkpoint(ckpt_path, "--ckpt_path", mmap=True)
            hparams = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if k != "_instantiator"}
            if hparams:
                log.info("--ckpt_path %s: restoring its state; the model is built from the config, not from the "
                         "checkpoint's hyper_parameters", ckpt_path)  # fmt: skip

        def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
            kwargs = super()._prepare_subcommand_kwargs(subcommand)
            if "weights_only" in self._subcommand_method_arguments[subcommand]:
                kwargs["weights_only"] = True
            return kwargs

        def instantiate_trainer(self, **kwargs: Any) -> Trainer:
            try:
                trainer = super().instantiate_trainer(**kwargs)
            except MisconfigurationException as err:  # Lightning's check of a trainer.* setting (max_steps: -5)
                raise ValueError(f"trainer: {err}") from None
            if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
                # Lightning's default I/O; a checkpoint_io plugin the user chose stays theirs.
                trainer.strategy.checkpoint_io = LocalCheckpointIO()
            config = self.config_init[self.subcommand] if self.subcommand else self.config_init
            default = config.get("finite_guard")
            guards = [c for c in trainer.callbacks if isinstance(c, FiniteGuard)]
            if default is not None and (not default.enabled or len(guards) > 1):
                trainer.callbacks = [c for c in trainer.callbacks if c is not default]
            resume = config.get("resume")
            if self.subcommand == "fit" and resume is not None and resume.enabled:
                root = str(trainer.default_root_dir)
                for callback in trainer.checkpoint_callbacks:
                    if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                        callback.dirpath = str(Path(root, RESUME_CHECKPOINT).parent)
                # Added after the Trainer is built: it is independent of `enable_checkpointing` (Lightning's own
                # checkpoints), and listed last so that `trainer.checkpoint_callback` stays the user's.
                settings = resume_settings(self.config["fit"])
                trainer.callbacks.append(ResumeCheckpoint(root, resume.every_n_train_steps, settings))
            return trainer

        def before_fit(self) -> None:
            config = self.config_init["fit"]
            resume = config.get("resume")
            if resume is None or not resume.enabled or config.get("ckpt_path") is not None:
                return
            root = self.trainer.default_root_dir
            checkpoint = resume_checkpoint_for(root, resume_settings(self.config["fit"]))
            if checkpoint is None:
                return
            try:
                check_checkpoint(checkpoint, "the resume checkpoint")
            except ValueError as err:
                if self.trainer.is_global_zero:
                    aside = _set_aside(Path(checkpoint))
                    rank_zero_warn(f"{err}; moved it aside to {aside.name} and starting the fit from scratch")
                self.trainer.strategy.barrier("pavlit resume check")
                return
            rank_zero_info(f"resuming the interrupted run in {root} from {checkpoint}")
            config.ckpt_path = checkpoint
            # A kill between a best-checkpoint save and the next resume checkpoint makes the resumed run save
            # that same checkpoint again (same step, same weights): overwrite it rather than keep both as
            # `...-v1.ckpt`, so the export names the file the uninterrupted run would.
            for callback in self.trainer.checkpoint_callbacks:
                if isinstance(callback, ModelCheckpoint) and not isinstance(callback, ResumeCheckpoint):
                    callback._enable_version_counter = False

        def after_fit(self) -> None:
            resume = self.config_init["fit"].get("resume")
            finished = self.trainer.state.status == TrainerStatus.FINISHED and not self.trainer.interrupted
            if resume is not None and resume.enabled and finished and self.trainer.is_global_zero:
                # Only now: the fit's exports (written in on_train_end) are complete.
                for name in (RESUME_CHECKPOINT, RESUME_SETTINGS):
                    Path(self.trainer.default_root_dir, name).unlink(missing_ok=True)

        def before_instantiate_classes(self) -> None:
            config = self.config[self.subcommand] if self.subcommand else self.config
            if config.trainer.default_root_dir is None:
                config.trainer.default_root_dir = default_run_dir(self.subcommand or "run")
                os.environ[RUN_DIR_ENV] = config.trainer.default_root_dir

    classes: dict[str, type] = {
        "PavlitCLI": PavlitCLI,
        "ResumeCheckpoint": ResumeCheckpoint,
        "RunFolderSaveConfigCallback": RunFolderSaveConfigCallback,
    }
    for name, cls in classes.items():
        # Importable as pavlit.cli.<name> (through __getattr__), so pickling (ddp_spawn) finds them.
        cls.__module__ = "pavlit.cli"
        cls.__qualname__ = name
    return classes
