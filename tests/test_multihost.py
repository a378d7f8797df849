"""Two JAX processes (4 fake CPU devices each, jax.distributed over localhost) train, log, sample
and checkpoint like one process with 8 devices; a single process then samples from their checkpoint.

Run as a script, this file is the training process the test starts (three of them: the two
workers and, at the same time, the one-process reference):

    python tests/test_multihost.py --workdir=DIR --out=PARAMS.npz \
        [--coordinator_address=localhost:PORT --num_processes=2 --process_id=I]
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 4
TIMEOUT_S = 240  # generous for 2 shared cores; a deadlock in a collective fails, not hangs
# Compiling is most of this test's time; XLA's backend optimizations are not what it is about.
XLA_FAST_COMPILE = "--xla_backend_optimization_level=0"


def two_step_config():
    """The tests' tiny config, cut to one level without attention (faster to compile), trained
    for 2 steps that log, evaluate, sample and checkpoint."""
    from conftest import tiny_config

    config = tiny_config()
    config.model.ch_mult = (1,)
    config.model.attn_resolutions = ()
    t = config.training
    t.num_train_steps = 2
    t.log_every_steps = t.eval_every_steps = 2
    t.checkpoint_every_steps = t.sample_every_steps = 2
    return config


def flat_params(tree, prefix: str) -> dict[str, np.ndarray]:
    """{'PREFIX/path': host array} for a replicated pytree of params."""
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {prefix + jax.tree_util.keystr(p): np.asarray(jax.device_get(x)) for p, x in leaves}


def state_params(state) -> dict[str, np.ndarray]:
    return {**flat_params(state.params, "params"), **flat_params(state.ema_params, "ema_params")}


# ---------------------------------------------------------------------------------------------
# The training process


def train_main(argv: list[str]) -> None:
    """Parse the distributed flags like main.py, initialize, train 2 steps, save the params."""
    # conftest appends its own 8-device XLA flag when imported; the parent's flag must win, and
    # XLA reads it only when the backend starts (in initialize_from_flags' logging).
    xla_flags = os.environ["XLA_FLAGS"]
    sys.path.insert(0, REPO)
    config = two_step_config()
    os.environ["XLA_FLAGS"] = xla_flags

    import logging

    from absl import flags

    from ddpm_jax import distributed

    distributed.define_flags()
    flags.DEFINE_string("workdir", None, "Training work directory.")
    flags.DEFINE_string("out", None, "Process 0 writes the final params here (.npz).")
    flags.FLAGS(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    multi = flags.FLAGS.num_processes is not None
    # Without flags (the reference), nothing here looks like a cluster: it must not start.
    assert distributed.initialize_from_flags() == multi

    import jax

    from ddpm_jax import train

    processes = NUM_PROCESSES if multi else 1
    assert jax.process_count() == processes, jax.process_count()
    assert jax.device_count() == NUM_PROCESSES * DEVICES_PER_PROCESS, jax.device_count()
    state = train.train_and_evaluate(config, flags.FLAGS.workdir)
    params = state_params(state)  # on every process: nothing that might sync hides in the `if`
    if jax.process_index() == 0:
        np.savez(flags.FLAGS.out, **params)
    print(f"process {jax.process_index()} done", flush=True)


# ---------------------------------------------------------------------------------------------
# Cluster detection (pure functions of the environment)

SRUN_STEP = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NODEID": "0"}


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    # python started in the batch script itself: one process, although the job has 16 tasks
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_LOCALID": "0"}, None),
    ({**SRUN_STEP, "SLURM_STEP_NUM_TASKS": "16"}, "SLURM"),
    ({**SRUN_STEP, "SLURM_STEP_NUM_TASKS": "1"}, None),  # srun -n1: a single process
    ({**SRUN_STEP, "SLURM_STEP_NUM_TASKS": "16", "DDPM_JAX_DISTRIBUTED": "0"}, None),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, "Open MPI"),
    ({"OMPI_COMM_WORLD_SIZE": "1"}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR_ADDRESS"),
    ({"DDPM_JAX_DISTRIBUTED": "1"}, "DDPM_JAX_DISTRIBUTED"),
])
def test_detect_cluster(environ, expected):
    from ddpm_jax import distributed

    assert distributed.detect_cluster(environ) == expected


@pytest.mark.parametrize("visible, gpus_per_task, tasks_per_node, node, local_id, expected", [
    ("0,1,2,3,4,5,6,7", "", "8(x2)", 1, 3, [3]),  # --gpus-per-node=8: every task sees all 8
    ("5", "1", "8(x2)", 0, 5, [0]),  # --gpus-per-task=1: its one GPU is ordinal 0, not 5
    ("5", "", "8(x2)", 0, 5, [0]),  # bound by --gpu-bind instead: fewer GPUs than tasks
    ("4,5", "2", "2(x2)", 0, 1, [0, 1]),  # --gpus-per-task=2: both GPUs are this task's
    ("0,1,2,3,4,5,6,7", "", "1(x4)", 2, 0, list(range(8))),  # 1 task per node: all its GPUs
    ("0,1,2,3,4,5,6,7", "", "4", 0, 1, [2, 3]),
    ("0,1,2,3", "", "8,4", 1, 2, [2]),  # uneven nodes: this node's (SLURM_NODEID) count counts
    ("0,1,2,3,4,5,6,7", "", "3", 0, 1, None),  # no even split: JAX's default, with a warning
    ("", "", "8", 0, 1, None),  # no GPUs (a CPU job)
])
def test_slurm_local_device_ids(visible, gpus_per_task, tasks_per_node, node, local_id,
                                expected):
    from ddpm_jax import distributed

    environ = {**SRUN_STEP, "CUDA_VISIBLE_DEVICES": visible, "SLURM_GPUS_PER_TASK": gpus_per_task,
               "SLURM_STEP_TASKS_PER_NODE": tasks_per_node, "SLURM_NODEID": str(node),
               "SLURM_LOCALID": str(local_id)}
    assert distributed.slurm_local_device_ids(environ) == expected


def test_initialize_does_nothing_on_a_plain_machine():
    from ddpm_jax import distributed

    assert distributed.initialize(environ={}) is False


# ---------------------------------------------------------------------------------------------
# Two processes against one


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _clean_env(devices: int) -> dict[str, str]:
    """This environment with `devices` fake CPU devices and no cluster variables."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR", "DDPM_JAX_DISTRIBUTED"))}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {XLA_FAST_COMPILE}"
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


def _start(args: list[str], devices: int, log: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, os.path.abspath(__file__), *args]
    with open(log, "w") as f:  # a file, not a pipe: a full pipe would stall the process
        proc = subprocess.Popen(cmd, env=_clean_env(devices), stdout=f, stderr=subprocess.STDOUT,
                                cwd=REPO)
    return proc, log


def _wait_all(procs, timeout_s: float) -> None:
    """Wait for every process; on a failure or the timeout, kill the rest and fail with the logs."""
    deadline = time.monotonic() + timeout_s
    problem = None
    while problem is None and any(p.poll() is None for p, _ in procs):
        if any(p.poll() not in (None, 0) for p, _ in procs):
            problem = "a process failed"
        elif time.monotonic() > deadline:
            problem = f"timed out after {timeout_s:.0f} s (deadlock in a collective?)"
        else:
            time.sleep(0.5)
    if problem is None and any(p.returncode != 0 for p, _ in procs):
        problem = "a process failed"
    for p, _ in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    if problem is not None:
        logs = "\n".join(f"--- {log} (rc={p.returncode}) ---\n" + open(log).read()[-6000:]
                         for p, log in procs)
        pytest.fail(f"{problem}\n{logs}")


def test_two_processes_match_one_and_their_checkpoint_samples(tmp_path):
    import jax

    from ddpm_jax import sampling

    if jax.device_count() != NUM_PROCESSES * DEVICES_PER_PROCESS:
        pytest.skip("needs the conftest's 8 fake CPU devices")
    multi_dir, multi_out = str(tmp_path / "two_processes"), str(tmp_path / "two.npz")
    single_out = str(tmp_path / "one.npz")
    address = f"localhost:{_free_port()}"
    procs = [
        _start([f"--workdir={multi_dir}", f"--out={multi_out}", f"--coordinator_address={address}",
                f"--num_processes={NUM_PROCESSES}", f"--process_id={i}"],
               DEVICES_PER_PROCESS, str(tmp_path / f"worker{i}.log"))
        for i in range(NUM_PROCESSES)
    ]
    # The reference runs alongside: compiling is mostly single-threaded, so it uses what the
    # two workers leave of the cores.
    procs.append(_start([f"--workdir={tmp_path / 'one_process'}", f"--out={single_out}"],
                        NUM_PROCESSES * DEVICES_PER_PROCESS, str(tmp_path / "one_process.log")))
    _wait_all(procs, TIMEOUT_S)

    # Logging, sampling and checkpointing ran on both processes, with files from process 0.
    assert os.path.isfile(os.path.join(multi_dir, "samples", "train_step_00000002.png"))
    assert os.path.isdir(os.path.join(multi_dir, "checkpoints", "2"))
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(multi_dir))

    # Same params as one process with 8 devices, up to the order of the gradient reduction.
    multi, single = dict(np.load(multi_out)), dict(np.load(single_out))
    assert single.keys() == multi.keys()
    for name, value in single.items():
        np.testing.assert_allclose(multi[name], value, rtol=1e-5, atol=1e-6, err_msg=name)

    # A single process (this one, which never joined them) restores their checkpoint and samples.
    sampler = sampling.Sampler.from_workdir(multi_dir)
    assert sampler.step == 2
    for name, value in flat_params(sampler.params, "ema_params").items():
        np.testing.assert_array_equal(value, multi[name], err_msg=name)
    images = sampler.sample(4)
    assert images.shape == (4, 8, 8, 3) and images.dtype == np.uint8


if __name__ == "__main__":
    train_main(sys.argv)
