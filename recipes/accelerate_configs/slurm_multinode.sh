#!/bin/bash
# Multi-node training under SLURM: one `accelerate launch` per node, each starting one process per GPU.
#   sbatch --nodes 2 recipes/accelerate_configs/slurm_multinode.sh recipes/stage1.py --config recipes/qwen2_5_vl_7b/stage1.yaml
# ACCELERATE_CONFIG picks the sharding (default multinode_fsdp2.yaml; zero3.yaml works the same way).
#SBATCH --job-name=vl-reward
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
set -euo pipefail

ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-recipes/accelerate_configs/multinode_fsdp2.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}

# srun starts one task per node; SLURM_NODEID (0..nodes-1) is that node's machine rank. The single quotes keep
# $SLURM_NODEID for the node itself to expand.
srun --kill-on-bad-exit=1 bash -c '.venv/bin/accelerate launch --config_file "$0" \
    --num_machines "$SLURM_NNODES" --num_processes $(( SLURM_NNODES * $1 )) \
    --machine_rank "$SLURM_NODEID" --main_process_ip "$2" --main_process_port "$3" \
    --rdzv_backend static --same_network "${@:4}"' \
    "$ACCELERATE_CONFIG" "$GPUS_PER_NODE" "$MAIN_ADDR" "$MAIN_PORT" "$@"
