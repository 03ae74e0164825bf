"""The ``pavlit`` command.

``pavlit fit|validate|test|predict`` are LightningCLI subcommands over any LightningModule and
LightningDataModule (:class:`PavlitCLI`); the other commands are plain functions of ``argv``. A command is
one entry in :data:`COMMANDS`, and its docstring's first line is its line in ``pavlit --help``.

Lightning takes seconds to import, so this module imports it only when a Lightning subcommand runs (or when
:class:`PavlitCLI` is first used): ``pavlit --help`` and ``pavlit plugins`` do not pay for it.

Errors: input a user can fix (a malformed file, a missing path, a bad setting, a broken plugin, a NaN loss)
ends the command with one line, ``pavlit <command>: error: <what, where, what was expected>``, and exit status 1;
``PAVLIT_TRACEBACK=1`` shows the full traceback instead. Other exceptions are bugs and keep their traceback.

Signals: SIGTERM and SIGINT (Ctrl-C) end every command with one line, ``pavlit <command>: interrupted by SIGTERM
...``, and exit status 128 + the signal's number (143, 130), as a shell reports a process the signal killed. The
work already committed is kept (label and search shards, a fit's ``resume.ckpt``), nothing half-done is exported,
and rerunning the same command resumes exactly as after ``kill -9``. A second signal ends the process at once.

Local files only: every command runs with ``HF_HUB_OFFLINE=1`` and ``HF_DATASETS_OFFLINE=1`` unless the
environment already sets them (``HF_HUB_OFFLINE=0`` lets ``datasets`` fetch a Hub dataset named by ``data.path``),
so no dataset or model name ever reaches the Hugging Face Hub unasked. Checkpoints (``--ckpt_path``) must be local
files and load with ``weights_only=True``; their ``hyper_parameters`` never change the model the config describes.

Run folders: unless ``--trainer.default_root_dir`` is given, every Lightning run writes its logs,
checkpoints and resolved ``config.yaml`` into ``runs/<command>/<timestamp>`` (or ``$PAVLIT_RUN_DIR``),
never into the working directory, where saving the config could overwrite an input file of that name.

Resuming: ``pavlit fit`` keeps ``<run folder>/checkpoints/resume.ckpt`` (every ``--resume.every_n_train_steps``
steps, written atomically) while it trains and deletes it once the fit has finished. Rerunning the same command
into the same run folder after a crash or ``kill -9`` continues from that checkpoint; a rerun whose settings
differ from the interrupted run's is refused (see :class:`ResumeArgs`).
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import pavlit
from pavlit import registry
from pavlit.interfaces import INTERFACES

# PavlitCLI, ResumeCheckpoint and RunFolderSaveConfigCallback are built on first access by __getattr__ below.
__all__ = [  # noqa: F822
    "COMMANDS",
    "Interrupted",
    "PavlitCLI",
    "ResumeArgs",
    "ResumeCheckpoint",
    "RunFolderSaveConfigCallback",
    "default_run_dir",
    "main",
    "plugins_command",
]

Command = Callable[[list[str]], "int | None"]

RUN_DIR_ENV = "PAVLIT_RUN_DIR"
RUNS_ROOT = "runs"
TRACEBACK_ENV = "PAVLIT_TRACEBACK"
RESUME_CHECKPOINT = "checkpoints/resume.ckpt"
RESUME_SETTINGS = "checkpoints/resume.json"
#: Config keys that do not change what a fit computes (or, for ``seed_everything``, are drawn anew by every run
#: that sets none), left out of the settings a resumed run must share with the interrupted one.
RESUME_IGNORED_KEYS = ("config", "ckpt_path", "resume", "seed_everything", "trainer.default_root_dir")
#: Set for every command unless the environment already sets them: nothing is fetched from the Hugging Face Hub.
OFFLINE_DEFAULTS = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
#: ``--ckpt_path`` keywords that Lightning resolves to local files itself (``registry`` would download).
CKPT_KEYWORDS = ("last", "best", "hpc")

log = logging.getLogger(__name__)

#: Exceptions that report input a user can fix; pavlit's own readers and settings raise these with messages that
#: name the file, line or field and what was expected. ``FloatingPointError`` is :class:`pavlit.callbacks.FiniteGuard`
#: stopping a run on a NaN loss.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    OSError,
    ImportError,
    FloatingPointError,
    registry.PluginError,
)


class Interrupted(BaseException):
    """A SIGTERM or SIGINT arrived while a command ran (raised in the main thread by :func:`main`'s handler).

    A ``BaseException``, like ``KeyboardInterrupt``, so that no ``except Exception`` on the way swallows it: the
    command unwinds as after any error (open files closed, locks released, Lightning's ``on_exception`` hooks),
    and :func:`main` reports it in one line with exit status ``128 + signum``.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def _signals_end_the_command() -> Iterator[list[int]]:
    """Turn SIGTERM and SIGINT into :class:`Interrupted` while the block runs (main thread only); yields the list
    of signals received. A signal the process was started ignoring (``nohup``) stays ignored."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once
        raise Interrupted(signum)

    previous = {signum: signal.getsignal(signum) for signum in _SIGNALS}
    for signum, before in previous.items():
        if before is not signal.SIG_IGN:
            signal.signal(signum, handler)
    try:
        yield received
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before if before is not None else signal.SIG_DFL)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pavlit <command> [options]``.

    Args:
        argv: The arguments after the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The exit status: 1 after one of :data:`USER_ERRORS`, reported on stderr as one line (LightningCLI and
        argparse exit through ``SystemExit``, status 2, on bad arguments and 0 on ``--help``); 128 + the signal's
        number after SIGTERM or SIGINT (:class:`Interrupted`).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(_usage(), file=sys.stderr)
        return 2
    if args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if args[0] == "--version":
        print(f"pavlit {pavlit.__version__}")
        return 0
    command = COMMANDS.get(args[0])
    if command is None:
        close = difflib.get_close_matches(args[0], COMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"pavlit: error: unknown command {args[0]!r}{hint}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    for name, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(name, value)
    received: list[int] = []
    try:
        with _signals_end_the_command() as received:
            if command is not plugins_command:
                check_config_files(args[1:])
            return command(args[1:]) or 0
    except BaseException as err:
        signum = err.signum if isinstance(err, Interrupted) else received[0] if received else None
        if signum is None:
            if isinstance(err, USER_ERRORS) and not _show_traceback():
                print(f"pavlit {args[0]}: error: {_error_text(err)}", file=sys.stderr)
                print(f"(set {TRACEBACK_ENV}=1 to see the traceback)", file=sys.stderr)
                return 1
            raise
        if _show_traceback():
            raise
        _close_progress_bars()
        if _first_process():  # the other ranks of a multi-process job end with the same status, silently
            name = signal.Signals(signum).name
            print(
                f"pavlit {args[0]}: interrupted by {name}; the work finished so far is kept, and rerunning the same "
                "command resumes from it",
                file=sys.stderr,
            )
        return 128 + signum


def _first_process() -> bool:
    return all(int(os.environ.get(name) or 0) == 0 for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def _close_progress_bars() -> None:
    # Open tqdm bars would redraw themselves after the message when the interpreter collects them.
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) or ()):
        try:
            bar.close()
        except Exception:  # a bar whose stream is gone; the message matters more
            pass


def _show_traceback() -> bool:
    return os.environ.get(TRACEBACK_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _config_paths(argv: Sequence[str]) -> list[str]:
    paths = []
    for index, arg in enumerate(argv):
        if arg == "--config" and index + 1 < len(argv):
            paths.append(argv[index + 1])
        elif arg.startswith("--config="):
            paths.append(arg.removeprefix("--config="))
    return paths


def check_config_files(argv: Sequence[str]) -> None:
    """Check every ``--config`` file on the command line before the command's parser reads it.

    jsonargparse reports a YAML syntax error without the file's name, an empty file as "Unexpected config" and a
    non-UTF-8 file as a bare ``UnicodeDecodeError``; this names the file (and the line) instead. A ``--config``
    value that is not an existing file is left to the parser (it may be an inline YAML string).

    Raises:
        ValueError: A config file that is not UTF-8, not valid YAML, empty, or not a mapping of options.
    """
    import yaml

    for value in _config_paths(argv):
        path = Path(value).expanduser()
        if not path.is_file():
            if Path(value).suffix.lower() in (".yaml", ".yml", ".json"):
                raise FileNotFoundError(2, "--config: no such config file", value)
            continue
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            line = data[: err.start].count(b"\n") + 1
            raise ValueError(
                f"{value}:{line}: the config file is not UTF-8 text (byte 0x{data[err.start]:02x}); save it as UTF-8"
            ) from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{value}:{mark.line + 1}:{mark.column + 1}" if mark is not None else value
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            context = getattr(err, "context", None)
            detail = f"{problem} ({context})" if context else problem
            raise ValueError(f"{where}: YAML syntax error in the config file: {detail}") from None
        if loaded is None:
            raise ValueError(f"{value}: the config file is empty (or holds only comments); expected YAML options")
        if not isinstance(loaded, dict):
            raise ValueError(
                f"{value}: expected a mapping of options (key: value lines) at the top of the config file, got a "
                f"{type(loaded).__name__}"
            )


def _error_text(err: BaseException) -> str:
    text = _unwrap_union_error(str(err).strip())
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    # A bare message from a library (e.g. "math domain error") says little without its type.
    return text if text and isinstance(err, (OSError, registry.PluginError)) else f"{type(err).__name__}: {text}"


_UNION_ERROR = "Does not validate against any of the Union subtypes"


def _unwrap_union_error(text: str) -> str:
    """The error a class raised while jsonargparse built it, out of its report on every Union subtype it tried.

    A LightningModule's ``__init__`` that refuses a setting (``TinyPolicy.n_head must be a positive integer``)
    reaches the user wrapped in ``Does not validate against any of the Union subtypes`` plus the subtypes, the
    ``NoneType`` alternative and the whole namespace; the class's own message is the line that says what is wrong.
    """
    if not text.startswith(_UNION_ERROR):
        return text
    reasons = [
        line.strip()[2:]
        for line in text.splitlines()
        if line.startswith("  - ") and not line.strip().startswith("- Expected a <class 'NoneType'>")
    ]
    return "; ".join(reasons) if reasons else text


def plugins_command(argv: list[str]) -> int:
    """List every registered plugin (kind, name, target, distribution) without importing any."""
    parser = argparse.ArgumentParser(prog="pavlit plugins", description=plugins_command.__doc__)
    kinds = [*INTERFACES, *(group.removeprefix("pavlit.") for group in INTERFACES)]
    parser.add_argument("--kind", choices=kinds, help="only this entry-point group")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    options = parser.parse_args(argv)
    try:
        plugins = registry.list_plugins(options.kind)
    except registry.PluginError as err:
        print(f"pavlit plugins: error: {err}", file=sys.stderr)
        return 1
    if options.json:
        rows = [
            {
                "kind": p.kind,
                "name": p.name,
                "target": p.target,
                "distribution": p.distribution,
                "version": p.version,
                "builtin": p.builtin,
            }
            for p in plugins
        ]
        print(json.dumps(rows, indent=2))
        return 0
    table = [("KIND", "NAME", "TARGET", "DISTRIBUTION")]
    table += [(p.kind, p.name, p.target, p.origin) for p in plugins]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
    if not plugins:
        print("(no plugins registered)", file=sys.stderr)
    if not registry.autoload_enabled():
        print(
            f"{registry.AUTOLOAD_ENV} is set: only pavlit's own plugins load automatically; "
            "the others load only when named",
            file=sys.stderr,
        )
    return 0


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


def _lightning_command(subcommand: str, summary: str) -> Command:
    def command(argv: list[str]) -> int:
        return run_lightning(subcommand, argv)

    command.__doc__ = summary
    command.__name__ = command.__qualname__ = f"{subcommand}_command"
    return command


def _label_command(argv: list[str]) -> int:
    """Sample seed rollouts and label every step prefix by Monte-Carlo rollouts (resumable, multi-rank)."""
    from pavlit.labeling.job import label_command

    return label_command(argv)


def _search_command(argv: list[str]) -> int:
    """Best-of-N / beam search with reward compositions over a split: accuracy-vs-compute table, plot, efficiency."""
    from pavlit.search.job import search_command

    return search_command(argv)


def _compare_command(argv: list[str]) -> int:
    """Fit configs over seeds (each a resumable `pavlit fit`) and compare their curves: table, plot, efficiency."""
    from pavlit.compare import compare_command

    return compare_command(argv)


def _pipeline_command(argv: list[str]) -> int:
    """Run every stage (SFT, label, ORM + PAV, search, RL) from one config; finished stages are reused."""
    from pavlit.pipeline import pipeline_command

    return pipeline_command(argv)


COMMANDS: dict[str, Command] = {
    "fit": _lightning_command("fit", "Train a LightningModule on a LightningDataModule from a YAML config."),
    "validate": _lightning_command("validate", "Run one evaluation epoch on the validation split."),
    "test": _lightning_command("test", "Run one evaluation epoch on the test split."),
    "predict": _lightning_command("predict", "Run inference on the predict split."),
    "label": _label_command,
    "search": _search_command,
    "compare": _compare_command,
    "pipeline": _pipeline_command,
    "plugins": plugins_command,
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [(command.__doc__ or "").strip().splitlines()[0] for command in COMMANDS.values()]
    listing = "\n".join(f"  {name.ljust(width)}  {line}" for name, line in zip(COMMANDS, lines))
    return (
        "usage: pavlit <command> [options]\n\n"
        "Process advantage verifiers (Setlur et al., 2024) on PyTorch Lightning.\n\n"
        f"commands:\n{listing}\n\n"
        "options:\n  -h, --help  show this message and exit\n  --version   print the version and exit\n\n"
        "Run `pavlit <command> --help` for the options of one command."
    )


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


def __getattr__(name: str) -> Any:
    # PEP 562: the Lightning-based classes are built on first use, so importing this module stays fast.
    classes = _lightning_classes() if name in ("PavlitCLI", "ResumeCheckpoint", "RunFolderSaveConfigCallback") else {}
    if name in classes:
        return classes[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        cls.__module__ = __name__
        cls.__qualname__ = name
    return classes


if __name__ == "__main__":
    sys.exit(main())
