#!/usr/bin/env bash
# Issue 26's GPU measurements in ONE call of at most ~9 minutes, compiles included, on a GPU
# machine with no network (such as the project's lent H200, whose image has jax[cuda], flax,
# optax, orbax, torch, scipy and sklearn but not ml_collections, diffusers or the peers).
#
#   benchmarks/gpu_suite.sh fetch          # here, with network: wheels + peer scripts -> .gpu_kit/
#   benchmarks/gpu_suite.sh run            # there, with .gpu_kit/ in the repo (device tool: carry)
#   SMOKE=1 benchmarks/gpu_suite.sh run    # the whole script on this CPU, tiny, a few minutes
#   benchmarks/gpu_suite.sh summarize      # the summary again from RESULTS
#
# `run` installs the kit's wheels that the image lacks into /tmp/site (no network, nothing the
# image has is shadowed), checks every import of every part before the first heavy one (ours
# missing: exit 1 at once; a peer missing: its parts are skipped and named), then runs, in order
# of importance, each under its own time limit clipped to what is left of BUDGET seconds:
#   ours_b128    ours, DDPM CIFAR-10 recipe, bf16, batch 128, STEPS_PER_CALL steps per jitted
#                call: train images/s, MFU, peak memory, compile time;
#   samplers     every sampler (ancestral, DDIM, DPM-Solver++, Heun) on SAMPLE_IMAGES images at
#                SAMPLER_STEPS (100) steps, bf16: per-step rate, extrapolated to 1,000 steps;
#   diffusers_*  the same network in PyTorch (../shared/bench/peer_diffusers.py, diffusers'
#                UNet2DModel, 35.7M params): eager float32, eager bf16 autocast, torch.compile bf16;
#   ours_b512    ours as ours_b128 at batch 512;
#   lucidrains   lucidrains' denoising-diffusion-pytorch in bf16 autocast (peer_autocast.py).
# A part of ours that fails (not a timeout) with ATTN=auto runs again with attention_impl=xla
# (cuDNN's fused attention is the likeliest thing to break on a new GPU stack). Each part's JSON
# line lands in $RESULTS as soon as it ends, and summary.txt plus gpu_suite.tar.gz (every file)
# are rewritten in $OUT (the device tool's folder; RESULTS if unset) after each part, so a call
# cut short still returns what it measured. Knobs: PARTS (a subset of the names above), BUDGET,
# ATTN, BATCH, BIG_BATCH, STEPS_PER_CALL, SAMPLE_IMAGES, SAMPLER_STEPS, PY (the Python with jax;
# default python3), PEER_PY (the one with torch; default PY).
set -uo pipefail
cd "$(dirname "$0")/.."

KIT="${KIT:-.gpu_kit}"
SHARED_BENCH="${SHARED_BENCH:-../shared/bench}"
# What the GPU image lacks. diffusers' and the peers' own dependencies are added by `fetch` from
# a venv where they are installed (PEER_VENV), at the versions that work there.
TOP=(ml_collections==1.1.0 diffusers==0.42.1 denoising_diffusion_pytorch==2.3.4
     ema-pytorch==0.8.3 pytorch-fid==0.3.0)
# Never in the kit: the image's own (binary, CUDA) builds must be the ones used.
IMAGE_HAS='^(torch|torchvision|triton|nvidia-.*|jax|jaxlib|jax-cuda.*|numpy|scipy|scikit-learn|flax|optax|orbax-.*|setuptools|pip|sympy|networkx|jinja2|markupsafe|mpmath)$'

fetch() {
  local venv="${PEER_VENV:-/tmp/peer-venv}" deps
  mkdir -p "$KIT"
  deps=$("$venv/bin/python" -m pip freeze 2>/dev/null | sed 's/ @ .*//' | grep '==' \
    | awk -F'==' -v re="$IMAGE_HAS" 'tolower($1) !~ re {print $1 "==" $2}' \
    | sed 's/+.*//') || { echo "error: no peer venv at $venv (benchmarks/compare_peer_cpu.sh" \
                               "makes it)"; exit 1; }
  # Binary wheels (regex, Pillow, PyYAML, ...) for every Python the image may have.
  for v in 3.11 3.12 3.13; do  # jax 0.11 and diffusers 0.42 need 3.11+
    # shellcheck disable=SC2086  # deps is a list
    python -m pip download -q --no-deps --only-binary=:all: --python-version "$v" \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux_2_17_x86_64 -d "$KIT" "${TOP[@]}" absl-py $deps \
      || { echo "error: pip download failed for Python $v"; exit 1; }
  done
  cp "$SHARED_BENCH/peer_diffusers.py" "$SHARED_BENCH/peer_lucidrains.py" "$KIT/"
  du -sh "$KIT"
}

install_kit() {  # python: install into /tmp/site the kit's distributions that it lacks
  local py=$1 missing
  missing=$("$py" - "$KIT" <<'EOF'
import importlib.metadata as md, os, re, sys
names = set()
for f in os.listdir(sys.argv[1]):
    if f.endswith(".whl"):
        name, version = f.split("-")[:2]
        try:
            md.version(name)
        except md.PackageNotFoundError:
            names.add(f"{name}=={version}")
print(" ".join(sorted(names)))
EOF
)
  if [[ -n "$missing" ]]; then
    echo "installing from $KIT: $missing"
    # shellcheck disable=SC2086  # missing is a list
    "$py" -m pip install -q --no-index --no-deps --no-compile --find-links "$KIT" \
      --target /tmp/site $missing || { echo "error: could not install the kit's wheels"; exit 1; }
  fi
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
}

preflight() {  # every import of every part, before the first heavy one
  local py=$1 peer_py=$2
  "$py" -c "
import jax, flax, optax, orbax.checkpoint, ml_collections
from ddpm_jax import benchmark
print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__)
" || { echo "error: ours cannot import (above); nothing was run"; exit 1; }
  if [[ -z "${SMOKE:-}" ]] && ! "$py" -c "import jax; assert jax.default_backend() == 'gpu'"; then
    echo "error: jax sees no GPU ($("$py" -c 'import jax; print(jax.devices())')); SMOKE=1 runs"\
         "the suite on a CPU"
    exit 1
  fi
  "$peer_py" -c "import torch, diffusers; from diffusers import UNet2DModel, DDPMScheduler
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers',
      diffusers.__version__)" || NO_PEER+=" diffusers"
  "$peer_py" -c "
import sys; sys.path.insert(0, '$PEER_DIR')
from peer_lucidrains import _torchvision_stand_in; _torchvision_stand_in()
import denoising_diffusion_pytorch" || NO_PEER+=" lucidrains"
  [[ -z "$NO_PEER" ]] || echo "error: cannot import peer(s):$NO_PEER; their parts are skipped"
}

publish() {  # summary.txt and the tarball, after every part
  summarize "$PY_" "$RESULTS" > "$RESULTS/summary.txt" 2>&1
  local out="${OUT:-$RESULTS}"
  cp "$RESULTS/summary.txt" "$out/summary.txt" 2>/dev/null
  tar czf "$out/gpu_suite.tar.gz.tmp" -C "$RESULTS" --exclude gpu_suite.tar.gz \
    --exclude gpu_suite.tar.gz.tmp . && mv "$out/gpu_suite.tar.gz.tmp" "$out/gpu_suite.tar.gz"
}

part() {  # name, limit (s), command...: run it under what is left of BUDGET, keep its JSON line
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - SECONDS))
  if ((left < 15)); then
    echo "$name: skipped, the budget is spent" | tee "$RESULTS/$name.skipped"
    return 1
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit}s, $((DEADLINE - SECONDS))s of the budget left)"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$RESULTS/$name.out" 2>"$RESULTS/$name.log"
  local rc=$?
  tail -n 1 "$RESULTS/$name.out" | grep '^{' > "$RESULTS/$name.json" || rm -f "$RESULTS/$name.json"
  case $rc in
    0) echo "$name: done in $((SECONDS - t0))s" ;;
    124) echo "$name: timed out after ${limit}s" | tee "$RESULTS/$name.failed" ;;
    *) { echo "$name: exit $rc; the end of $name.log:"; tail -n 5 "$RESULTS/$name.log"; } \
         | tee "$RESULTS/$name.failed" ;;
  esac
  publish
  return $rc
}

ours() {  # name, limit, benchmark flags...: with attention_impl=xla again if ATTN=auto failed
  local name=$1 limit=$2 rc
  shift 2
  part "$name" "$limit" "$PY_" -m ddpm_jax.benchmark "${OURS[@]}" "$@" \
    --config.model.attention_impl="$ATTN"
  rc=$?
  if ((rc != 0 && rc != 124)) && [[ "$ATTN" == auto ]]; then
    echo "$name: retrying with --config.model.attention_impl=xla"
    mv "$RESULTS/$name.log" "$RESULTS/$name.auto.log"
    rm -f "$RESULTS/$name.failed"
    part "$name" "$limit" "$PY_" -m ddpm_jax.benchmark "${OURS[@]}" "$@" \
      --config.model.attention_impl=xla
  fi
}

run() {
  PY_="${PY:-python3}"
  local peer_py="${PEER_PY:-$PY_}"
  RESULTS="${RESULTS:-runs/gpu_suite}"
  ATTN="${ATTN:-auto}"
  PEER_DIR="$KIT"
  [[ -f "$PEER_DIR/peer_diffusers.py" ]] || PEER_DIR="$SHARED_BENCH"
  PEER_DIR=$(realpath "$PEER_DIR")
  local parts="${PARTS:-ours_b128 samplers diffusers_fp32 diffusers_bf16 diffusers_compile
                        ours_b512 lucidrains}"
  local batch="${BATCH:-128}" big="${BIG_BATCH:-512}" k="${STEPS_PER_CALL:-10}"
  local n_img="${SAMPLE_IMAGES:-256}" s_steps="${SAMPLER_STEPS:-100}" p_steps=20 repeats=5
  local dtype=bfloat16 budget="${BUDGET:-530}"
  OURS=(--config configs/cifar10.py)
  if [[ -n "${SMOKE:-}" ]]; then  # the CPU, a tiny network, a few steps: every code path
    export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=""
    batch="${BATCH:-4}" big="${BIG_BATCH:-8}" k=1 n_img="${SAMPLE_IMAGES:-4}"
    s_steps="${SAMPLER_STEPS:-3}" p_steps=1 repeats=2 budget="${BUDGET:-600}"
    OURS+=(--config.model.ch=32 "--config.model.ch_mult=(1,2)" --config.model.num_res_blocks=1)
    RESULTS="${RESULTS%/}_smoke"
  fi
  DEADLINE=$((SECONDS + budget))
  NO_PEER=""
  rm -rf "$RESULTS" && mkdir -p "$RESULTS"
  [[ -n "${OUT:-}" ]] && mkdir -p "$OUT"
  if ! "$PY_" -c "import ml_collections" 2>/dev/null || \
     ! "$peer_py" -c "import importlib.util as u, diffusers
assert u.find_spec('denoising_diffusion_pytorch') and u.find_spec('ema_pytorch')" 2>/dev/null
  then
    [[ -d "$KIT" ]] || { echo "error: $KIT missing: run '$0 fetch' first (with network)"; exit 1; }
    install_kit "$PY_"
    [[ "$peer_py" == "$PY_" ]] || install_kit "$peer_py"
  fi
  export PYTHONUNBUFFERED=1
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
    echo "smoke: ${SMOKE:-no}; budget ${budget}s; parts: $(echo $parts)"
    preflight "$PY_" "$peer_py"
  } 2>&1 | tee "$RESULTS/versions.txt"
  [[ ${PIPESTATUS[0]} == 0 ]] || exit 1
  grep -q "cannot import peer(s):.*diffusers" "$RESULTS/versions.txt" && NO_PEER+=" diffusers"
  grep -q "cannot import peer(s):.*lucidrains" "$RESULTS/versions.txt" && NO_PEER+=" lucidrains"
  publish

  local train=(--config.model.dtype="$dtype" --config.training.steps_per_call="$k"
               --steps=$((10 * k)) --repeats="$repeats" --skip_sampling)
  local diff=("$peer_py" "$PEER_DIR/peer_diffusers.py" --batch "$batch" --steps "$p_steps")
  for p in $parts; do
    case $p in
      ours_b128) ours ours_b128 150 "${train[@]}" --config.training.batch_size="$batch" ;;
      ours_b512) ours ours_b512 150 "${train[@]}" --config.training.batch_size="$big" ;;
      samplers) ours samplers 180 --config.model.dtype="$dtype" --skip_training \
                  --sample_images="$n_img" --sampling_timesteps="$s_steps" --repeats=3 ;;
      diffusers_fp32|diffusers_bf16|diffusers_compile)
        if [[ "$NO_PEER" == *diffusers* ]]; then echo "$p: skipped (no diffusers)"; continue; fi
        case $p in
          diffusers_fp32) part "$p" 60 "${diff[@]}" ;;
          diffusers_bf16) part "$p" 60 "${diff[@]}" --bf16 ;;
          # SMOKE: inductor's C++ build of the network takes over 4 minutes on 2 cores, so
          # torch.compile is switched off there (the part's flags and path still run).
          diffusers_compile) part "$p" 240 env ${SMOKE:+TORCH_COMPILE_DISABLE=1} "${diff[@]}" \
                               --bf16 --compile ;;
        esac ;;
      lucidrains)
        if [[ "$NO_PEER" == *lucidrains* ]]; then echo "$p: skipped (no lucidrains)"; continue; fi
        part lucidrains 60 "$peer_py" benchmarks/peer_autocast.py --peer_script \
          "$PEER_DIR/peer_lucidrains.py" --batch "$batch" --steps "$p_steps" ;;
      *) echo "error: unknown part $p (known: ours_b128 samplers diffusers_fp32 diffusers_bf16" \
              "diffusers_compile ours_b512 lucidrains)"; exit 2 ;;
    esac
  done
  publish
  cat "$RESULTS/summary.txt"
  # Exit status: 0 only if every part asked for left a result.
  for p in $parts; do [[ -s "$RESULTS/$p.json" ]] || return 1; done
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

b128, b512, samp = load("ours_b128"), load("ours_b512"), load("samplers")
peers = {n: load(n) for n in ("diffusers_fp32", "diffusers_bf16", "diffusers_compile",
                              "lucidrains")}
rows = []
def target(what, value, goal, ok):
    shown = "n/a" if value is None else f"{value:.4g}"
    verdict = "n/a" if value is None else ("met" if ok(value) else "MISSED")
    rows.append(f"{what:<62}{shown:>11}   goal {goal:<9}{verdict}")

ours = b128 and b128.get("train_images_per_s")
target(f"train images/s (bf16, batch {b128 and b128.get('batch_size')})", ours, ">= 8000",
       lambda v: v >= 8000)
target("MFU (bf16, batch 128)", b128 and b128.get("mfu"), ">= 0.40", lambda v: v >= 0.40)
# Per-step rate (image-steps/s) of each sampler, and 256 images x 1,000 steps from it.
rates = {}
for s in ("ddpm", "ddim", "dpm_solver++", "heun"):
    ips, steps = (samp or {}).get(f"{s}_sample_images_per_s"), (samp or {}).get(f"{s}_sample_steps")
    if ips and steps:
        rates[s] = ips * steps
anc = rates.get("ddpm")
target("ancestral 256 samples x 1,000 steps: seconds (extrapolated)",
       256 * 1000 / anc if anc else None, "< 8", lambda v: v < 8)
for name, goal in (("diffusers_bf16", 2.0), ("diffusers_compile", 1.0)):
    p = peers[name] and peers[name].get("img_per_s")
    target(f"ours bf16 / {name}: train images/s, batch 128", ours / p if ours and p else None,
           f">= {goal:g}", lambda v, g=goal: v >= g)
print("\n".join(rows))
print()
for name, r in (("ours_b128", b128), ("ours_b512", b512)):
    if r:
        mem = r.get("peak_memory_bytes")
        print(f"{name}: {r['train_images_per_s']:.1f} img/s, MFU {r.get('mfu') or 0:.3f}, "
              f"{r.get('achieved_tflops') or 0:.1f} TFLOP/s, peak memory "
              f"{mem / 2**30 if mem else float('nan'):.2f} GiB, compile {r['compile_s']:.1f} s, "
              f"attention {r['attention_impl']}, {r['device_kind']}")
    else:
        print(f"{name}: no result (see {name}.log)")
if samp:
    n = samp.get("sample_images")
    for s, rate in rates.items():
        steps = samp[f"{s}_sample_steps"]
        print(f"sampler {s:<13}{rate:>10.1f} image-steps/s (timed: {n} images x {steps} steps "
              f"in {n * steps / rate:.2f} s); 256 x 1,000 steps: {256000 / rate:.1f} s; "
              f"first call (compile) {samp[f'{s}_sample_first_call_s']:.1f} s")
else:
    print("samplers: no result (see samplers.log)")
for name, r in peers.items():
    if r:
        print(f"{name}: {r['img_per_s']:.1f} img/s, batch {r['batch']}, {r['device']}, "
              f"{r.get('params') or r.get('params_M')} params")
    else:
        print(f"{name}: no result")
EOF
}

case "${1:-}" in
  fetch) fetch ;;
  run) run ;;
  summarize) summarize "${PY:-python3}" "${RESULTS:-runs/gpu_suite}" ;;
  *) echo "usage: $0 fetch|run|summarize" >&2; exit 2 ;;
esac
