#!/usr/bin/env bash
# Set up and run the main job on the embedded default (tiny policy + arithmetic task), on CPU, offline.
# Every stage writes into runs/tiny/ and is skipped when its output already exists (rerun = resume).
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0          # the CPU wheel first; no dependency may pull another torch
python -m pip install -q -e ".[dev,quant]"

[ -f runs/tiny/sft/policy/config.json ] || pavlit fit --config configs/tiny/sft.yaml
pavlit label --config configs/tiny/label.yaml    # resumes: finished chunks are skipped
echo "done: policy in runs/tiny/sft/policy, labels in runs/tiny/labels (see metrics.json in each)"
