#!/usr/bin/env bash
# Multi-node pre-training on SLURM: submit with sbatch, which runs this script once; srun then starts one task
# per GPU on every node of the allocation.
#
#SBATCH --job-name=pcpt-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#
# Each task runs
#   pcpt-pretrain fit -c CONFIG [OVERRIDES...] --trainer.num_nodes=NODES --trainer.devices=TASKS_PER_NODE
# Lightning reads SLURM_PROCID / SLURM_LOCALID / SLURM_NODEID / SLURM_NTASKS (SLURMEnvironment), takes the
# first host of the allocation as the rendezvous address and a port derived from the job id (MASTER_PORT
# overrides it), and checks that devices equals --ntasks-per-node and num_nodes equals --nodes. The
# topology is read from the allocation and goes last on the command line, so a config cannot contradict it
# (e.g. `devices: -1` in configs/trainer/ddp_gpu.yaml); change it with sbatch options, not in overrides.
#
# Usage:
#   sbatch [--nodes N] [--ntasks-per-node G --gpus-per-node G] [--partition P] [--time T] \
#       scripts/launch_slurm.sh CONFIG [OVERRIDES...]
#
#   CONFIG      a pcpt-pretrain config, e.g. configs/pretrain/point_mae.yaml
#   OVERRIDES   anything pcpt-pretrain fit takes after it: more configs (-c configs/trainer/ddp_gpu.yaml),
#               --data.data_root DIR, --trainer.max_epochs 300, ...
#   One task per GPU: --ntasks-per-node must equal --gpus-per-node. The job starts in the submission
#   folder; submit from the repository root (relative config paths) with pcpt installed on every node.
#   Checkpoints, config.yaml and the encoder artifact are written by global rank 0 into the run folder, and
#   a resumed run reads its checkpoint on every rank: put the run folder on a filesystem all nodes share.
#
# Environment:
#   PCPT_PRETRAIN   pre-training command, split on spaces (default: pcpt-pretrain, else
#                   "python -m pretrain.cli")
#   SRUN_ARGS       extra srun options, split on spaces (e.g. "--mpi=none")
#   PCPT_RUN_DIR    run folder when no --trainer.default_root_dir is given (default runs/pretrain/<UTC time>)
#   NNODES, NTASKS_PER_NODE  override what the allocation says (normally unset)
#
# Example: 2 nodes x 4 GPUs, global batch 128 (16 per GPU):
#   sbatch --nodes 2 --ntasks-per-node 4 --gpus-per-node 4 scripts/launch_slurm.sh \
#       configs/pretrain/point_mae.yaml -c configs/trainer/ddp_gpu.yaml \
#       --data.data_root data/shapenet55 --data.batch_size 16
set -euo pipefail

PROG=launch_slurm.sh

die() {
    echo "$PROG: error: $*" >&2
    exit 2
}

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '/^# Usage:/,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 0
fi
[[ -n ${SLURM_JOB_ID:-} ]] \
    || die "not inside a SLURM allocation (no SLURM_JOB_ID); submit with: sbatch scripts/$PROG CONFIG ..."
[[ $# -ge 1 ]] || die "missing CONFIG (usage: sbatch $PROG CONFIG [OVERRIDES...]; see --help)"
CONFIG=$1
shift
[[ -f $CONFIG ]] || die "config $CONFIG: no such file (the job runs in $(pwd))"

NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-}}}
# SLURM_NTASKS_PER_NODE is set when --ntasks-per-node was given; SLURM_TASKS_PER_NODE looks like "4(x2)".
tasks_per_node=${SLURM_TASKS_PER_NODE:-}
NTASKS_PER_NODE=${NTASKS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-${tasks_per_node%%[(,]*}}}
for name in NNODES NTASKS_PER_NODE; do
    [[ ${!name} =~ ^[1-9][0-9]*$ ]] \
        || die "$name must be a positive integer, got '${!name}' (sbatch --nodes / --ntasks-per-node)"
done
for arg in "$@"; do
    case $arg in
        --trainer.num_nodes* | --trainer.devices*)
            die "$arg: the topology comes from the allocation (sbatch --nodes / --ntasks-per-node)" ;;
    esac
done
# Without --trainer.default_root_dir, pcpt-pretrain picks runs/pretrain/<UTC timestamp> in each process;
# choose it once here (as pcpt-pretrain does for ranks it starts itself) so all tasks on all nodes agree.
export PCPT_RUN_DIR=${PCPT_RUN_DIR:-runs/pretrain/$(date -u +%Y%m%d-%H%M%S)}
# srun no longer inherits --cpus-per-task from sbatch (SLURM >= 22.05): pass it on for the loader workers.
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
    export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
fi

if [[ -n ${PCPT_PRETRAIN:-} ]]; then
    read -r -a pretrain <<<"$PCPT_PRETRAIN"
elif command -v pcpt-pretrain >/dev/null 2>&1; then
    pretrain=(pcpt-pretrain)
else
    pretrain=(python -m pretrain.cli)
fi
read -r -a srun_args <<<"${SRUN_ARGS:-}"
command -v srun >/dev/null 2>&1 || die "srun not found on PATH"

echo "$PROG: job ${SLURM_JOB_ID}, $NNODES node(s) x $NTASKS_PER_NODE task(s)" >&2
exec srun --nodes="$NNODES" --ntasks-per-node="$NTASKS_PER_NODE" --kill-on-bad-exit=1 "${srun_args[@]}" \
    "${pretrain[@]}" fit -c "$CONFIG" "$@" \
    --trainer.num_nodes="$NNODES" --trainer.devices="$NTASKS_PER_NODE"
