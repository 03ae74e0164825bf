#!/usr/bin/env bash
# The test suite (the default excludes tests marked slow or gpu; pass -m slow to run those).
set -euo pipefail
cd "$(dirname "$0")"
# The venv run.sh made, unless another environment is already active (CI activates its own).
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then
  . .venv/bin/activate
fi
exec python -m pytest -q "$@"
