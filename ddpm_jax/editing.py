"""Sampling that edits: inpainting, interpolation and image-to-image, with a trained model.

* Inpainting (`inpaint`): the replacement method. Before every step at timestep t the known
  pixels (where the mask is black) are replaced by a fresh draw of q(x_t | x_0) from the input, and
  after the last step by the input itself, so they come out exactly as they went in. RePaint's
  resampling (Lugmayr et al. 2022; andreas128/RePaint `get_schedule_jump`) optionally goes
  `jump_length` steps back up the chain, re-noising with q(x_t | x_{t-1}), `jump_n_sample - 1`
  times per stretch, so the drawn pixels have time to agree with the known ones. Ancestral (ddpm)
  and DDIM steps, on the sampler's grid.
* Interpolation (`ddim_invert`, `slerp`): an image goes to x_T by DDIM inversion (eta = 0, the
  deterministic ODE run backwards along the DDIM grid), two x_T are slerped, and each frame is
  decoded by DDIM at eta = 0. Between two seeds only their noises are slerped.
* Image-to-image (`img2img`, SDEdit, Meng et al. 2022): the input noised to t ~ strength x T by
  q(x_t | x_0), then denoised by any sampler from there (solvers.py's `t_max` and `x_init`).

Image i of a call draws from `fold_in(key(seed), i)`, as sampling does, so results do not depend
on the device count, and image-to-image at strength 1 is `Sampler.sample` with the same seed.
These are pure functions of a batch, as solvers.py's samplers are; sampling.py runs them on the
devices from a checkpoint: the notebook API is `sampling.Sampler.inpaint`, `.interpolate`,
`.interpolate_seeds` and `.img2img`, and the CLI (`--mode=inpaint|interpolate|img2img`,
`sampling.edit_and_write`) reads `config.edit` (configs/default.py) and the files below.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from ddpm_jax import diffusion, solvers, validate

INPAINT_SAMPLERS = ("ddpm", "ddim")
MASK_GREY_TOLERANCE = 10  # a mask's channels may differ this much (JPEG chroma noise)


# ---------------------------------------------------------------------------------------------
# The editing samplers: pure functions of a batch, for jit. x is in [-1, 1], [B, H, W, C].


def jump_schedule(num_steps: int, jump_length: int = 1, jump_n_sample: int = 1) -> np.ndarray:
    """RePaint's time schedule over the levels of a chain of `num_steps` steps: num_steps - 1
    (the noisiest grid point) down to -1 (the clean data), going back up `jump_length` levels
    `jump_n_sample - 1` times at every multiple of `jump_length` (RePaint's
    `get_schedule_jump` without its second and third jump levels). Consecutive levels differ by
    one; with jump_n_sample = 1 it is plain sampling, num_steps - 1, ..., 0, -1."""
    jumps = {j: jump_n_sample - 1 for j in range(0, num_steps - jump_length, jump_length)}
    t, levels = num_steps, []
    while t >= 1:
        t -= 1
        levels.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                levels.append(t)
    levels.append(-1)
    return np.asarray(levels, np.int32)


def inpaint(model, params, sched: diffusion.Schedule, image_keys: jax.Array, x_known: jax.Array,
            draw: jax.Array, *, sampler: str, num_steps: int, spacing: str, eta: float = 0.0,
            variance: str = "fixed_large", clip_x0: bool = True, prediction: str = "eps",
            jump_length: int = 1, jump_n_sample: int = 1) -> jax.Array:
    """x_0 [B, H, W, C] that keeps x_known where `draw` (bool, [B, H, W, 1]) is False, exactly.

    A scan over RePaint's schedule on the sampler's grid (`jump_schedule`): a move down from
    grid timestep t re-imposes the known pixels from q(x_t | x_0), then takes the sampler's step
    (solvers.ancestral_step or solvers.ddim_step); a move up re-noises with q(x_t' | x_t)
    (diffusion.q_forward). Move k draws its noise from fold_in(key, k) of two streams split
    from each image's key: one for the steps, one for the known pixels.
    """
    if sampler not in INPAINT_SAMPLERS:
        raise ValueError(f"sampling.sampler={sampler!r}: inpainting takes {INPAINT_SAMPLERS}")
    T, shape = sched.num_timesteps, x_known.shape[1:]
    ts = solvers.timesteps(sched, num_steps, spacing)[::-1]  # level l is timestep ts[l]
    sub = sched if len(ts) == T else diffusion.respace(sched, ts)  # as solvers.ddpm_sample
    levels = jump_schedule(len(ts), jump_length, jump_n_sample)
    t_of = np.append(ts, -1).astype(np.int32)  # level -1 (index -1 here): the clean data
    moves = (jnp.arange(len(levels) - 1), jnp.asarray(levels[:-1]), jnp.asarray(t_of[levels[:-1]]),
             jnp.asarray(t_of[levels[1:]]))
    streams = jax.vmap(jax.random.split)(image_keys)
    step_keys, known_keys = streams[:, 0], streams[:, 1]
    t_B = functools.partial(jnp.full, (x_known.shape[0],), dtype=jnp.int32)

    def move(x, inputs):
        k, level, t, t_next = inputs
        noise = solvers.image_noise(step_keys, k, shape)

        def down(x):
            known_t = diffusion.q_sample(sched, x_known, t_B(t),
                                         solvers.image_noise(known_keys, k, shape))
            x = jnp.where(draw, x, known_t)
            x0, eps = solvers.predict(model, params, sched, prediction, clip_x0, x, t)
            if sampler == "ddpm":
                return solvers.ancestral_step(sub, x, x0, level, noise, variance)
            return solvers.ddim_step(sched, x0, eps, t, t_next, eta, noise)

        def up(x):
            return diffusion.q_forward(sched, x, t, t_next, noise)

        return jax.lax.cond(t_next < t, down, up, x), None

    x, _ = jax.lax.scan(move, solvers.image_noise(image_keys, T, shape), moves)
    return jnp.where(draw, x, x_known)  # the last step's re-imposition: q(x_{-1} | x_0) is x_0


def start_timestep(strength: float, num_timesteps: int) -> int:
    """The largest timestep an image-to-image edit of `strength` may start from: the grid's
    timesteps t < strength x T are kept (-1 at strength 0: none, the input is returned)."""
    return math.ceil(strength * num_timesteps) - 1


def img2img(model, params, sched: diffusion.Schedule, s: ml_collections.ConfigDict,
            prediction: str, image_keys: jax.Array, x0: jax.Array, strength: float) -> jax.Array:
    """SDEdit: x0 noised by q(x_t | x_0) to the first grid timestep t < strength x T of sampler
    config `s`, then denoised by that sampler from t. Strength 0 is x0; strength 1 starts from
    the noise itself, exactly as sampling from scratch does with the same keys."""
    T = sched.num_timesteps
    ts = solvers.visited_timesteps(s, sched)
    t_max = start_timestep(strength, T)
    if t_max < ts[-1]:
        return x0
    t_start = int(ts[ts <= t_max][0])
    x_init = None  # at T - 1 the sampler's own start (pure noise): sampling from scratch
    if t_start < T - 1:
        noise = solvers.image_noise(image_keys, T, x0.shape[1:])
        x_init = diffusion.q_sample(sched, x0, jnp.full((x0.shape[0],), t_start), noise)
    fn = solvers.from_config(s, T)
    return fn(model, params, sched, image_keys, x0.shape[1:], clip_x0=s.clip_x0,
              prediction=prediction, t_max=t_start, x_init=x_init)


def ddim_invert(model, params, sched: diffusion.Schedule, x0: jax.Array, *, num_steps: int,
                spacing: str, prediction: str = "eps") -> jax.Array:
    """x at t = T - 1 from which DDIM at eta = 0 on the same grid decodes (about) x0.

    Each step runs DDIM's update upwards, from grid point t (-1 at the start: the data) to the
    next one up, t': x_t' = alpha_t' x0_hat + sigma_t' eps, with eps the network's at (x_t, t')
    (it cannot be evaluated at x_t', which is being computed: Song et al.'s approximation,
    exact as steps shrink) and x0_hat = (x_t - sigma_t eps) / alpha_t. Nothing is clipped:
    clipping is not invertible.
    """
    up = solvers.timesteps(sched, num_steps, spacing)[::-1]
    pairs = (jnp.asarray(np.append(-1, up[:-1]).astype(np.int32)), jnp.asarray(up))

    def step(x, pair):
        t, t_next = pair
        _, eps = solvers.predict(model, params, sched, prediction, False, x, t_next)
        alpha, sigma = diffusion.alpha_sigma(sched, t)
        return solvers.ddim_step(sched, (x - sigma * eps) / alpha, eps, t, t_next, 0.0, None), None

    return jax.lax.scan(step, x0, pairs)[0]


def slerp(a: jax.Array, b: jax.Array, w: jax.Array) -> jax.Array:
    """Spherical interpolation (Shoemake 1985) of each image pair a[i], b[i] at weight w[i]:
    a at w = 0 and b at w = 1 exactly. Gaussian noise lives near a sphere, where a straight
    line's midpoint would have too small a norm."""
    flat_a, flat_b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    cos = jnp.sum(flat_a * flat_b, -1) / (jnp.linalg.norm(flat_a, axis=-1)
                                          * jnp.linalg.norm(flat_b, axis=-1))
    theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
    sin = jnp.sin(theta)
    near = sin < 1e-6  # (anti)parallel: the straight line
    wa = jnp.where(near, 1.0 - w, jnp.sin((1.0 - w) * theta) / jnp.where(near, 1.0, sin))
    wb = jnp.where(near, w, jnp.sin(w * theta) / jnp.where(near, 1.0, sin))
    bc = (-1,) + (1,) * (a.ndim - 1)
    out = wa.reshape(bc) * a + wb.reshape(bc) * b
    return jnp.where(w.reshape(bc) == 0, a, jnp.where(w.reshape(bc) == 1, b, out))


def interpolation_config(s: ml_collections.ConfigDict,
                         inverted: bool = False) -> ml_collections.ConfigDict:
    """The sampling config interpolation decodes with: DDIM at eta = 0 on `s`'s grid (the same
    x_T must always give the same image, or the frames would not form a path). Decoding what
    `ddim_invert` encoded does not clip x0 either: on the tiny test model, clipping took the
    reconstruction's RMSE from 0.03 to 0.1-0.3 (tests/test_editing.py)."""
    s = ml_collections.ConfigDict(s.to_dict())
    s.sampler, s.eta = "ddim", 0.0
    if inverted:
        s.clip_x0 = False
    return s


def seed_noise(seeds, image_shape, num_timesteps: int) -> np.ndarray:
    """float32 [len(seeds), H, W, C]: the noise image 0 of each seed starts from in sampling."""
    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), 0))(jnp.asarray(seeds))
    return np.asarray(solvers.image_noise(keys, num_timesteps, tuple(image_shape)))


# ---------------------------------------------------------------------------------------------
# Reading images and masks (the CLI's edit.images and edit.masks)


def _decode_file(path: str, data_config, channels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """(uint8 [H, W, channels] at the model's size, decoded and fitted exactly as training data
    is, the file's own (height, width)). The one use of the data pipeline's decoding here."""
    from ddpm_jax import data

    with Image.open(path) as im:
        size = (im.height, im.width)
    hw = data.image_hw(data_config.image_size)
    return data.load_image(path, hw, data_config.get("resize", "center_crop"), channels), size


def _image_files(path: str, key: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise validate.ConfigError(f"{key}={path!r}: no such file or folder")
    readable = {ext for ext, _ in Image.registered_extensions().items()}
    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if not f.startswith(".") and os.path.splitext(f)[1].lower() in readable)
    if not files:
        raise validate.ConfigError(f"{key}={path!r}: no image files in the folder")
    return files


def read_images(path: str, data_config) -> tuple[list[str], np.ndarray, list[tuple[int, int]]]:
    """(file names, uint8 [N, H, W, C] as the model sees them, each file's own (height, width))
    of an image file, or of the images in a folder (sorted by name, not recursive)."""
    files = _image_files(path, "edit.images")
    images, sizes = [], []
    for f in files:
        try:
            image, size = _decode_file(f, data_config, data_config.get("channels", 3))
        except Exception as e:  # noqa: BLE001 -- any decoding failure: name the file
            raise validate.ConfigError(f"edit.images: {f} cannot be read as an image "
                                       f"({type(e).__name__}: {e})") from None
        images.append(image)
        sizes.append(size)
    return [os.path.basename(f) for f in files], np.stack(images), sizes


def read_masks(path: str, names: list[str], sizes: list[tuple[int, int]],
               data_config) -> np.ndarray:
    """bool [N, H, W], True where the model draws (white), for the images `names` (of file
    sizes `sizes`): one mask file for all, or a folder with one per image of the same name (any
    image extension). A mask has its image's size (it is cropped and resized with it) or the
    model's; it is black and white (grey values are thresholded at half), and neither all black
    (nothing to draw) nor all white (nothing kept). Every failure is one line naming the file."""
    if os.path.isdir(path):
        files = _image_files(path, "edit.masks")
        by_stem = {os.path.splitext(os.path.basename(f))[0]: f for f in files}
        missing = [n for n in names if os.path.splitext(n)[0] not in by_stem]
        if missing or len(files) != len(names):
            extra = sorted(set(by_stem) - {os.path.splitext(n)[0] for n in names})
            raise validate.ConfigError(
                f"edit.masks={path!r}: {len(files)} masks for {len(names)} images (one per image, "
                "same file name)" + (f"; none for {', '.join(missing[:3])}" if missing else "")
                + (f"; no image for {', '.join(extra[:3])}" if extra else ""))
        per_image = [(by_stem[os.path.splitext(n)[0]], f"its image {n} is", [size])
                     for n, size in zip(names, sizes, strict=True)]
    else:
        per_image = [(_image_files(path, "edit.masks")[0], "the images are", sorted(set(sizes)))]
    masks = []
    for f, images_are, image_sizes in per_image:
        try:
            rgb, size = _decode_file(f, data_config, 3)
        except Exception as e:  # noqa: BLE001 -- any decoding failure: name the file
            raise validate.ConfigError(f"edit.masks: {f} cannot be read as an image "
                                       f"({type(e).__name__}: {e})") from None
        hw = rgb.shape[:2]
        if size != hw and any(size != s for s in image_sizes):
            raise validate.ConfigError(
                f"edit.masks: {f} is {size[1]}x{size[0]} but {images_are} "
                f"{', '.join(f'{w}x{h}' for h, w in image_sizes)}: a mask has its image's size or "
                f"the model's {hw[1]}x{hw[0]}")
        spread = int(np.max(rgb.max(-1).astype(int) - rgb.min(-1)))
        if spread > MASK_GREY_TOLERANCE:
            raise validate.ConfigError(
                f"edit.masks: {f} is not greyscale (its colour channels differ by up to {spread}):"
                " a mask is black where the image is kept and white where the model draws")
        draw = rgb[..., 0] >= 128
        for bad, what in ((not draw.any(), "all black: nothing to draw"),
                          (draw.all(), "all white: nothing kept (use --mode=sample)")):
            if bad:
                raise validate.ConfigError(
                    f"edit.masks: {f} is {what} at the model's {hw[1]}x{hw[0]} (white where the "
                    "model draws, black where the image is kept)")
        masks.append(draw)
    return np.stack(masks) if len(masks) == len(names) else np.broadcast_to(
        masks[0], (len(names), *masks[0].shape))
