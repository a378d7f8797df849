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


# ---------------------------------------------------------------------------------------------
# The variational bound (bits/dim)


def test_normal_kl_matches_the_integral():
    import scipy.integrate
    import scipy.stats

    for m1, v1, m2, v2 in [(0.3, 0.5, -0.2, 1.7), (1.0, 2.0, 1.0, 2.0), (-2.0, 0.01, 0.5, 0.3)]:
        p, q = scipy.stats.norm(m1, math.sqrt(v1)), scipy.stats.norm(m2, math.sqrt(v2))
        want, _ = scipy.integrate.quad(lambda x, p=p, q=q: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)),
                                       m1 - 20 * math.sqrt(v1), m1 + 20 * math.sqrt(v1),
                                       epsabs=1e-13, epsrel=1e-12)
        got = float(diffusion.normal_kl(m1, math.log(v1), m2, math.log(v2)))
        assert got == pytest.approx(want, rel=1e-9, abs=1e-13)


def test_approx_cdf_is_within_2e4_of_the_normal_cdf():
    import scipy.special

    x = np.linspace(-8, 8, 20001)
    err = np.abs(np.asarray(diffusion.approx_standard_normal_cdf(jnp.asarray(x)))
                 - scipy.special.ndtr(x))
    assert err.max() < 2e-4


def _bins_probability(x, mean, std):
    """P(bin of x) under N(mean, std^2) with DDPM's CDF, written out: [x - 1/255, x + 1/255],
    the end bins open to -inf and +inf."""
    def cdf(z):
        return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z**3)))
    upper = np.where(x > 0.999, 1.0, cdf((x + 1 / 255 - mean) / std))
    lower = np.where(x < -0.999, 0.0, cdf((x - 1 / 255 - mean) / std))
    return upper - lower


def test_discretized_gaussian_is_a_distribution_over_the_256_levels():
    levels = np.arange(256) / 127.5 - 1.0
    rng = np.random.default_rng(0)
    means = rng.uniform(-1.2, 1.2, (6, 1))
    stds = np.exp(rng.uniform(np.log(0.002), np.log(0.5), (6, 1)))
    log_p = np.asarray(diffusion.discretized_gaussian_log_likelihood(
        jnp.asarray(np.broadcast_to(levels, (6, 256))), jnp.asarray(means),
        jnp.asarray(np.log(stds))))
    want = _bins_probability(levels, means, stds)
    np.testing.assert_allclose(np.exp(log_p), np.maximum(want, 1e-12), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(np.exp(log_p).sum(axis=1), 1.0, atol=1e-9)  # bins tile the line


def test_prior_bpd_is_the_kl_of_q_xT_from_the_standard_normal():
    s = sched64()
    abar = float(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[-1])
    x0 = np.array([-1.0, 0.0, 0.5, 1.0]).reshape(1, 2, 2, 1)
    # KL(N(m, v) || N(0, 1)) = (v + m^2 - 1 - log v) / 2 per pixel.
    m, v = math.sqrt(abar) * x0, 1.0 - abar
    want = np.mean((v + m**2 - 1.0 - math.log(v)) / 2.0) / math.log(2.0)
    np.testing.assert_allclose(diffusion.prior_bpd(s, jnp.asarray(x0)), [want], rtol=1e-10)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_vb_terms_of_a_model_that_knows_x0(variance):
    # With x0_pred = x0 the model's mean is the true posterior mean, so each KL term is the KL of
    # two zero-mean Gaussians, 0 for fixed_small and (r - 1 - log r) / 2 with r = beta_tilde /
    # beta for fixed_large; the decoder is N(x0, beta_tilde_1) at t = 0 (both variances).
    T = 50
    s = sched64("linear", T)
    betas = np.linspace(1e-4, 0.02, T) * 1000 / T
    abar = np.cumprod(1 - betas)
    beta_tilde = betas[1:] * (1 - abar[:-1]) / (1 - abar[1:])  # t = 1 .. T - 1
    rng = np.random.default_rng(0)
    x0 = rng.integers(0, 256, (T, 4, 4, 3)) / 127.5 - 1.0
    xt = rng.normal(size=x0.shape)  # any x_t: the KL terms do not depend on it
    t_B = jnp.arange(T)
    got = np.asarray(diffusion.vb_term_bpd(s, jnp.asarray(x0), jnp.asarray(xt), t_B,
                                           jnp.asarray(x0), variance))
    r = beta_tilde / betas[1:]
    want_kl = np.zeros(T - 1) if variance == "fixed_small" else (r - 1 - np.log(r)) / 2
    np.testing.assert_allclose(got[1:], want_kl / math.log(2.0), rtol=1e-9, atol=1e-14)
    p = _bins_probability(x0[0], x0[0], math.sqrt(beta_tilde[0]))
    np.testing.assert_allclose(got[0], -np.mean(np.log2(p)), rtol=1e-10)
