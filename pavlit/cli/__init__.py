"""The ``pavlit`` command.

``pavlit fit|validate|test|predict`` are LightningCLI subcommands over any LightningModule and
LightningDataModule (:class:`PavlitCLI`); the other commands are plain functions of ``argv``. A command is
one entry in :data:`COMMANDS`, and its docstring's first line is its line in ``pavlit --help``.

This package holds :func:`main` and re-exports the names of its modules: ``commands`` (the command table,
``pavlit plugins``), ``lightning`` (:class:`PavlitCLI` and its callbacks), ``resume`` (run folders, resuming a
fit), ``errors`` (user errors, ``--config`` file checks) and ``signals`` (SIGTERM/SIGINT).

Lightning takes seconds to import, so this package imports it only when a Lightning subcommand runs (or when
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

# The imported names that main does not use are re-exported, for `from pavlit.cli import ...`.
# ruff: noqa: F401
from __future__ import annotations

import difflib
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import pavlit
from pavlit.cli.commands import COMMANDS, Command, _usage, plugins_command
from pavlit.cli.errors import (
    TRACEBACK_ENV,
    USER_ERRORS,
    _error_text,
    _show_traceback,
    check_config_files,
)
from pavlit.cli.lightning import CKPT_KEYWORDS, _lightning_classes, run_lightning
from pavlit.cli.resume import (
    RESUME_CHECKPOINT,
    RESUME_IGNORED_KEYS,
    RESUME_SETTINGS,
    RUN_DIR_ENV,
    RUNS_ROOT,
    ResumeArgs,
    default_run_dir,
    resume_checkpoint_for,
    resume_settings,
)
from pavlit.cli.signals import Interrupted, _close_progress_bars, _first_process, _signals_end_the_command

# Every public name of the single-module cli.py stays importable from here (the imports above). PavlitCLI,
# ResumeCheckpoint and RunFolderSaveConfigCallback are built on first access by __getattr__ below.
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

#: Set for every command unless the environment already sets them: nothing is fetched from the Hugging Face Hub.
OFFLINE_DEFAULTS = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


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


def __getattr__(name: str) -> Any:
    # PEP 562: the Lightning-based classes are built on first use, so importing this package stays fast.
    classes = _lightning_classes() if name in ("PavlitCLI", "ResumeCheckpoint", "RunFolderSaveConfigCallback") else {}
    if name in classes:
        return classes[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
