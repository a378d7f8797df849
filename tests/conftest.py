"""Test set-up: 8 fake CPU devices (set before jax is imported) and a tiny config."""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Compiles dominate the suite on 2 cores: share them between tests and their subprocesses.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/ddpm_jax_test_jax_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # for `configs`

import jax  # noqa: E402
import pytest  # noqa: E402

from configs import default  # noqa: E402


def tiny_config():
    """The default config shrunk to seconds on a CPU: 8x8 images, two levels, batch 8."""
    config = default.get_config()
    config.data.image_size = 8
    config.data.num_eval_examples = 8
    config.data.prefetch = 1
    config.data.num_workers = 2
    config.model.ch = 32
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (4,)
    config.model.dropout = 0.1
    config.diffusion.num_timesteps = 20
    config.optim.warmup_steps = 2
    config.optim.learning_rate = 1e-3
    config.training.batch_size = 8
    config.training.num_train_steps = 4
    config.training.log_every_steps = 2
    config.training.eval_every_steps = 2
    config.training.checkpoint_every_steps = 2
    config.training.sample_every_steps = 4
    config.training.num_grid_samples = 8
    config.sampling.num_steps = 5
    config.sampling.num_samples = 8
    config.sampling.per_device_batch = 1
    return config


@pytest.fixture
def config():
    return tiny_config()


def pytest_report_header(config):
    return f"jax {jax.__version__}: {jax.device_count()} devices"
