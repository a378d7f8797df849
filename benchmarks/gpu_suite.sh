#!/usr/bin/env bash
# Issue 6's GPU measurements in one command, for a GPU machine with no network (such as the
# project's lent H200, whose image has jax[cuda], flax, optax, orbax and torch but not
# ml_collections or the peer).
#
#   benchmarks/gpu_suite.sh fetch     # here, with network: wheels + the peer script into .gpu_kit/
#   benchmarks/gpu_suite.sh run       # there, with .gpu_kit/ in the repo (device tool: carry it)
#
# `run` installs the kit's wheels into /tmp/site (no network, no dependencies pulled), then times:
#   1. ours, DDPM CIFAR-10 recipe, batch 128, bf16, 10 steps per jitted call, with the ancestral
#      (1,000 steps) and DDIM samplers on 256 images: train images/s, MFU, sampler images/s;
#   2. ours, the same in float32 (training only), to show what bf16 buys;
#   3. the peer (lucidrains' denoising-diffusion-pytorch, --dim 128 --mults 1,2,2,2) on the GPU,
#      as ../shared/bench/peer_lucidrains.py runs it (float32) and in bf16 autocast
#      (benchmarks/peer_autocast.py; its trainer's amp option is the same idea);
# and prints the issue's targets against the figures. Each part writes its JSON line to
# $RESULTS (default runs/gpu_suite) as soon as it ends, so a part that fails
# or times out costs only itself. The parts' time limits add up to 11 minutes, over the device
# tool's 10 per command: PARTS="bf16" and PARTS="fp32 peer" split them over two commands. Where
# $OUT is set (the device tool), summary.txt and gpu_suite.tar.gz (every file) are put there.
# Knobs: BATCH, STEPS_PER_CALL, SAMPLE_IMAGES, ATTN (model.attention_impl: auto, cudnn or xla),
# BF16_TIMEOUT/FP32_TIMEOUT/PEER_TIMEOUT (seconds), PY (the Python with jax; default python3),
# PEER_PY (the one with torch; default PY).
set -uo pipefail
cd "$(dirname "$0")/.."

KIT="${KIT:-.gpu_kit}"
PEER_SCRIPT_SRC="${PEER_SCRIPT_SRC:-../shared/bench/peer_lucidrains.py}"
# Pure-Python wheels only; everything else they import is in the GPU image.
WHEELS=(ml_collections==1.1.0 denoising_diffusion_pytorch==2.3.4 ema-pytorch==0.8.3
        pytorch-fid==0.3.0)

fetch() {
  mkdir -p "$KIT"
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d "$KIT" "${WHEELS[@]}"
  cp "$PEER_SCRIPT_SRC" "$KIT/peer_lucidrains.py"
  ls -l "$KIT"
}

ended() {  # part name, its exit status: say why a part left no result
  case "$2" in
    0) ;;
    124) echo "$1: timed out (raise its *_TIMEOUT)" ;;
    *) echo "$1: exit $2; the end of $1.log:"; tail -n 5 "$results/$1.log" ;;
  esac
}

run() {
  local py="${PY:-python3}" peer_py="${PEER_PY:-${PY:-python3}}" batch="${BATCH:-128}"
  local k="${STEPS_PER_CALL:-10}" n_img="${SAMPLE_IMAGES:-256}"
  local results="${RESULTS:-runs/gpu_suite}" parts="${PARTS:-bf16 fp32 peer}"
  mkdir -p "$results"
  if ! "$py" -c "import ml_collections" 2>/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$KIT"/*.whl \
      || { echo "error: could not install the wheels in $KIT (run 'fetch' first)"; exit 1; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    | tee "$results/gpu.txt"
  { "$py" -c "import jax, flax; print('jax', jax.__version__, jax.devices(), flax.__version__)"
    "$peer_py" -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())"
  } 2>&1 | tee "$results/versions.txt"

  local common=(--config configs/cifar10.py --config.training.batch_size="$batch"
                --config.training.steps_per_call="$k" --steps=$((10 * k)) --repeats=5
                --config.model.attention_impl="${ATTN:-auto}")
  if [[ " $parts " == *" bf16 "* ]]; then
    echo "== ours, bf16, samplers on $n_img images"
    timeout "${BF16_TIMEOUT:-330}" "$py" -m ddpm_jax.benchmark "${common[@]}" \
      --config.model.dtype=bfloat16 --sample_images="$n_img" 2>"$results/ours_bf16.log" \
      | tee "$results/ours_bf16.txt" | tail -n 1 > "$results/ours_bf16.json"
    ended ours_bf16 "${PIPESTATUS[0]}"
  fi
  if [[ " $parts " == *" fp32 "* ]]; then
    echo "== ours, float32, training only"
    timeout "${FP32_TIMEOUT:-150}" "$py" -m ddpm_jax.benchmark "${common[@]}" --skip_sampling \
      2>"$results/ours_fp32.log" | tail -n 1 > "$results/ours_fp32.json"
    ended ours_fp32 "${PIPESTATUS[0]}"
  fi
  if [[ " $parts " == *" peer "* ]]; then
    echo "== peer, batch $batch"
    timeout "${PEER_TIMEOUT:-90}" "$peer_py" "$KIT/peer_lucidrains.py" --dim 128 \
      --mults 1,2,2,2 --batch "$batch" --size 32 --steps 20 2>"$results/peer.log" \
      | tail -n 1 > "$results/peer.json"
    ended peer "${PIPESTATUS[0]}"
    echo "== peer in bf16 autocast, batch $batch"
    timeout "${PEER_TIMEOUT:-90}" "$peer_py" benchmarks/peer_autocast.py \
      --peer_script "$KIT/peer_lucidrains.py" --batch "$batch" --steps 20 \
      2>"$results/peer_bf16.log" | tail -n 1 > "$results/peer_bf16.json"
    ended peer_bf16 "${PIPESTATUS[0]}"
  fi
  summarize "$py" "$results" | tee "$results/summary.txt"
  if [[ -n "${OUT:-}" ]]; then  # the device tool returns at most 8 files: two
    cp "$results/summary.txt" "$OUT/" && tar czf "$OUT/gpu_suite.tar.gz" -C "$results" .
  fi
}

summarize() {
  "$1" - "$2" <<'EOF'
import json, os, sys

results = sys.argv[1]
def load(name):
    try:
        with open(os.path.join(results, name + ".json")) as f:
            return json.loads(f.read().strip() or "null")
    except (OSError, ValueError):
        return None

bf16, fp32 = load("ours_bf16"), load("ours_fp32")
peer, peer_bf16 = load("peer"), load("peer_bf16")
rows = []
def target(what, value, goal, ok):
    shown = "n/a" if value is None else f"{value:.4g}"
    verdict = "n/a" if value is None else ("met" if ok(value) else "MISSED")
    rows.append(f"{what:<52}{shown:>12}   goal {goal:<10}{verdict}")

ours = bf16 and bf16.get("train_images_per_s")
target(f"train images/s (bf16, batch {bf16 and bf16.get('batch_size')})", ours, ">= 8000",
       lambda v: v >= 8000)
target("MFU (bf16)", bf16 and bf16.get("mfu"), ">= 0.40", lambda v: v >= 0.40)
anc = bf16 and bf16.get("ddpm_sample_images_per_s")
n, steps = bf16 and bf16.get("sample_images"), bf16 and bf16.get("ddpm_sample_steps")
target(f"ancestral sampling, {steps} steps, {n} images: seconds", n / anc if anc else None, "< 8",
       lambda v: v < 8)
for label, r in (("float32", peer), ("bf16 autocast", peer_bf16)):
    p = r and r.get("img_per_s")
    target(f"ours bf16 / peer {label}: train images/s", ours / p if ours and p else None, ">= 2",
           lambda v: v >= 2)
print("\n".join(rows))
for name, r in (("ours bf16", bf16), ("ours fp32", fp32), ("peer", peer),
                ("peer bf16 autocast", peer_bf16)):
    if r:
        keys = ("device_kind", "train_images_per_s", "img_per_s", "mfu", "achieved_tflops",
                "flops_per_image", "peak_memory_bytes", "compile_s", "ddpm_sample_images_per_s",
                "ddim_sample_images_per_s", "device", "params_M")
        print(name + ": " + ", ".join(f"{k}={r[k]:.4g}" if isinstance(r[k], float) else
                                      f"{k}={r[k]}" for k in keys if r.get(k) is not None))
    else:
        print(f"{name}: no result (see its .log)")
EOF
}

case "${1:-}" in
  fetch) fetch ;;
  run) run ;;
  summarize) summarize "${PY:-python3}" "${RESULTS:-runs/gpu_suite}" ;;
  *) echo "usage: $0 fetch|run|summarize" >&2; exit 2 ;;
esac
