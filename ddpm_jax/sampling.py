"""Sampling: the samplers of solvers.py jitted over the devices, and sampling from checkpoints.

Every image draws its noise from `fold_in(seed_key, image_index)`, so an image depends only on the
seed and its index: the same samples on 1 device or 8, in one call or many.

Library use (e.g. in a notebook):

    from ddpm_jax import sampling
    sampler = sampling.Sampler.from_workdir("runs/quickstart")
    images = sampler.sample(16, seed=0)      # uint8 [16, H, W, C]

and edit with it (editing.py, docs/editing.md): `sampler.inpaint(images, masks)`,
`sampler.interpolate(images_a, images_b)`, `sampler.interpolate_seeds(seeds_a, seeds_b)`,
`sampler.img2img(images, strength)`.

A class-conditional model draws image i of class `sampling.label`, or with label -1 of class
i % num_classes (all classes in turn, uniform over a sample; grids put a class in each column),
with classifier-free guidance `sampling.guidance_scale` (solvers.Guided).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from ddpm_jax import data, diffusion, editing, sharding, solvers, unet, validate
from ddpm_jax import progress as progress_lib  # `progress` is make_sampler's flag

SAMPLERS = solvers.SAMPLERS


def image_labels(index_B: jax.Array, sampling_config, num_classes: int) -> jax.Array | None:
    """The class of each image index (None for an unconditional model): a function of the index
    alone, like the image's noise, so it does not depend on the call size or device count."""
    if not num_classes:
        return None
    label = sampling_config.get("label", -1)
    return index_B % num_classes if label < 0 else jnp.full_like(index_B, label)


def conditioned(model, index_B: jax.Array, sampling_config):
    """`model` as the samplers call it for images `index_B`: with their labels and guidance."""
    num_classes = getattr(model, "num_classes", 0)  # any model with `apply`, e.g. in tests
    return solvers.conditioned(model, image_labels(index_B, sampling_config, num_classes),
                               sampling_config.get("guidance_scale", 1.0))


def grid_columns(config, num_images: int) -> int | None:
    """A class per column when a class-conditional model draws all classes in turn."""
    k = config.model.get("num_classes", 0)
    return min(k, num_images) if k and config.sampling.get("label", -1) < 0 else None


def draw_progress(model, params, sched, sampling_config, prediction: str, image_shape,
                  rng: jax.Array, num_images: int = 6, num_frames: int = 10) -> np.ndarray:
    """uint8 [num_images, num_frames, H, W, C]: each image's predicted x_0 at `num_frames`
    timesteps, evenly spaced over those the sampler visits from T - 1 to 0.

    Images 0 .. num_images - 1 of `rng`, with the same per-image noise as `make_sampler`: the
    last frames are (up to float rounding) the first samples `make_sampler` draws.
    """
    ts = solvers.visited_timesteps(sampling_config, sched)
    record = ts[np.unique(np.round(np.linspace(0, len(ts) - 1, num_frames)).astype(int))]
    fn = solvers.from_config(sampling_config, sched.num_timesteps)

    @jax.jit
    def run(params, rng):
        index = jnp.arange(num_images)
        image_keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(index)
        _, frames = fn(conditioned(model, index, sampling_config), params, sched, image_keys,
                       tuple(image_shape), clip_x0=sampling_config.clip_x0, prediction=prediction,
                       record=record)
        return to_uint8(jnp.swapaxes(frames, 0, 1))

    return np.asarray(run(params, rng))  # replicated, like the params: every process has it


def make_sampler(model, sched, sampling_config, prediction: str, image_shape, mesh,
                 progress: bool = False):
    """Build (and jit, once) a function (params, rng, num_samples, start=0) -> uint8 [N, H, W, C]
    on host: images start .. start + num_samples - 1 of `rng`.

    Images are drawn in calls of `per_device_batch` images per device; image i of a seed is the
    same whatever the call size, the device count or how the range is split into calls.
    """
    s = sampling_config
    fn = solvers.from_config(s, sched.num_timesteps)
    image_shape = tuple(image_shape)

    @functools.partial(jax.jit, out_shardings=sharding.batch(mesh))
    def sample_uint8(params, rng, index_B):
        image_keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(index_B)
        x = fn(conditioned(model, index_B, s), params, sched, image_keys, image_shape,
               clip_x0=s.clip_x0, prediction=prediction)
        return to_uint8(x)

    n_dev = mesh.devices.size

    def draw(params, rng, num_samples: int, start: int = 0) -> np.ndarray:
        per_call = min(s.per_device_batch * n_dev, -(-num_samples // n_dev) * n_dev)
        out = []
        shown = progress_lib.ImageProgress(num_samples) if progress else None
        for first in range(0, num_samples, per_call):
            index = np.arange(start + first, start + first + per_call, dtype=np.int32)
            index = sharding.global_batch(mesh, index)
            images = multihost_utils.process_allgather(sample_uint8(params, rng, index), tiled=True)
            out.append(np.asarray(images))
            if shown:
                shown.update(min(first + per_call, num_samples))
        if shown:
            shown.close()
        return np.concatenate(out)[:num_samples]

    return draw


def to_uint8(x: jax.Array) -> jax.Array:
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def make_grid(images: np.ndarray, pad: int = 2, cols: int | None = None) -> np.ndarray:
    """uint8 [N, H, W, C] -> one uint8 grid image (near-square unless `cols` is given) with `pad`
    white pixels between."""
    n, h, w, c = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
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

        Without `config`, the config saved with the checkpoint is used; with it, the class names
        saved with the checkpoint still come with it (`config.data.class_names`).
        """
        from ddpm_jax import checkpoint

        ckpt = checkpoint.Checkpointer(workdir, read_only=True)
        if config is None:
            steps = ckpt.all_steps()
            if not steps:
                raise checkpoint.CheckpointError(f"no checkpoint in {ckpt.directory}")
            config = ml_collections.ConfigDict(ckpt.saved_config(steps[-1] if step < 0 else step))
        elif config.model.get("num_classes", 0) and ckpt.all_steps():
            saved = ckpt.saved_config(ckpt.all_steps()[-1] if step < 0 else step)
            config = config.copy_and_resolve_references()
            config.data.class_names = tuple(saved.get("data", {}).get("class_names", ()))
        mesh = sharding.make_mesh()
        model = unet.from_config(config)
        abstract = unet.abstract_params(model, data.image_shape(config.data))
        abstract = sharding.with_shardings(abstract, sharding.replicated(mesh, abstract))
        step, params = ckpt.restore_ema_params(abstract, step, config)
        ckpt.close()
        return cls(config, model, params, step, mesh)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return data.image_shape(self.config.data)

    def sampling_config(self, **overrides) -> ml_collections.ConfigDict:
        """The sampling config with `overrides` replacing its fields."""
        s = ml_collections.ConfigDict(self.config.sampling.to_dict())
        s.update(overrides)
        return s

    def sample(self, num_samples: int, seed: int = 0, progress: bool = False,
               **overrides) -> np.ndarray:
        """uint8 images [num_samples, H, W, C]; `overrides` replace sampling config fields."""
        s = self.sampling_config(**overrides)
        c = self.config
        sched = diffusion.make_schedule(c.diffusion.beta_schedule, c.diffusion.num_timesteps)
        draw = make_sampler(self.model, sched, s, c.diffusion.prediction, self.image_shape,
                            self.mesh, progress)
        return draw(self.params, jax.random.key(seed), num_samples)

    def progress(self, num_images: int = 6, seed: int = 0, num_frames: int = 10) -> np.ndarray:
        """uint8 [num_images, num_frames, H, W, C]: predicted x_0 from T to 0 (`draw_progress`)."""
        c = self.config
        sched = diffusion.make_schedule(c.diffusion.beta_schedule, c.diffusion.num_timesteps)
        return draw_progress(self.model, self.params, sched, c.sampling, c.diffusion.prediction,
                             data.image_shape(c.data), jax.random.key(seed),
                             min(num_images, c.sampling.num_samples), num_frames)

    # Sampling that edits (editing.py). Images are uint8 [N, H, W, C] at the model's size
    # (editing.read_images reads files so); `overrides` replace sampling config fields. Image i
    # draws from fold_in(key(seed), i), as `sample` does.
    def inpaint(self, images: np.ndarray, masks: np.ndarray, seed: int = 0,
                jump_length: int = 1, jump_n_sample: int = 1, **overrides) -> np.ndarray:
        """uint8 [N, H, W, C]: the pixels where `masks` (bool [N or 1, H, W]) is True drawn, the
        rest kept exactly; RePaint's resampling with jump_n_sample > 1. ddpm or ddim."""
        s, sched = self.sampling_config(**overrides), self._schedule()
        images = self._check_images(images)
        draw = np.broadcast_to(np.asarray(masks, bool), images.shape[:3])[..., None]
        kw = solvers.settings(s, sched.num_timesteps)

        def fn(params, keys, index_B, images_B, draw_B):
            return editing.inpaint(
                conditioned(self.model, index_B, s), params, sched, keys, from_uint8(images_B),
                draw_B, sampler=s.sampler, clip_x0=s.clip_x0,
                prediction=self.config.diffusion.prediction, jump_length=jump_length,
                jump_n_sample=jump_n_sample, **kw)

        return self._map(fn, s, seed, images, np.ascontiguousarray(draw))

    def img2img(self, images: np.ndarray, strength: float, seed: int = 0,
                **overrides) -> np.ndarray:
        """uint8 [N, H, W, C]: SDEdit, `images` noised to strength x T and denoised by the
        sampler; strength 0 returns them, strength 1 is `sample(N, seed)`."""
        s, sched = self.sampling_config(**overrides), self._schedule()
        images = self._check_images(images)
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength={strength}: expected 0 to 1")

        def fn(params, keys, index_B, images_B):
            return editing.img2img(conditioned(self.model, index_B, s), params, sched, s,
                                   self.config.diffusion.prediction, keys, from_uint8(images_B),
                                   strength)

        return self._map(fn, s, seed, images)

    def interpolate(self, images_a: np.ndarray, images_b: np.ndarray, num_frames: int = 8,
                    **overrides) -> np.ndarray:
        """uint8 [P, num_frames, H, W, C]: from images_a[p] to images_b[p] by DDIM inversion,
        slerp of the two x_T and DDIM decoding (eta = 0, the sampling config's grid)."""
        a = self._check_images(images_a, "images_a")
        b = self._check_images(images_b, "images_b")
        if len(a) != len(b):
            raise ValueError(f"images_a has {len(a)} images, images_b {len(b)}: expected pairs")
        s = editing.interpolation_config(self.sampling_config(**overrides), inverted=True)
        sched = self._schedule()
        kw = solvers.settings(s, sched.num_timesteps)

        def encode(params, keys, index_B, pair_B, images_B):
            return editing.ddim_invert(conditioned(self.model, pair_B, s), params, sched,
                                       from_uint8(images_B), num_steps=kw["num_steps"],
                                       spacing=kw["spacing"],
                                       prediction=self.config.diffusion.prediction)

        pair = np.arange(len(a), dtype=np.int32)
        x = self._map(encode, s, 0, np.concatenate([pair, pair]), np.concatenate([a, b]),
                      uint8=False)
        return self._decode_path(x[:len(a)], x[len(a):], num_frames, s)

    def interpolate_seeds(self, seeds_a, seeds_b, num_frames: int = 8,
                          **overrides) -> np.ndarray:
        """uint8 [P, num_frames, H, W, C]: from image 0 of seed seeds_a[p] to that of seeds_b[p]
        (as `sample` draws them with DDIM at eta = 0) by slerp of their noises."""
        s = editing.interpolation_config(self.sampling_config(**overrides))
        T = self.config.diffusion.num_timesteps
        return self._decode_path(editing.seed_noise(seeds_a, self.image_shape, T),
                                 editing.seed_noise(seeds_b, self.image_shape, T), num_frames, s)

    def _decode_path(self, x_a, x_b, num_frames: int, s) -> np.ndarray:
        """uint8 [P, num_frames, ...]: sampler `s` from slerp(x_a[p], x_b[p], w), w from 0 to 1;
        all of pair p's frames take pair p's class (if any)."""
        sched, P = self._schedule(), len(x_a)
        w = np.tile(np.linspace(0.0, 1.0, num_frames, dtype=np.float32), P)
        pair = np.repeat(np.arange(P, dtype=np.int32), num_frames)
        sample_fn = solvers.from_config(s, sched.num_timesteps)

        def fn(params, keys, index_B, pair_B, a_B, b_B, w_B):
            return sample_fn(conditioned(self.model, pair_B, s), params, sched, keys,
                             a_B.shape[1:], clip_x0=s.clip_x0,
                             prediction=self.config.diffusion.prediction,
                             x_init=editing.slerp(a_B, b_B, w_B))

        frames = self._map(fn, s, 0, pair, x_a[pair], x_b[pair], w)
        return frames.reshape(P, num_frames, *frames.shape[1:])

    def _schedule(self) -> diffusion.Schedule:
        c = self.config.diffusion
        return diffusion.make_schedule(c.beta_schedule, c.num_timesteps)

    def _check_images(self, images: np.ndarray, what: str = "images") -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != self.image_shape or images.dtype != np.uint8:
            raise ValueError(f"{what}: expected uint8 [N, {', '.join(map(str, self.image_shape))}]"
                             f" (the model's images), got {images.dtype} {list(images.shape)}")
        return images

    def _map(self, fn, s, seed: int, *arrays, uint8: bool = True) -> np.ndarray:
        """fn(params, image_keys, index_B, *rows) -> x over the rows of `arrays`, jitted once,
        in calls of `s.per_device_batch` images per device with the batch sharded (the last
        call padded with copies of its last row). Rows are independent, so the results do not
        depend on the device count or the call size."""

        @functools.partial(jax.jit, out_shardings=sharding.batch(self.mesh))
        def run(params, rng, index_B, *rows):
            x = fn(params, jax.vmap(lambda i: jax.random.fold_in(rng, i))(index_B), index_B,
                   *rows)
            return to_uint8(x) if uint8 else x

        n, n_dev = len(arrays[0]), self.mesh.devices.size
        per_call = min(s.per_device_batch * n_dev, -(-n // n_dev) * n_dev)
        out = []
        for first in range(0, n, per_call):
            index = np.arange(first, first + per_call)
            rows = [sharding.global_batch(self.mesh, np.asarray(a)[np.minimum(index, n - 1)])
                    for a in arrays]
            result = run(self.params, jax.random.key(seed),
                         sharding.global_batch(self.mesh, index.astype(np.int32)), *rows)
            out.append(np.asarray(multihost_utils.process_allgather(result, tiled=True)))
        return np.concatenate(out)[:n]


def from_uint8(images: jax.Array) -> jax.Array:
    """uint8 images -> float32 in [-1, 1], as the model sees them (to_uint8's inverse)."""
    return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def sample_and_write(config: ml_collections.ConfigDict, workdir: str) -> str:
    """--mode=sample: samples from the checkpoint into WORKDIR/samples/step_<N>/."""
    validate.check_sampling(config)
    sampler = Sampler.from_workdir(workdir, config, config.sampling.checkpoint_step)
    images = sampler.sample(config.sampling.num_samples, seed=config.seed, progress=True)
    out_dir = os.path.join(workdir, "samples", f"step_{sampler.step}")
    labels = image_labels(np.arange(len(images)), config.sampling, config.model.num_classes)
    if labels is not None:
        names = sampler.config.data.get("class_names", ())
        logging.info("Classes drawn: %s; guidance scale %g", ", ".join(
            f"{k} ({names[k]})" if k < len(names) else str(k) for k in np.unique(labels)),
            config.sampling.guidance_scale)
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        write_png(os.path.join(out_dir, "grid.png"),
                  make_grid(images, cols=grid_columns(config, len(images))))
        for i, img in enumerate(images):
            write_png(os.path.join(out_dir, f"{i:05d}.png"), img)
        np.savez(os.path.join(out_dir, "samples.npz"), images=images,
                 **({} if labels is None else {"labels": labels}))
    # The denoising of the first few samples, one row per image: predicted x_0 from T to 0.
    frames = sampler.progress(seed=config.seed)
    if jax.process_index() == 0:
        write_png(os.path.join(out_dir, "progress.png"),
                  make_grid(frames.reshape(-1, *frames.shape[2:]), cols=frames.shape[1]))
    logging.info("Wrote %d samples and progress.png to %s", len(images), out_dir)
    return out_dir


def edit_and_write(config: ml_collections.ConfigDict, workdir: str, mode: str) -> str:
    """--mode=inpaint|interpolate|img2img: edits as `config.edit` says (docs/editing.md) into
    WORKDIR/<mode>/step_<N>/: grid.png (a row per image or pair), a PNG per result named after
    its input, and <mode>.npz. The inputs are read and checked before anything is restored."""
    validate.check_edit(config, mode)
    e = config.edit
    names = images = masks = None
    if e.images:
        names, images, sizes = editing.read_images(e.images, config.data)
    if mode == "inpaint":
        masks = editing.read_masks(e.masks, names, sizes, config.data)
    if mode == "interpolate" and images is not None and len(images) % 2:
        raise validate.ConfigError(f"edit.images={e.images!r}: {len(images)} images; "
                                   "interpolation takes pairs (1st to 2nd, 3rd to 4th, ...)")
    sampler = Sampler.from_workdir(workdir, config, config.sampling.checkpoint_step)
    out_dir = os.path.join(workdir, mode, f"step_{sampler.step}")
    if mode == "inpaint":
        results = sampler.inpaint(images, masks, seed=config.seed, jump_length=e.jump_length,
                                  jump_n_sample=e.jump_n_sample)
        shown = np.where(masks[..., None], np.uint8(127), images)  # the drawn area grey
        rows, arrays = np.stack([images, shown, results], 1), dict(masks=masks, results=results)
    elif mode == "img2img":
        results = sampler.img2img(images, e.strength, seed=config.seed)
        rows, arrays = np.stack([images, results], 1), dict(results=results)
    elif images is not None:
        rows = sampler.interpolate(images[0::2], images[1::2], e.num_frames)
        arrays = dict(frames=rows)
        names = [f"pair_{p:03d}_{names[2 * p]}" for p in range(len(rows))]
    else:
        seeds = tuple(e.seeds)
        rows = sampler.interpolate_seeds(seeds[0::2], seeds[1::2], e.num_frames)
        arrays = dict(frames=rows, seeds=np.asarray(seeds))
        names = [f"seeds_{a}_{b}" for a, b in zip(seeds[0::2], seeds[1::2], strict=True)]
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        write_png(os.path.join(out_dir, "grid.png"),
                  make_grid(rows.reshape(-1, *rows.shape[2:]), cols=rows.shape[1]))
        for name, row in zip(names, rows, strict=True):
            # A result per input image; an interpolation's is its row of frames.
            one = make_grid(row, cols=len(row)) if mode == "interpolate" else row[-1]
            write_png(os.path.join(out_dir, os.path.splitext(name)[0] + ".png"), one)
        np.savez(os.path.join(out_dir, f"{mode}.npz"),
                 **({} if images is None else {"inputs": images}), **arrays)
    logging.info("Wrote %d results (grid.png and a PNG each) to %s", len(rows), out_dir)
    return out_dir
