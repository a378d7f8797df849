"""Negative log-likelihood in bits/dim: DDPM's variational bound on held-out images.

`--mode=eval` with `eval.nll_num_examples` != 0 reports DDPM's `calc_bpd_loop`
(hojonathanho/diffusion, diffusion_utils_2.py): for each image, the prior term L_T, the T - 1 KL
terms L_{t-1} (t = T-1 .. 1) and the decoder's L_0 (the terms are in diffusion.py), each on its own
draw of x_t ~ q(x_t | x_0), summed. One jitted call per batch runs all T timesteps in a `lax.scan`
over the batch sharded on the data mesh, params replicated.

The model's reverse process is the one ancestral sampling uses: `sampling.variance` (DDPM's CIFAR-10
code evaluates its bound with the model's own variance, `model_var_type='fixedlarge'`) and
`sampling.clip_x0` (DDPM's `clip_denoised=True`).

Images: the tfds split `eval.nll_split` (CIFAR-10's 'test'), its first `eval.nll_num_examples`
decodable images (-1: all); a folder or embedded set has no test split, so there the bound is
taken on the images training holds out (`data.num_eval_examples`), which it never trained on.
Image i draws its noise from `fold_in(key, i)` (key from `config.seed`), so the per-image terms do
not depend on the batch size or the device count.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from ddpm_jax import data, diffusion, sharding, solvers, validate
from ddpm_jax import progress as progress_lib  # `progress` is a flag here

PARTS = ("prior", "kl", "decoder")  # the bound's terms; their sum is "total"
_NOISE_STREAM = 0x4E4C4C  # folded into the seed's key: the bound's noise is not the samples'


def make_bpd_fn(model, sched: diffusion.Schedule, prediction: str, variance: str,
                clip_x0: bool, mesh: Mesh) -> Callable:
    """Jitted (params, images_uint8 [B, H, W, C], index_B, rng) -> {'total', *PARTS}: [B] each,
    bits/dim, replicated (every process can read them). Example i's noise is
    `image_noise(fold_in(rng, index_B[i]), t)` at every timestep t."""
    T = sched.num_timesteps

    @functools.partial(jax.jit, out_shardings=sharding.rep(mesh))
    def bpd(params, images_uint8, index_B, rng):
        x0 = data.to_model_input(images_uint8, rng, random_flip=False)
        keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(index_B)
        t_shape = (x0.shape[0],)

        def term(_, t):
            xt = diffusion.q_sample(sched, x0, jnp.full(t_shape, t), solvers.image_noise(
                keys, t, x0.shape[1:]))
            x0_pred, _ = solvers.predict(model, params, sched, prediction, clip_x0, xt, t)
            return None, diffusion.vb_term_bpd(sched, x0, xt, jnp.full(t_shape, t), x0_pred,
                                               variance)

        _, terms_TB = jax.lax.scan(term, None, jnp.arange(T - 1, -1, -1))  # the last is t = 0
        parts = {"prior": diffusion.prior_bpd(sched, x0), "kl": terms_TB[:-1].sum(axis=0),
                 "decoder": terms_TB[-1]}
        return {"total": parts["prior"] + parts["kl"] + parts["decoder"], **parts}

    return bpd


def bits_per_dim(bpd_fn: Callable, params, images: np.ndarray, rng: jax.Array, mesh: Mesh,
                 batch_size: int, progress: bool = False) -> dict[str, np.ndarray]:
    """Per-image terms {'total', *PARTS} (float64 [N]) of uint8 `images`, `batch_size` at a time
    (a multiple of the mesh size; the last batch is zero-padded, so the call compiles once)."""
    n = len(images)
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("total", *PARTS)}
    shown = progress_lib.ImageProgress(n, desc="nll", verb="NLL of") if progress else None
    for first in range(0, n, batch_size):
        batch = images[first:first + batch_size]
        count = len(batch)
        pad = np.zeros((batch_size - count, *images.shape[1:]), images.dtype)
        index = np.arange(first, first + batch_size, dtype=np.int32)
        terms = bpd_fn(params, sharding.global_batch(mesh, np.concatenate([batch, pad])),
                       sharding.global_batch(mesh, index), rng)
        for k, v in terms.items():
            out[k].append(np.asarray(v, np.float64)[:count])
        if shown:
            shown.update(first + count)
    if shown:
        shown.close()
    return {k: np.concatenate(v) for k, v in out.items()}


def nll_images(config: ml_collections.ConfigDict) -> np.ndarray:
    """uint8 [N, H, W, C]: the held-out images the bound is computed on (see the module doc).

    Raises validate.ConfigError (or data.InputError for unreadable data) in one line.
    """
    d, n = config.data, config.eval.nll_num_examples
    if d.source == "tfds":
        data_config = ml_collections.ConfigDict(d.to_dict())
        data_config.split, data_config.eval_split = config.eval.nll_split, ""
        data_config.num_eval_examples = 0
        data_config.cache = False  # each image is read once
        dataset, _ = data.create_datasets(data_config, seed=config.seed,
                                          global_batch_size=jax.process_count())
        try:
            ids = dataset.train_indices  # every decodable image of the split, in split order
            return dataset.images(ids if n < 0 else ids[:n])
        finally:
            dataset.close()
    if not d.num_eval_examples:
        raise validate.ConfigError(
            f"eval.nll_num_examples={n} needs held-out images: data.source={d.source!r} has no "
            "test split, so set data.num_eval_examples > 0 (the images training holds out)")
    data_config = ml_collections.ConfigDict(d.to_dict())
    data_config.cache = False
    dataset, held_out = data.create_datasets(data_config, seed=config.seed,
                                             global_batch_size=jax.process_count())
    dataset.close()
    if 0 < len(held_out) < n:
        logging.warning("eval.nll_num_examples=%d exceeds the %d held-out images; using them all.",
                        n, len(held_out))
    return held_out if n < 0 else held_out[:n]


def evaluate_nll(config: ml_collections.ConfigDict, model, params, mesh: Mesh,
                 images: np.ndarray) -> dict[str, float]:
    """The bound's mean over `images`: {'nll_bpd', 'nll_prior_bpd', 'nll_kl_bpd',
    'nll_decoder_bpd', 'nll_num_examples'} for the eval record."""
    c = config
    sched = diffusion.make_schedule(c.diffusion.beta_schedule, c.diffusion.num_timesteps)
    bpd_fn = make_bpd_fn(model, sched, c.diffusion.prediction, c.sampling.variance,
                         c.sampling.clip_x0, mesh)
    rng = jax.random.fold_in(jax.random.key(c.seed), _NOISE_STREAM)
    batch = c.sampling.per_device_batch * mesh.devices.size
    terms = bits_per_dim(bpd_fn, params, images, rng, mesh, batch, progress=True)
    record = {"nll_bpd": float(terms["total"].mean())}
    record.update({f"nll_{k}_bpd": float(terms[k].mean()) for k in PARTS})
    record["nll_num_examples"] = len(images)
    return record
