#!/usr/bin/env bash
# Multi-node pre-training with torchrun: run this script once on every node.
#
# Each call starts NPROC_PER_NODE ranks of
#   pcpt-pretrain fit -c CONFIG [OVERRIDES...] --trainer.num_nodes=NNODES --trainer.devices=NPROC_PER_NODE
# through torchrun's static rendezvous at MASTER_ADDR:MASTER_PORT (node rank 0 hosts it). Lightning sees
# torchrun's RANK / LOCAL_RANK / WORLD_SIZE variables and uses them (TorchElasticEnvironment); with more than
# one node or device it trains with DDP. The topology goes last on the command line, so a config cannot
# contradict torchrun (e.g. `devices: -1` in configs/trainer/ddp_gpu.yaml); set it here, not in overrides.
#
# Usage:
#   scripts/launch_torchrun.sh [--nnodes N] [--node_rank R] [--master_addr HOST] [--master_port PORT]
#                              [--nproc_per_node G] [--] CONFIG [OVERRIDES...]
#
#   CONFIG      a pcpt-pretrain config, e.g. configs/pretrain/point_mae.yaml
#   OVERRIDES   anything pcpt-pretrain fit takes after it: more configs (-c configs/trainer/ddp_gpu.yaml),
#               --data.data_root DIR, --trainer.max_epochs 300, ...
#
# Environment (an option wins over its variable):
#   NNODES          number of nodes (default 1)
#   NODE_RANK       this node's rank, 0 .. NNODES-1 (default 0)
#   MASTER_ADDR     address of node rank 0, reachable from every node (default 127.0.0.1)
#   MASTER_PORT     a free TCP port on node rank 0 (default 29500)
#   NPROC_PER_NODE  ranks (GPUs) per node (default: the GPUs nvidia-smi lists, or 1 without nvidia-smi)
#   TORCHRUN        torchrun command (default: torchrun, else "python -m torch.distributed.run")
#   PCPT_PRETRAIN   pre-training command (default: pcpt-pretrain, else "python -m pretrain.cli")
#   PCPT_RUN_DIR    run folder when no --trainer.default_root_dir is given (default runs/pretrain/<UTC time>)
#   Commands in TORCHRUN and PCPT_PRETRAIN are split on spaces.
#
# Global rank 0 writes checkpoints, config.yaml and the encoder artifact; a resumed run reads its checkpoint
# on every rank. Across nodes, give every node the same --trainer.default_root_dir on a shared filesystem.
#
# Example: 2 nodes x 4 GPUs, global batch 128 (16 per GPU); on node0 and then node1 (NODE_RANK=1):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 NPROC_PER_NODE=4 \
#     scripts/launch_torchrun.sh configs/pretrain/point_mae.yaml -c configs/trainer/ddp_gpu.yaml \
#       --data.data_root data/shapenet55 --data.batch_size 16 --trainer.default_root_dir /shared/runs/mae
set -euo pipefail

PROG=launch_torchrun.sh

die() {
    echo "$PROG: error: $*" >&2
    exit 2
}

usage() {
    sed -n '/^# Usage:/,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

need_value() {  # OPTION VALUE_COUNT
    [[ $2 -ge 2 ]] || die "$1 needs a value"
}

gpus_on_node() {
    if command -v nvidia-smi >/dev/null 2>&1; then
        local count
        count=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
        if [[ $count -ge 1 ]]; then
            echo "$count"
            return
        fi
    fi
    echo 1
}

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
NPROC_PER_NODE=${NPROC_PER_NODE:-}

while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --nnodes) need_value "$1" $#; NNODES=$2; shift 2 ;;
        --nnodes=*) NNODES=${1#*=}; shift ;;
        --node_rank) need_value "$1" $#; NODE_RANK=$2; shift 2 ;;
        --node_rank=*) NODE_RANK=${1#*=}; shift ;;
        --master_addr) need_value "$1" $#; MASTER_ADDR=$2; shift 2 ;;
        --master_addr=*) MASTER_ADDR=${1#*=}; shift ;;
        --master_port) need_value "$1" $#; MASTER_PORT=$2; shift 2 ;;
        --master_port=*) MASTER_PORT=${1#*=}; shift ;;
        --nproc_per_node) need_value "$1" $#; NPROC_PER_NODE=$2; shift 2 ;;
        --nproc_per_node=*) NPROC_PER_NODE=${1#*=}; shift ;;
        --) shift; break ;;
        -*) die "unknown option $1 (options come before CONFIG; see --help)" ;;
        *) break ;;
    esac
done

[[ $# -ge 1 ]] || die "missing CONFIG (usage: $PROG [options] CONFIG [OVERRIDES...]; see --help)"
CONFIG=$1
shift
[[ -f $CONFIG ]] || die "config $CONFIG: no such file"
NPROC_PER_NODE=${NPROC_PER_NODE:-$(gpus_on_node)}

for name in NNODES NPROC_PER_NODE; do
    [[ ${!name} =~ ^[1-9][0-9]*$ ]] || die "$name must be a positive integer, got '${!name}'"
done
[[ $NODE_RANK =~ ^[0-9]+$ ]] || die "NODE_RANK must be an integer >= 0, got '$NODE_RANK'"
((NODE_RANK < NNODES)) || die "NODE_RANK $NODE_RANK must be below NNODES $NNODES"
if ! [[ $MASTER_PORT =~ ^[1-9][0-9]{0,4}$ ]] || ((MASTER_PORT > 65535)); then
    die "MASTER_PORT must be a TCP port (1-65535), got '$MASTER_PORT'"
fi
[[ -n $MASTER_ADDR ]] || die "MASTER_ADDR is empty"
for arg in "$@"; do
    case $arg in
        --trainer.num_nodes* | --trainer.devices*)
            die "$arg: the topology comes from --nnodes / --nproc_per_node (NNODES / NPROC_PER_NODE)" ;;
    esac
done

if [[ -n ${TORCHRUN:-} ]]; then
    read -r -a torchrun <<<"$TORCHRUN"
elif command -v torchrun >/dev/null 2>&1; then
    torchrun=(torchrun)
else
    torchrun=(python -m torch.distributed.run)
fi
if [[ -n ${PCPT_PRETRAIN:-} ]]; then
    read -r -a pretrain <<<"$PCPT_PRETRAIN"
elif command -v pcpt-pretrain >/dev/null 2>&1; then
    pretrain=(pcpt-pretrain)
else
    pretrain=(python -m pretrain.cli)
fi

# Without --trainer.default_root_dir, pcpt-pretrain picks runs/pretrain/<UTC timestamp> in each process;
# choose it once per node so the ranks of a node agree (Lightning writes where global rank 0 says).
export PCPT_RUN_DIR=${PCPT_RUN_DIR:-runs/pretrain/$(date -u +%Y%m%d-%H%M%S)}

echo "$PROG: node $NODE_RANK of $NNODES, $NPROC_PER_NODE rank(s), rendezvous $MASTER_ADDR:$MASTER_PORT" >&2
exec "${torchrun[@]}" \
    --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC_PER_NODE" \
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
    --no-python "${pretrain[@]}" fit -c "$CONFIG" "$@" \
    --trainer.num_nodes="$NNODES" --trainer.devices="$NPROC_PER_NODE"
