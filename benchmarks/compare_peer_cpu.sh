#!/usr/bin/env bash
# ddpm_jax vs lucidrains' denoising-diffusion-pytorch: one training step of DDPM's CIFAR-10
# network at 32x32, batch 16, on this machine's CPU. The two run back to back, never at the same
# time, and the pair is repeated (PAIRS) because a shared CPU makes single timings noisy.
#
#   benchmarks/compare_peer_cpu.sh                      # 2 pairs, results under runs/
#   PAIRS=3 OURS_FLAGS="--config.model.attention_impl=xla" benchmarks/compare_peer_cpu.sh
#   PEER_THREADS=1 benchmarks/compare_peer_cpu.sh       # torch on one thread (see below)
#
# Threads: torch defaults to one OpenMP thread per core. On a CPU shared with other jobs its
# thread barriers stall whenever a core is busy elsewhere; on our shared 2-core machine the peer
# ran ~8x faster with PEER_THREADS=1 than with its default 2, so run both before concluding.
#
# The peer lives in its own venv outside the repo (PEER_VENV, created on first use with CPU torch).
# Networks differ: the peer's closest U-Net (--dim 128 --mults 1,2,2,2, 28.5M params) has 8.97
# GFLOPs/img forward against DDPM's 12.44 (35.7M params), so the summary also gives
# FLOP-normalised throughput: GFLOP/s = images/s x 3 x forward GFLOPs/img (the backward pass costs
# ~2x the forward). Both forward counts are 2 x the multiply-adds of convolutions and matmuls:
# torch.utils.flop_counter's for the peer, measured here; the benchmark's
# forward_matmul_flops_per_image for ours, the same rule applied to our jaxpr.
set -euo pipefail
cd "$(dirname "$0")/.."

PAIRS="${PAIRS:-2}"
BATCH="${BATCH:-16}"
STEPS="${STEPS:-5}"                 # timed steps per side (ours: 5 repeats of 1 step, median)
PEER_VENV="${PEER_VENV:-/tmp/peer-venv}"
PEER_SCRIPT="${PEER_SCRIPT:-../shared/bench/peer_lucidrains.py}"
OURS_FLAGS="${OURS_FLAGS:-}"
PEER_THREADS="${PEER_THREADS:-0}"           # 0: torch's default (one per core)
OUT="${OUT:-runs/compare_peer_cpu_threads$PEER_THREADS}"

if [[ ! -x "$PEER_VENV/bin/python" ]]; then
  python -m venv "$PEER_VENV"
  "$PEER_VENV/bin/pip" install -q torch==2.13.0 denoising_diffusion_pytorch
fi
mkdir -p "$OUT"
# The peer's forward GFLOPs per image at 32x32, counted by torch (its torchvision stand-in first).
PEER_FWD_GFLOPS=$("$PEER_VENV/bin/python" - "$(realpath "$PEER_SCRIPT")" <<'EOF'
import os, sys
sys.path.insert(0, os.path.dirname(sys.argv[1]))
from peer_lucidrains import _torchvision_stand_in
_torchvision_stand_in()
import torch
from denoising_diffusion_pytorch import Unet
from torch.utils.flop_counter import FlopCounterMode
model = Unet(dim=128, dim_mults=(1, 2, 2, 2), flash_attn=False)
with FlopCounterMode(display=False) as counter:
    model(torch.rand(1, 3, 32, 32), torch.tensor([1]))
print(counter.get_total_flops() / 1e9)
EOF
)
echo "peer forward GFLOPs/img (torch.utils.flop_counter): $PEER_FWD_GFLOPS"
echo "machine: $(nproc) CPU cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"

for pair in $(seq 1 "$PAIRS"); do
  echo "== pair $pair/$PAIRS: ddpm_jax (load $(cut -d' ' -f1 /proc/loadavg))"
  # shellcheck disable=SC2086  # OURS_FLAGS is a list of flags
  python -m ddpm_jax.benchmark --config configs/cifar10.py \
    --config.training.batch_size="$BATCH" --repeats="$STEPS" --steps=1 --skip_sampling \
    $OURS_FLAGS 2>"$OUT/ours_$pair.log" | tail -n 1 | tee "$OUT/ours_$pair.json"
  echo "== pair $pair/$PAIRS: peer (load $(cut -d' ' -f1 /proc/loadavg))"
  "$PEER_VENV/bin/python" "$PEER_SCRIPT" --dim 128 --mults 1,2,2,2 --batch "$BATCH" --size 32 \
    --steps "$STEPS" --threads "$PEER_THREADS" 2>"$OUT/peer_$pair.log" | tail -n 1 | tee "$OUT/peer_$pair.json"
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"

python - "$OUT" "$PAIRS" "$PEER_FWD_GFLOPS" <<'EOF'
import json
import statistics
import sys

out, pairs, peer_fwd = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ours_fwd = json.load(open(f"{out}/ours_1.json"))["forward_matmul_flops_per_image"] / 1e9
print(f"\n{'pair':<5}{'ours img/s':>12}{'peer img/s':>12}{'ratio':>8}"
      f"{'ours GFLOP/s':>14}{'peer GFLOP/s':>14}{'ratio':>8}")
rows = []
for p in range(1, pairs + 1):
    ours = json.load(open(f"{out}/ours_{p}.json"))["train_images_per_s"]
    peer = json.load(open(f"{out}/peer_{p}.json"))["img_per_s"]
    o_fl, p_fl = ours * 3 * ours_fwd, peer * 3 * peer_fwd
    rows.append((ours, peer, o_fl, p_fl))
    print(f"{p:<5}{ours:>12.3f}{peer:>12.3f}{ours / peer:>8.2f}{o_fl:>14.1f}{p_fl:>14.1f}"
          f"{o_fl / p_fl:>8.2f}")
med = [statistics.median(col) for col in zip(*rows)]
print(f"{'med':<5}{med[0]:>12.3f}{med[1]:>12.3f}{med[0] / med[1]:>8.2f}{med[2]:>14.1f}"
      f"{med[3]:>14.1f}{med[2] / med[3]:>8.2f}")
print(f"GFLOP/s = img/s x 3 x forward GFLOPs/img ({ours_fwd:.2f} ours, {peer_fwd:.2f} peer)")
EOF
