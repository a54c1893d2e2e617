#!/usr/bin/env bash
# The test suite as `make test` and CI run it. pytest exits non-zero on any failure and
# with 5 when it collected nothing, so CI can never pass on an empty run. The 30 slowest
# tests are listed at the end: the suite must stay under 25 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/python -m pytest tests --durations=30 "$@"
