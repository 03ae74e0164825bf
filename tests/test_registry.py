import sys
import warnings
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from pavlit import registry
from pavlit.interfaces import INTERFACES, Prover
from pavlit.registry import PluginError, PluginInfo, PluginWarning

PROVER_SOURCE = """
    from pavlit.interfaces import Prover


    class {cls}(Prover):
        def __init__(self, gamma: float = 1.0):
            self.gamma = gamma

        def q_values(self, q_pi, prefixes=None):
            return q_pi * self.gamma
"""


@pytest.fixture(autouse=True)
def _autoload_on(monkeypatch):
    monkeypatch.delenv(registry.AUTOLOAD_ENV, raising=False)
    monkeypatch.setattr(sys, "argv", ["pavlit"])  # LightningCLI warns when args and pytest's sys.argv both exist


def _prover_module(make_module, name, cls="ListedProver"):
    return make_module(name, PROVER_SOURCE.format(cls=cls))


def _plugin(name, target, kind="pavlit.provers", dist="acme-provers", version="1.2"):
    return PluginInfo(kind=kind, name=name, target=target, distribution=dist, version=version)


def test_list_plugins_imports_nothing(make_module):
    module = _prover_module(make_module, "reg_probe_listed")
    plugins = [
        _plugin("zeta", f"{module}:ListedProver"),
        _plugin("alpha", f"{module}:ListedProver", dist="other-dist"),
        _plugin("arith", "pavlit_no_such_module:Task", kind="pavlit.tasks", dist="pavlit"),
    ]
    listed = registry.list_plugins(entry_points=plugins)
    assert [(p.kind, p.name) for p in listed] == [
        ("pavlit.provers", "alpha"),
        ("pavlit.provers", "zeta"),
        ("pavlit.tasks", "arith"),
    ]
    assert module not in sys.modules
    assert [p.name for p in registry.list_plugins("provers", entry_points=plugins)] == ["alpha", "zeta"]
    assert registry.list_plugins("pavlit.search", entry_points=plugins) == []
    assert registry.info("tasks", "arith", entry_points=plugins).builtin
    assert module not in sys.modules


def test_entry_points_outside_pavlit_groups_are_ignored():
    eps = [
        EntryPoint("x", "json:JSONDecoder", "console_scripts"),
        EntryPoint("fast", "mod:FastProver", "pavlit.provers"),
    ]
    (only,) = registry.list_plugins(entry_points=eps)
    # An entry point without a distribution (built by hand) still lists, under an explicit placeholder.
    assert only == PluginInfo("pavlit.provers", "fast", "mod:FastProver", registry.UNKNOWN_DISTRIBUTION, "")


def test_load_imports_lazily_and_returns_the_class(make_module):
    module = _prover_module(make_module, "reg_probe_lazy", cls="LazyProver")
    plugins = [_plugin("lazy", f"{module}:LazyProver")]
    registry.list_plugins(entry_points=plugins)
    assert module not in sys.modules
    cls = registry.load("pavlit.provers", "lazy", entry_points=plugins)
    assert module in sys.modules
    assert cls is sys.modules[module].LazyProver and issubclass(cls, Prover)


def test_get_instantiates_with_init_args(make_module, monkeypatch):
    module = _prover_module(make_module, "reg_probe_get", cls="HalfProver")
    monkeypatch.setattr(registry, "discover", lambda: [_plugin("half", f"{module}:HalfProver")])
    prover = registry.get("provers", "half", gamma=0.5)
    assert prover.gamma == 0.5
    import torch

    assert torch.equal(prover.q_values(torch.tensor([0.5, 1.0])), torch.tensor([0.25, 0.5]))


def test_unknown_name_and_unknown_kind():
    plugins = [_plugin("b", "m:B"), _plugin("a", "m:A")]
    with pytest.raises(PluginError, match=r"no pavlit.provers plugin named 'c' is installed \(available: a, b\)"):
        registry.load("provers", "c", entry_points=plugins)
    with pytest.raises(ValueError, match="unknown plugin kind 'verifiers'"):
        registry.list_plugins("verifiers", entry_points=plugins)


def test_interface_check_names_plugin_target_distribution_and_interface(make_module):
    module = make_module(
        "reg_probe_wrong",
        """
        from pavlit.interfaces import Task, Prover


        class NotAProver(Task):
            def problems(self, split):
                return []

            def score(self, problem, response):
                return 0.0


        class HalfDone(Prover):
            pass


        def factory():
            return None
        """,
    )
    plugins = [
        _plugin("task_as_prover", f"{module}:NotAProver", dist="wrong-dist", version="0.9"),
        _plugin("abstract", f"{module}:HalfDone", dist="wrong-dist", version="0.9"),
        _plugin("function", f"{module}:factory", dist="wrong-dist", version="0.9"),
    ]
    with pytest.raises(PluginError) as excinfo:
        registry.load("provers", "task_as_prover", entry_points=plugins)
    message = str(excinfo.value)
    for part in ("'task_as_prover'", f"{module}:NotAProver", "'wrong-dist 0.9'", "pavlit.interfaces.Prover"):
        assert part in message
    with pytest.raises(PluginError, match="does not implement the abstract method.* q_values"):
        registry.load("provers", "abstract", entry_points=plugins)
    with pytest.raises(PluginError, match="not a class; expected a subclass of pavlit.interfaces.Prover"):
        registry.load("provers", "function", entry_points=plugins)


def test_load_all_turns_broken_plugins_into_warnings_naming_their_distribution(make_module):
    good = _prover_module(make_module, "reg_probe_good", cls="GoodProver")
    wrong = make_module("reg_probe_not_prover", "class Plain:\n    pass\n")
    raising = make_module("reg_probe_raising", "raise RuntimeError('plugin exploded at import')\n")
    plugins = [
        _plugin("good", f"{good}:GoodProver", dist="good-dist"),
        _plugin("plain", f"{wrong}:Plain", dist="plain-dist", version="2.0"),
        _plugin("boom", f"{raising}:Anything", dist="boom-dist", version="3.0"),
        _plugin("missing", "reg_probe_not_installed:Thing", dist="ghost-dist", version="4.0"),
    ]
    with pytest.warns(PluginWarning) as record:
        loaded = registry.load_all(entry_points=plugins)
    assert loaded == {group: {} for group in INTERFACES} | {"pavlit.provers": {"good": sys.modules[good].GoodProver}}
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 3
    assert "'boom-dist 3.0'" in messages[0] and "RuntimeError: plugin exploded at import" in messages[0]
    assert "'ghost-dist 4.0'" in messages[1] and "ModuleNotFoundError" in messages[1]
    assert "'plain-dist 2.0'" in messages[2] and "not a subclass of pavlit.interfaces.Prover" in messages[2]


@pytest.mark.parametrize(("index", "code"), enumerate(["sys.exit(3)", "raise SystemExit", "sys.exit('bye')"]))
def test_a_plugin_calling_sys_exit_at_import_is_a_warning_not_the_end(make_module, index, code):
    exiting = make_module(f"reg_probe_exit_{index}", f"import sys\n{code}\n")
    good = _prover_module(make_module, f"reg_probe_good_beside_exit_{index}", cls="GoodProver")
    plugins = [
        _plugin("quits", f"{exiting}:Anything", dist="quitter-dist", version="0.9"),
        _plugin("good", f"{good}:GoodProver", dist="good-dist"),
    ]
    with pytest.warns(PluginWarning) as record:
        loaded = registry.load_all(entry_points=plugins)
    assert list(loaded["pavlit.provers"]) == ["good"]
    [message] = [str(w.message) for w in record]
    assert "'quitter-dist 0.9'" in message and "failed to import: SystemExit" in message
    with pytest.raises(PluginError, match="quitter-dist 0.9.*SystemExit"):
        registry.load("provers", "quits", entry_points=plugins)


def test_a_plugin_calling_sys_exit_does_not_end_a_command(make_module, monkeypatch, tmp_path, capsys):
    from pavlit.cli import main

    exiting = make_module("reg_probe_exit_cli", "import sys\nsys.exit(3)\n")
    monkeypatch.setattr(registry, "discover", lambda: [_plugin("quits", f"{exiting}:X", dist="quitter-dist")])
    config = tmp_path / "label.yaml"
    config.write_text("task: {class_path: pavlit.tasks.arithmetic.ArithmeticTask}\noutput_dir: out\n")
    # The command goes on to do what it was asked (--print_config prints the config and exits 0), with a warning.
    with pytest.warns(PluginWarning, match="quitter-dist"), pytest.raises(SystemExit) as done:
        main(["label", "--config", str(config), "--print_config"])
    assert done.value.code in (0, None) and "ArithmeticTask" in capsys.readouterr().out


def test_duplicate_names_are_an_error_naming_both_distributions():
    plugins = [
        _plugin("beam", "acme.search:Beam", kind="pavlit.search", dist="acme-search", version="1.0"),
        _plugin("beam", "pavlit.search.beam:BeamSearch", kind="pavlit.search", dist="pavlit", version="0.1.0"),
    ]
    expected = r"pavlit.search name 'beam' is registered more than once: .*'acme-search 1.0'.*'pavlit 0.1.0'"
    with pytest.raises(PluginError, match=expected):
        registry.list_plugins(entry_points=plugins)
    with pytest.raises(PluginError, match=expected):
        registry.load_all(entry_points=plugins)
    with pytest.raises(PluginError, match=expected):
        registry.load("search", "beam", entry_points=plugins)


def test_same_declaration_seen_twice_is_one_plugin():
    # An editable install can make one distribution visible twice, possibly spelled differently.
    plugins = [
        _plugin("demo", "demo_pkg:Demo", dist="demo-pkg"),
        _plugin("demo", "demo_pkg:Demo", dist="demo_pkg"),
        _plugin("demo", "demo_pkg:Demo", dist="demo-pkg"),
    ]
    assert registry.list_plugins(entry_points=plugins) == [plugins[0]]
    stale = [*plugins, _plugin("demo", "demo_pkg.old:Demo", dist="demo-pkg")]
    with pytest.raises(PluginError, match="demo_pkg:Demo by 'demo-pkg 1.2'; demo_pkg.old:Demo by 'demo-pkg 1.2'"):
        registry.list_plugins(entry_points=stale)


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_off_switch_keeps_autoload_to_builtins(make_module, monkeypatch, value):
    builtin = _prover_module(make_module, f"reg_probe_builtin_{value}", cls="BuiltinProver")
    third = _prover_module(make_module, f"reg_probe_third_{value}", cls="ThirdProver")
    plugins = [
        _plugin("third", f"{third}:ThirdProver", dist="acme"),
        _plugin("builtin", f"{builtin}:BuiltinProver", dist="pavlit", version="0.1.0"),
        # With autoloading off, a clash involving only third-party plugins must not block the built-ins.
        _plugin("clash", "acme_a:Clash", dist="acme-a"),
        _plugin("clash", "acme_b:Clash", dist="acme-b"),
    ]
    monkeypatch.setenv(registry.AUTOLOAD_ENV, value)
    assert not registry.autoload_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = registry.load_all(entry_points=plugins)
    assert loaded["pavlit.provers"] == {"builtin": sys.modules[builtin].BuiltinProver}
    assert third not in sys.modules
    # Naming a plugin is asking for it, as with pytest's `-p` under PYTEST_DISABLE_PLUGIN_AUTOLOAD.
    assert registry.load("provers", "third", entry_points=plugins).__name__ == "ThirdProver"


@pytest.mark.parametrize("value", ["", "0", "false"])
def test_off_switch_unset_values_keep_autoload(monkeypatch, value):
    monkeypatch.setenv(registry.AUTOLOAD_ENV, value)
    assert registry.autoload_enabled()


def test_short_class_name_in_lightning_yaml_resolves_a_registered_plugin(
    make_module, fixtures_on_path, monkeypatch, tmp_path
):
    from pavlit.cli import PavlitCLI

    module = _prover_module(make_module, "reg_probe_shortname", cls="RegistryShortNameProver")
    monkeypatch.setattr(registry, "discover", lambda: [_plugin("short", f"{module}:RegistryShortNameProver")])
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "holder.yaml"
    config.write_text(
        "model:\n"
        "  class_path: pavlit_toy_modules.ProverHolder\n"
        "  init_args:\n"
        "    prover:\n"
        "      class_path: RegistryShortNameProver\n"
        "      init_args:\n"
        "        gamma: 0.25\n"
    )
    assert module not in sys.modules
    cli = PavlitCLI(args=["--config", str(config)], run=False)
    assert type(cli.model.prover) is sys.modules[module].RegistryShortNameProver
    assert cli.model.prover.gamma == 0.25


def test_off_switch_reaches_the_cli(make_module, fixtures_on_path, monkeypatch, tmp_path, capsys):
    from pavlit.cli import PavlitCLI

    module = _prover_module(make_module, "reg_probe_switched_off", cls="SwitchedOffProver")
    monkeypatch.setattr(registry, "discover", lambda: [_plugin("off", f"{module}:SwitchedOffProver")])
    monkeypatch.setenv(registry.AUTOLOAD_ENV, "1")
    monkeypatch.chdir(tmp_path)
    args = ["--model=pavlit_toy_modules.ProverHolder", "--model.prover=SwitchedOffProver"]
    with pytest.raises(SystemExit) as excinfo:
        PavlitCLI(args=args, run=False)
    assert excinfo.value.code != 0
    assert "SwitchedOffProver" in capsys.readouterr().err
    assert module not in sys.modules


def test_real_third_party_distribution_is_discovered(third_party_site, monkeypatch):
    monkeypatch.syspath_prepend(str(third_party_site))
    plugins = registry.list_plugins("provers")
    assert PluginInfo("pavlit.provers", "demo", "pavlit_demo_prover:DemoProver", "pavlit-demo-prover", "0.3.1") in (
        plugins
    )
    assert "pavlit_demo_prover" not in sys.modules
    cls = registry.load("provers", "demo")
    assert cls.__module__ == "pavlit_demo_prover" and issubclass(cls, Prover)
    assert "demo" in registry.load_all("provers")["pavlit.provers"]


def test_builtins_are_declared_in_pavlits_own_pyproject():
    tomllib = pytest.importorskip("tomllib")
    try:
        registry.info("tasks", "arithmetic")
    except PluginError:
        pytest.skip("pavlit is not installed (pip install -e .), so its entry points are not visible")
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    declared = {
        (group, name, target)
        for group, entries in pyproject["project"]["entry-points"].items()
        if group in INTERFACES
        for name, target in entries.items()
    }
    listed = {(p.kind, p.name, p.target) for p in registry.list_plugins() if p.builtin}
    assert listed == declared, "installed entry points are stale: run `pip install -e . --no-deps` again"


def test_public_api_resolves_lazily_without_importing_torch_up_front():
    import subprocess
    import sys

    code = (
        "import sys, pavlit; assert 'torch' not in sys.modules; "
        "[getattr(pavlit, name) for name in pavlit.__all__]; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
