"""The table of ``pavlit`` commands (:data:`COMMANDS`): one entry per command, whose docstring's first line is
its line in ``pavlit --help`` (:func:`_usage`). ``pavlit plugins`` is defined here; the job commands import
their module only when they run, and the Lightning subcommands go through :func:`pavlit.cli.lightning.run_lightning`.
(:mod:`pavlit.commands` is something else: the parser plumbing that the job commands share.)"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from pavlit import registry
from pavlit.cli.lightning import run_lightning
from pavlit.interfaces import INTERFACES

Command = Callable[[list[str]], "int | None"]


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
