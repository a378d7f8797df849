"""The samplers on a known distribution, and their equivalences."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ddpm_jax import diffusion, sampling, sharding, solvers

POINTS = np.array([[-0.8, 0.6], [0.5, 0.5], [0.2, -0.9]], np.float32)  # the "dataset"


@dataclasses.dataclass(frozen=True)
class OptimalDenoiser:
    """The exact eps-prediction of a dataset of points: eps* = (x_t - sqrt(abar) E[x0|x_t]) / ..."""

    sched: diffusion.Schedule

    def apply(self, variables, x_BHWC, t_B):
        abar = self.sched.alphas_cumprod[t_B][:, None]
        x = x_BHWC.reshape(x_BHWC.shape[0], -1)  # [B, 2]
        d2 = jnp.sum((x[:, None, :] - jnp.sqrt(abar)[:, None] * POINTS[None]) ** 2, -1)
        w = jax.nn.softmax(-d2 / (2 * (1 - abar)), axis=-1)  # posterior over the points
        x0 = w @ POINTS
        eps = (x - jnp.sqrt(abar) * x0) / jnp.sqrt(1 - abar)
        return eps.reshape(x_BHWC.shape)


def draw(sampler, num=64, devices=None, T=200, start=0, **kw):
    sched = diffusion.make_schedule("linear", T)
    cfg = ml_collections.ConfigDict(dict(sampler=sampler, num_steps=kw.pop("num_steps", 50),
                                         eta=kw.pop("eta", 0.0), variance=kw.pop("variance",
                                         "fixed_small"), spacing=kw.pop("spacing", "auto"),
                                         clip_x0=False, per_device_batch=8))
    mesh = sharding.make_mesh(devices)
    fn = sampling.make_sampler(OptimalDenoiser(sched), sched, cfg, "eps", (1, 1, 2), mesh)
    return fn(None, jax.random.key(0), num, start=start)


def to_float(images):
    return images.reshape(len(images), 2).astype(np.float32) / 127.5 - 1


@pytest.mark.parametrize("sampler, kw", [
    ("ddpm", {"num_steps": 0}), ("ddpm", {"num_steps": 0, "variance": "fixed_large"}),
    ("ddim", {}), ("ddim", {"eta": 1.0}),
    # The few-step samplers at 20 network evaluations (Heun: 19), respaced ancestral included.
    ("ddpm", {"num_steps": 20}), ("ddim", {"num_steps": 20}), ("dpm_solver++", {"num_steps": 20}),
    ("heun", {"num_steps": 20})])
def test_samples_land_on_the_data_points(sampler, kw):
    x = to_float(draw(sampler, **kw))
    dist = np.linalg.norm(x[:, None] - POINTS[None], axis=-1)
    assert dist.min(axis=1).max() < 0.02, dist.min(axis=1)  # uint8 rounding is 0.004
    hits = np.bincount(dist.argmin(axis=1), minlength=3)
    assert (hits > 5).all(), hits  # every point is reached, none dominates


def test_ddim_with_all_steps_and_eta_one_is_ancestral_sampling():
    sched = diffusion.make_schedule("linear", 50)
    model = OptimalDenoiser(sched)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(jnp.arange(16))
    a = solvers.ddpm_sample(model, None, sched, keys, (1, 1, 2), variance="fixed_small",
                             clip_x0=True)
    b = solvers.ddim_sample(model, None, sched, keys, (1, 1, 2), num_steps=50, eta=1.0,
                             clip_x0=True)
    np.testing.assert_allclose(a, b, atol=2e-4)


def test_samples_do_not_depend_on_device_count_or_call_size():
    one = draw("ddpm", num=24, devices=jax.devices()[:1], T=50, num_steps=0)
    eight = draw("ddpm", num=24, T=50, num_steps=0)
    np.testing.assert_array_equal(one, eight)
    np.testing.assert_array_equal(draw("ddpm", num=10, T=50, num_steps=0), eight[:10])
    # A range drawn in pieces (how evaluation streams its samples) is the same range.
    np.testing.assert_array_equal(draw("ddpm", num=11, T=50, start=13, num_steps=0), eight[13:])


@pytest.mark.parametrize("sampler", ["ddpm", "dpm_solver++", "heun"])  # ddpm: respaced
def test_few_step_samples_do_not_depend_on_device_count(sampler):
    one = draw(sampler, num=16, devices=jax.devices()[:1], T=50, num_steps=10)
    np.testing.assert_array_equal(one, draw(sampler, num=16, T=50, num_steps=10))


def test_make_grid():
    images = np.zeros((5, 4, 4, 3), np.uint8)
    grid = sampling.make_grid(images, pad=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3)
    assert grid[0].min() == 255 and grid[1, 1:5].max() == 0


@pytest.mark.parametrize("sampler", solvers.SAMPLERS)
def test_progress_frames_end_at_the_same_samples(sampler):
    """progress.png's rows: predicted x0 at 10 timesteps, the same images as samples 0..3."""
    T = 50
    sched = diffusion.make_schedule("linear", T)
    cfg = ml_collections.ConfigDict(dict(sampler=sampler, num_steps=20, eta=0.0, spacing="auto",
                                         variance="fixed_small", clip_x0=False))
    frames = sampling.draw_progress(OptimalDenoiser(sched), None, sched, cfg, "eps", (1, 1, 2),
                                    jax.random.key(0), num_images=4, num_frames=10)
    assert frames.shape == (4, 10, 1, 1, 2) and frames.dtype == np.uint8
    samples = draw(sampler, num=4, T=T, num_steps=20)
    # The x0 predicted at t=0 is the sample, up to uint8 rounding of float differences.
    assert np.abs(frames[:, -1].astype(int) - samples.astype(int)).max() <= 1
    assert not np.array_equal(frames[:, 0], frames[:, -1])  # early predictions are blurry means


def test_make_grid_with_columns():
    grid = sampling.make_grid(np.zeros((6, 4, 4, 3), np.uint8), pad=1, cols=3)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3)
