#!/usr/bin/env bash
# Reproduce DDPM's CIFAR-10 row of Table 1 (Ho et al. 2020) from the published EMA model:
#
#     benchmarks/reproduce_ddpm_cifar10.sh EMA_CHECKPOINT [WORKDIR]
#
# EMA_CHECKPOINT: the DDPM release's diffusion_cifar10_model/model.ckpt-790000 (a TF checkpoint
# prefix) or pesser/pytorch_diffusion's ema_cifar10 model-790000.ckpt; WORKDIR (default
# runs/ddpm_cifar10_ema) receives the imported checkpoint and eval/step_0.json.
#
# It imports the weights (python -m ddpm_jax.import_weights), then runs --mode=eval: 50,000
# ancestral samples over all 1,000 steps with fixed_large variance (as DDPM), FID and IS
# against the CIFAR-10 training set, and the NLL bound (bits/dim) on the 10,000 test images;
# and prints ours next to the paper's: IS 9.46, FID 3.17, NLL <= 3.75.
#
# Needs, each checked first (a missing one fails in one line before any long work):
#   * the checkpoint above;
#   * CIFAR-10 prepared for tfds in $TFDS_DATA_DIR (default ~/tensorflow_datasets), e.g. once
#     with network: python -c "import tensorflow_datasets as t; t.builder('cifar10').download_and_prepare()"
#   * the FID Inception weights: $INCEPTION_WEIGHTS (.pth or .npz), else the converted .npz in
#     $DDPM_JAX_CACHE (default ~/.cache/ddpm_jax), see docs/evaluation.md;
#   * a GPU visible to JAX.
# Runtime on one GPU: an estimate, not measured: see docs/published-models.md, "Reproducing DDPM
# on CIFAR-10".
# Extra arguments after WORKDIR go to --mode=eval (e.g. --config.sampling.per_device_batch=256).
set -euo pipefail

fail() {
  echo "reproduce_ddpm_cifar10: $*" >&2
  exit 1
}

[[ $# -ge 1 ]] || fail "usage: $0 EMA_CHECKPOINT [WORKDIR] [--config.KEY=VALUE ...]"
ckpt=$1
workdir=${2:-runs/ddpm_cifar10_ema}
shift $(( $# >= 2 ? 2 : 1 ))
python=${PYTHON:-python}
data_dir=${TFDS_DATA_DIR:-$HOME/tensorflow_datasets}
cache=${DDPM_JAX_CACHE:-$HOME/.cache/ddpm_jax}
inception=${INCEPTION_WEIGHTS:-$cache/pt_inception-2015-12-05.npz}

# --- Preflight: cheapest first, every failure one line ---------------------------------------
[[ -e $ckpt || -e $ckpt.index ]] \
  || fail "no EMA checkpoint at $ckpt: get diffusion_cifar10_model/model.ckpt-790000 (DDPM release) or pesser/pytorch_diffusion's ema_cifar10 model-790000.ckpt"
compgen -G "$data_dir/cifar10/*/dataset_info.json" >/dev/null \
  || fail "CIFAR-10 is not prepared in $data_dir (TFDS_DATA_DIR): run once with network: python -c \"import tensorflow_datasets as t; t.builder('cifar10', data_dir='$data_dir').download_and_prepare()\""
[[ -f $inception ]] \
  || fail "no FID Inception weights at $inception: download https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth and set INCEPTION_WEIGHTS to it (or convert it there with python -m ddpm_jax.convert_inception)"
backend=$("$python" -c "import jax; print(jax.default_backend())" 2>/dev/null) \
  || fail "$python cannot import jax (set PYTHON to the environment with ddpm_jax installed)"
[[ $backend == gpu || $backend == cuda ]] \
  || fail "no GPU: JAX's backend is '$backend' (50,000 x 1,000 network evaluations need one; install jax[cuda12])"
"$python" -c "import ddpm_jax.import_weights" 2>/dev/null \
  || fail "ddpm_jax.import_weights is missing: this script needs the weight importer (issue 16, parts 1-2)"

# --- Import, then evaluate ---------------------------------------------------------------------
if [[ -d $workdir/checkpoints ]]; then
  echo "reproduce_ddpm_cifar10: $workdir already holds a checkpoint; evaluating it" >&2
else
  "$python" -m ddpm_jax.import_weights "$ckpt" --workdir "$workdir"
fi
"$python" -m ddpm_jax.main --workdir "$workdir" --mode=eval \
  --config.data.source=tfds --config.data.name=cifar10 --config.data.data_dir="$data_dir" \
  --config.sampling.sampler=ddpm --config.sampling.num_steps=1000 \
  --config.sampling.variance=fixed_large --config.sampling.clip_x0=True \
  --config.sampling.checkpoint_step=-1 --config.seed=0 \
  --config.eval.num_samples=50000 --config.eval.reference_split=train \
  --config.eval.reference_num_examples=0 --config.eval.is_splits=10 \
  --config.eval.nll_num_examples=-1 --config.eval.nll_split=test \
  --config.eval.inception_weights="$inception" "$@"

"$python" - "$workdir" <<'EOF'
import glob, json, os, sys

path = max(glob.glob(os.path.join(sys.argv[1], "eval", "step_*.json")), key=os.path.getmtime)
r = json.load(open(path))
print(f"\nDDPM CIFAR-10 (L_simple, EMA), {r['num_samples']} samples, {path}")
print(f"{'metric':<34}{'ours':>16}{'paper':>12}")
print(f"{'IS (10 splits)':<34}{r['is_mean']:>9.2f} +- {r['is_std']:.2f}{'9.46':>12}")
print(f"{'FID (vs train, 50k)':<34}{r['fid']:>16.2f}{'3.17':>12}")
print(f"{'NLL bits/dim (test, bound)':<34}{r['nll_bpd']:>16.2f}{'<= 3.75':>12}")
print(f"  NLL parts: prior {r['nll_prior_bpd']:.4f} + KL {r['nll_kl_bpd']:.4f} + decoder "
      f"{r['nll_decoder_bpd']:.4f} on {r['nll_num_examples']} images")
print("(For scale: torch-fidelity's IS of the CIFAR-10 training images is 11.24.)")
EOF
