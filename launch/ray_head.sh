#!/usr/bin/env bash
# Start (or stop) the Ray head that hosts the MoRec coordinator of a multi-machine job.
#
#   launch/ray_head.sh [--host ADDR] [--port PORT] [--object-store-mb MB] [--num-cpus N] [--foreground]
#                      [--until FILE] [-- <more `ray start` options>]
#   launch/ray_head.sh --stop [--port PORT]
#
# --host             address the head binds and advertises (default 127.0.0.1: loopback only;
#                    give the address the other nodes reach, e.g. 10.0.0.1, for a real cluster)
# --port             GCS port (default 6379); the job's MOREC_RAY_ADDRESS is HOST:PORT
# --object-store-mb  object store size in MiB (default 256; the coordinator moves small state)
# --num-cpus         CPUs the head offers to actors (default 1: the coordinator actor)
# --foreground       run in the foreground (containers) instead of as a background process
# --until FILE       with --foreground: stop the head and exit 0 once FILE exists (a pod whose
#                    lifetime is the job's: k8s/base/ray-head.yaml waits for the pipeline's
#                    last output); exit 1 if the head dies first, 143 on SIGTERM. FILE may be
#                    a filesystem URI (s3://...: launch/wait_for.sh polls the store beside the
#                    head; exit 2 if it can never be read, e.g. a URI carrying credentials)
# --stop             stop the head this script started for PORT; other Ray instances on the
#                    machine are left alone (this is not `ray stop`)
#
# The dashboard is off and usage statistics are disabled. The background head's process
# group id and log are kept in ${MOREC_RAY_STATE:-/tmp/morec-ray-head}-PORT/.
#
# Ray token authentication is on (RAY_AUTH_MODE=token unless set otherwise): the token is
# RAY_AUTH_TOKEN, or the file RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token, which is generated
# when none exists. Every node and every driver of the job needs the same token.
set -euo pipefail

die() { echo "launch/ray_head.sh: $*" >&2; exit 2; }
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
host=127.0.0.1
port=6379
object_store_mb=256
num_cpus=1
foreground=0
until_file=""
stop=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --host) [[ $# -ge 2 ]] || die "--host needs an address"; host="$2"; shift 2 ;;
        --port) [[ $# -ge 2 ]] || die "--port needs a value"; port="$2"; shift 2 ;;
        --object-store-mb) [[ $# -ge 2 ]] || die "--object-store-mb needs a value"; object_store_mb="$2"; shift 2 ;;
        --num-cpus) [[ $# -ge 2 ]] || die "--num-cpus needs a value"; num_cpus="$2"; shift 2 ;;
        --foreground) foreground=1; shift ;;
        --until) [[ $# -ge 2 ]] || die "--until needs a file"; until_file="$2"; shift 2 ;;
        --stop) stop=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ "$port" =~ ^[0-9]+$ ]] && (( port >= 1 && port <= 65535 )) || die "--port: expected 1..65535, got '$port'"
[[ "$object_store_mb" =~ ^[0-9]+$ ]] && (( object_store_mb >= 80 )) || die "--object-store-mb: Ray needs at least 80, got '$object_store_mb'"
[[ "$num_cpus" =~ ^[0-9]+$ ]] || die "--num-cpus: expected an integer >= 0, got '$num_cpus'"
[[ -z "$until_file" ]] || (( foreground )) || die "--until needs --foreground"

state="${MOREC_RAY_STATE:-/tmp/morec-ray-head}-$port"

group_alive() {
    # a member of process group $1 that is not a zombie (an exited child nobody reaped yet)
    ps -eo pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ { found = 1 } END { exit !found }'
}
stop_head() {
    [[ -f "$state/pgid" ]] || die "no head started by this script on port $port ($state/pgid missing)"
    local pgid
    pgid="$(cat "$state/pgid")"
    if group_alive "$pgid"; then
        # `ray start --block` drains the node and stops its processes on SIGTERM (a second or
        # two); a signal to the whole group instead makes each process wait out its own grace.
        kill -TERM "$pgid" 2>/dev/null || true
        for _ in $(seq 1 200); do group_alive "$pgid" || break; sleep 0.2; done
        if group_alive "$pgid"; then kill -KILL -- "-$pgid" 2>/dev/null || true; fi
    fi
    rm -f "$state/pgid"
    echo "ray head on port $port stopped"
}
if (( stop )); then stop_head; exit 0; fi

if [[ -x "$ROOT/.venv/bin/ray" ]]; then ray="$ROOT/.venv/bin/ray"; else ray="$(command -v ray)" || die "ray is not installed (.venv/bin/ray or PATH)"; fi
export RAY_USAGE_STATS_ENABLED=0
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [[ "$host" == 127.* || "$host" == localhost ]]; then
    # Ray replaces a loopback node address by the host's public one unless told not to;
    # drivers on this machine need the same variable (launch/multinode.sh sets it).
    export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
fi
if [[ "$RAY_AUTH_MODE" == token && -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" && ! -s "$HOME/.ray/auth_token" ]]; then
    "$ray" get-auth-token --generate >/dev/null || die "could not generate a Ray auth token (ray get-auth-token --generate)"
    echo "launch/ray_head.sh: generated $HOME/.ray/auth_token; give the same token to every node (RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)" >&2
fi
head=("$ray" start --head --block
      --node-ip-address="$host" --port="$port"
      --include-dashboard=false --disable-usage-stats
      --num-cpus="$num_cpus" --object-store-memory="$(( object_store_mb * 1024 * 1024 ))" "$@")

if (( foreground )) && [[ -z "$until_file" ]]; then exec "${head[@]}"; fi
if (( foreground )); then
    # `ray start --block` stops its node's processes on SIGTERM; it is this shell's child so
    # that the shell can end it when the job's last output appears, or forward a SIGTERM.
    "${head[@]}" &
    child=$!
    waiter=""
    # for messages: a URI without its query or a user:secret@ (data/storage.py's rule)
    shown="$(sed -E 's#^([A-Za-z0-9+.-]+://)[^/@]*@#\1#; s#[?].*$##' <<<"$until_file")"
    if [[ "$until_file" == *://* && "$until_file" != file://* ]]; then
        # an object on a store: one waiter process polls it (python, through data/storage.py)
        "$ROOT/launch/wait_for.sh" "$until_file" &
        waiter=$!
    fi
    stop_child() {
        [[ -z "$waiter" ]] || kill -TERM "$waiter" 2>/dev/null || true
        kill -TERM "$child" 2>/dev/null || true; wait "$child" 2>/dev/null || true
    }
    until_exists() {
        if [[ -z "$waiter" ]]; then [[ -e "$until_file" ]]; return; fi
        kill -0 "$waiter" 2>/dev/null && return 1
        local s=0; wait "$waiter" || s=$?
        waiter=""
        (( s == 0 )) && return 0
        echo "launch/ray_head.sh: waiting for $shown failed ($s); stopping the head" >&2
        stop_child
        exit $(( s == 2 ? 2 : 1 ))
    }
    trap 'stop_child; exit 143' TERM INT
    while kill -0 "$child" 2>/dev/null; do
        if until_exists; then
            echo "launch/ray_head.sh: $shown exists: the job is done; stopping the head" >&2
            stop_child
            exit 0
        fi
        sleep 2 & wait $! || true
    done
    status=0; wait "$child" || status=$?
    [[ -z "$waiter" ]] || kill -TERM "$waiter" 2>/dev/null || true
    echo "launch/ray_head.sh: the head exited ($status) before $shown appeared" >&2
    exit 1
fi

mkdir -p "$state"
if [[ -f "$state/pgid" ]] && group_alive "$(cat "$state/pgid")"; then
    die "a head started by this script already runs on port $port (stop it with --stop --port $port)"
fi
# A new session makes the head and every process it spawns one group that --stop can end.
setsid "${head[@]}" >"$state/log" 2>&1 < /dev/null &
echo $! >"$state/pgid"
for _ in $(seq 1 300); do
    if ! kill -0 "$(cat "$state/pgid")" 2>/dev/null; then
        rm -f "$state/pgid"
        die "ray head exited during start; log: $state/log"$'\n'"$(tail -20 "$state/log")"
    fi
    if grep -q "Ray runtime started" "$state/log" 2>/dev/null; then
        echo "$host:$port"
        exit 0
    fi
    sleep 0.2
done
die "ray head did not start within 60 s; log: $state/log"
