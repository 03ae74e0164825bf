"""Every YAML under configs/ parses through the real CLI (a renamed argument fails here, not for a user)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
COMMAND_HEADER = "# pavlit-command:"


def lightning_configs() -> list[Path]:
    """Configs for ``pavlit fit/validate/...``; those headed ``# pavlit-command: <label|search|pipeline>`` belong to
    other commands and are parsed by ``test_command_configs_parse_through_their_command``."""
    return [path for path in CONFIGS if not path.read_text().startswith(COMMAND_HEADER)]


@pytest.fixture
def parse_only(monkeypatch):
    from pavlit.cli import PavlitCLI

    monkeypatch.setattr(sys, "argv", ["pavlit"])

    class ParseOnly(PavlitCLI):
        """Parses and type-checks the whole config (class paths, argument names, values) without building it:
        building would load checkpoints that only exist after earlier pipeline stages."""

        def before_instantiate_classes(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

    return ParseOnly


def test_there_are_configs_to_check():
    names = {path.relative_to(REPO / "configs").as_posix() for path in lightning_configs()}
    assert {"tiny/pav.yaml", "tiny/orm.yaml", "pav_gemma3_270m.yaml", "pav_gemma2b.yaml"} <= names


def config_args(path: Path) -> list[str]:
    """``--config`` arguments that load ``path``: an overlay documents its base in its usage line
    (``pavlit fit --config base.yaml --config overlay.yaml``) and is parsed on top of it."""
    relative = path.relative_to(REPO).as_posix()
    for line in path.read_text().splitlines():
        found = re.search(r"pavlit fit --config (\S+) --config " + re.escape(relative) + r"\b", line)
        if found:
            return ["--config", str(REPO / found.group(1)), "--config", str(path)]
    return ["--config", str(path)]


@pytest.mark.parametrize("path", lightning_configs(), ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_config_parses_through_the_cli(parse_only, path):
    cli = parse_only(args=config_args(path), run=False)
    assert cli.config.model.class_path  # data may be absent: some modules make their own (didactic RL)


def test_gemma2b_recipe_is_the_papers_and_names_the_path_to_set(parse_only):
    cli = parse_only(args=["--config", str(REPO / "configs" / "pav_gemma2b.yaml")], run=False)
    config = cli.config
    model, data, trainer = config.model.init_args, config.data.init_args, config.trainer
    assert model.lr == 5e-7 and model.warmup_steps == 2000 and trainer.max_steps == 20000
    assert data.batch_size * trainer.devices * trainer.num_nodes == 32
    assert trainer.strategy == "fsdp" and trainer.precision.startswith("bf16")

    from pavlit.modules.pav import PAVModule
    from pavlit.policy.sources import Pretrained

    source = Pretrained(**vars(model.source.init_args))
    with pytest.raises(FileNotFoundError, match=r"set model\.init_args\.source\.init_args\.path to a local"):
        PAVModule(source=source)


COMMAND_CONFIGS = [path for path in CONFIGS if path.read_text().startswith(COMMAND_HEADER)]


@pytest.mark.parametrize("path", COMMAND_CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_command_configs_parse_through_their_command(path, capsys):
    """`# pavlit-command: X` configs parse with `pavlit X --print_config` (a renamed argument fails here)."""
    from pavlit.cli import main

    command = path.read_text().splitlines()[0].removeprefix(COMMAND_HEADER).strip()
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    assert capsys.readouterr().out.strip()


PIPELINES = [path for path in COMMAND_CONFIGS if "pipeline" in path.read_text().splitlines()[0]]


def pipeline_stages() -> list[tuple[str, list[str]]]:
    import yaml

    stages = []
    for path in PIPELINES:
        for stage in yaml.safe_load(path.read_text())["stages"]:
            stages.append((f"{path.relative_to(REPO / 'configs')}:{stage['name']}", [str(a) for a in stage["command"]]))
    return stages


@pytest.mark.parametrize(("name", "command"), pipeline_stages(), ids=[name for name, _ in pipeline_stages()])
def test_every_pipeline_stage_parses_with_its_overrides(name, command, parse_only, capsys):
    """A stage is its command line: the config plus overrides must parse, or the pipeline fails halfway through."""
    from pavlit.cli import main

    if command[0] == "python":
        script = REPO / command[1]
        assert script.is_file(), name
        import runpy

        namespace = runpy.run_path(str(script), run_name="not_main")
        namespace["parse_args"](command[2:])
        return
    if command[0] == "fit":
        cli = parse_only(args=command[1:], run=False)
        assert cli.config.model.class_path, name
        return
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err


@pytest.mark.parametrize("name", ["tiny_rl.yaml", "didactic_rl.yaml"])
def test_an_older_releases_config_converts_with_the_readmes_one_line(parse_only, name, tmp_path):
    """tests/fixtures/configs_v1 holds configs as shipped before the RL modules were renamed; the README's sed line
    turns each into one that parses and names the renamed classes."""
    import shutil
    import subprocess

    line = re.search(r"`(sed -i '[^`]+' my_rl\.yaml)`", (REPO / "README.md").read_text())
    assert line, "README.md should document the one-line config conversion"
    config = tmp_path / "my_rl.yaml"
    shutil.copy(REPO / "tests" / "fixtures" / "configs_v1" / name, config)
    subprocess.run(["bash", "-c", line.group(1)], cwd=tmp_path, check=True)
    text = config.read_text()
    assert "pavlit.rl." not in text and "modules.rl." not in text and "didactic.rl." not in text
    cli = parse_only(args=["--config", str(config)], run=False)
    assert cli.config.model.class_path.endswith(("policy_rl.PolicyRLModule", "training.DidacticRLModule"))
