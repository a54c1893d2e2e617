#!/usr/bin/env bash
# One node of a multi-machine job: join the Ray cluster, then start this node's torchrun ranks.
#
#   NODE_RANK=1 NNODES=2 RDZV_ENDPOINT=10.0.0.1:29400 MOREC_RAY_ADDRESS=10.0.0.1:6379 \
#       launch/multinode.sh -- train --config configs/ml1m_mf_pretrain.toml
#
# Environment (each also settable by the flag in brackets):
#   NODE_RANK          this node's index, 0 .. NNODES-1 (required)            [--node-rank]
#   NNODES             number of nodes (required)                            [--nnodes]
#   RDZV_ENDPOINT      HOST:PORT of the c10d rendezvous, on node 0 (required)[--rdzv]
#   MOREC_RAY_ADDRESS  HOST:PORT of the Ray head (launch/ray_head.sh) (required unless
#                      RAY_JOIN=no: pretraining and evaluation need no Ray)  [--ray-address]
#   NPROC_PER_NODE     ranks on this node (default 1)                        [--nproc]
#   RDZV_ID            job id shared by all nodes (default "morec")          [--rdzv-id]
#   RAY_JOIN           auto | yes | no (default auto)                        [--ray-join]
#   RAY_NODE_IP        the address this node's raylet advertises (default: Ray picks)
#   RAY_OBJECT_STORE_MB  object store of the joined raylet in MiB (default 256)
#   RAY_JOIN_TIMEOUT_S how long to retry joining a head that is still starting (default 300)
#   RAY_AUTH_MODE      as on the head (default token); the token is RAY_AUTH_TOKEN, the file
#                      RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token: the head's, on every node
#   MAX_RESTARTS       torchrun --max-restarts (default: the config's run.max_restarts)
#
# Signals: a SIGTERM (the kubelet's, through tini as PID 1) is forwarded once to
# launch/train.sh, which forwards it to torchrun; the ranks checkpoint at the next step
# boundary and the node exits 143. The exit status is launch/train.sh's (2 = bad input,
# 143 = preempted after a checkpoint; see there).
#
# The Ray address reaches the job twice: exported as MOREC_RAY_ADDRESS, and appended to
# the morec arguments as the override coordinator.ray_address=HOST:PORT (a later override
# wins, so the environment decides).
#
# Ray drivers must run on a Ray node, so a node that does not host the head joins the
# cluster first as a worker with no CPUs for tasks (RAY_JOIN=auto: join unless the head's
# host is one of this machine's addresses) and leaves it when the ranks exit, stopping only
# the Ray processes it started.
set -euo pipefail

die() { echo "launch/multinode.sh: $*" >&2; exit 2; }
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
ray_join="${RAY_JOIN:-auto}"
extra=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --node-rank) [[ $# -ge 2 ]] || die "--node-rank needs a value"; NODE_RANK="$2"; shift 2 ;;
        --nnodes) [[ $# -ge 2 ]] || die "--nnodes needs a value"; NNODES="$2"; shift 2 ;;
        --rdzv) [[ $# -ge 2 ]] || die "--rdzv needs HOST:PORT"; RDZV_ENDPOINT="$2"; shift 2 ;;
        --ray-address) [[ $# -ge 2 ]] || die "--ray-address needs HOST:PORT"; MOREC_RAY_ADDRESS="$2"; shift 2 ;;
        --nproc) [[ $# -ge 2 ]] || die "--nproc needs a value"; NPROC_PER_NODE="$2"; shift 2 ;;
        --rdzv-id) [[ $# -ge 2 ]] || die "--rdzv-id needs a value"; RDZV_ID="$2"; shift 2 ;;
        --ray-join) [[ $# -ge 2 ]] || die "--ray-join needs auto, yes or no"; ray_join="$2"; shift 2 ;;
        --dry-run) extra+=(--dry-run); shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) break ;;
    esac
done
[[ $# -gt 0 ]] || die "no morec arguments; e.g. launch/multinode.sh -- train --config configs/ml1m_mf_pretrain.toml"
[[ -n "${NODE_RANK:-}" ]] || die "NODE_RANK is not set (this node's index, 0 .. NNODES-1)"
[[ -n "${NNODES:-}" ]] || die "NNODES is not set (number of nodes)"
[[ -n "${RDZV_ENDPOINT:-}" ]] || die "RDZV_ENDPOINT is not set (HOST:PORT of the c10d rendezvous on node 0)"
[[ "$ray_join" =~ ^(auto|yes|no)$ ]] || die "RAY_JOIN: expected auto, yes or no, got '$ray_join'"
ray_override=()
if [[ -n "${MOREC_RAY_ADDRESS:-}" ]]; then
    [[ "$MOREC_RAY_ADDRESS" =~ ^[^:/]+:[0-9]+$ ]] || die "MOREC_RAY_ADDRESS: expected HOST:PORT, got '$MOREC_RAY_ADDRESS'"
    export MOREC_RAY_ADDRESS
    ray_override=("coordinator.ray_address=$MOREC_RAY_ADDRESS")
    ray_host="${MOREC_RAY_ADDRESS%:*}"
    if [[ "$ray_host" == 127.* || "$ray_host" == localhost ]]; then
        export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0  # as launch/ray_head.sh does for a loopback head
    else
        unset RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER  # inherited =0 would bind this node to loopback only
    fi
    export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}" RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
    if [[ "$RAY_AUTH_MODE" == token && -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" && ! -s "$HOME/.ray/auth_token" ]]; then
        die "RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the head's token (launch/ray_head.sh), or copy it to ~/.ray/auth_token"
    fi
elif [[ "$ray_join" != no ]]; then
    die "MOREC_RAY_ADDRESS is not set (HOST:PORT of the Ray head, see launch/ray_head.sh; RAY_JOIN=no for a job without Ray)"
fi

if [[ -x "$ROOT/.venv/bin/ray" ]]; then ray="$ROOT/.venv/bin/ray"; else ray="$(command -v ray || true)"; fi

head_is_local() {
    # true when the head's host resolves to an address of this machine (so a raylet runs here)
    local host="${MOREC_RAY_ADDRESS%:*}" addr
    addr="$(getent ahostsv4 "$host" 2>/dev/null | awk 'NR == 1 { print $1 }')"
    [[ -n "$addr" ]] || addr="$host"
    [[ "$addr" == 127.* ]] && return 0
    ip -o addr show 2>/dev/null | awk '{ split($4, a, "/"); print a[1] }' | grep -qxF "$addr"
}

should_join=0
[[ "$ray_join" == no ]] || case "$ray_join" in
    yes) should_join=1 ;;
    auto) head_is_local || should_join=1 ;;
esac
if (( should_join )) && [[ "${RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER:-}" == 0 ]]; then
    die "RAY_JOIN=$ray_join: a loopback Ray head ($MOREC_RAY_ADDRESS) serves only its own machine; start it on an address the nodes reach (launch/ray_head.sh --host ADDR)"
fi
ray_pid=""
ray_log="${TMPDIR:-/tmp}/morec-ray-join.$$.log"
leave_ray() {
    # `ray start --block` drains and stops this node's Ray processes (only them) on SIGTERM
    [[ -n "$ray_pid" ]] || return 0
    kill -TERM "$ray_pid" 2>/dev/null || true
    for _ in $(seq 1 200); do kill -0 "$ray_pid" 2>/dev/null || break; sleep 0.2; done
    rm -f "$ray_log"
}
join_ray() {
    # retried: the head may still be starting (a Kubernetes Job and Deployment start together)
    local deadline=$(( SECONDS + ${RAY_JOIN_TIMEOUT_S:-300} ))
    while true; do
        setsid "${join[@]}" --block >"$ray_log" 2>&1 </dev/null &
        ray_pid=$!
        while kill -0 "$ray_pid" 2>/dev/null; do
            grep -q "Ray runtime started" "$ray_log" && return 0
            sleep 0.2
        done
        ray_pid=""
        (( SECONDS < deadline )) || die "could not join the Ray cluster at $MOREC_RAY_ADDRESS within ${RAY_JOIN_TIMEOUT_S:-300} s (is launch/ray_head.sh running there?):"$'\n'"$(tail -5 "$ray_log")"
        sleep 5
    done
}
if (( should_join )); then
    [[ -n "$ray" ]] || die "ray is not installed (.venv/bin/ray or PATH) but this node must join $MOREC_RAY_ADDRESS"
    join=("$ray" start --address="$MOREC_RAY_ADDRESS" --num-cpus=0 --disable-usage-stats
          --object-store-memory="$(( ${RAY_OBJECT_STORE_MB:-256} * 1024 * 1024 ))")
    [[ -z "${RAY_NODE_IP:-}" ]] || join+=(--node-ip-address="$RAY_NODE_IP")
    if (( ${#extra[@]} )); then
        echo "would join Ray: $(printf '%q ' "${join[@]}")"
    else
        trap leave_ray EXIT
        join_ray
    fi
fi

# not exec: the trap must leave the Ray cluster after the ranks exit. In the background, so
# that this shell can forward a SIGTERM (bash runs no trap while a foreground child runs).
restarts=()
[[ -z "${MAX_RESTARTS:-}" ]] || restarts=(--max-restarts "$MAX_RESTARTS")
got_term=0 interrupted=0 child=""
forward() {
    interrupted=1
    (( got_term )) && return 0  # once: a second SIGTERM would stop the ranks without a checkpoint
    got_term=1
    [[ -z "$child" ]] || kill -TERM "$child" 2>/dev/null || true
}
trap forward TERM INT
"$HERE/train.sh" "${extra[@]}" --nproc "${NPROC_PER_NODE:-1}" --nnodes "$NNODES" --node-rank "$NODE_RANK" \
    --rdzv "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-morec}" "${restarts[@]}" -- "$@" "${ray_override[@]}" &
child=$!
while :; do
    interrupted=0
    status=0; wait "$child" || status=$?
    if (( interrupted )) && kill -0 "$child" 2>/dev/null; then continue; fi
    if (( interrupted && status > 128 )); then s=0; wait "$child" 2>/dev/null || s=$?; (( s == 127 )) || status=$s; fi
    break
done
trap - TERM INT
(( status == 0 || status == 2 || ! got_term )) || status=143
exit "$status"
