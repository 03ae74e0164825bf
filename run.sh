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

# Tiny models run fastest on one intra-op thread per process when cores are shared.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
pavlit pipeline --config configs/tiny/pipeline.yaml   # SFT -> label -> ORM + PAV -> search -> RL; resumes
echo "done: the combined report is runs/pipeline/report.md"
