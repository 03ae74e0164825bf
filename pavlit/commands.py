"""Plumbing shared by the non-Lightning commands (``pavlit label``, ``pavlit search``): a jsonargparse parser
over a job function's signature, and the resolved config saved into the job's output folder."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pavlit.jobs.atomic import atomic_write_text
from pavlit.jobs.lock import check_unlocked


def parse_job(prog: str, job: Callable[..., Any], argv: list[str], example: str) -> dict[str, Any]:
    """Parse ``--config`` YAML(s) and flags against ``job``'s signature, build its objects, save the config.

    Registered plugins are imported first so that configs can name them by short class name. The resolved
    config is written to ``<output_dir>/config.yaml`` by the first process of the job only, and never over one
    of the input configs (``config.resolved.yaml`` then).

    Args:
        prog: The command's name in messages (``"pavlit label"``).
        job: The job function; each parameter is a config key.
        argv: The command-line arguments.
        example: A config to point at in ``--help``.

    Returns:
        The keyword arguments to call ``job`` with.
    """
    from jsonargparse import ActionConfigFile, ArgumentParser

    from pavlit import registry

    registry.load_all()
    parser = ArgumentParser(prog=prog, description=(job.__doc__ or "").split("\n")[0], parser_mode="yaml")
    parser.add_argument("--config", action=ActionConfigFile, help=f"a YAML config (see {example})")
    parser.add_function_arguments(job, fail_untyped=True)
    cfg = parser.parse_args(argv)
    init = parser.instantiate_classes(cfg)
    kwargs = {k: v for k, v in vars(init).items() if k != "config"}
    out = Path(kwargs["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    inputs = {Path(str(c)).resolve() for c in (cfg.get("config") or []) if c is not None}
    config_path = out / "config.yaml"
    if config_path.resolve() in inputs:
        config_path = out / "config.resolved.yaml"
    check_unlocked(out)  # a job writing into `out` keeps its config.yaml (the job itself then refuses to start)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0:
        atomic_write_text(config_path, parser.dump(cfg, skip_none=False, skip_check=True))
    return kwargs
