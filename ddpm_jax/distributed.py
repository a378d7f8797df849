"""Multi-process start-up: `jax.distributed.initialize` from flags or from the cluster environment.

One JAX process runs per host (TPU VM workers, one GPU machine) or per GPU (SLURM); they find each
other through a coordinator on process 0. Call `initialize_from_flags()` (or `initialize()`) first
thing in `main`, before anything that touches devices (`jax.devices()`, `jnp` arrays, jit calls):
JAX fixes the device topology when its backend starts.

Without flags, a multi-process environment is recognised and JAX's own auto-detection is trusted
with the details:

* SLURM, inside an `srun` step with more than one task (SLURM_STEP_NUM_TASKS > 1);
* Open MPI's `mpirun` with more than one rank (OMPI_COMM_WORLD_SIZE > 1);
* a Cloud TPU VM that is one of several workers of a slice (TPU worker env vars or the GCE
  metadata server's worker list);
* JAX_COORDINATOR_ADDRESS set, or DDPM_JAX_DISTRIBUTED=1 (anything else JAX can detect, e.g.
  Kubernetes, or mpi4py via cluster_detection_method).

On a plain machine none of these hold and nothing happens, so a laptop run never waits for a
coordinator. DDPM_JAX_DISTRIBUTED=0 switches detection off.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import urllib.request
from collections.abc import Mapping, Sequence

import jax
from absl import flags

ENV_SWITCH = "DDPM_JAX_DISTRIBUTED"  # "1": initialize (auto-detect); "0": never auto-initialize
_GCE_WORKERS_URL = (
    "http://metadata.google.internal/computeMetadata/v1/instance/attributes/"
    "worker-network-endpoints"
)


def define_flags() -> None:
    """Define --coordinator_address, --num_processes, --process_id, --local_device_ids (once)."""
    if "coordinator_address" in flags.FLAGS:
        return  # already defined, e.g. by an earlier import of main
    flags.DEFINE_string(
        "coordinator_address", None,
        "host:port of process 0, reachable by all processes. Omit on TPU slices, SLURM and "
        "Open MPI: it is detected.")
    flags.DEFINE_integer("num_processes", None, "Total number of JAX processes (omit: detect).")
    flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
    flags.DEFINE_list(
        "local_device_ids", None,
        "Comma list of the local GPU ordinals this process uses (omit: all it can see; under "
        "SLURM, its share of the node's GPUs).")


def initialize_from_flags() -> bool:
    """`initialize()` with the flags of `define_flags()`; logs the topology. True if distributed."""
    f = flags.FLAGS
    ids = f.local_device_ids
    started = initialize(
        coordinator_address=f.coordinator_address,
        num_processes=f.num_processes,
        process_id=f.process_id,
        local_device_ids=[int(i) for i in ids] if ids else None,
    )
    log_topology()
    return started


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Start `jax.distributed` when asked to (any of the first three arguments) or when a
    multi-process environment is detected.

    Returns True if this process is now part of a multi-process job, False on a single machine.
    Arguments left as None are detected by JAX from the environment.
    """
    env = os.environ if environ is None else environ
    if jax.distributed.is_initialized():
        return True
    explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
    cluster = "flags" if explicit else detect_cluster(env)
    if cluster is None:
        if local_device_ids is not None:
            logging.warning("--local_device_ids applies to multi-process runs only; ignored. On "
                            "one machine, choose GPUs with CUDA_VISIBLE_DEVICES.")
        return False
    # JAX's SLURM detection picks devices even when the other three are passed: correct it.
    if local_device_ids is None and _in_srun_step(env) and not env.get("JAX_LOCAL_DEVICE_IDS"):
        local_device_ids = slurm_local_device_ids(env)
    _use_gloo_for_cpu()
    logging.info("Starting jax.distributed (%s): coordinator=%s num_processes=%s process_id=%s "
                 "local_device_ids=%s", cluster, coordinator_address, num_processes, process_id,
                 local_device_ids)
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids,
        )
    except ValueError as e:  # JAX could not fill in what was left out
        raise RuntimeError(
            f"jax.distributed.initialize failed ({e}) in a {cluster} environment: pass "
            "--coordinator_address, --num_processes and --process_id, or set "
            f"{ENV_SWITCH}=0 to run as a single process."
        ) from e
    return True


def detect_cluster(environ: Mapping[str, str]) -> str | None:
    """The multi-process environment this process runs in, or None for a plain single process."""
    switch = environ.get(ENV_SWITCH, "").strip().lower()
    if switch in ("0", "false", "no"):
        return None
    if switch in ("1", "true", "yes"):
        return ENV_SWITCH
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    # SLURM_STEP_NUM_TASKS exists only inside an srun step: a python started directly in the
    # batch script (one process, although SLURM_NTASKS may be 16) must not wait for 15 others.
    if _in_srun_step(environ) and _int(environ.get("SLURM_STEP_NUM_TASKS")) > 1:
        return "SLURM"
    if _int(environ.get("OMPI_COMM_WORLD_SIZE")) > 1:
        return "Open MPI"
    if _on_cloud_tpu_vm() and _tpu_worker_count(environ) > 1:
        return "Cloud TPU slice"
    return None


def slurm_local_device_ids(environ: Mapping[str, str]) -> list[int] | None:
    """This SLURM task's GPUs, as ordinals among the GPUs it can see (CUDA_VISIBLE_DEVICES).

    The pitfall: JAX's SLURM detection makes each process use GPU ordinal SLURM_LOCALID. That is
    right when every task sees all of its node's GPUs (`--gpus-per-node=8`), but when SLURM binds
    GPUs to tasks (`--gpus-per-task=1`: CUDA_VISIBLE_DEVICES holds the task's own GPU) the only
    ordinal is 0, and tasks 1..7 find no GPU. So: a task that sees only its own GPUs takes them
    all; otherwise a task seeing G GPUs, with T tasks on its node, takes its G / T of them
    ([SLURM_LOCALID] for G = T, all G for T = 1). None (JAX's default) when there are no GPUs or
    no even split.
    """
    visible = _visible_gpu_count(environ)
    tasks = _tasks_on_this_node(environ)
    local_id = _int(environ.get("SLURM_LOCALID"))
    per_task_request = _int(environ.get("SLURM_GPUS_PER_TASK", "").rpartition(":")[2])
    if visible == 0:
        return None
    if visible == per_task_request or (tasks is not None and visible < tasks):
        return list(range(visible))  # bound to this task already
    if tasks is None or visible % tasks:
        logging.warning("SLURM task sees %d GPUs shared by %s tasks on its node: no even split; "
                        "pass --local_device_ids.", visible, tasks)
        return None
    per_task = visible // tasks
    return list(range(local_id * per_task, (local_id + 1) * per_task))


def log_topology() -> None:
    """Log process index/count and local/global device counts (this starts JAX's backend)."""
    logging.info("JAX %s: process %d of %d, %d local / %d global devices (%s).", jax.__version__,
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count(), jax.devices()[0].platform)


def _use_gloo_for_cpu() -> None:
    """Cross-process collectives on the CPU backend need an implementation; gloo ships with jaxlib.

    It is the default on jax 0.10.2 but was unset (no cross-process CPU collectives) on older
    releases. It affects only the CPU backend, so setting it on GPU/TPU hosts is harmless.
    """
    try:
        if not jax.config.jax_cpu_collectives_implementation:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:  # a JAX without the option
        pass


def _int(value: str | None) -> int:
    try:
        return int(value) if value else 0
    except ValueError:
        return 0


def _in_srun_step(environ: Mapping[str, str]) -> bool:
    """Inside an srun step: where JAX's SLURM detection applies (it needs SLURM_STEP_NODELIST)."""
    return "SLURM_JOB_ID" in environ and "SLURM_STEP_NODELIST" in environ


def _visible_gpu_count(environ: Mapping[str, str]) -> int:
    """GPUs this process can see, without starting JAX (which would fix the device set)."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "NoDevFiles"])
    return len(glob.glob("/proc/driver/nvidia/gpus/*"))


def _tasks_on_this_node(environ: Mapping[str, str]) -> int | None:
    """Tasks of this srun step on this node, from SLURM_STEP_TASKS_PER_NODE (e.g. '8(x2),4')."""
    spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return None
    per_node: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return None
        per_node += [int(m.group(1))] * int(m.group(2) or 1)
    node = _int(environ.get("SLURM_NODEID"))
    return per_node[node] if node < len(per_node) else None


def _on_cloud_tpu_vm() -> bool:
    """True on a Cloud TPU VM with libtpu (JAX checks this at import, from PCI ids)."""
    try:
        from jax._src import cloud_tpu_init  # private, hence the guard
    except ImportError:
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def _tpu_worker_count(environ: Mapping[str, str]) -> int:
    """Hosts in this TPU slice: from GKE's env vars, else the GCE metadata server (1 if unknown).

    A single-host TPU (Colab's v5e-1, v4-8) needs no jax.distributed; a multi-host slice would
    run without it too (libtpu connects the chips) but orbax's barriers and preemption sync use it.
    """
    for key in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        if environ.get(key):
            return len(environ[key].split(","))
    if _int(environ.get("MEGASCALE_NUM_SLICES")) > 1:
        return 2
    request = urllib.request.Request(_GCE_WORKERS_URL, headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return len(response.read().decode().strip().split(","))
    except OSError:  # not on GCE, or no such attribute (e.g. Colab)
        return 1
