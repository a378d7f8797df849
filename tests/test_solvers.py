"""The samplers' math: order of convergence on an exact model, respacing, grids, settings."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from benchmarks import solver_convergence
from ddpm_jax import diffusion, evaluate, solvers, validate


# Slopes of log error against log evaluations, at each sampler's default spacing (the
# benchmarks/solver_convergence.py table; measured 0.99, 2.00, 2.18). Below ~20 evaluations the
# second-order solvers are not yet in their asymptotic regime on the linear schedule, so the fit
# starts at 20. A wrong coefficient shows as order 1 or less (or no convergence at all).
@pytest.mark.parametrize("sampler, steps, order", [
    ("ddim", (20, 40, 80), (0.85, 1.15)),
    ("dpm_solver++", (20, 40, 80), (1.8, 2.4)),
    ("heun", (21, 41, 81), (1.8, 2.6)),  # 21, 41, 81 evaluations: 11, 21, 41 noise levels
])
def test_order_of_convergence_on_gaussian_data(sampler, steps, order):
    errs = solver_convergence.errors(sampler, steps, num_images=4)
    slope = solver_convergence.slope(steps, errs)
    assert order[0] < slope < order[1], (slope, errs)
    assert errs[-1] < 0.02, errs  # and it converges to the exact solution


@pytest.mark.parametrize("sampler", ["dpm_solver++", "heun"])
def test_every_parameterisation_gives_the_same_samples(sampler):
    errs = [solver_convergence.errors(sampler, (6,), num_images=2, prediction=p)
            for p in ("eps", "x0", "v")]
    np.testing.assert_allclose(errs[1:], [errs[0]] * 2, rtol=1e-6)


def ancestral_reference(model, sched, image_keys, image_shape, variance):
    """DDPM's algorithm 2 over all T steps, as ddpm_sample was written before respacing."""
    x = solvers.image_noise(image_keys, sched.num_timesteps, image_shape)

    def step(x, t):
        x0, _ = solvers.predict(model, None, sched, "eps", True, x, t)
        t_B = jnp.full((x.shape[0],), t, jnp.int32)
        mean, log_var = diffusion.q_posterior(sched, x0, x, t_B, variance)
        noise = solvers.image_noise(image_keys, t, image_shape)
        return mean + jnp.where(t > 0, jnp.exp(0.5 * log_var), 0.0) * noise, None

    return jax.lax.scan(step, x, jnp.arange(sched.num_timesteps - 1, -1, -1))[0]


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_respaced_ancestral_with_all_steps_is_ancestral_sampling(variance):
    sched = diffusion.make_schedule("linear", 50)
    model = solver_convergence.GaussianDenoiser(sched)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(jnp.arange(8))
    a = ancestral_reference(model, sched, keys, (2, 2, 1), variance)
    b = solvers.ddpm_sample(model, None, sched, keys, (2, 2, 1), num_steps=50, variance=variance)
    np.testing.assert_array_equal(a, b)


def test_respace():
    with jax.enable_x64(True):
        sched = diffusion.make_schedule("cosine", 100, jnp.float64)
        # All steps: the same schedule, constant for constant (ddpm_sample relies on it).
        for a, b in zip(jax.tree.leaves(diffusion.respace(sched, np.arange(100))),
                        jax.tree.leaves(sched), strict=True):
            np.testing.assert_array_equal(a, b)
        # A subsequence keeps abar at the kept timesteps: the same forward marginals.
        ts = solvers.timesteps(sched, 10, "quadratic")
        sub = diffusion.respace(sched, ts)
        np.testing.assert_allclose(sub.alphas_cumprod, sched.alphas_cumprod[ts[::-1]],
                                   rtol=1e-9)  # 1e-11 at abar = 2e-7
        assert sub.num_timesteps == 10 and (np.asarray(sub.betas) > 0).all()


@pytest.mark.parametrize("spacing", solvers.SPACINGS)
@pytest.mark.parametrize("num_steps", [1, 2, 10, 50, 1000])
def test_timesteps_are_distinct_and_end_at_zero(spacing, num_steps):
    sched = diffusion.make_schedule("linear", 1000)
    ts = solvers.timesteps(sched, num_steps, spacing)
    assert len(ts) == num_steps and ts[0] == 999 and (np.diff(ts) < 0).all()
    assert ts[-1] == (0 if num_steps > 1 else 999)


def test_timesteps_follow_their_spacing():
    sched = diffusion.make_schedule("linear", 1000)
    np.testing.assert_array_equal(solvers.timesteps(sched, 50, "uniform"),  # DDIM's grid, as ever
                                  np.round(np.linspace(0, 999, 50)).astype(int)[::-1])
    assert list(solvers.timesteps(sched, 4, "quadratic")) == [999, 444, 111, 0]
    lam = np.asarray(diffusion.log_snr(sched, jnp.asarray(solvers.timesteps(sched, 10, "logsnr"))))
    assert np.ptp(np.diff(lam)[:6]) < 0.05  # even in lambda, up to rounding, away from t = 0


def test_sampling_settings_are_validated_in_one_line():
    for key, value, message in [
        ("sampler", "foo", "sampling.sampler='foo': expected one of ('ddpm', 'ddim', "
                           "'dpm_solver++', 'heun')"),
        ("spacing", "linear", "sampling.spacing='linear'"),
        ("num_steps", 21, "sampling.num_steps=21"),
        ("num_steps", -1, "sampling.num_steps=-1"),
    ]:
        config = tiny_config()
        config.sampling[key] = value
        for check in (lambda c: validate.check_config(c, 8), evaluate.check_eval_config):
            with pytest.raises(validate.ConfigError, match="^" + re.escape(message)):
                check(config)
    config = tiny_config()
    for sampler in solvers.SAMPLERS:
        for spacing in ("auto",) + solvers.SPACINGS:
            config.sampling.sampler, config.sampling.spacing = sampler, spacing
            validate.check_config(config, 8)


def test_eval_record_says_what_was_run():
    config = tiny_config()
    config.sampling.sampler, config.sampling.num_steps = "heun", 10
    assert evaluate.sampler_settings(config) == {
        "sampler": "heun", "clip_x0": True, "num_timesteps": 20, "num_steps": 10,
        "spacing": "karras", "network_evaluations": 9}
    config.sampling.sampler, config.sampling.num_steps = "ddpm", 0
    record = evaluate.sampler_settings(config)
    assert (record["num_steps"], record["spacing"], record["variance"]) == (20, "uniform",
                                                                           "fixed_large")
