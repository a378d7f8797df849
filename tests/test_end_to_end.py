"""The trainer as a user runs it: work directory, resume, preemption, damage, sampling, errors."""

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO, tiny_config
from PIL import Image

from configs import default
from ddpm_jax import checkpoint, data, sampling, train, validate


def overrides(config) -> list[str]:
    """--config.KEY=VALUE flags turning configs/default.py into `config`."""
    flat_default = default.get_config()
    out = []
    for group, fields in config.items():
        if not hasattr(fields, "items"):
            if fields != flat_default[group]:
                out.append(f"--config.{group}={fields}")
            continue
        for key, value in fields.items():
            if value != flat_default[group][key]:
                out.append(f"--config.{group}.{key}={value}")
    return out


def main_cmd(config, workdir, *extra):
    return [sys.executable, "-m", "ddpm_jax.main", "--config", f"{REPO}/configs/default.py",
            "--workdir", str(workdir), *overrides(config), *extra]


def env(devices=8):
    e = dict(os.environ)
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return e


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """4 steps of the tiny config on 8 devices: checkpoints at 2 and 4, a grid at 4."""
    workdir = tmp_path_factory.mktemp("run")
    state = train.train_and_evaluate(tiny_config(), str(workdir))
    return workdir, jax.device_get(state)


def test_work_directory_layout(trained):
    workdir, state = trained
    assert int(state.step) == 4
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    assert os.path.exists(workdir / "samples" / "train_step_00000004.png")
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))


def test_interrupted_and_resumed_training_is_bit_identical(trained, tmp_path, caplog):
    _, straight = trained
    config = tiny_config()
    config.training.num_train_steps = 2
    train.train_and_evaluate(config, str(tmp_path))
    config.training.num_train_steps = 4
    resumed = jax.device_get(train.train_and_evaluate(config, str(tmp_path)))
    for name in ("params", "ema_params", "opt_state"):
        jax.tree.map(np.testing.assert_array_equal, getattr(straight, name),
                     getattr(resumed, name))
    # The restored state has the fresh state's types and shardings: the step compiled once.
    assert "traced and compiled again" not in caplog.text


def test_a_step_that_compiles_again_is_reported(tmp_path, monkeypatch, caplog):
    """A batch whose dtype changes mid-run (here: pre-scaled floats at the third step) makes jax
    trace and compile the step again; the log names the step and the input that changed."""
    create_datasets = data.create_datasets

    def patched(*args, **kwargs):
        train_ds, eval_images = create_datasets(*args, **kwargs)
        iterate = train_ds.iterate

        def float_third_batch(*a, **k):
            it = iterate(*a, **k)
            try:
                for i, batch in enumerate(it):
                    yield batch.astype(np.float32) / 127.5 - 1.0 if i == 2 else batch
            finally:
                it.close()

        monkeypatch.setattr(train_ds, "iterate", float_third_batch)
        return train_ds, eval_images

    monkeypatch.setattr(data, "create_datasets", patched)
    config = tiny_config()
    config.training.num_train_steps = 3
    config.training.sample_every_steps = 100
    train.train_and_evaluate(config, str(tmp_path))
    warnings = [r.getMessage() for r in caplog.records if "compiled again" in r.getMessage()]
    assert len(warnings) == 1
    assert "at step 2" in warnings[0]
    assert "batches_KBHWC: uint8[1,8,8,8,3] -> float32[1,8,8,8,3]" in warnings[0]


def test_damaged_latest_checkpoint_is_set_aside(trained, tmp_path, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(trained[0], workdir)
    for root, _, files in os.walk(workdir / "checkpoints" / "4" / "state"):
        for f in files:
            open(os.path.join(root, f), "w").close()  # truncate every file of step 4's state
    config = tiny_config()
    ckpt = checkpoint.Checkpointer(str(workdir), config)
    abstract = jax.eval_shape(
        lambda: train.init_state(jax.random.key(0), __import__("ddpm_jax.unet").unet.from_config(
            config), train.make_optimizer(config), (8, 8, 3)))
    # Sampling (read-only) skips the damaged checkpoint and leaves it in place.
    sampler = sampling.Sampler.from_workdir(str(workdir), config)
    assert sampler.step == 2 and os.path.isdir(workdir / "checkpoints" / "4")
    state = ckpt.restore_train_state(abstract)
    ckpt.close()
    assert int(state.step) == 2
    assert "checkpoints/4 is damaged" in caplog.text
    assert os.path.isdir(workdir / "checkpoints" / "4.damaged")


def test_sigterm_checkpoints_exits_zero_and_resumes(tmp_path):
    config = tiny_config()
    config.training.num_train_steps = 100_000
    config.training.log_every_steps = 1
    config.training.checkpoint_every_steps = 10_000
    log = open(tmp_path / "log", "w+")
    proc = subprocess.Popen(main_cmd(config, tmp_path / "w"), env=env(), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=log, text=True)
    deadline = time.time() + 300
    while "train/loss" not in open(tmp_path / "log").read():
        assert proc.poll() is None and time.time() < deadline, open(tmp_path / "log").read()
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, open(tmp_path / "log").read()[-3000:]
    stopped = int(out.split("Stopped at step ")[1].split(";")[0])
    assert stopped >= 1
    assert str(stopped) in os.listdir(tmp_path / "w" / "checkpoints")
    config.training.num_train_steps = stopped + 1
    rerun = subprocess.run(main_cmd(config, tmp_path / "w"), env=env(), cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"starting at step {stopped}." in rerun.stderr


def test_sample_on_one_device_from_an_eight_device_checkpoint(trained, tmp_path):
    config = tiny_config()
    result = subprocess.run(main_cmd(config, trained[0], "--mode=sample"), env=env(devices=1),
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = trained[0] / "samples" / "step_4"
    images = np.load(out / "samples.npz")["images"]
    assert images.shape == (8, 8, 8, 3) and images.dtype == np.uint8
    assert os.path.exists(out / "grid.png") and os.path.exists(out / "00007.png")
    # Each image depends only on the seed and its index: 8 devices draw the same samples.
    sampler = sampling.Sampler.from_workdir(str(trained[0]), config)
    np.testing.assert_array_equal(sampler.sample(8, seed=config.seed), images)


@pytest.mark.parametrize("flag, messages", [
    ("--config.model.ch=64", ("has shape", "conv_in")),
    # The group count changes no parameter's shape: without its own check the params would load.
    ("--config.model.norm_groups=32", ("trained with 8 GroupNorm groups (model.norm_groups=0) but "
                                       "this config gives 32; add --config.model.norm_groups=8",)),
    ("--config.diffusion.prediction=v", ("trained with diffusion.prediction='eps' but this config "
                                         "has 'v'; add --config.diffusion.prediction=eps",)),
    # Conditional params would not fit either, but the message names the flag that fixes it.
    ("--config.model.num_classes=2", ("trained with model.num_classes=0 but this config has 2; "
                                      "add --config.model.num_classes=0",)),
])
def test_sampling_with_a_mismatched_config_names_the_parameter(trained, tmp_path, flag, messages):
    result = subprocess.run(main_cmd(tiny_config(), trained[0], "--mode=sample", flag),
                            env=env(1), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and all(m in line for m in messages), line
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flag, culprit", [
    ("--config.training.batch_sise=8", "batch_sise"),
    ("--config.training.batch_size=12", "training.batch_size=12"),
    ("--config.data.image_size=7", "data.image_size=7"),
    ("--config.training.batch_size=abc", "batch_size=abc"),
    ("--config.sampling.sampler=euler", "sampling.sampler='euler'"),
    ("--config.model.norm_groups=5", "model.ch=32 is not divisible by the 5 GroupNorm groups"),
    ("--config.model.ch=30", "model.ch=30 is not divisible by the 7 GroupNorm groups"),
    ("--config.model.num_classes=2", "model.num_classes=2: data.source='embedded' has no labels"),
    ("--config.sampling.guidance_scale=2", "sampling.guidance_scale=2.0: guidance needs a class-"),
])
def test_config_errors_are_one_line_before_compiling(tmp_path, flag, culprit):
    result = subprocess.run(main_cmd(tiny_config(), tmp_path / "w", flag), env=env(),
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and culprit in line, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_unwritable_workdir_and_missing_checkpoint(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = subprocess.run(main_cmd(tiny_config(), blocker / "w"), env=env(), cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and f"--workdir={blocker}/w" in result.stderr
    result = subprocess.run(main_cmd(tiny_config(), tmp_path / "empty", "--mode=sample"),
                            env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f"no checkpoint in {tmp_path}/empty/checkpoints" in result.stderr


@pytest.mark.parametrize("workdir", ["gs://bucket/run", "s3://bucket/run", "file:///tmp/run"])
def test_url_workdir_is_refused_without_making_a_local_directory(tmp_path, monkeypatch, workdir):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(validate.ConfigError, match=f"--workdir={workdir}: URLs are not supported"):
        train.train_and_evaluate(tiny_config(), workdir)
    with pytest.raises(validate.ConfigError, match="gcsfuse"):
        sampling.Sampler.from_workdir(workdir)
    assert os.listdir(tmp_path) == []


def test_greyscale_training_samples_grey_pngs(tmp_path):
    config = tiny_config()
    config.data.channels = 1
    config.training.num_train_steps = 2
    config.training.sample_every_steps = 2
    train.train_and_evaluate(config, str(tmp_path))
    assert Image.open(tmp_path / "samples" / "train_step_00000002.png").mode == "L"
    sampler = sampling.Sampler.from_workdir(str(tmp_path))  # the config saved with the run
    assert sampler.model.out_ch == 1
    out = sampling.sample_and_write(sampler.config, str(tmp_path))
    images = np.load(os.path.join(out, "samples.npz"))["images"]
    assert images.shape == (8, 8, 8, 1) and images.dtype == np.uint8
    with Image.open(os.path.join(out, "00000.png")) as png:
        assert png.mode == "L" and np.array_equal(np.asarray(png), images[0, ..., 0])


def test_workdir_defaults_to_runs_and_the_config_name(tmp_path):
    """`--config configs/NAME.py` alone works in every mode, in runs/NAME below the current
    directory, and says so on its first line (here: sampling, which finds no checkpoint there)."""
    cmd = [a for a in main_cmd(tiny_config(), "unused", "--mode=sample") if a not in
           ("--workdir", "unused")]
    result = subprocess.run(cmd, env=env(1), cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.splitlines()[0] == "Work directory: runs/default"
    assert result.returncode == 1
    assert f"no checkpoint in {tmp_path}/runs/default/checkpoints" in result.stderr
