"""`pavlit compare`: fit configs over seeds, each run a `pavlit fit` in its own folder, kept once finished."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from pavlit import compare as compare_module
from pavlit.cli import main
from pavlit.compare import CompareMethod, compare, sample_efficiency

REPO = Path(__file__).parents[1]
ORM_CONFIG = str(REPO / "configs" / "tiny" / "rl_orm.yaml")

# A fake fit: accuracy `slope * step / 10`, the slope read from the method's own argument; seed s adds s / 100.
CURVE_ARG = "--model.init_args.lr"


def _value(command: list[str], key: str) -> str:
    return command[len(command) - 1 - command[::-1].index(key) + 1]


class FakeFits:
    """Stands in for the `pavlit` subprocesses: writes what fit / validate write, records the command lines."""

    def __init__(self) -> None:
        self.commands: list[list[str]] = []

    def __call__(self, command: list[str], log: Path) -> None:
        self.commands.append(command)
        root = Path(_value(command, "--trainer.default_root_dir"))
        root.mkdir(parents=True, exist_ok=True)
        seed = int(_value(command, "--seed_everything"))
        slope = float(_value(command, CURVE_ARG))
        if command[0] == "validate":
            (root / "lightning_logs" / "version_0").mkdir(parents=True)
            csv = "val/accuracy,val/pass@2,step\n" + f"{seed / 100},0.0,0\n"
            (root / "lightning_logs" / "version_0" / "metrics.csv").write_text(csv)
            return
        history = [{"step": s, "split": "val", "accuracy": slope * s / 10 + seed / 100} for s in (2, 4, 6)]
        (root / "metrics.json").write_text(json.dumps({"history": history}))


@pytest.fixture
def fake_fits(monkeypatch):
    fits = FakeFits()
    monkeypatch.setattr(compare_module, "_run", fits)
    return fits


def _methods() -> list[CompareMethod]:
    return [
        CompareMethod("fast", ORM_CONFIG, "Fast", [CURVE_ARG, "1.0"]),
        CompareMethod("slow", ORM_CONFIG, "Slow", [CURVE_ARG, "0.5"]),
    ]


def test_runs_every_method_per_seed_and_compares_their_curves(tmp_path, fake_fits):
    results = compare(
        str(tmp_path), _methods(), seeds=[0, 1], args=["--trainer.max_steps", 6], baseline="slow", target="fast"
    )
    fits = [c for c in fake_fits.commands if c[0] == "fit"]
    assert len(fits) == 4 and len(fake_fits.commands) == 8  # a validate (iteration 0) before every fit
    first = fits[0]
    assert first[:3] == ["fit", "--config", ORM_CONFIG]
    assert first[first.index("--trainer.max_steps") + 1] == "6"  # YAML numbers are passed on as text
    for key in ("--seed_everything", "--model.init_args.seed", "--data.init_args.seed"):
        assert _value(first, key) == "0"
    assert _value(first, "--trainer.default_root_dir") == str(tmp_path / "runs" / "fast-0")
    fast, slow = results["curves"]["fast"], results["curves"]["slow"]
    assert slow["mean"][-1] == pytest.approx(0.305)
    assert fast["iterations"] == [0, 2, 4, 6]
    assert fast["per_seed"]["1"] == pytest.approx([0.01, 0.21, 0.41, 0.61])  # iteration 0 from the validate
    assert fast["mean"] == pytest.approx([0.005, 0.205, 0.405, 0.605])
    assert fast["min"][-1] == pytest.approx(0.6) and fast["max"][-1] == pytest.approx(0.61)
    assert results["final_gap"] == pytest.approx(0.3)
    # Slow reaches its final 0.305 at iteration 6; fast passes it at 4: 6 / 4.
    assert results["sample_efficiency"]["ratio"] == pytest.approx(1.5)
    assert results["per_seed_efficiency"]["0"]["ratio"] == pytest.approx(1.5)
    report = (tmp_path / "report.md").read_text()
    assert "**1.50×**" in report and "| 6 | 0.605 [0.600–0.610] | 0.305 [0.300–0.310] |" in report
    assert (tmp_path / "accuracy_vs_iterations.png").stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["seeds"] == [0, 1]


def test_finished_runs_are_kept_and_a_changed_command_is_refused(tmp_path, fake_fits):
    compare(str(tmp_path), _methods(), seeds=[0], initial_eval=False)
    assert len(fake_fits.commands) == 2
    compare(str(tmp_path), _methods(), seeds=[0, 1], initial_eval=False)
    assert len(fake_fits.commands) == 4  # seed 0 reused, seed 1 run
    # An interrupted run (record written, never finished) is run again into its own folder (the fit resumes).
    record = tmp_path / "runs" / "slow-1" / "compare.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "finished": False}))
    compare(str(tmp_path), _methods(), seeds=[0, 1], initial_eval=False)
    assert len(fake_fits.commands) == 5 and "slow-1" in fake_fits.commands[-1][-1]
    with pytest.raises(ValueError, match=r"runs/fast-0 was run as .*use another output_dir"):
        compare(str(tmp_path), _methods(), seeds=[0], args=["--trainer.max_steps", "9"], initial_eval=False)


def test_only_splits_the_methods_over_processes(tmp_path, fake_fits):
    assert compare(str(tmp_path), _methods(), seeds=[0], only=["fast"], initial_eval=False) == {}
    assert not (tmp_path / "report.md").exists()  # no seed finished by every method yet
    results = compare(str(tmp_path), _methods(), seeds=[0], only=["slow"], initial_eval=False)
    assert set(results["curves"]) == {"fast", "slow"} and len(fake_fits.commands) == 2


def test_method_args_come_after_the_shared_args(tmp_path, fake_fits):
    compare(
        str(tmp_path),
        _methods(),
        seeds=[3],
        args=[CURVE_ARG, "0.1"],
        method_args={"slow": [CURVE_ARG, "0.2"]},
        initial_eval=False,
    )
    by_root = {Path(_value(c, "--trainer.default_root_dir")).name: c for c in fake_fits.commands}
    assert _value(by_root["fast-3"], CURVE_ARG) == "0.1" and _value(by_root["slow-3"], CURVE_ARG) == "0.2"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"baseline": "nope", "target": "fast"}, r"baseline: 'nope' is not one of the methods"),
        ({"baseline": "slow"}, r"give both"),
        ({"seeds": [1, 1]}, r"seeds: expected distinct"),
        ({"method_args": {"x": []}}, r"method_args: 'x'"),
    ],
)
def test_bad_settings_are_one_clear_error(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        compare(str(tmp_path), _methods(), **kwargs)


def test_rebase_runs_copies_of_the_configs_with_moved_paths(tmp_path, fake_fits):
    source = tmp_path / "fit.yaml"
    source.write_text(yaml.safe_dump({"trainer": {"default_root_dir": "runs/a/x"}, "other": ["runs/ab", "runs/a"]}))
    method = CompareMethod("m", str(source), args=[CURVE_ARG, "1"])
    compare(str(tmp_path / "out"), [method], initial_eval=False, rebase={"runs/a": "runs/b"})
    copy = tmp_path / "out" / "configs" / "m.yaml"
    assert fake_fits.commands[0][:3] == ["fit", "--config", str(copy)]
    assert yaml.safe_load(copy.read_text()) == {
        "trainer": {"default_root_dir": "runs/b/x"},
        "other": ["runs/ab", "runs/b"],
    }


def test_a_missing_config_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"methods: x: config .*nothere.yaml does not exist"):
        compare(str(tmp_path), [CompareMethod("x", str(tmp_path / "nothere.yaml"))])


def test_sample_efficiency_says_why_there_is_no_ratio():
    steps = [0, 10, 20, 30]
    assert sample_efficiency(steps, [0.2, 0.3, 0.4, 0.5], [0.2, 0.5, 0.5, 0.6])["ratio"] == pytest.approx(3.0)
    assert sample_efficiency(steps, [0.2, 0.3, 0.4, 0.5], [0.2, 0.5, 0.5, 0.6])["lower_bound"] is True
    flat = sample_efficiency(steps, [0.4, 0.3, 0.3, 0.4], [0.4, 0.5, 0.6, 0.7])
    assert flat["ratio"] is None and "did not improve" in flat["note"]
    never = sample_efficiency(steps, [0.2, 0.3, 0.4, 0.5], [0.2, 0.2, 0.3, 0.4])
    assert never["ratio"] is None and "never reached" in never["note"]


def test_the_pipeline_rl_stage_runs_fit_lines_that_parse(tmp_path, monkeypatch):
    """Every fit the tiny pipeline's compare stage would run (configs rebased into the pipeline's run folder, as
    `pavlit pipeline` and `compare` do) parses through the CLI with the paths of that run folder."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from pavlit.cli import PavlitCLI
    from pavlit.pipeline import Stage, _rebase_stage, rebase_config, resolve_run_dir

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["pavlit"])
    config = yaml.safe_load((REPO / "configs" / "tiny" / "pipeline.yaml").read_text())
    mapping = {config["configs_run_dir"]: config["run_dir"]}
    stages = resolve_run_dir([Stage(**s) for s in config["stages"]], config["run_dir"])
    stage = _rebase_stage(next(s for s in stages if s.name == "rl"), mapping, tmp_path / "stage")
    parser = ArgumentParser(parser_mode="yaml")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(compare)
    cfg = parser.parse_args(stage.command[1:])
    assert cfg.rebase == {"runs/tiny": "runs/pipeline"} and cfg.output_dir == "runs/pipeline/rl_compare"
    methods = [CompareMethod(**dict(m)) for m in cfg.methods]
    assert [m.config for m in methods] == ["configs/tiny/rl.yaml", "configs/tiny/rl_orm.yaml"]

    class ParseOnly(PavlitCLI):
        def before_instantiate_classes(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

    for method in methods:
        copy = CompareMethod(method.name, rebase_config(method.config, cfg.rebase, tmp_path / f"{method.name}.yaml"))
        command = compare_module.fit_command(copy, 0, cfg.args, cfg.seed_keys, tmp_path / method.name)
        cli = ParseOnly(args=command[1:], run=False)
        init = cli.config.model.init_args
        assert init.policy.init_args.path == "runs/pipeline/sft/policy" and init.seed == 0
        assert cli.config.trainer.max_steps == 12 and cli.config.data.init_args.batch_size == 8
        if method.name == "pav":
            assert init.advantages.init_args.verifier_path == "runs/pipeline/pav/verifier"


@pytest.mark.slow
def test_real_fits_over_two_seeds_resume(tmp_path, monkeypatch):
    """Real `pavlit fit` / `pavlit validate` runs of rl_orm.yaml on the random tiny policy, two iterations each."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = tmp_path / "compare.yaml"
    shrink = [
        "--model.init_args.policy", "TinyPolicy", "--trainer.max_steps", 2, "--trainer.val_check_interval", 1,
        "--data.init_args.eval_problems", 4, "--data.init_args.batch_size", 2,
        "--model.init_args.samples_per_prompt", 2, "--model.init_args.max_new_tokens", 16,
        "--model.init_args.eval_samples", 2, "--model.init_args.warmup_steps", 0,
    ]  # fmt: skip
    config.write_text(
        "# pavlit-command: compare\n"
        + yaml.safe_dump(
            {
                "output_dir": str(tmp_path / "out"),
                "methods": [{"name": "orm", "config": ORM_CONFIG}],
                "seeds": [0, 1],
                "args": shrink,
            }
        )
    )
    monkeypatch.setattr(sys, "argv", ["pavlit"])
    assert main(["compare", "--config", str(config)]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    curve = results["curves"]["orm"]
    assert curve["iterations"] == [0, 1, 2] and sorted(curve["per_seed"]) == ["0", "1"]
    assert all(0.0 <= v <= 1.0 for v in curve["mean"])
    stamp = (tmp_path / "out" / "runs" / "orm-0" / "metrics.json").stat().st_mtime_ns
    assert main(["compare", "--config", str(config)]) == 0  # both runs finished: kept, nothing re-run
    assert (tmp_path / "out" / "runs" / "orm-0" / "metrics.json").stat().st_mtime_ns == stamp
