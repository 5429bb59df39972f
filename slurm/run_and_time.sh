#!/bin/bash
# One training process of one MLPerf run; started by slurm/run.sub with `srun --ntasks-per-node=$DGXNGPU`
# inside the container (one task per GPU). Maps the Slurm task environment to torch.distributed's, then runs
#   python recipes/flux_schnell.py launcher=none <MLPerf data paths> <seed, log file> $CONFIG
# DRYRUN=1 prints the command instead of running it.
set -euo pipefail

: "${MLPERF_LOG_FILE:?set by run.sub: the MLPerf log of this run (mlperf.log_file)}"
: "${SEED_THIS_RUN:?set by run.sub: the seed of this run (train.seed)}"
RUN_INDEX="${RUN_INDEX:-0}"
CONFIG="${CONFIG:-}"
ENABLE_CHECKPOINTING="${ENABLE_CHECKPOINTING:-0}"
DGXNNODES="${DGXNNODES:-${SLURM_JOB_NUM_NODES:-1}}"
DGXNGPU="${DGXNGPU:-${SLURM_NTASKS_PER_NODE:-1}}"
CODEDIR="${CODEDIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
DRYRUN="${DRYRUN:-0}"

# torch.distributed env:// from Slurm (MASTER_ADDR/MASTER_PORT come from run.sub).
export RANK="${RANK:-${SLURM_PROCID:-0}}"
export LOCAL_RANK="${LOCAL_RANK:-${SLURM_LOCALID:-0}}"
export WORLD_SIZE="${WORLD_SIZE:-${SLURM_NTASKS:-1}}"
export LOCAL_WORLD_SIZE="${LOCAL_WORLD_SIZE:-${DGXNGPU}}"
export MASTER_ADDR="${MASTER_ADDR:-localhost}"
export MASTER_PORT="${MASTER_PORT:-29500}"

args=(
    launcher=none
    data=preprocessed
    data.train_path=/dataset/cc12m_preprocessed
    data.eval_path=/dataset/coco_preprocessed
    data.empty_encodings_path=/dataset/empty_encodings
    system.num_nodes="${DGXNNODES}"
    system.devices="${DGXNGPU}"
    train.seed="${SEED_THIS_RUN}"
    mlperf.log_file="${MLPERF_LOG_FILE}"
    exp_manager.exp_dir="/logdir/nemo_experiments/run_${RUN_INDEX}"
)
if [[ "${ENABLE_CHECKPOINTING}" != "1" ]]; then
    args+=(exp_manager.create_checkpoint_callback=false train.checkpoint_on_stop=false)
fi
# CONFIG: extra Hydra overrides, whitespace-separated (e.g. "system=h100_8x8 train.global_batch_size=1024").
read -r -a extra <<<"${CONFIG}"
args+=("${extra[@]}")

cmd=(python -u "${CODEDIR}/recipes/flux_schnell.py" "${args[@]}")
if [[ "${DRYRUN}" == "1" ]]; then
    printf '+'
    printf ' %q' "${cmd[@]}"
    printf '\n'
    exit 0
fi
cd "${CODEDIR}"
if [[ "${RANK}" == "0" ]]; then
    echo "flux1 run ${RUN_INDEX}: start $(date -u +%FT%TZ)"
fi
status=0
"${cmd[@]}" || status=$?
if [[ "${RANK}" == "0" ]]; then
    echo "flux1 run ${RUN_INDEX}: end $(date -u +%FT%TZ), exit status ${status}"
fi
exit "${status}"
