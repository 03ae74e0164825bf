#!/usr/bin/env bash
# The test suite (the default excludes tests marked slow or gpu; pass -m slow to run those).
set -euo pipefail
cd "$(dirname "$0")"
exec python -m pytest -q "$@"
