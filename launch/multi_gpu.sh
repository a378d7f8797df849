#!/usr/bin/env bash
# One machine with several GPUs: the normal command. One process sees every GPU, and the batch
# is split over all of them (training.batch_size must be divisible by the GPU count); nothing
# distributed to set up, because there is only one process.
#
#   ./launch/multi_gpu.sh                                   # configs/cifar10.py on all GPUs
#   CUDA_VISIBLE_DEVICES=0,1 ./launch/multi_gpu.sh           # only GPUs 0 and 1
#   CONFIG=configs/faces.py ./launch/multi_gpu.sh --config.training.batch_size=128
#
# Needs the CUDA build of JAX: pip install -U "jax[cuda12]"
set -euo pipefail

CONFIG="${CONFIG:-configs/cifar10.py}"
WORKDIR="${WORKDIR:-runs/$(basename "$CONFIG" .py)}"

# Extra arguments (e.g. --config.KEY=VALUE overrides, --mode=sample) are passed through.
python -m ddpm_jax.main --config "$CONFIG" --workdir "$WORKDIR" --config.model.dtype=bfloat16 "$@"
