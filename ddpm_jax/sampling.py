"""Ancestral (DDPM) and DDIM samplers, each one jitted `lax.scan`, and sampling from checkpoints.

Every image draws its noise from `fold_in(seed_key, image_index)`, so an image depends only on the
seed and its index: the same samples on 1 device or 8, in one call or many.

Library use (e.g. in a notebook):

    from ddpm_jax import sampling
    sampler = sampling.Sampler.from_workdir("runs/quickstart")
    images = sampler.sample(16, seed=0)      # uint8 [16, H, W, C]
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from ddpm_jax import diffusion, input_pipeline, sharding, unet

SAMPLERS = ("ddpm", "ddim")


def _image_noise(image_keys: jax.Array, t, shape) -> jax.Array:
    """Per-image standard normal noise for step t: [B, *shape]."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, t), shape))(image_keys)


def _predict(model, params, sched, prediction, clip_x0, x, t):
    t_B = jnp.full((x.shape[0],), t, jnp.int32)
    x0, eps = diffusion.predict_x0_eps(sched, prediction, x, t_B, model.apply({"params": params},
                                                                               x, t_B))
    if clip_x0:
        x0 = jnp.clip(x0, -1.0, 1.0)
        eps = diffusion.eps_from_x0(sched, x, t_B, x0)  # keep eps consistent with the clipped x0
    return x0, eps, t_B


def ddpm_sample(model, params, sched: diffusion.Schedule, image_keys: jax.Array, image_shape,
                *, variance="fixed_large", clip_x0=True, prediction="eps") -> jax.Array:
    """Ancestral sampling over all T steps (DDPM algorithm 2). Returns x_0 in [-1, 1]-ish."""
    T = sched.num_timesteps
    x = _image_noise(image_keys, T, image_shape)

    def step(x, t):
        x0, _, t_B = _predict(model, params, sched, prediction, clip_x0, x, t)
        mean, log_var = diffusion.q_posterior(sched, x0, x, t_B, variance)
        noise = _image_noise(image_keys, t, image_shape)
        return mean + jnp.where(t > 0, jnp.exp(0.5 * log_var), 0.0) * noise, None

    x, _ = jax.lax.scan(step, x, jnp.arange(T - 1, -1, -1))
    return x


def ddim_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """Evenly spaced timesteps from T - 1 down to 0 (includes both ends)."""
    ts = np.unique(np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(np.int32))
    return ts[::-1].copy()


def ddim_sample(model, params, sched: diffusion.Schedule, image_keys: jax.Array, image_shape,
                *, num_steps=100, eta=0.0, clip_x0=True, prediction="eps") -> jax.Array:
    """DDIM (Song et al. 2021, eq. 12): eta=0 deterministic, eta=1 matches DDPM's fixed-small."""
    ts = ddim_timesteps(sched.num_timesteps, num_steps)
    ts_prev = np.append(ts[1:], -1)
    x = _image_noise(image_keys, sched.num_timesteps, image_shape)

    def step(x, t_pair):
        t, t_prev = t_pair
        x0, eps, _ = _predict(model, params, sched, prediction, clip_x0, x, t)
        abar = sched.alphas_cumprod[t]
        abar_prev = jnp.where(t_prev >= 0, sched.alphas_cumprod[jnp.maximum(t_prev, 0)], 1.0)
        var = eta**2 * (1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev)
        dir_coef = jnp.sqrt(jnp.maximum(1.0 - abar_prev - var, 0.0))
        noise = _image_noise(image_keys, t, image_shape)
        return jnp.sqrt(abar_prev) * x0 + dir_coef * eps + jnp.sqrt(var) * noise, None

    x, _ = jax.lax.scan(step, x, (jnp.asarray(ts), jnp.asarray(ts_prev)))
    return x


def make_sampler(model, sched, sampling_config, prediction: str, image_shape, mesh,
                 progress: bool = False):
    """Build (and jit, once) a function (params, rng, num_samples, start=0) -> uint8 [N, H, W, C]
    on host: images start .. start + num_samples - 1 of `rng`.

    Images are drawn in calls of `per_device_batch` images per device; image i of a seed is the
    same whatever the call size, the device count or how the range is split into calls.
    """
    s = sampling_config
    if s.sampler == "ddpm":
        fn = functools.partial(ddpm_sample, variance=s.variance)
    elif s.sampler == "ddim":
        fn = functools.partial(ddim_sample, num_steps=s.num_steps, eta=s.eta)
    else:
        raise ValueError(f"sampling.sampler={s.sampler!r}: expected one of {SAMPLERS}")
    image_shape = tuple(image_shape)

    @functools.partial(jax.jit, out_shardings=sharding.batch(mesh))
    def sample_uint8(params, rng, index_B):
        image_keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(index_B)
        x = fn(model, params, sched, image_keys, image_shape, clip_x0=s.clip_x0,
               prediction=prediction)
        return to_uint8(x)

    n_dev = mesh.devices.size

    def draw(params, rng, num_samples: int, start: int = 0) -> np.ndarray:
        per_call = min(s.per_device_batch * n_dev, -(-num_samples // n_dev) * n_dev)
        out, t0 = [], time.time()
        for first in range(0, num_samples, per_call):
            index = np.arange(start + first, start + first + per_call, dtype=np.int32)
            index = sharding.global_batch(mesh, index)
            images = multihost_utils.process_allgather(sample_uint8(params, rng, index), tiled=True)
            out.append(np.asarray(images))
            if progress:
                done = min(first + per_call, num_samples)
                rate = done / (time.time() - t0)
                logging.info("Sampled %d/%d images (%.1f img/s, ETA %.0f s).", done,
                             num_samples, rate, (num_samples - done) / rate)
        return np.concatenate(out)[:num_samples]

    return draw


def to_uint8(x: jax.Array) -> jax.Array:
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def make_grid(images: np.ndarray, pad: int = 2) -> np.ndarray:
    """uint8 [N, H, W, C] -> one near-square uint8 grid image with `pad` white pixels between."""
    n, h, w, c = images.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h,
             pad + col * (w + pad):pad + col * (w + pad) + w] = img
    return grid


def write_png(path: str, image: np.ndarray) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)  # 1: greyscale


@dataclasses.dataclass
class Sampler:
    """EMA params restored from a checkpoint, ready to sample on the devices present."""

    config: ml_collections.ConfigDict
    model: unet.UNet
    params: object
    step: int
    mesh: object

    @classmethod
    def from_workdir(cls, workdir: str, config: ml_collections.ConfigDict | None = None,
                     step: int = -1) -> Sampler:
        """Restore EMA params (only them) of checkpoint `step` (-1: latest) in `workdir`.

        Without `config`, the config saved with the checkpoint is used.
        """
        from ddpm_jax import checkpoint

        ckpt = checkpoint.Checkpointer(workdir, read_only=True)
        if config is None:
            steps = ckpt.all_steps()
            if not steps:
                raise checkpoint.CheckpointError(f"no checkpoint in {ckpt.directory}")
            config = ml_collections.ConfigDict(ckpt.saved_config(steps[-1] if step < 0 else step))
        mesh = sharding.make_mesh()
        model = unet.from_config(config)
        abstract = unet.abstract_params(model, input_pipeline.image_shape(config.data))
        abstract = sharding.with_shardings(abstract, sharding.replicated(mesh, abstract))
        step, params = ckpt.restore_ema_params(abstract, step)
        ckpt.close()
        return cls(config, model, params, step, mesh)

    def sample(self, num_samples: int, seed: int = 0, progress: bool = False,
               **overrides) -> np.ndarray:
        """uint8 images [num_samples, H, W, C]; `overrides` replace sampling config fields."""
        s = ml_collections.ConfigDict(self.config.sampling.to_dict())
        s.update(overrides)
        c = self.config
        sched = diffusion.make_schedule(c.diffusion.beta_schedule, c.diffusion.num_timesteps)
        draw = make_sampler(self.model, sched, s, c.diffusion.prediction,
                            input_pipeline.image_shape(c.data), self.mesh, progress)
        return draw(self.params, jax.random.key(seed), num_samples)


def sample_and_write(config: ml_collections.ConfigDict, workdir: str) -> str:
    """--mode=sample: samples from the checkpoint into WORKDIR/samples/step_<N>/."""
    sampler = Sampler.from_workdir(workdir, config, config.sampling.checkpoint_step)
    images = sampler.sample(config.sampling.num_samples, seed=config.seed, progress=True)
    out_dir = os.path.join(workdir, "samples", f"step_{sampler.step}")
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        write_png(os.path.join(out_dir, "grid.png"), make_grid(images))
        for i, img in enumerate(images):
            write_png(os.path.join(out_dir, f"{i:05d}.png"), img)
        np.savez(os.path.join(out_dir, "samples.npz"), images=images)
    logging.info("Wrote %d samples to %s", len(images), out_dir)
    return out_dir
