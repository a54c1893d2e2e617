#!/usr/bin/env bash
# Wait until every FILE exists and is not empty: the init container that chains the
# pipeline's Jobs (fine-tuning waits for pretraining's metrics.json, evaluation for
# fine-tuning's, the Ray head for pretraining's). Every output of a stage appears
# atomically (written aside, then renamed), so an existing file is a finished stage.
#
#   launch/wait_for.sh [--timeout SECONDS] [--every SECONDS] FILE...
#
# A FILE may be a filesystem URI (s3://bucket/runs/r/pretrain/metrics.json, gs://...): then
# every FILE is waited for by `python -m morec_dist.data.wait` (one process polling the
# store through data/storage.py, credentials from the environment; the object-store
# variant, k8s/components/object-store). There an object exists whole or not at all (one
# upload), so the same rule holds; the store's errors are printed and retried.
#
# --timeout  give up after this long, exit 1 (default 0: wait for ever; the Job's
#            activeDeadlineSeconds bounds it)
# --every    seconds between looks (default 5)
set -euo pipefail
die() { echo "launch/wait_for.sh: $*" >&2; exit 2; }
timeout=0 every=5
while [[ $# -gt 0 ]]; do
    case "$1" in
        --timeout) [[ $# -ge 2 ]] || die "--timeout needs seconds"; timeout="$2"; shift 2 ;;
        --every) [[ $# -ge 2 ]] || die "--every needs seconds"; every="$2"; shift 2 ;;
        --) shift; break ;;
        -*) die "unknown option '$1'" ;;
        *) break ;;
    esac
done
[[ $# -gt 0 ]] || die "no file to wait for"
[[ "$timeout" =~ ^[0-9]+$ ]] || die "--timeout: expected seconds, got '$timeout'"
[[ "$every" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--every: expected seconds, got '$every'"
for file in "$@"; do
    if [[ "$file" == *://* && "$file" != file://* ]]; then
        ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
        if [[ -x "$ROOT/.venv/bin/python" ]]; then python="$ROOT/.venv/bin/python"; else python="$(command -v python3)" || die "no .venv/bin/python and no python3 on PATH (needed for $file)"; fi
        # importable from a checkout too; exec: the waiter gets the kubelet's SIGTERM itself
        export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
        exec "$python" -m morec_dist.data.wait --timeout "$timeout" --every "$every" -- "$@"
    fi
done
trap 'exit 143' TERM INT
start=$SECONDS
for file in "$@"; do
    echo "launch/wait_for.sh: waiting for $file" >&2
    until [[ -s "$file" ]]; do
        if (( timeout > 0 && SECONDS - start >= timeout )); then
            echo "launch/wait_for.sh: $file did not appear within $timeout s" >&2
            exit 1
        fi
        sleep "$every" & wait $!
    done
done
echo "launch/wait_for.sh: found $*" >&2
