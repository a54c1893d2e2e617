#!/usr/bin/env bash
# Start `morec <args>` as torchrun ranks: one machine (standalone) or one node of many (c10d).
#
#   launch/train.sh [--nproc N] [--nnodes N] [--node-rank R] [--rdzv HOST:PORT]
#                   [--rdzv-id ID] [--bind ADDR] [--max-restarts N] [--dry-run] -- <morec args>
#
#   launch/train.sh --nproc 2 -- train --config configs/ml1m_mf_pretrain.toml
#   launch/train.sh --nproc 1 --nnodes 2 --node-rank 0 --rdzv 10.0.0.1:29400 -- train --config c.toml
#
# --nproc      ranks on this machine (torchrun --nproc_per_node; also "gpu" / "cpu" / "auto").
#              Default $NPROC_PER_NODE, else 1.
# --nnodes     machines in the job: N, or MIN:MAX for an elastic job (torchrun starts when
#              MIN nodes have joined and admits up to MAX; a changed node count resumes
#              through checkpoint.reshard, exact only at the saved world size, see
#              docs/fault-tolerance.md). Default $NNODES, else 1. With 1 the job is
#              --standalone (a private rendezvous on a free local port) unless --rdzv is given.
# --node-rank  this machine's index, default $NODE_RANK, else 0. With c10d, torchrun assigns
#              global ranks itself; the node rank decides which node hosts the rendezvous
#              store (node 0, which must be the --rdzv host) and is exported as NODE_RANK.
# --rdzv       HOST:PORT of the c10d rendezvous (required when --nnodes > 1). Default $RDZV_ENDPOINT.
# --rdzv-id    the job id every node passes (default $RDZV_ID, else "morec").
# LOCAL_ADDR   (environment) the address this node advertises to the others; node 0's is the
#              MASTER_ADDR of the ranks (default: torchrun resolves the hostname).
# --bind       the IP address torchrun's stores (the c10d rendezvous store, the ranks'
#              MASTER_PORT store) listen on, through morec_dist.train.bind. Default $BIND_ADDR;
#              else, on one machine (no --rdzv), 127.0.0.1, with the ranks' gloo / NCCL sockets
#              on `lo` (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME, unless set) and MASTER_ADDR
#              127.0.0.1: nothing of the job listens beyond loopback. On several machines,
#              every interface (torch's own behaviour) unless given: name this node's address,
#              and its interface in GLOO_SOCKET_IFNAME (docs/deploy.md, "What listens where").
# --max-restarts  torchrun's restarts of the rank group; default $MAX_RESTARTS, else the
#              config's run.max_restarts (or the morec command's own --max-restarts), read by
#              `python -m morec_dist.train.launch settings`, which validates the config first:
#              a bad config exits 2 with one line before any rank starts.
# --dry-run    print the command instead of running it.
#
# Signals and exit status (this script may be PID 1's only child in a container): SIGTERM
# and SIGINT are forwarded to torchrun once (it passes them to the ranks, which checkpoint
# at the next step boundary). The status is torchrun's, except: 2 when a rank stopped on
# bad input (its one line is printed), 143 when the ranks stopped after a SIGTERM
# checkpoint (also when the SIGTERM reached a peer node and not this one) or this script
# was sent SIGTERM.
#
# The interpreter is .venv/bin/python when the repository has one, else python3.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "launch/train.sh: $*" >&2; exit 2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nproc="${NPROC_PER_NODE:-1}"
nnodes="${NNODES:-1}"
node_rank="${NODE_RANK:-0}"
rdzv="${RDZV_ENDPOINT:-}"
rdzv_id="${RDZV_ID:-morec}"
max_restarts="${MAX_RESTARTS:-}"
bind="${BIND_ADDR:-}"
dry_run=0

while [[ $# -gt 0 ]]; do
    case "$1" in
        --nproc) [[ $# -ge 2 ]] || die "--nproc needs a value"; nproc="$2"; shift 2 ;;
        --nnodes) [[ $# -ge 2 ]] || die "--nnodes needs a value"; nnodes="$2"; shift 2 ;;
        --node-rank) [[ $# -ge 2 ]] || die "--node-rank needs a value"; node_rank="$2"; shift 2 ;;
        --rdzv) [[ $# -ge 2 ]] || die "--rdzv needs HOST:PORT"; rdzv="$2"; shift 2 ;;
        --rdzv-id) [[ $# -ge 2 ]] || die "--rdzv-id needs a value"; rdzv_id="$2"; shift 2 ;;
        --max-restarts) [[ $# -ge 2 ]] || die "--max-restarts needs a value"; max_restarts="$2"; shift 2 ;;
        --bind) [[ $# -ge 2 ]] || die "--bind needs an IP address"; bind="$2"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) break ;;  # the first word that is not ours starts the morec arguments
    esac
done
[[ $# -gt 0 ]] || die "no morec arguments; e.g. launch/train.sh --nproc 2 -- train --config configs/ml1m_mf_pretrain.toml"

[[ "$nproc" =~ ^([1-9][0-9]*|gpu|cpu|auto)$ ]] || die "--nproc: expected a positive integer, gpu, cpu or auto, got '$nproc'"
[[ "$nnodes" =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]] || die "--nnodes: expected N or MIN:MAX (positive integers), got '$nnodes'"
min_nodes="${nnodes%:*}" max_nodes="${nnodes#*:}"
(( min_nodes <= max_nodes )) || die "--nnodes $nnodes: MIN must be <= MAX"
[[ "$node_rank" =~ ^[0-9]+$ ]] || die "--node-rank (or NODE_RANK): expected an integer >= 0, got '$node_rank'"
(( node_rank < max_nodes )) || die "--node-rank $node_rank: expected < --nnodes $nnodes"
[[ -z "$max_restarts" || "$max_restarts" =~ ^[0-9]+$ ]] || die "--max-restarts: expected an integer >= 0, got '$max_restarts'"
[[ -z "$bind" || "$bind" =~ ^[0-9.]+$ || "$bind" =~ ^[0-9a-fA-F:]+$ ]] || die "--bind (or BIND_ADDR): expected an IP address, got '$bind'"

if [[ -x "$ROOT/.venv/bin/python" ]]; then
    python="$ROOT/.venv/bin/python"
else
    python="$(command -v python3)" || die "no .venv/bin/python and no python3 on PATH"
fi

# The package is importable from a checkout even when it is not installed into $python.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [[ -z "$max_restarts" ]]; then
    # from the config (validated here: exit 2 with its one line before any rank starts)
    settings="$("$python" -m morec_dist.train.launch settings -- "$@")" || exit 2
    max_restarts="$(sed -n 's/^max_restarts=//p' <<<"$settings")"
fi

if [[ -z "$rdzv" ]]; then
    [[ "$nnodes" == 1 ]] || die "--nnodes $nnodes needs --rdzv HOST:PORT (or RDZV_ENDPOINT): the c10d rendezvous every node reaches"
    bind="${bind:-127.0.0.1}"
fi
# torch's TCPStore listens on every interface whatever host it is given: morec_dist.train.bind
# runs torchrun with its stores on $bind only
if [[ -n "$bind" ]]; then
    torchrun=("$python" -m morec_dist.train.bind --bind "$bind")
else
    torchrun=("$python" -m torch.distributed.run)
fi
torchrun+=(--nproc_per_node="$nproc" --max_restarts="$max_restarts")
if [[ -z "$rdzv" ]]; then
    # the ranks dial MASTER_ADDR = the store's address (else the hostname, which may not be loopback)
    torchrun+=(--standalone --local-addr="${LOCAL_ADDR:-$bind}")
    if [[ "$bind" == 127.* || "$bind" == ::1 ]]; then
        export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}" NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-lo}"
    fi
else
    [[ "$rdzv" =~ ^[^:]+:[0-9]+$ || "$rdzv" =~ ^\[.+\]:[0-9]+$ ]] || die "--rdzv: expected HOST:PORT, got '$rdzv'"
    # Node 0 hosts the c10d store; saying so explicitly avoids torchrun guessing from hostnames.
    is_host=$(( node_rank == 0 ? 1 : 0 ))
    torchrun+=(--nnodes="$nnodes" --rdzv_backend=c10d --rdzv_endpoint="$rdzv" --rdzv_id="$rdzv_id"
               --rdzv_conf="is_host=$is_host")
    # The address this node advertises to the others (node 0's becomes MASTER_ADDR). Without
    # it torchrun uses the hostname, which other hosts may not resolve to a reachable address.
    [[ -z "${LOCAL_ADDR:-}" ]] || torchrun+=(--local-addr="$LOCAL_ADDR")
fi
torchrun+=(-m morec_dist.cli "$@")

export NODE_RANK="$node_rank" NNODES="$nnodes"
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
if (( dry_run )); then
    printf '%q ' "${torchrun[@]}"; echo
    exit 0
fi

# The ranks describe a user error / mark a preemption in these files (morec_dist.train.launch).
marks="$(mktemp -d "${TMPDIR:-/tmp}/morec-launch.XXXXXX")"
export MOREC_USER_ERROR_FILE="$marks/user-error" MOREC_PREEMPTED_FILE="$marks/preempted"
child="" got_term=0 interrupted=0
forward() {
    interrupted=1
    (( got_term )) && return 0  # once: a second SIGTERM would make the ranks exit without a checkpoint
    got_term=1
    [[ -z "$child" ]] || kill -TERM "$child" 2>/dev/null || true
}
trap forward TERM INT
"${torchrun[@]}" &
child=$!
while :; do
    interrupted=0
    status=0; wait "$child" || status=$?
    if (( interrupted )) && kill -0 "$child" 2>/dev/null; then continue; fi  # the wait was cut by the trap
    if (( interrupted && status > 128 )); then s=0; wait "$child" 2>/dev/null || s=$?; (( s == 127 )) || status=$s; fi
    break
done
trap - TERM INT
if (( status != 0 )) && [[ -s "$MOREC_USER_ERROR_FILE" ]]; then
    echo "morec: error: $(head -1 "$MOREC_USER_ERROR_FILE")" >&2
    status=2
elif (( status != 0 )) && { [[ -e "$MOREC_PREEMPTED_FILE" ]] || (( got_term )); }; then
    status=143
fi
rm -rf "$marks"
exit "$status"
