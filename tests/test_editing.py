"""Sampling that edits: inpainting keeps the known pixels and fills the rest from the data,
DDIM inversion round-trips, SDEdit's two ends, and bad masks in one line.

One tiny model, trained once for the module on test_learning's coloured patterns, serves every
model test (compiles dominate: each editing program is compiled once or twice).
"""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image
from test_learning import learning_config, nearest, on_one_device, patterns, write_patterns
from test_sampling import POINTS, OptimalDenoiser

from benchmarks import solver_convergence
from ddpm_jax import diffusion, editing, sampling, sharding, solvers, train, validate

TRAIN_STEPS = 120  # the halves' colours are right from 100 steps on (RMSE 0.06-0.14)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(Sampler, workdir) of a tiny RGB model trained on one device for TRAIN_STEPS on the four
    8x8 patterns (4 copies each), T = 100."""
    tmp = tmp_path_factory.mktemp("editing")
    config = learning_config(write_patterns(tmp / "data", copies=4), batch_size=16)
    t = config.training
    t.num_train_steps = t.log_every_steps = t.checkpoint_every_steps = TRAIN_STEPS
    t.sample_every_steps, t.eval_every_steps = TRAIN_STEPS, 10 * TRAIN_STEPS  # no eval
    config.sampling.sampler, config.sampling.num_steps = "ddim", 5  # a cheap last grid
    with pytest.MonkeyPatch.context() as mp:
        on_one_device(mp)
        train.train_and_evaluate(config, str(tmp / "run"))
        return sampling.Sampler.from_workdir(str(tmp / "run")), str(tmp / "run")


@pytest.fixture(scope="module")
def exact():
    """Samplers on 1 and on 8 devices of the exact model of Gaussian 4x4 grey images (T = 50):
    compiles in a second, for the tests of bookkeeping rather than of learning."""
    config = tiny_config()
    config.data.image_size, config.data.channels, config.diffusion.num_timesteps = 4, 1, 50
    config.sampling.per_device_batch = 1
    model = solver_convergence.GaussianDenoiser(diffusion.make_schedule("linear", 50))
    return [sampling.Sampler(config, model, None, 0, sharding.make_mesh(devices))
            for devices in (jax.devices()[:1], None)]


def random_images(n: int, shape=(4, 4, 1)) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, *shape), dtype=np.uint8)


def right_half_masks(n: int, size: int = 8) -> np.ndarray:
    masks = np.zeros((n, size, size), bool)
    masks[:, :, size // 2:] = True
    return masks


def test_jump_schedule_is_repaints():
    # RePaint's get_schedule_jump_paper(t_T=6, jump_length=2, jump_n_sample=2), by hand: down to
    # 2, back up to 4, down to 0, back up to 2, down to the data.
    assert list(editing.jump_schedule(6, 2, 2)) == [5, 4, 3, 2, 3, 4, 3, 2, 1, 0, 1, 2, 1, 0, -1]
    assert list(editing.jump_schedule(4)) == [3, 2, 1, 0, -1]  # no resampling: plain sampling
    levels = editing.jump_schedule(250, 10, 10)  # the paper's setting
    assert (np.abs(np.diff(levels)) == 1).all() and levels[0] == 249 and levels[-1] == -1
    assert np.sum(np.diff(levels) < 0) == 250 + 24 * 9 * 10  # 24 jumps of 10, each 9 more times


@pytest.mark.parametrize("sampler, jumps", [("ddpm", (3, 2)), ("ddim", (1, 1))])
def test_inpainting_keeps_the_known_pixels_exactly_on_1_and_8_devices(exact, sampler, jumps):
    one, eight = exact
    images = random_images(10)  # 10 images: two calls of 8 on 8 devices, one on 1
    masks = right_half_masks(10, 4)
    masks[::2] = np.rot90(masks[::2], axes=(1, 2))  # every other one: the top half drawn
    kw = dict(seed=5, jump_length=jumps[0], jump_n_sample=jumps[1], sampler=sampler,
              num_steps=20, eta=0.0, per_device_batch=8)
    a, b = one.inpaint(images, masks, **kw), eight.inpaint(images, masks, **kw)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[~masks], images[~masks])
    assert np.mean(a[masks] != images[masks]) > 0.9  # and the rest was drawn, not copied


def test_img2img_at_strength_0_is_the_input_and_at_1_sampling(exact):
    one, eight = exact
    images = random_images(5)
    np.testing.assert_array_equal(eight.img2img(images, 0.0, seed=2), images)
    for sampler in ("ddpm", "ddim"):
        kw = dict(sampler=sampler, num_steps=10, eta=1.0)
        np.testing.assert_array_equal(eight.img2img(images, 1.0, seed=2, **kw),
                                      one.sample(5, seed=2, **kw))


@pytest.mark.parametrize("sampler", solvers.SAMPLERS)
def test_img2img_at_strength_1_is_sampling_for_every_sampler(sampler):
    """On an exact model of three points, in float: no uint8 rounding to hide a difference."""
    sched = diffusion.make_schedule("linear", 50)
    model = OptimalDenoiser(sched)
    s = tiny_config().sampling
    s.sampler, s.num_steps, s.eta, s.clip_x0 = sampler, 10, 1.0, False
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(7), i))(jnp.arange(30))
    x0 = jnp.asarray(np.tile(POINTS, (10, 1)).reshape(30, 1, 1, 2))
    plain = solvers.from_config(s, 50)(model, None, sched, keys, (1, 1, 2), clip_x0=False)
    np.testing.assert_array_equal(editing.img2img(model, None, sched, s, "eps", keys, x0, 1.0),
                                  plain)
    # At strength 0.2 (from t = 5 of 50, abar 0.87) the samples are data points, most of them
    # the input's own (measured: 28 to 30 of 30 over the four samplers).
    edited = editing.img2img(model, None, sched, s, "eps", keys, x0, 0.2).reshape(30, 2)
    dist = np.linalg.norm(edited[:, None] - POINTS[None], axis=-1)
    assert dist.min(axis=1).max() < 1e-3
    assert np.mean(dist.argmin(axis=1) == np.tile(np.arange(3), 10)) >= 0.8


def test_interpolation_between_seeds_ends_at_their_samples(exact):
    one, eight = exact
    frames = eight.interpolate_seeds([3, 5], [4, 6], num_frames=4, num_steps=20)
    assert frames.shape == (2, 4, 4, 4, 1)
    for image, seed in [(frames[0, 0], 3), (frames[0, -1], 4), (frames[1, -1], 6)]:
        np.testing.assert_array_equal(image, one.sample(1, seed=seed, sampler="ddim", eta=0.0,
                                                        num_steps=20)[0])
    assert not np.array_equal(frames[0, 1], frames[0, 0])


def test_trained_model_fills_a_masked_half_with_its_patterns_colour(trained, tmp_path):
    """Through the CLI's code: a folder of images and a folder of masks of the same names."""
    _, workdir = trained
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    images = np.repeat(patterns(), 2, axis=0)  # each pattern twice: two draws
    for i, (img, mask) in enumerate(zip(images, right_half_masks(8), strict=True)):
        Image.fromarray(img).save(tmp_path / "images" / f"{i}.png")
        Image.fromarray(np.uint8(mask) * 255).save(tmp_path / "masks" / f"{i}.png")
    config = sampling.Sampler.from_workdir(workdir).config
    config.edit = tiny_config().edit
    config.edit.images, config.edit.masks = str(tmp_path / "images"), str(tmp_path / "masks")
    s = config.sampling
    s.sampler, s.num_steps, s.eta, s.per_device_batch = "ddim", 50, 1.0, 8
    out = sampling.edit_and_write(config, workdir, "inpaint")
    results = np.load(os.path.join(out, "inpaint.npz"))["results"]
    assert os.path.exists(os.path.join(out, "grid.png")) and os.path.exists(out + "/7.png")
    np.testing.assert_array_equal(results[:, :, :4], images[:, :, :4])
    # Each filled half is nearest its own pattern's half (the others' are 0.35 to 0.57 away).
    rmse, which = nearest(results[:, :, 4:], patterns()[:, :, 4:])
    assert (which == np.repeat(np.arange(4), 2)).all(), (which, np.round(rmse, 3))
    assert rmse.max() < 0.2, np.round(rmse, 3)


def test_ddim_inversion_then_decoding_reconstructs_the_data(trained):
    sampler, _ = trained
    data = patterns()
    frames = sampler.interpolate(data, data[[1, 2, 3, 0]], num_frames=3, num_steps=50)
    # The ends decode each image's inversion: measured RMSE (on [0, 1]) 0.017 to 0.037 after
    # 100 training steps, 0.020 to 0.035 after 200 (and 0.10 to 0.34 if decoding clipped x0).
    for end, images in ((0, data), (-1, data[[1, 2, 3, 0]])):
        rmse = np.sqrt(np.mean(np.square(frames[:, end] / 255.0 - images / 255.0), (1, 2, 3)))
        assert rmse.max() < 0.06, np.round(rmse, 4)
    assert (nearest(frames[:, 1], data)[0] > 0.06).all()  # the midpoints are neither end


def test_slerp():
    a, b = jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 2.0]])
    mid = editing.slerp(a, b, jnp.array([0.5]))
    np.testing.assert_allclose(mid, [[np.sqrt(0.5), np.sqrt(2.0)]], rtol=1e-6)
    np.testing.assert_array_equal(editing.slerp(a, b, jnp.array([0.0])), a)
    np.testing.assert_array_equal(editing.slerp(a, b, jnp.array([1.0])), b)


# ---------------------------------------------------------------------------------------------
# Bad input: one line each, naming the file, before any model is restored.


def write(path, array):
    Image.fromarray(array).save(path)
    return str(path)


@pytest.fixture
def folder(tmp_path):
    """Two 8x8 images in tmp/images and the data config of the tiny model (8x8 RGB)."""
    (tmp_path / "images").mkdir()
    for i in range(2):
        write(tmp_path / "images" / f"face{i}.png", patterns()[i])
    return tmp_path, tiny_config().data


def read(path, masks, data_config):
    names, _, sizes = editing.read_images(str(path / "images"), data_config)
    return editing.read_masks(str(masks), names, sizes, data_config)


def test_good_masks(folder):
    tmp, data = folder
    half = np.zeros((8, 8), np.uint8)
    half[:, 4:] = 255
    one = read(tmp, write(tmp / "one.png", half), data)  # one mask for all
    assert one.shape == (2, 8, 8) and one[:, :, 4:].all() and not one[:, :, :4].any()
    (tmp / "masks").mkdir()
    write(tmp / "masks" / "face0.jpg", np.stack([half] * 3, -1))  # any extension, RGB grey
    write(tmp / "masks" / "face1.png", 255 - half)
    each = read(tmp, tmp / "masks", data)
    assert each[0, :, 4:].all() and each[1, :, :4].all() and not each[1, :, 4:].any()
    big = np.zeros((64, 64), np.uint8)
    big[:, 32:] = 255  # a mask of a 64x64 image is fitted with it: the right half stays right
    write(tmp / "images" / "face0.png", np.zeros((64, 64, 3), np.uint8))
    write(tmp / "masks" / "face0.jpg", big)
    assert read(tmp, tmp / "masks", data)[0, :, 4:].all()


@pytest.mark.parametrize("case, message", [
    ("size", r"edit.masks: .*m.png is 5x7 but the images are 8x8: a mask has its image's size "
             r"or the model's 8x8$"),
    ("colour", r"edit.masks: .*m.png is not greyscale \(its colour channels differ by up to "
               r"255\): a mask is black where the image is kept and white where the model draws$"),
    ("black", r"edit.masks: .*m.png is all black: nothing to draw at the model's 8x8"),
    ("white", r"edit.masks: .*m.png is all white: nothing kept \(use --mode=sample\)"),
    ("unreadable", r"edit.masks: .*m.png cannot be read as an image \(UnidentifiedImageError"),
    ("count", r"edit.masks='.*masks': 3 masks for 2 images \(one per image, same file name\); "
              r"no image for extra$"),
    ("missing", r"edit.masks='.*masks': 1 masks for 2 images .*; none for face1.png$"),
])
def test_bad_masks_are_one_line_naming_the_file(folder, case, message):
    tmp, data = folder
    half = np.zeros((8, 8), np.uint8)
    half[:, 4:] = 255
    path = tmp / "m.png"
    if case == "size":
        write(path, np.zeros((7, 5), np.uint8))
    elif case == "colour":
        write(path, np.stack([half, 255 - half, half], -1))
    elif case in ("black", "white"):
        write(path, np.full((8, 8), 0 if case == "black" else 255, np.uint8))
    elif case == "unreadable":
        path.write_text("not an image")
    else:
        path = tmp / "masks"
        path.mkdir()
        names = ["face0"] + (["face1", "extra"] if case == "count" else [])
        for name in names:
            write(path / f"{name}.png", half)
    with pytest.raises(validate.ConfigError, match=message) as e:
        read(tmp, path, data)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("mode, key, value, message", [
    ("inpaint", "images", "", "edit.images is empty: --mode=inpaint needs"),
    ("inpaint", "masks", "", "edit.masks is empty"),
    ("inpaint", "jump_length", 10, "edit.jump_length=10 has no effect with edit.jump_n_sample=1"),
    ("img2img", "strength", 1.5, "edit.strength=1.5: expected 0 (the input) to 1 (pure noise)"),
    ("interpolate", "num_frames", 1, "edit.num_frames=1: expected an integer >= 2"),
    ("interpolate", "seeds", (1, 2, 3), "edit.seeds=(1, 2, 3): expected pairs"),
])
def test_edit_settings_are_checked_in_one_line(mode, key, value, message):
    config = tiny_config()
    config.edit.images, config.edit.masks = ("" if key == "seeds" else "x"), "m"
    config.edit[key] = value
    with pytest.raises(validate.ConfigError, match="^" + re.escape(message)):
        validate.check_edit(config, mode)
    config = tiny_config()
    config.sampling.sampler, config.edit.images, config.edit.masks = "heun", "x", "m"
    with pytest.raises(validate.ConfigError, match="inpainting takes 'ddpm' or 'ddim'"):
        validate.check_edit(config, "inpaint")
    validate.check_edit(config, "img2img")  # every sampler edits images


def test_editing_modes_read_the_workdirs_config(trained):
    """--mode=inpaint etc. without --config: the checkpoint's config, with config.edit's fields
    (a run trained before they existed saved none) for the command line to set."""
    from configs import from_workdir

    _, workdir = trained
    # In a subprocess: ddpm_jax.main and ddpm_jax.benchmark (test_benchmark) both define absl's
    # --config, so the two cannot be imported into one process.
    script = f"""
from ddpm_jax import main
argv = main.with_workdir_config(["main", "--mode=inpaint", "--workdir={workdir}"])
assert argv[1] == f"--config={{main.WORKDIR_CONFIG}}:{workdir}", argv
"""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=repo), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = from_workdir.get_config(workdir)
    assert config.edit.to_dict() == tiny_config().edit.to_dict()
    assert config.diffusion.num_timesteps == 100  # and the rest is the run's
