#!/usr/bin/env bash
# The test suite as `make test` and CI run it. pytest exits non-zero on any failure and
# with 5 when it collected nothing, so CI can never pass on an empty run. The 30 slowest
# tests are listed at the end.
#
# Time is kept and enforced: every test's duration goes to
# runs/test-durations/<UTC stamp>.xml (junit: one <testcase time=...> per test, setup and
# teardown included) and the run's total to <stamp>.json; a run longer than
# MOREC_TEST_BUDGET_S seconds (default 2700 = 45 min) fails even when every test passed.
# That default is a ceiling against runaway growth, not the target: the whole suite takes
# about 30 min on 2 cores (38 min with other jobs on the machine) and the 20-minute target
# (issue 25's headroom) is not met yet.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_USAGE_STATS_ENABLED=0
budget="${MOREC_TEST_BUDGET_S:-2700}"
[[ "$budget" =~ ^[1-9][0-9]*$ ]] || { echo "MOREC_TEST_BUDGET_S: expected a positive number of seconds, got '$budget'" >&2; exit 2; }
out=runs/test-durations
mkdir -p "$out"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
started=$(date +%s)
rc=0
.venv/bin/python -m pytest tests --durations=30 --junitxml="$out/$stamp.xml" "$@" || rc=$?
elapsed=$(( $(date +%s) - started ))
printf '{"seconds": %d, "budget_s": %d, "pytest_exit": %d, "args": "%s", "junit": "%s"}\n' \
    "$elapsed" "$budget" "$rc" "${*//\"/\\\"}" "$out/$stamp.xml" > "$out/$stamp.json"
echo "tests took ${elapsed} s (budget ${budget} s, MOREC_TEST_BUDGET_S); durations in $out/$stamp.xml"
if (( rc == 0 && elapsed > budget )); then
    echo "FAIL: the test run took ${elapsed} s, over its budget of ${budget} s (MOREC_TEST_BUDGET_S)" >&2
    exit 1
fi
exit "$rc"
