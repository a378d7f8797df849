"""The NLL loop (likelihood.py): closed forms with a model that knows x0, device independence,
and where its images come from. The terms themselves are tested in float64 in test_diffusion.py."""

from __future__ import annotations

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from ddpm_jax import data, diffusion, likelihood, sharding, validate

T = 20


def _oracle(image_uint8: np.ndarray):
    """A 'network' that predicts x0 = this image whatever it sees (prediction='x0')."""
    x0 = jnp.asarray(image_uint8, jnp.float32) / 127.5 - 1.0
    return types.SimpleNamespace(apply=lambda variables, x, t: jnp.broadcast_to(x0, x.shape))


def _bits(images, model, prediction, variance, mesh, batch, clip_x0=True):
    sched = diffusion.make_schedule("linear", T)
    fn = likelihood.make_bpd_fn(model, sched, prediction, variance, clip_x0, mesh)
    return likelihood.bits_per_dim(fn, {}, images, jax.random.key(0), mesh, batch)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_bound_of_a_model_that_knows_x0(variance):
    # The model's mean is then the true posterior mean at every t: the KL terms are those of two
    # zero-mean Gaussians (0, or (r - 1 - log r) / 2 with r = beta_tilde / beta for fixed_large),
    # the decoder is N(x0, beta_tilde_1) on x0's own bin, and the prior is KL(q(x_T|x0) || N(0,1)).
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.uint8)
    image[0, :3] = [0, 255, 128]  # both end bins and the middle
    images = np.stack([image] * 5)
    got = _bits(images, _oracle(image), "x0", variance, sharding.make_mesh(), batch=8)

    betas = np.linspace(1e-4, 0.02, T) * 1000 / T
    abar = np.cumprod(1 - betas)
    beta_tilde = betas[1:] * (1 - abar[:-1]) / (1 - abar[1:])
    r = beta_tilde / betas[1:]
    kl = 0.0 if variance == "fixed_small" else np.sum((r - 1 - np.log(r)) / 2) / math.log(2)
    x0 = image / 127.5 - 1.0
    m, v = math.sqrt(abar[-1]) * x0, 1 - abar[-1]
    prior = np.mean((v + m**2 - 1 - math.log(v)) / 2) / math.log(2)

    def cdf(z):
        return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))

    z = (1 / 255) / math.sqrt(beta_tilde[0])
    p = np.where(np.abs(x0) > 0.999, cdf(z), 2 * cdf(z) - 1)  # end bins are one-sided
    decoder = -np.mean(np.log2(p))
    for key, want in [("kl", kl), ("prior", prior), ("decoder", decoder),
                      ("total", kl + prior + decoder)]:
        np.testing.assert_allclose(got[key], np.full(5, want), rtol=2e-5, atol=1e-6, err_msg=key)


def test_per_image_terms_do_not_depend_on_devices_or_batch():
    # A model whose prediction depends on x_t, so every term depends on the drawn noise.
    model = types.SimpleNamespace(apply=lambda v, x, t: 0.5 * x + 0.01 * t[:, None, None, None])
    images = np.random.default_rng(1).integers(0, 256, (11, 4, 4, 3)).astype(np.uint8)
    eight = _bits(images, model, "eps", "fixed_large", sharding.make_mesh(), batch=8)
    one = _bits(images, model, "eps", "fixed_large", sharding.make_mesh(jax.devices()[:1]),
                batch=3)
    for key in ("total", *likelihood.PARTS):
        # float32 sums in another order (measured 1.5e-6); other noise would differ by O(1).
        np.testing.assert_allclose(eight[key], one[key], rtol=1e-5, err_msg=key)
    assert len(set(np.round(eight["kl"], 6))) == 11  # distinct images, distinct noise
    np.testing.assert_allclose(eight["total"], eight["prior"] + eight["kl"] + eight["decoder"],
                               rtol=1e-6)


def test_images_come_from_held_out_data_or_the_tfds_test_split(monkeypatch):
    config = tiny_config()
    config.eval.nll_num_examples = 5
    held_out = likelihood.nll_images(config)
    assert held_out.shape == (5, 8, 8, 3) and held_out.dtype == np.uint8
    config.data.num_eval_examples = 0
    with pytest.raises(validate.ConfigError, match="data.num_eval_examples"):
        likelihood.nll_images(config)

    tfds = pytest.importorskip("tensorflow_datasets")
    config.data.source, config.data.name = "tfds", "cifar10"
    config.eval.nll_num_examples = -1
    opened = []
    open_tfds = data.sources.open_tfds
    monkeypatch.setattr(data.sources, "open_tfds",
                        lambda name, split, *a, **k: opened.append(split) or open_tfds(
                            name, split, *a, **k))
    with tfds.testing.mock_data(num_examples=7):
        assert likelihood.nll_images(config).shape == (7, 8, 8, 3)
        assert opened == ["test"]  # not data.split, and nothing else is read
        config.eval.nll_num_examples = 2
        assert likelihood.nll_images(config).shape == (2, 8, 8, 3)
