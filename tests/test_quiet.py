"""A bad input's one-line error is all a user sees: no TensorFlow start-up lines before it."""

import os
import platform
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from ddpm_jax import quiet

TF_STARTUP = ("All log messages before absl::InitializeLog()", "oneDNN custom operations are on")
OUR_LINE = ("error: data.labels='subdirs': ", "has 2 classes ('cat', 'dog'); "
            "set --config.model.num_classes=2")


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    """A folder with one sub-directory per class, trained with num_classes left at 0."""
    root = tmp_path_factory.mktemp("pets")
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir()
        for i in range(2):
            image = rng.integers(0, 256, (8, 8, 3), np.uint8)
            Image.fromarray(image).save(root / name / f"{i}.png")
    return root


def run_bad_input(pets, tmp_path, **env):
    environ = {k: v for k, v in os.environ.items()
               if k not in ("TF_CPP_MIN_LOG_LEVEL", quiet.ENV_VAR)}  # conftest sets the level
    cmd = [sys.executable, "-m", "ddpm_jax.main", "--config", os.path.join(REPO, "configs",
           "default.py"), "--workdir", str(tmp_path / "w"), "--config.data.source=folder",
           f"--config.data.path={pets}", "--config.data.labels=subdirs"]
    result = subprocess.run(cmd, env={**environ, **env}, cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert OUR_LINE[0] in result.stderr and OUR_LINE[1] in result.stderr, result.stderr[-3000:]
    return result.stderr


def test_bad_input_error_comes_without_tensorflow_startup_lines(pets, tmp_path):
    stderr = run_bad_input(pets, tmp_path)
    assert not [line for line in TF_STARTUP if line in stderr], stderr


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="TensorFlow announces oneDNN where it enables it by default: x86-64")
def test_tf_logs_come_back_with_the_environment_variable(pets, tmp_path):
    stderr = run_bad_input(pets, tmp_path, **{quiet.ENV_VAR: "1"})
    assert all(line in stderr for line in TF_STARTUP), stderr


def test_filter_drops_cpp_lines_below_the_level_and_keeps_the_rest():
    text = (f"{quiet._BANNER}\n"
            "I0000 00:00:1796417617.926370    5941 port.cc:153] oneDNN custom operations are on.\n"
            "E0000 00:00:1796417617.926370    5941 cuda_fft.cc:467] Unable to register cuFFT\n"
            "I1204 20:53:37.585558 140027694795648 distributed.py:166] JAX 0.10.2: process 0\n"
            "error: ours\n")
    jax_line = text.splitlines(keepends=True)[3]
    assert quiet.filter_startup_lines(text, 3) == jax_line + "error: ours\n"
    assert quiet.filter_startup_lines(text, 2).count("\n") == 3  # the E line stays
    assert quiet.filter_startup_lines(text, 0) == text
    assert quiet.min_log_level({"TF_CPP_MIN_LOG_LEVEL": "1"}) == 1
    assert quiet.min_log_level({}) == 0
