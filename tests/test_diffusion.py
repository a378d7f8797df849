"""The diffusion math against closed forms, in float64."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def sched64(name="linear", T=1000):
    return diffusion.make_schedule(name, T, jnp.float64)


def test_linear_schedule_is_ddpms():
    s = sched64()
    betas = np.asarray(s.betas)
    assert betas.dtype == np.float64
    np.testing.assert_allclose(betas[[0, -1]], [1e-4, 0.02], rtol=1e-12)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-9)
    np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-12)
    # DDPM's schedule ends with almost no signal left: abar_T ~ 4e-5.
    assert 3e-5 < float(s.alphas_cumprod[-1]) < 5e-5


def test_cosine_schedule_follows_its_definition():
    T, s_off = 1000, 0.008
    s = sched64("cosine", T)

    def f(t):
        return math.cos((t / T + s_off) / (1 + s_off) * math.pi / 2) ** 2

    for t in (0, 10, 500, 900):  # below the 0.999 clip, abar_t = f(t + 1) / f(0)
        np.testing.assert_allclose(float(s.alphas_cumprod[t]), f(t + 1) / f(0), rtol=1e-10)
    assert float(np.max(s.betas)) <= 0.999


def test_q_sample_mean_and_std():
    s = sched64()
    x0 = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, 4, 3)))
    eps = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4, 4, 3)))
    t = jnp.array([0, 499, 999])
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[[0, 499, 999]][:, None, None, None]
    np.testing.assert_allclose(diffusion.q_sample(s, x0, t, eps),
                               np.sqrt(abar) * x0 + np.sqrt(1 - abar) * eps, rtol=1e-12)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_posterior_is_bayes_rule(name):
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0), a product of Gaussians."""
    s = sched64(name, 50)
    betas = np.asarray(s.betas)
    abar = np.cumprod(1 - betas)
    rng = np.random.default_rng(0)
    x0, xt = rng.normal(size=(2, 5, 2, 2, 1))
    for t in range(1, 50):
        prec = (1 - betas[t]) / betas[t] + 1 / (1 - abar[t - 1])
        mean = (np.sqrt(1 - betas[t]) / betas[t] * xt
                + np.sqrt(abar[t - 1]) / (1 - abar[t - 1]) * x0) / prec
        t_B = jnp.full((5,), t)
        got_mean, got_logvar = diffusion.q_posterior(s, x0, xt, t_B, "fixed_small")
        np.testing.assert_allclose(got_mean, mean, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(np.exp(got_logvar[:, 0, 0, 0]), 1 / prec, rtol=1e-9)
        _, large = diffusion.q_posterior(s, x0, xt, t_B, "fixed_large")
        np.testing.assert_allclose(np.exp(large[:, 0, 0, 0]), betas[t], rtol=1e-9)
    # At t = 0 the posterior mean is x0 itself.
    m0, _ = diffusion.q_posterior(s, x0, xt, jnp.zeros((5,), int), "fixed_small")
    np.testing.assert_allclose(m0, x0, rtol=1e-9)


def test_parameterisations_round_trip():
    s = sched64()
    rng = np.random.default_rng(0)
    x0, eps = jnp.asarray(rng.normal(size=(2, 4, 3, 3, 3)))
    t = jnp.array([0, 10, 500, 999])
    xt = diffusion.q_sample(s, x0, t, eps)
    v = diffusion.v_from_eps_x0(s, t, eps, x0)
    for prediction, out in (("eps", eps), ("x0", x0), ("v", v)):
        got_x0, got_eps = diffusion.predict_x0_eps(s, prediction, xt, t, out)
        np.testing.assert_allclose(got_x0, x0, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(got_eps, eps, rtol=1e-6, atol=1e-8)
    # v is the velocity of x_phi = cos(phi) x0 + sin(phi) eps: v = cos(phi) eps - sin(phi) x0.
    phi = np.arccos(np.sqrt(np.asarray(s.alphas_cumprod)[np.asarray(t)]))[:, None, None, None]
    np.testing.assert_allclose(v, np.cos(phi) * eps - np.sin(phi) * x0, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("gamma", [None, 5.0])
def test_losses_agree_across_parameterisations(gamma):
    """One prediction, expressed as eps, x0 or v, gives the same min-SNR-weighted loss."""
    s = sched64()
    rng = np.random.default_rng(0)
    x0, eps, x0_hat = jnp.asarray(rng.normal(size=(3, 6, 4, 4, 3)))
    t = jnp.array([0, 50, 200, 500, 800, 999])
    xt = diffusion.q_sample(s, x0, t, eps)
    eps_hat = diffusion.eps_from_x0(s, xt, t, x0_hat)
    v_hat = diffusion.v_from_eps_x0(s, t, eps_hat, x0_hat)
    snr = np.asarray(diffusion.snr(s, t))
    x0_mse = np.mean((np.asarray(x0_hat) - np.asarray(x0)) ** 2, axis=(1, 2, 3))
    losses = {p: diffusion.loss_per_example(s, out, x0, eps, t, p, gamma)
              for p, out in (("eps", eps_hat), ("x0", x0_hat), ("v", v_hat))}
    if gamma is None:  # unweighted: eps-MSE = SNR * x0-MSE, v-MSE = (SNR + 1) * x0-MSE
        np.testing.assert_allclose(losses["eps"], snr * x0_mse, rtol=1e-8)
        np.testing.assert_allclose(losses["x0"], x0_mse, rtol=1e-8)
        np.testing.assert_allclose(losses["v"], (snr + 1) * x0_mse, rtol=1e-8)
    else:
        for p in ("eps", "x0", "v"):
            np.testing.assert_allclose(losses[p], np.minimum(snr, gamma) * x0_mse, rtol=1e-8)


def test_perfect_eps_prediction_has_zero_loss():
    s = sched64()
    x0, eps = jnp.asarray(np.random.default_rng(0).normal(size=(2, 2, 4, 4, 3)))
    t = jnp.array([3, 700])
    np.testing.assert_array_equal(diffusion.loss_per_example(s, eps, x0, eps, t), 0.0)
    wrong = diffusion.loss_per_example(s, eps + 1.0, x0, eps, t)
    np.testing.assert_allclose(wrong, 1.0)


def test_float32_schedule_matches_float64():
    s32, s64 = diffusion.make_schedule("linear", 1000), sched64()
    assert s32.betas.dtype == jnp.float32
    np.testing.assert_allclose(s32.posterior_mean_coef2, s64.posterior_mean_coef2, rtol=1e-6)


def test_bad_names_are_rejected():
    with pytest.raises(ValueError, match="beta_schedule='quadratic'"):
        diffusion.beta_schedule("quadratic", 10)
