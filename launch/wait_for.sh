#!/usr/bin/env bash
# Wait until every FILE exists and is not empty: the init container that chains the
# pipeline's Jobs (fine-tuning waits for pretraining's metrics.json, evaluation for
# fine-tuning's, the Ray head for pretraining's). Every output of a stage appears
# atomically (written aside, then renamed), so an existing file is a finished stage.
#
#   launch/wait_for.sh [--timeout SECONDS] [--every SECONDS] FILE...
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
