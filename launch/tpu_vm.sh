#!/usr/bin/env bash
# Train ddpm_jax on a multi-host Cloud TPU VM slice (default: v4-32 = 4 hosts x 4 chips).
#
#   ./launch/tpu_vm.sh create     # create the slice
#   ./launch/tpu_vm.sh install    # clone + pip install + mount the shared bucket, on every host
#   ./launch/tpu_vm.sh train      # the same training command on every host, at once
#   ./launch/tpu_vm.sh sample     # --mode=sample, also on every host
#   ./launch/tpu_vm.sh fetch      # copy the samples back to ./results/
#   ./launch/tpu_vm.sh delete     # stop paying
#   ./launch/tpu_vm.sh all        # create, install, train, sample, fetch (not delete)
#
# Every host runs one JAX process; ddpm_jax.main finds the others by itself (it calls
# jax.distributed.initialize() when it sees it is one worker of a TPU slice), so no flags differ
# between hosts. Sampling uses all chips too, so it also runs on every host.
#
# The work directory must be ONE directory that every host sees: orbax writes each checkpoint
# from all hosts at once (each host its share of the arrays) and process 0 merges them. Here it
# is a Cloud Storage bucket mounted with gcsfuse at the same path on every host. (ddpm_jax opens
# the work directory with plain file APIs, so a gs:// path does not work as --workdir.)
set -euo pipefail

# ---- Settings: edit these -----------------------------------------------------------------------
PROJECT="${PROJECT:-your-gcp-project}"
ZONE="${ZONE:-us-central2-b}"                 # a zone that has the accelerator type (v4: here)
TPU_NAME="${TPU_NAME:-ddpm-v4-32}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"  # v4-32: 16 chips on 4 hosts
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"  # v5e: v2-alpha-tpuv5-lite
REPO_URL="${REPO_URL:-https://github.com/YOUR_USER/ddpm_jax.git}"  # placeholder
BRANCH="${BRANCH:-main}"
BUCKET="${BUCKET:-your-bucket}"               # gs://BUCKET, created beforehand, same project
MOUNT="${MOUNT:-/mnt/ddpm}"                   # where every host mounts it
CONFIG="${CONFIG:-configs/quickstart.py}"     # batch 32: divisible by v4-32's 16 chips
WORKDIR="${WORKDIR:-$MOUNT/runs/quickstart}"
EXTRA_FLAGS="${EXTRA_FLAGS:---config.model.dtype=bfloat16}"
# --------------------------------------------------------------------------------------------------

TRAIN_CMD="cd ~/ddpm_jax && python3 -m ddpm_jax.main --config $CONFIG --workdir $WORKDIR $EXTRA_FLAGS"

# gcloud compute tpus tpu-vm SUBCOMMAND with the project and zone filled in.
tpu() {
  local subcommand="$1"
  shift
  gcloud compute tpus tpu-vm "$subcommand" "$@" --project="$PROJECT" --zone="$ZONE"
}

# Run a shell command on every host of the slice at the same time.
on_all_hosts() {
  tpu ssh "$TPU_NAME" --worker=all --command="$1"
}

create() {
  # cloud-platform scope: the hosts' service account must write to the bucket.
  tpu create "$TPU_NAME" \
    --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" \
    --scopes=https://www.googleapis.com/auth/cloud-platform
}

install() {
  # TPU runtime images have Python but neither JAX nor TensorFlow: `jax[tpu]` brings libtpu,
  # `pip install -e .` the rest (tensorflow-cpu included, for TensorBoard logs and tfds).
  on_all_hosts "set -e
    python3 -m pip install -q -U pip 'jax[tpu]'
    [ -d ~/ddpm_jax ] || git clone -q --branch $BRANCH $REPO_URL ~/ddpm_jax
    cd ~/ddpm_jax && git pull -q && python3 -m pip install -q -e .
    if ! command -v gcsfuse >/dev/null; then
      echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
      curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
      sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
    fi
    sudo mkdir -p $MOUNT && sudo chown \$USER $MOUNT
    # --implicit-dirs: see directories made by other hosts; --rename-dir-limit: orbax commits a
    # checkpoint by renaming its temporary directory, which gcsfuse does only when allowed to.
    mountpoint -q $MOUNT || gcsfuse --implicit-dirs --rename-dir-limit=100000 $BUCKET $MOUNT"
}

train() {
  # In the foreground: the output of every host streams here (prefixed by gcloud), and a
  # lost connection stops training; run it again to resume from the last checkpoint. For long
  # runs, wrap TRAIN_CMD in `nohup ... > train.log 2>&1 &` or tmux.
  on_all_hosts "$TRAIN_CMD"
}

sample() {
  on_all_hosts "$TRAIN_CMD --mode=sample"
}

fetch() {
  # Process 0 (worker 0) writes the sample PNGs; the files are in the bucket as well
  # (gcloud storage cp -r gs://$BUCKET/... works too).
  mkdir -p results
  tpu scp --worker=0 --recurse "$TPU_NAME:$WORKDIR/samples" results/
  echo "Samples in results/samples/"
}

delete() {
  tpu delete "$TPU_NAME" --quiet
}

case "${1:-}" in
  create | install | train | sample | fetch | delete) "$1" ;;
  all) create && install && train && sample && fetch ;;
  *)
    sed -n '2,10p' "$0"
    exit 2
    ;;
esac
