import dataclasses
import json
import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from pavlit import __version__, registry
from pavlit._optional import require
from pavlit.cli import COMMANDS, RUN_DIR_ENV, default_run_dir, main
from pavlit.registry import PluginInfo

REPO = Path(__file__).parents[1]

PLUGINS = [
    PluginInfo("pavlit.tasks", "arithmetic", "pavlit.tasks.arithmetic:ArithmeticTask", "pavlit", "0.1.0"),
    PluginInfo("pavlit.provers", "tempered", "cli_probe_never_imported:TemperedProver", "acme-provers", "2.0"),
]

TOY_CONFIG = """\
model:
  class_path: pavlit_toy_modules.ToyRegression
  init_args:
    width: 2
data:
  class_path: pavlit_toy_modules.ToyData
  init_args:
    width: 2
trainer:
  max_epochs: 1
  limit_train_batches: 1
  limit_val_batches: 0
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
"""


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    # LightningCLI warns when given args while sys.argv holds pytest's own arguments.
    monkeypatch.setattr(sys, "argv", ["pavlit"])


@pytest.fixture
def no_plugins(monkeypatch):
    """Lightning runs with an empty registry, so they do not depend on which built-ins exist yet."""
    monkeypatch.setattr(registry, "discover", lambda: [])
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)


@pytest.fixture
def toy_run(no_plugins, fixtures_on_path, tmp_path, monkeypatch):
    """A working directory holding the toy ``config.yaml`` (the input a careless run could overwrite)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text(TOY_CONFIG)
    return tmp_path


# --- top level -----------------------------------------------------------------------------------------------


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    listed = re.findall(r"^  (\w+)  ", out.split("commands:")[1].split("options:")[0], flags=re.M)
    assert listed == list(COMMANDS)
    assert {"fit", "validate", "test", "predict", "label", "search", "plugins"} <= set(listed)


def test_version_unknown_command_and_no_command(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"pavlit {__version__}\n"
    assert main(["fitt"]) == 2
    assert "unknown command 'fitt' (did you mean 'fit'?)" in capsys.readouterr().err
    assert main([]) == 2
    assert "usage: pavlit <command>" in capsys.readouterr().err


# --- pavlit plugins ------------------------------------------------------------------------------------------


def test_plugins_table_and_json(monkeypatch, capsys):
    monkeypatch.setattr(registry, "discover", lambda: list(PLUGINS))
    monkeypatch.delenv(registry.AUTOLOAD_ENV, raising=False)
    assert main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split() for line in lines] == [
        ["KIND", "NAME", "TARGET", "DISTRIBUTION"],
        ["pavlit.provers", "tempered", "cli_probe_never_imported:TemperedProver", "acme-provers", "2.0"],
        ["pavlit.tasks", "arithmetic", "pavlit.tasks.arithmetic:ArithmeticTask", "pavlit", "0.1.0"],
    ]
    assert lines[1].index("tempered") == lines[2].index("arithmetic") == lines[0].index("NAME")

    assert main(["plugins", "--json", "--kind", "provers"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {
            "kind": "pavlit.provers",
            "name": "tempered",
            "target": "cli_probe_never_imported:TemperedProver",
            "distribution": "acme-provers",
            "version": "2.0",
            "builtin": False,
        }
    ]
    assert "cli_probe_never_imported" not in sys.modules


def test_plugins_reports_duplicates_and_the_off_switch(monkeypatch, capsys):
    monkeypatch.setattr(
        registry, "discover", lambda: [*PLUGINS, dataclasses.replace(PLUGINS[1], distribution="other-provers")]
    )
    assert main(["plugins"]) == 1
    err = capsys.readouterr().err
    assert "'tempered' is registered more than once" in err and "'acme-provers 2.0'" in err
    assert "'other-provers 2.0'" in err

    monkeypatch.setattr(registry, "discover", lambda: list(PLUGINS))
    monkeypatch.setenv(registry.AUTOLOAD_ENV, "1")
    assert main(["plugins"]) == 0
    assert f"{registry.AUTOLOAD_ENV} is set" in capsys.readouterr().err


def test_python_m_pavlit_plugins_lists_a_real_third_party_package_without_importing_it(third_party_site):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(third_party_site), str(REPO)])}
    env.pop(registry.AUTOLOAD_ENV, None)
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "pavlit", "plugins"],
        capture_output=True,
        text=True,
        env=env,
        cwd=third_party_site,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines()]
    assert ["pavlit.provers", "demo", "pavlit_demo_prover:DemoProver", "pavlit-demo-prover", "0.3.1"] in rows
    imported = set(re.findall(r"^import time:.*\|\s*([\w.]+)$", done.stderr, flags=re.M))
    assert "pavlit.registry" in imported
    assert "pavlit_demo_prover" not in imported
    assert not {name for name in imported if name.split(".")[0] in ("lightning", "pavlit_demo_prover")}


# --- Lightning subcommands -----------------------------------------------------------------------------------


def test_fit_fast_dev_run(toy_run):
    assert main(["fit", "--config", "config.yaml", "--trainer.fast_dev_run=true"]) == 0
    assert (toy_run / "config.yaml").read_text() == TOY_CONFIG


def test_fit_saves_resolved_config_in_its_own_run_folder_not_over_the_input(toy_run):
    before = (toy_run / "config.yaml").stat().st_mtime_ns
    assert main(["fit", "--config", "config.yaml", "--model.init_args.lr=0.5"]) == 0
    assert main(["fit", "--config", "config.yaml"]) == 0
    assert (toy_run / "config.yaml").read_text() == TOY_CONFIG
    assert (toy_run / "config.yaml").stat().st_mtime_ns == before
    saved = sorted(toy_run.glob("runs/fit/*/config.yaml"))
    assert len(saved) == 2, "each run gets its own folder"
    first = saved[0].read_text()
    assert "lr: 0.5" in first and "class_path: pavlit_toy_modules.ToyRegression" in first
    assert f"default_root_dir: {saved[0].parent.relative_to(toy_run)}" in first
    assert RUN_DIR_ENV not in os.environ


def test_root_dir_pointed_at_the_inputs_folder_keeps_the_input(toy_run):
    with pytest.warns(UserWarning, match="is an input config of this run"):
        assert main(["fit", "--config", "config.yaml", "--trainer.default_root_dir", "."]) == 0
    assert (toy_run / "config.yaml").read_text() == TOY_CONFIG
    assert "class_path: pavlit_toy_modules.ToyData" in (toy_run / "config.resolved.yaml").read_text()
    assert not (toy_run / "runs").exists()


def test_typo_in_config_is_a_clear_error_not_a_traceback(toy_run, capsys):
    (toy_run / "typo.yaml").write_text(TOY_CONFIG.replace("    width: 2\ndata", "    widht: 2\ndata"))
    with pytest.raises(SystemExit) as excinfo:
        main(["fit", "--config", "typo.yaml"])
    assert excinfo.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "widht" in err and "Traceback" not in err


def test_fit_help_shows_docstrings(no_plugins, fixtures_on_path, capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["fit", "--model.help", "pavlit_toy_modules.ToyRegression"])
    assert excinfo.value.code == 0
    assert "Number of input features of the linear layer" in capsys.readouterr().out


def test_default_run_dir(tmp_path, monkeypatch):
    class FrozenClock:
        @staticmethod
        def now():
            return datetime(2024, 5, 6, 7, 8, 9)

    monkeypatch.setattr("pavlit.cli.resume.datetime", FrozenClock)  # default_run_dir lives there
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    names = []
    for _ in range(3):
        run_dir = Path(default_run_dir("fit", root=tmp_path))
        run_dir.mkdir(parents=True)
        names.append(run_dir.relative_to(tmp_path).as_posix())
    assert names == ["fit/2024-05-06_07-08-09", "fit/2024-05-06_07-08-09_1", "fit/2024-05-06_07-08-09_2"]
    monkeypatch.setenv(RUN_DIR_ENV, "elsewhere/run7")
    assert default_run_dir("fit", root=tmp_path) == "elsewhere/run7"


# --- optional imports ----------------------------------------------------------------------------------------


def test_require_returns_the_module():
    assert require("json", extra="quant") is json


@pytest.mark.parametrize("module", ["pavlit_probe_absent_pkg", "pavlit_probe_absent_pkg.sub"])
def test_require_missing_names_the_extra(module):
    with pytest.raises(ImportError, match=re.escape("pip install 'pavlit[quant]'")) as excinfo:
        require(module, extra="quant")
    assert excinfo.value.name == module


@pytest.mark.parametrize(("index", "code"), enumerate(["raise RuntimeError('no CUDA runtime')", "raise SystemExit(3)"]))
def test_require_reports_any_import_failure_as_an_import_error(make_module, index, code):
    failing = make_module(f"cli_probe_failing_import_{index}", f"{code}\n")
    with pytest.raises(ImportError, match=r"installed but failed to import: (RuntimeError: no CUDA|SystemExit: 3)"):
        require(failing, extra="quant")


def test_require_broken_install_is_not_reported_as_missing(make_module):
    broken = make_module("cli_probe_broken_dep", "import cli_probe_dependency_that_is_gone\n")
    with pytest.raises(ImportError, match="installed but failed to import") as excinfo:
        require(broken, extra="gemma")
    assert "pip install" not in str(excinfo.value)
    assert isinstance(excinfo.value.__cause__, ModuleNotFoundError)


# --- config files are checked before any command reads them (issue 19) -------------------------------------------


@pytest.mark.parametrize("command", ["fit", "label", "search", "pipeline"])
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"model: [unclosed\n  width: 2\n", r":2:8: YAML syntax error in the config file: expected ',' or ']'"),
        (b"", ": the config file is empty"),
        (b"# only a comment\n", ": the config file is empty"),
        (b"output_dir: caf\xe9\n", r":1: the config file is not UTF-8 text \(byte 0xe9\)"),
        (b"- a list\n- of things\n", r": expected a mapping of options .* got a list"),
    ],
    ids=["yaml-syntax", "empty", "only-comments", "latin-1", "a-list"],
)
def test_a_broken_config_file_is_one_line_naming_it(tmp_path, capsys, command, content, expected):
    config = tmp_path / "broken.yaml"
    config.write_bytes(content)
    assert main([command, "--config", str(config)]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[0].startswith(f"pavlit {command}: error: "), lines
    assert re.search(re.escape(str(config)) + expected, lines[0]), lines[0]


def test_a_missing_config_file_names_it(tmp_path, capsys):
    assert main(["label", "--config", str(tmp_path / "nowhere.yaml")]) == 1
    assert "--config: no such config file" in capsys.readouterr().err
