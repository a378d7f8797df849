#!/usr/bin/env bash
# ddpm_jax vs PyTorch on this machine's CPU, DDPM's CIFAR-10 network at 32x32, batch 16:
#   * diffusers' UNet2DModel in DDPM's layout (../shared/bench/peer_diffusers.py): the SAME network
#     (35,746,307 parameters, dropout 0.1), eager PyTorch: a training step (forward, eps-MSE,
#     backward, clip 1.0, Adam) and a sampling step (one network evaluation of the batch);
#   * lucidrains' denoising-diffusion-pytorch (../shared/bench/peer_lucidrains.py), the trainer
#     users pick, whose closest U-Net is a different network: training only, per image and per FLOP.
# Each pair runs every side once, back to back, never two at the same time, and prints its ratios
# at once: on a shared CPU only a pair's own ratio means much, so the pair is repeated (PAIRS).
#
#   benchmarks/compare_peer_cpu.sh                      # 2 pairs, both peers, results under runs/
#   PAIRS=3 ROWS=train PEERS=diffusers benchmarks/compare_peer_cpu.sh
#   OURS_FLAGS="--config.model.attention_impl=xla" benchmarks/compare_peer_cpu.sh
#   PEER_THREADS=1 benchmarks/compare_peer_cpu.sh       # torch on one thread (see below)
#
# Rows: `train` is training images/s (ours: python -m ddpm_jax.benchmark, the median of STEPS
# one-step repeats); `sample` is network evaluations/s (image-evaluations: ours DDIM with
# SAMPLE_STEPS steps on BATCH images, the whole draw one jitted call; the peer's --sample, the same
# network called on the batch at t = 500 STEPS times under no_grad).
#
# Threads: torch defaults to one OpenMP thread per core. On a CPU shared with other jobs its
# thread barriers stall whenever a core is busy elsewhere (lucidrains' peer once ran ~8x faster
# with PEER_THREADS=1 than with its default 2 here), so try both before concluding.
#
# The peers live in one venv outside the repo (PEER_VENV, created on first use with CPU torch).
# lucidrains' closest U-Net (--dim 128 --mults 1,2,2,2, 28.5M params) has 8.97 GFLOPs/img forward
# against DDPM's 12.44, so its rows also give FLOP-normalised throughput: GFLOP/s = images/s x 3 x
# forward GFLOPs/img (the backward pass costs ~2x the forward), both counted as 2 x the
# multiply-adds of convolutions and matmuls (torch.utils.flop_counter's rule; the benchmark's
# forward_matmul_flops_per_image for ours).
set -euo pipefail
cd "$(dirname "$0")/.."

PAIRS="${PAIRS:-2}"
BATCH="${BATCH:-16}"
STEPS="${STEPS:-5}"                 # timed steps per side (ours: 5 repeats of 1 step, median)
SAMPLE_STEPS="${SAMPLE_STEPS:-4}"   # ours: DDIM steps per draw (the peer: STEPS evaluations)
ROWS="${ROWS:-train sample}"
PEERS="${PEERS:-diffusers lucidrains}"
PEER_VENV="${PEER_VENV:-/tmp/peer-venv}"
PEER_DIR="${PEER_DIR:-../shared/bench}"
OURS_FLAGS="${OURS_FLAGS:-}"
PEER_THREADS="${PEER_THREADS:-0}"           # 0: torch's default (one per core)
OUT="${OUT:-runs/compare_peer_cpu_threads$PEER_THREADS}"
PY="${PY:-python}"
has() { [[ " $1 " == *" $2 "* ]]; }

if ! "$PEER_VENV/bin/python" -c "import importlib.util as u, torch, diffusers
assert u.find_spec('denoising_diffusion_pytorch')" 2>/dev/null; then
  [[ -x "$PEER_VENV/bin/python" ]] || python -m venv "$PEER_VENV"
  # torch alone first, so that the others find it and pull no other build.
  "$PEER_VENV/bin/pip" install -q "${TORCH_SPEC:-torch==2.13.0}"
  "$PEER_VENV/bin/pip" install -q diffusers==0.42.1 denoising_diffusion_pytorch
fi
# A torchvision built for another torch breaks diffusers' import ("operator torchvision::nms does
# not exist"); neither step uses it (peer_lucidrains.py puts a stand-in in its place).
if ! "$PEER_VENV/bin/python" -c "import torchvision" 2>/dev/null; then
  "$PEER_VENV/bin/pip" uninstall -q -y torchvision 2>/dev/null || true
fi
mkdir -p "$OUT"
rm -f "$OUT"/*.json
PEER_FWD_GFLOPS=0
if has "$PEERS" lucidrains && has "$ROWS" train; then
  # lucidrains' forward GFLOPs per image at 32x32, counted by torch (its torchvision stand-in).
  PEER_FWD_GFLOPS=$("$PEER_VENV/bin/python" - "$(realpath "$PEER_DIR/peer_lucidrains.py")" <<'EOF'
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
  echo "lucidrains forward GFLOPs/img (torch.utils.flop_counter): $PEER_FWD_GFLOPS"
fi
echo "machine: $(nproc) CPU cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "torch: $("$PEER_VENV/bin/python" -c 'import torch, diffusers; print(torch.__version__, "diffusers", diffusers.__version__)')"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"

summary() {  # the ratios of every pair measured so far, then their medians
  "$PY" - "$OUT" "$PAIRS" "$PEER_FWD_GFLOPS" <<'EOF'
import json
import os
import statistics
import sys

out, pairs, luc_fwd = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])

def load(name):
    try:
        with open(os.path.join(out, name + ".json")) as f:
            return json.loads(f.read().strip() or "null")
    except (OSError, ValueError):
        return None

def ours_train(p):
    r = load(f"ours_train_{p}")
    return r and r["train_images_per_s"], r and r["forward_matmul_flops_per_image"] / 1e9

def ours_sample(p):
    r = load(f"ours_sample_{p}")
    return r and r["ddim_sample_images_per_s"] * r["ddim_sample_steps"]

def peer(name, p):
    r = load(f"{name}_{p}")
    return r and r["img_per_s"]

rows = {"train: images/s, ours / diffusers (same network)":
        lambda p: (ours_train(p)[0], peer("diffusers_train", p)),
        "sample: network evaluations/s, ours DDIM / diffusers":
        lambda p: (ours_sample(p), peer("diffusers_sample", p)),
        "train: images/s, ours / lucidrains (a smaller network)":
        lambda p: (ours_train(p)[0], peer("lucidrains_train", p)),
        "train: GFLOP/s, ours / lucidrains":
        lambda p: ((ours_train(p)[0] or 0) * 3 * (ours_train(p)[1] or 0),
                   (peer("lucidrains_train", p) or 0) * 3 * luc_fwd)}
for title, get in rows.items():
    got = [(p, *get(p)) for p in range(1, pairs + 1)]
    got = [(p, o, q) for p, o, q in got if o and q]
    if not got:
        continue
    print(f"\n{title}\n{'pair':<6}{'ours':>10}{'peer':>10}{'ratio':>8}")
    for p, o, q in got:
        print(f"{p:<6}{o:>10.2f}{q:>10.2f}{o / q:>8.2f}")
    if len(got) > 1:
        ratios = [o / q for _, o, q in got]
        print(f"{'median':<6}{statistics.median(o for _, o, _ in got):>10.2f}"
              f"{statistics.median(q for _, _, q in got):>10.2f}{statistics.median(ratios):>8.2f}"
              f"   (ratios {min(ratios):.2f} to {max(ratios):.2f})")
EOF
}

ours() {  # row, pair, flags...
  local row=$1 pair=$2
  shift 2
  echo "== pair $pair/$PAIRS: ddpm_jax $row (load $(cut -d' ' -f1 /proc/loadavg))"
  # shellcheck disable=SC2086  # OURS_FLAGS is a list of flags
  "$PY" -m ddpm_jax.benchmark --config configs/cifar10.py --config.training.batch_size="$BATCH" \
    "$@" $OURS_FLAGS 2>"$OUT/ours_${row}_$pair.log" | tail -n 1 > "$OUT/ours_${row}_$pair.json" \
    || echo "   failed: see $OUT/ours_${row}_$pair.log"
}

peer() {  # name, row, pair, command...
  local name=$1 row=$2 pair=$3
  shift 3
  echo "== pair $pair/$PAIRS: $name $row (load $(cut -d' ' -f1 /proc/loadavg))"
  "$PEER_VENV/bin/python" "$@" --threads "$PEER_THREADS" 2>"$OUT/${name}_${row}_$pair.log" \
    | tail -n 1 > "$OUT/${name}_${row}_$pair.json" || echo "   failed: see $OUT/${name}_${row}_$pair.log"
}

for pair in $(seq 1 "$PAIRS"); do
  if has "$ROWS" train; then
    ours train "$pair" --repeats="$STEPS" --steps=1 --skip_sampling
    if has "$PEERS" diffusers; then
      peer diffusers train "$pair" "$PEER_DIR/peer_diffusers.py" --batch "$BATCH" --steps "$STEPS"
    fi
    if has "$PEERS" lucidrains; then
      peer lucidrains train "$pair" "$PEER_DIR/peer_lucidrains.py" --dim 128 --mults 1,2,2,2 \
        --batch "$BATCH" --size 32 --steps "$STEPS"
    fi
  fi
  if has "$ROWS" sample && has "$PEERS" diffusers; then
    ours sample "$pair" --skip_training --samplers=ddim --sample_images="$BATCH" \
      --sampling_timesteps="$SAMPLE_STEPS" --repeats=3
    peer diffusers sample "$pair" "$PEER_DIR/peer_diffusers.py" --sample --batch "$BATCH" \
      --steps "$STEPS"
  fi
  summary | tail -n +1 > "$OUT/summary.txt"
  echo "-- after pair $pair:"; cat "$OUT/summary.txt"
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
