"""The installed package through pavlit's own commands: `pavlit plugins` lists it, YAML configs select it by name.

Every command runs in a subprocess, as a user's shell would run it: plugins are found through the installed
distribution's entry points, not through anything this test process imported.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pavlit import registry

pytestmark = pytest.mark.usefixtures("installed")

DISTRIBUTION = "pavlit-example"
VERSION = "0.1.0"
EXAMPLE_CONFIG = Path(__file__).parents[1] / "configs" / "search.yaml"


def pavlit(
    *args: str, cwd: Path | None = None, autoload: bool = True, timeout: int = 300
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(registry.AUTOLOAD_ENV, None)
    if not autoload:
        env[registry.AUTOLOAD_ENV] = "1"
    python = [sys.executable, "-X", "importtime"] if args[0] == "plugins" else [sys.executable]
    return subprocess.run(
        [*python, "-m", "pavlit", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
    )


def test_pavlit_plugins_lists_the_example_under_its_distribution_without_importing_it():
    done = pavlit("plugins")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines()]
    assert ["pavlit.provers", "mixture", "pavlit_example.provers:MixtureProver", DISTRIBUTION, VERSION] in rows
    assert ["pavlit.rewards", "pav_min", "pavlit_example.rewards:PAVMinReward", DISTRIBUTION, VERSION] in rows
    assert ["pavlit.rewards", "pav", "pavlit.rewards:PAVReward", "pavlit", VERSION] in rows  # beside the built-ins
    imported = set(re.findall(r"^import time:.*\|\s*([\w.]+)$", done.stderr, flags=re.M))
    assert "pavlit.registry" in imported and not {m for m in imported if m.startswith("pavlit_example")}

    done = pavlit("plugins", "--json", "--kind", "rewards")
    assert done.returncode == 0, done.stderr[-2000:]
    mine = [row for row in json.loads(done.stdout) if row["distribution"] == DISTRIBUTION]
    assert mine == [
        {
            "kind": "pavlit.rewards",
            "name": "pav_min",
            "target": "pavlit_example.rewards:PAVMinReward",
            "distribution": DISTRIBUTION,
            "version": VERSION,
            "builtin": False,
        }
    ]


def _config(verifier: Path, *, short: bool = True) -> str:
    prover = "MixtureProver" if short else "pavlit_example.provers.MixtureProver"
    reward = "PAVMinReward" if short else "pavlit_example.rewards.PAVMinReward"
    return f"""\
task: {{class_path: ArithmeticTask, init_args: {{n_train: 4, n_validation: 3, n_test: 4}}}}
policy: {{class_path: TinyPolicy, init_args: {{n_layer: 1, n_embd: 16, n_head: 2, max_position: 128}}}}
methods:
  - name: pav_beam_mixture
    search: {{class_path: BeamSearch, init_args: {{max_steps: 2}}}}
    reward:
      class_path: PAVReward
      init_args: {{verifier: {verifier}, alpha: 0.5, prover: {{class_path: {prover}, init_args: {{k: 2, mix: 0.25}}}}}}
  - name: pav_min_beam
    search: {{class_path: BeamSearch, init_args: {{max_steps: 2}}}}
    reward:
      class_path: {reward}
      init_args: {{verifier: {verifier}, alpha: 0.5, prover: {{class_path: {prover}, init_args: {{k: 2, mix: 0.5}}}}}}
  - name: pav_min_bon
    search: {{class_path: BestOfN}}
    reward: {{class_path: {reward}, init_args: {{verifier: {verifier}}}}}
budgets: [1, 2]
max_new_tokens: 8
chunk_size: 2
bootstrap: 50
alpha_sweep: {{method: pav_min_beam, alphas: [0.0, 1.0], budgets: [2]}}
"""


@pytest.fixture(scope="module")
def verifier(tmp_path_factory) -> Path:
    """An (untrained) tiny process verifier exported as `PAVModule.save_pretrained` writes it."""
    from pavlit.modules.pav import PAVModule
    from pavlit.policy.sources import TinyPolicy
    from pavlit.tasks.arithmetic import ALPHABET

    folder = tmp_path_factory.mktemp("verifier") / "pav"
    PAVModule(source=TinyPolicy(n_layer=1, n_embd=16, n_head=2, max_position=128, alphabet=ALPHABET)).save_pretrained(
        folder
    )
    return folder


def test_the_example_config_selects_the_plugins_by_short_class_name(tmp_path):
    # The config this package ships (configs/search.yaml); printing it resolves every class without running.
    done = pavlit("search", "--config", str(EXAMPLE_CONFIG), "--print_config", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout
    assert printed.count("class_path: pavlit_example.provers.MixtureProver") == 2
    assert printed.count("class_path: pavlit_example.rewards.PAVMinReward") == 2
    assert printed.count("class_path: pavlit.rewards.PAVReward") == 2
    assert printed.count("mix: 0.5") == 2
    assert not (tmp_path / "runs").exists()


def test_autoload_off_short_names_fail_and_full_paths_still_work(verifier, tmp_path):
    (tmp_path / "short.yaml").write_text(_config(verifier))
    done = pavlit("search", "--config", "short.yaml", "--print_config", cwd=tmp_path, autoload=False)
    assert done.returncode != 0
    # jsonargparse no longer knows the short name: only pavlit's built-ins were imported.
    assert "import path string: MixtureProver" in done.stderr and "Traceback" not in done.stderr

    (tmp_path / "full.yaml").write_text(_config(verifier, short=False))
    done = pavlit("search", "--config", "full.yaml", "--print_config", cwd=tmp_path, autoload=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "class_path: pavlit_example.rewards.PAVMinReward" in done.stdout


def test_pavlit_search_runs_the_plugins_end_to_end(verifier, tmp_path):
    (tmp_path / "search.yaml").write_text(_config(verifier))
    done = pavlit("search", "--config", "search.yaml", "--output_dir", "run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "run"
    results = json.loads((out / "results.json").read_text())
    lines = {p["line"] for p in results["points"]}
    assert {"pav_beam_mixture", "pav_min_beam", "pav_min_bon", "pav_min_bon [pass@N]"} <= lines
    methods = {m["name"]: m for m in results["settings"]["methods"]}
    assert methods["pav_min_beam"]["reward"]["class"] == "pavlit_example.rewards.PAVMinReward"
    assert methods["pav_min_beam"]["reward"]["prover"] == "MixtureProver(k=2, mix=0.5)"
    assert methods["pav_beam_mixture"]["reward"]["prover"] == "MixtureProver(k=2, mix=0.25)"
    # The α sweep tuned the plugin reward's alpha on validation, then the test run used the chosen one.
    assert results["alpha_sweep"]["method"] == "pav_min_beam" and results["alpha_sweep"]["chosen"] in (0.0, 1.0)
    records = [
        json.loads(line) for shard in sorted(out.glob("chunk-*.jsonl")) for line in shard.read_text().splitlines()
    ]
    beam = [r for r in records if r["method"] == "pav_min_beam"]
    assert len(beam) == 4 * 2  # 4 test problems x budgets 1 and 2
    assert all(r["tokens"] > 0 and r["verifier_calls"] > 0 and 0.0 <= r["value"] <= 1.0 for r in beam)
    report = (out / "report.md").read_text()
    assert "| pav_min_beam | 2 |" in report and "PAVMinReward(verifier=" in report
    assert "| pav_min_beam | 2 |" in done.stdout  # the command prints its report
