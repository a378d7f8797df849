"""A new user's own photos through the CLI: a folder smaller than a batch, non-square images."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, tiny_config
from PIL import Image

from ddpm_jax import sampling, validate

# configs/faces.py shrunk to seconds: what test_end_to_end's tiny config does to the default.
TINY_FACES = [
    "--config.model.ch=32", "--config.model.ch_mult=(1,2)", "--config.model.num_res_blocks=1",
    "--config.model.attn_resolutions=(4,)", "--config.diffusion.num_timesteps=20",
    "--config.optim.warmup_steps=2", "--config.training.batch_size=8",
    "--config.training.num_train_steps=2",
    "--config.training.log_every_steps=2", "--config.training.eval_every_steps=2",
    "--config.training.checkpoint_every_steps=2", "--config.training.sample_every_steps=2",
    "--config.training.num_grid_samples=8", "--config.sampling.num_steps=5",
    "--config.sampling.num_samples=4", "--config.sampling.per_device_batch=4",
    "--config.data.num_workers=2", "--config.data.prefetch=1",
]


def test_five_photos_train_at_8x16_and_sample_8x16_images(tmp_path):
    """configs/faces.py (batch 8, num_eval_examples=256) on 5 photos of mixed aspect ratios:
    none held out (5% of 5), batches repeat images, and a (height, width) size given on the
    command line reaches the sample grid and the sampled PNGs."""
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(60, 40), (40, 60), (32, 32), (100, 20), (45, 30)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(photos / f"{i}.jpg")
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "ddpm_jax.main", "--config", f"{REPO}/configs/faces.py",
           "--workdir", str(workdir), "--config.data.source=folder",
           f"--config.data.path={photos}", "--config.data.image_size=(8, 16)", *TINY_FACES]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    result = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("5 usable images, 0 held out for the validation loss (data.folder_eval_fraction=0.05"
            " of them, at most data.num_eval_examples=256); no validation loss") in result.stderr
    assert "5 training images, fewer than global_batch_size=8: images repeat" in result.stderr
    assert "at 8x16 (HxW)" in result.stderr

    # 8 grid samples of 8x16 in 3 columns and 3 rows, 2 px apart.
    with Image.open(workdir / "samples" / "train_step_00000002.png") as grid:
        assert grid.size == (3 * (16 + 2) + 2, 3 * (8 + 2) + 2)
    # The saved config holds the size as a JSON list; sampling reads it back as (8, 16).
    sampler = sampling.Sampler.from_workdir(str(workdir))
    out = sampling.sample_and_write(sampler.config, str(workdir))
    images = np.load(os.path.join(out, "samples.npz"))["images"]
    assert images.shape == (4, 8, 16, 3)
    with Image.open(os.path.join(out, "00000.png")) as png:
        assert png.size == (16, 8)


@pytest.mark.parametrize("size, message", [
    ((9, 16), "data.image_size=(9, 16): height 9 cannot be halved 1 times"),
    ((8, 0), "data.image_size=(8, 0) must be an integer >= 1 or a (height, width) pair"),
    (7, "data.image_size=7 is not divisible by 2^(len(model.ch_mult)-1)=2"),
])
def test_image_size_errors_are_one_line_config_errors(size, message):
    config = tiny_config()
    config.data.image_size = (8, 16)
    validate.check_config(config, num_devices=8)
    config.data.image_size = size
    with pytest.raises(validate.ConfigError, match="^" + re.escape(message)):
        validate.check_config(config, num_devices=8)
