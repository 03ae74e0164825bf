"""``pavlit pipeline``: every stage of the method from one config, resumable, with one report at the end.

A pipeline config names its stages in order; each stage is an ordinary pavlit command with its own config (so
every stage can also be run alone), plus the file whose existence means the stage is finished::

    # pavlit-command: pipeline
    run_dir: runs/pipeline
    configs_run_dir: runs/tiny
    stages:
      - name: sft
        command: [fit, --config, configs/tiny/sft.yaml]
        output: ${run_dir}/sft/policy/config.json
      - name: label
        command: [label, --config, configs/tiny/label.yaml, --num_problems, "200"]
        output: ${run_dir}/labels/metrics.json
      - name: rl
        command: [compare, --config, configs/tiny/rl_compare.yaml, --output_dir, "${run_dir}/rl_compare"]
        output: ${run_dir}/rl_compare/results.json

Paths: ``${run_dir}`` in a stage's command, ``output`` or ``report`` is the pipeline's ``run_dir``. The stage
configs above name ``runs/tiny/...`` (where they write and read when run alone); ``configs_run_dir: runs/tiny``
makes each stage run a copy of its ``--config`` files, ``<run_dir>/configs/<stage>/``, with every path under
``runs/tiny`` moved under ``run_dir`` (a ``compare`` stage moves its fit configs' paths too), so one set of shipped
configs serves every run folder and no stage config exists only to repoint paths. The RL stage is ``pavlit
compare`` over the shipped RL configs (:mod:`pavlit.compare`): a pipeline runs pavlit commands only, never a
benchmark script.

A finished stage is skipped on a rerun, so rerunning the command after an interruption resumes (stages that
resume internally, like ``label``, ``search`` and ``fit``, also keep their own finished chunks and checkpoints).
``shared_args`` are appended to every stage of the given command (e.g. ``{fit: [--trainer.accelerator, cpu]}``).
A stage marked ``parallel: true`` runs at the same time as the stage before it (the ORM and PAV fits need the same
labels and not each other); concurrent stages split the CPU cores between them through ``OMP_NUM_THREADS`` and
their output lines are tagged with the stage name.
Stages run as subprocesses of the same Python, so a crash in one is reported with its log and never leaves the
next stage reading half-written outputs. At the end, :mod:`pavlit.pipeline_report` writes ``<run_dir>/report.md``:
a summary of what was and was not shown, then every stage's numbers (SFT pass@k, label statistics, each verifier
beside the constant predictor, the search with its CIs and efficiency ratios, the RL curves) with its plots.

Interruptions: while a stage runs, ``<run_dir>/logs/<name>.running`` exists; it is removed when the stage has
exited successfully. A stage whose marker survived (the pipeline was killed, the machine went down) is run again
on the next pipeline run even when its output file exists — a stage may write its ``output`` before the rest of
its files (a Hugging Face export writes ``config.json`` before the weights), so only a clean exit says it is
complete. On Linux a stage dies with the pipeline (``kill -9`` of the pipeline does not leave it running, racing
the rerun).

Stage names are plain names (letters, digits, ``.``, ``_``, ``-``; no ``/`` or ``..``): they name the stage's files
in ``<run_dir>/logs``. A stage that runs the pipeline's own config (directly, or through another pipeline) is
refused before anything runs: it would recurse without end.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pavlit.jobs.atomic import atomic_write_text
from pavlit.pipeline_report import write_report

#: The configs of the pipelines this process runs inside (``os.pathsep``-separated real paths), inherited by stages.
STACK_ENV = "PAVLIT_PIPELINE_STACK"
#: Written in a stage's command, ``output`` or ``report``, it stands for the pipeline's ``run_dir``.
RUN_DIR_VARIABLE = "${run_dir}"
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class Stage:
    """One step of the pipeline.

    Args:
        name: Short name (used in logs and the report).
        command: The pavlit command line after ``pavlit`` (e.g. ``[fit, --config, configs/tiny/sft.yaml]``);
            ``[python, ...]`` runs this Python (for tests: shipped pipelines run pavlit commands only).
        output: A file that exists once the stage has finished; the stage is skipped when it exists.
        report: Folder holding the stage's ``metrics.json`` / ``results.json`` / ``report.md`` / PNGs for the
            final report (default: the folder of ``output``, or the one above it; see
            :func:`pavlit.pipeline_report.report_folder`).
        parallel: Run at the same time as the stage before it (which must not need this one's output), e.g. the
            ORM and PAV fits. Concurrent stages split the CPU cores between them (``OMP_NUM_THREADS``).
    """

    name: str
    command: list[str]
    output: str
    report: str | None = None
    parallel: bool = False


def pipeline(
    run_dir: str,
    stages: list[Stage],
    shared_args: dict[str, list[str]] | None = None,
    configs_run_dir: str | None = None,
) -> Path:
    """Run ``stages`` in order, skipping finished ones, then write ``<run_dir>/report.md``.

    Args:
        run_dir: Where the pipeline's logs and the combined report go.
        stages: The stages, in order.
        shared_args: Extra arguments appended to every stage whose command starts with the key.
        configs_run_dir: The run folder the stage configs name (``runs/tiny``). When it is not ``run_dir``, each
            stage runs a copy of its ``--config`` files (``<run_dir>/configs/<stage>/``) in which every path under
            it is under ``run_dir`` instead (and a ``compare`` stage rebases its fit configs the same way), so one
            set of shipped configs serves every run folder.

    Returns:
        The path of the combined report.
    """
    if not stages:
        raise ValueError("the pipeline config lists no stages")
    names = [s.name for s in stages]
    for name in names:
        if not _PLAIN_NAME.fullmatch(name) or ".." in name:
            raise ValueError(
                f"stages: name {name!r} must be a plain name (letters, digits, '.', '_', '-'; no '/' or '..'), as it "
                f"names the stage's files in {Path(run_dir) / 'logs'}"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be unique, got {names}")
    for stage in stages:
        if not stage.command:
            raise ValueError(f"stage {stage.name!r}: command is empty; expected e.g. [fit, --config, <file>]")
    stages = resolve_run_dir(stages, run_dir)
    root = Path(run_dir)
    (root / "logs").mkdir(parents=True, exist_ok=True)
    if configs_run_dir is not None and os.path.normpath(configs_run_dir) != os.path.normpath(run_dir):
        stages = [_rebase_stage(stage, {configs_run_dir: run_dir}, root / "configs" / stage.name) for stage in stages]
    shared_args = shared_args or {}
    timings: dict[str, Any] = {}
    for group in _parallel_groups(stages):
        pending = []
        for index, stage in group:
            banner = f"[{index}/{len(stages)}] {stage.name}"
            running = root / "logs" / f"{stage.name}.running"
            if Path(stage.output).exists() and not running.exists():
                print(f"{banner}: done already ({stage.output})", flush=True)
                seconds_file = root / "logs" / f"{stage.name}.seconds"
                ran = seconds_file.read_text().strip() if seconds_file.exists() else ""
                timings[stage.name] = f"reused (ran in {ran} s)" if ran else "reused"
                continue
            if running.exists():
                print(f"{banner}: interrupted last time; running it again (it resumes where it can)", flush=True)
            pending.append((banner, stage))
        threads = None if len(pending) < 2 else max(1, (os.cpu_count() or 1) // len(pending))
        runs = [_StageRun(root, banner, stage, shared_args, threads, len(pending) > 1) for banner, stage in pending]
        for run in runs:
            run.wait()
        failed = [run for run in runs if run.error]
        if failed:
            raise RuntimeError("; ".join(run.error for run in failed))
        for run in runs:
            timings[run.stage.name] = round(run.seconds, 1)
            print(f"{run.banner}: finished in {run.seconds:.0f} s", flush=True)
    report = write_report(root, stages, timings)
    print(f"report: {report}", flush=True)
    return report


def resolve_run_dir(stages: list[Stage], run_dir: str) -> list[Stage]:
    """The stages with ``${run_dir}`` replaced by ``run_dir`` in their command, ``output`` and ``report``.

    Raises:
        ValueError: A ``${...}`` other than ``${run_dir}``, naming the stage.
    """

    def fill(stage: Stage, text: str) -> str:
        filled = text.replace(RUN_DIR_VARIABLE, run_dir)
        if "${" in filled:
            raise ValueError(
                f"stage {stage.name!r}: {text!r}: the only variable a pipeline knows is {RUN_DIR_VARIABLE}"
            )
        return filled

    return [
        replace(
            stage,
            command=[fill(stage, str(arg)) for arg in stage.command],
            output=fill(stage, stage.output),
            report=None if stage.report is None else fill(stage, stage.report),
        )
        for stage in stages
    ]


def rebase_config(source: str, mapping: dict[str, str], target: Path, extra: dict[str, Any] | None = None) -> str:
    """Write a copy of the YAML ``source`` to ``target`` with every string that is a key of ``mapping``, or a path
    under one, moved under its value (``runs/tiny/sft/policy`` → ``runs/pipeline/sft/policy``); ``extra`` keys set
    on top. Returns ``target`` as a string."""
    import yaml

    prefixes = {old.rstrip("/"): new.rstrip("/") for old, new in mapping.items()}

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: walk(item) for key, item in value.items()}
        if isinstance(value, list):
            return [walk(item) for item in value]
        if isinstance(value, str):
            for old, new in prefixes.items():
                if value == old or value.startswith(old + "/"):
                    return new + value[len(old) :]
        return value

    data = walk(yaml.safe_load(Path(source).read_text(encoding="utf-8")))
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a YAML mapping of config keys")
    data.update(extra or {})
    moved = ", ".join(f"{old} -> {new}" for old, new in prefixes.items())
    header = f"# Written by pavlit from {source}, its paths moved ({moved}).\n"
    atomic_write_text(target, header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return str(target)


def _rebase_stage(stage: Stage, mapping: dict[str, str], folder: Path) -> Stage:
    """``stage`` running rebased copies of its ``--config`` files (a nested ``pipeline`` stage is left alone)."""
    if stage.command[0] == "pipeline":
        return stage
    extra = {"rebase": mapping} if stage.command[0] == "compare" else None
    command = list(stage.command)
    for index, arg in enumerate(command):
        if arg == "--config" and index + 1 < len(command):
            source = command[index + 1]
            command[index + 1] = rebase_config(source, mapping, folder / Path(source).name, extra)
        elif arg.startswith("--config="):
            source = arg.split("=", 1)[1]
            command[index] = "--config=" + rebase_config(source, mapping, folder / Path(source).name, extra)
    return replace(stage, command=command)


def _parallel_groups(stages: list[Stage]) -> list[list[tuple[int, Stage]]]:
    """Consecutive stages joined by ``parallel: true`` (with the one before), numbered from 1."""
    groups: list[list[tuple[int, Stage]]] = []
    for index, stage in enumerate(stages, start=1):
        if stage.parallel and groups:
            groups[-1].append((index, stage))
        else:
            groups.append([(index, stage)])
    return groups


class _StageRun:
    """One stage's subprocess: started on construction, its output copied to its log and to the terminal."""

    def __init__(
        self,
        root: Path,
        banner: str,
        stage: Stage,
        shared_args: dict[str, list[str]],
        threads: int | None,
        tag_lines: bool,
    ) -> None:
        self.banner, self.stage, self.error = banner, stage, ""
        self.running = root / "logs" / f"{stage.name}.running"
        self.log_path = root / "logs" / f"{stage.name}.log"
        command = _command_line(stage.command + shared_args.get(stage.command[0], []))
        shown = " ".join(command[1:]) if command[1:2] == ["-m"] else " ".join(command)
        note = f" ({threads} thread{'s' * (threads != 1)}, beside other stages)" if threads else ""
        print(f"{banner}: {shown}{note}", flush=True)
        env = dict(os.environ)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)  # concurrent stages split the cores instead of fighting over them
        atomic_write_text(self.running, f"{os.getpid()}\n")
        self.start = time.perf_counter()
        self.log = self.log_path.open("a", encoding="utf-8")
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=env,
            preexec_fn=functools.partial(die_with_parent, os.getpid()) if sys.platform == "linux" else None,
        )
        prefix = f"[{stage.name}] " if tag_lines else ""
        self.reader = threading.Thread(target=self._copy_output, args=(prefix,), daemon=True)
        self.reader.start()

    def _copy_output(self, prefix: str) -> None:
        # The stage's own progress bar goes to the terminal (stderr); its full output also lands in the log.
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.log.write(line)
            sys.stderr.write(prefix + line)

    def wait(self) -> None:
        returncode = self.process.wait()
        self.reader.join()
        self.log.close()
        self.seconds = time.perf_counter() - self.start
        name = self.stage.name
        if returncode != 0:
            self.error = f"stage {name!r} failed (exit {returncode}); its log: {self.log_path}"
        elif not Path(self.stage.output).exists():
            self.error = f"stage {name!r} finished but did not write {self.stage.output}; its log: {self.log_path}"
        else:
            # How long the stage took, for the reports of later runs that reuse it.
            atomic_write_text(self.log_path.with_suffix(".seconds"), f"{self.seconds:.1f}\n")
            self.running.unlink()


def die_with_parent(parent: int) -> None:
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


def pipeline_command(argv: list[str]) -> int:
    """Run every stage (SFT, label, ORM + PAV, search, RL) from one config; finished stages are reused."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="pavlit pipeline", description=pipeline_command.__doc__, parser_mode="yaml")
    parser.add_argument("--config", action=ActionConfigFile, help="a pipeline YAML (see configs/tiny/pipeline.yaml)")
    parser.add_function_arguments(pipeline, fail_untyped=True)
    cfg = parser.parse_args(argv)
    init = parser.instantiate_classes(cfg)
    configs = [os.path.realpath(str(c)) for c in (cfg.get("config") or []) if c is not None]
    stack = [p for p in os.environ.get(STACK_ENV, "").split(os.pathsep) if p]
    before = os.environ.get(STACK_ENV)
    try:
        check_no_recursion(resolve_run_dir(init.stages, init.run_dir), configs, stack)
        os.environ[STACK_ENV] = os.pathsep.join([*stack, *configs])
        pipeline(init.run_dir, init.stages, init.shared_args, init.configs_run_dir)
    except (RuntimeError, ValueError) as err:
        print(f"pavlit pipeline: error: {err}", file=sys.stderr)
        return 1
    finally:
        if before is None:
            os.environ.pop(STACK_ENV, None)
        else:
            os.environ[STACK_ENV] = before
    return 0


def check_no_recursion(stages: list[Stage], configs: list[str], stack: list[str]) -> None:
    """Refuse a pipeline config already running above this one, and a stage that runs this pipeline's own config.

    Args:
        stages: This pipeline's stages.
        configs: The real paths of this pipeline's config files.
        stack: The real paths of the configs of the pipelines running above this one (:data:`STACK_ENV`).

    Raises:
        ValueError: Naming the stage or config that recurses.
    """
    for config in configs:
        if config in stack:
            raise ValueError(
                f"{config} is already running as a pipeline above this one (a stage of it runs it again); a pipeline "
                "cannot be a stage of itself"
            )
    for stage in stages:
        if not stage.command or stage.command[0] != "pipeline":
            continue
        args = stage.command[1:]
        for index, arg in enumerate(args):
            value = args[index + 1] if arg == "--config" and index + 1 < len(args) else None
            if arg.startswith("--config="):
                value = arg.split("=", 1)[1]
            if value is not None and os.path.realpath(value) in {*configs, *stack}:
                raise ValueError(
                    f"stage {stage.name!r} runs the pipeline config {value} that it is part of; a pipeline cannot be "
                    "a stage of itself (it would recurse without end)"
                )
