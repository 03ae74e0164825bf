"""``pavlit pipeline``: every stage of the method from one config, resumable, with one report at the end.

A pipeline config names its stages in order; each stage is an ordinary pavlit command with its own config (so
every stage can also be run alone), plus the file whose existence means the stage is finished::

    # pavlit-command: pipeline
    run_dir: runs/tiny
    stages:
      - name: sft
        command: [fit, --config, configs/tiny/sft.yaml]
        output: runs/tiny/sft/policy/config.json
      - name: label
        command: [label, --config, configs/tiny/label.yaml]
        output: runs/tiny/labels/metrics.json

A finished stage is skipped on a rerun, so rerunning the command after an interruption resumes (stages that
resume internally, like ``label``, ``search`` and ``fit``, also keep their own finished chunks and checkpoints).
``shared_args`` are appended to every stage of the given command (e.g. ``{fit: [--trainer.accelerator, cpu]}``).
Stages run as subprocesses of the same Python, so a crash in one is reported with its log and never leaves the
next stage reading half-written outputs. At the end, every stage's ``metrics.json`` and ``report.md`` (with their
PNG plots) are gathered into ``<run_dir>/report.md``.

Interruptions: while a stage runs, ``<run_dir>/logs/<name>.running`` exists; it is removed when the stage has
exited successfully. A stage whose marker survived (the pipeline was killed, the machine went down) is run again
on the next pipeline run even when its output file exists — a stage may write its ``output`` before the rest of
its files (a Hugging Face export writes ``config.json`` before the weights), so only a clean exit says it is
complete. On Linux a stage dies with the pipeline (``kill -9`` of the pipeline does not leave it running, racing
the rerun).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pavlit.labeling.shards import atomic_write_text


@dataclass
class Stage:
    """One step of the pipeline.

    Args:
        name: Short name (used in logs and the report).
        command: The pavlit command line after ``pavlit`` (e.g. ``[fit, --config, configs/tiny/sft.yaml]``), or
            ``[python, script.py, ...]`` for a benchmark script run with this Python.
        output: A file that exists once the stage has finished; the stage is skipped when it exists.
        report: Folder holding the stage's ``metrics.json`` / ``report.md`` / PNGs for the final report
            (default: the folder of ``output``).
    """

    name: str
    command: list[str]
    output: str
    report: str | None = None


def pipeline(run_dir: str, stages: list[Stage], shared_args: dict[str, list[str]] | None = None) -> Path:
    """Run ``stages`` in order, skipping finished ones, then write ``<run_dir>/report.md``.

    Args:
        run_dir: Where the pipeline's logs and the combined report go.
        stages: The stages, in order.
        shared_args: Extra arguments appended to every stage whose command starts with the key.

    Returns:
        The path of the combined report.
    """
    if not stages:
        raise ValueError("the pipeline config lists no stages")
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be unique, got {names}")
    root = Path(run_dir)
    (root / "logs").mkdir(parents=True, exist_ok=True)
    shared_args = shared_args or {}
    timings: dict[str, Any] = {}
    for index, stage in enumerate(stages, start=1):
        banner = f"[{index}/{len(stages)}] {stage.name}"
        running = root / "logs" / f"{stage.name}.running"
        if Path(stage.output).exists() and not running.exists():
            print(f"{banner}: done already ({stage.output})", flush=True)
            timings[stage.name] = "reused"
            continue
        if running.exists():
            print(f"{banner}: interrupted last time; running it again (it resumes where it can)", flush=True)
        command = _command_line(stage.command + shared_args.get(stage.command[0], []))
        print(f"{banner}: {' '.join(command[1:]) if command[1:2] == ['-m'] else ' '.join(command)}", flush=True)
        log_path = root / "logs" / f"{stage.name}.log"
        atomic_write_text(running, f"{os.getpid()}\n")
        start = time.perf_counter()
        with log_path.open("a", encoding="utf-8") as log:
            # The stage's own progress bar goes to the terminal (stderr); its full output also lands in the log.
            process = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
                preexec_fn=functools.partial(_die_with_parent, os.getpid()) if sys.platform == "linux" else None,
            )
            assert process.stdout is not None
            for line in process.stdout:
                log.write(line)
                sys.stderr.write(line)
            returncode = process.wait()
        seconds = time.perf_counter() - start
        if returncode != 0:
            raise RuntimeError(f"stage {stage.name!r} failed (exit {returncode}); its log: {log_path}")
        if not Path(stage.output).exists():
            raise RuntimeError(f"stage {stage.name!r} finished but did not write {stage.output}; its log: {log_path}")
        running.unlink()
        timings[stage.name] = round(seconds, 1)
        print(f"{banner}: finished in {seconds:.0f} s", flush=True)
    report = write_report(root, stages, timings)
    print(f"report: {report}", flush=True)
    return report


def _die_with_parent(parent: int) -> None:
    """In the forked stage, before exec: ask Linux to SIGKILL it when the pipeline process dies."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the pipeline died before the request took effect
        os._exit(1)


def _command_line(command: list[str]) -> list[str]:
    if command[0] == "python":
        return [sys.executable, *command[1:]]
    return [sys.executable, "-m", "pavlit", *command]


def write_report(root: Path, stages: list[Stage], timings: dict[str, Any]) -> Path:
    """Gather every stage's metrics and report into one markdown file with relative links to its plots."""
    lines = ["# pavlit pipeline report", "", "| stage | status / seconds | output |", "| --- | --- | --- |"]
    for stage in stages:
        lines.append(f"| {stage.name} | {timings.get(stage.name, '?')} | `{stage.output}` |")
    for stage in stages:
        folder = Path(stage.report) if stage.report else Path(stage.output).parent
        lines += ["", f"## {stage.name}", ""]
        metrics = folder / "metrics.json"
        if metrics.exists():
            data = json.loads(metrics.read_text(encoding="utf-8"))
            lines += ["```json", json.dumps(_flat(data), indent=2)[:4000], "```"]
        sub_report = folder / "report.md"
        if sub_report.exists():
            text = sub_report.read_text(encoding="utf-8")
            rel = os.path.relpath(folder, root)
            # Re-anchor the stage report's image links relative to the combined report.
            text = text.replace("](", f"]({rel}/").replace(f"]({rel}/http", "](http")
            lines += [_demote(text)]
        for png in sorted(folder.glob("*.png")):
            if sub_report.exists() and png.name in sub_report.read_text(encoding="utf-8"):
                continue
            lines += [f"![{stage.name}: {png.stem}]({os.path.relpath(png, root)})"]
    path = root / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _flat(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _flat(v) for k, v in data.items() if not isinstance(v, list) or len(v) <= 20}
    return data


def _demote(markdown: str) -> str:
    return "\n".join("#" + line if line.startswith("#") else line for line in markdown.splitlines())


def pipeline_command(argv: list[str]) -> int:
    """Run every stage (SFT, label, ORM + PAV, search, RL) from one config; finished stages are reused."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="pavlit pipeline", description=pipeline_command.__doc__, parser_mode="yaml")
    parser.add_argument("--config", action=ActionConfigFile, help="a pipeline YAML (see configs/tiny/pipeline.yaml)")
    parser.add_function_arguments(pipeline, fail_untyped=True)
    cfg = parser.parse_args(argv)
    init = parser.instantiate_classes(cfg)
    try:
        pipeline(init.run_dir, init.stages, init.shared_args)
    except (RuntimeError, ValueError) as err:
        print(f"pavlit pipeline: error: {err}", file=sys.stderr)
        return 1
    return 0
