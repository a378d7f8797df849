"""The diffusion process: noise schedules, forward process, posterior and the training loss.

All of DDPM's math (Ho et al. 2020) lives here, as pure functions of a `Schedule`, with the VP
view the few-step solvers use (alpha, sigma, log-SNR) and Improved DDPM's respacing. The schedule is
computed in float64 NumPy and then cast, so float32 training uses the most accurate constants and
tests can run every function in float64 (under `jax.enable_x64`) against closed forms.

Notation: `abar_t` = prod_{s<=t} (1 - beta_s) (`alphas_cumprod`); timesteps are 0-based, so
t = 0 is the first noising step and t = T - 1 the last.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

PREDICTIONS = ("eps", "x0", "v")
BETA_SCHEDULES = ("linear", "cosine")
VARIANCES = ("fixed_small", "fixed_large")


def beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """float64 betas of length `num_timesteps`."""
    if name == "linear":
        # DDPM's 1e-4..0.02 is defined for T = 1000; scale it so other T keep the same end point
        # of the forward process (as improved-diffusion does).
        scale = 1000.0 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":
        # Nichol & Dhariwal 2021, eq. 17, with s = 0.008 and betas clipped at 0.999.
        s = 0.008
        steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
        f = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return np.minimum(1.0 - f[1:] / f[:-1], 0.999)
    raise ValueError(f"diffusion.beta_schedule={name!r}: expected one of {BETA_SCHEDULES}")


@flax.struct.dataclass
class Schedule:
    """Per-timestep constants of the forward process and its posterior, each of shape [T]."""

    betas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    posterior_variance: jax.Array  # beta_tilde_t, "fixed_small"
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array  # multiplies x0
    posterior_mean_coef2: jax.Array  # multiplies x_t

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]


def make_schedule(name: str, num_timesteps: int, dtype=jnp.float32) -> Schedule:
    return schedule_from_betas(beta_schedule(name, num_timesteps), dtype)


def schedule_from_betas(betas: np.ndarray, dtype=jnp.float32) -> Schedule:
    """The Schedule of float64 `betas`, its constants computed in float64 and then cast."""
    num_timesteps = len(betas)
    if num_timesteps < 2:
        raise ValueError(f"diffusion.num_timesteps={num_timesteps}: need at least 2")
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    # beta_tilde_0 = 0; DDPM clips its log at beta_tilde_1 so log-likelihood terms stay finite.
    post_log_var = np.log(np.append(post_var[1], post_var[1:]))
    arrays = dict(
        betas=betas,
        alphas_cumprod=abar,
        alphas_cumprod_prev=abar_prev,
        posterior_variance=post_var,
        posterior_log_variance_clipped=post_log_var,
        posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
        posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar),
    )
    return Schedule(**{k: jnp.asarray(v, dtype) for k, v in arrays.items()})


def respace(sched: Schedule, timesteps) -> Schedule:
    """The schedule of the sub-chain through `timesteps` (Improved DDPM's respacing, Nichol &
    Dhariwal 2021, sec. 4): betas recomputed so that its abar_i is the original abar at the i-th
    kept timestep (ascending). Index i of the result stands for timestep `timesteps[i]`.

    Computed in NumPy float64 from the schedule's (concrete, not traced) betas. Where two kept
    timesteps are consecutive the new beta is the old one, taken as is rather than as
    1 - abar_t / abar_{t-1}, so respacing to all T steps returns the same constants.
    """
    ts = np.sort(np.asarray(timesteps))
    betas = np.asarray(sched.betas, np.float64)
    abar = np.cumprod(1.0 - betas)[ts]
    abar_prev = np.append(1.0, abar[:-1])
    consecutive = np.diff(ts, prepend=-1) == 1
    new_betas = np.where(consecutive, betas[ts], 1.0 - abar / abar_prev)
    return schedule_from_betas(new_betas, sched.betas.dtype)


def _bcast(values_B: jax.Array, x: jax.Array) -> jax.Array:
    """Per-example constants [B] -> [B, 1, 1, 1] to broadcast against images."""
    return values_B.reshape(values_B.shape + (1,) * (x.ndim - 1)).astype(x.dtype)


def q_sample(sched: Schedule, x0: jax.Array, t_B: jax.Array, eps: jax.Array) -> jax.Array:
    """x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x0, (1 - abar_t) I), reparameterised with eps."""
    abar = _bcast(sched.alphas_cumprod[t_B], x0)
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * eps


def q_posterior(sched: Schedule, x0: jax.Array, xt: jax.Array, t_B: jax.Array, variance: str):
    """Mean and log-variance of q(x_{t-1} | x_t, x_0); `variance` picks the reverse variance.

    'fixed_small' is the true posterior variance beta_tilde_t (clipped at t = 0, where it is 0);
    'fixed_large' is beta_t (with beta_tilde_1 at t = 0, as in DDPM's code), the two bounds of
    DDPM section 3.2.
    """
    mean = (
        _bcast(sched.posterior_mean_coef1[t_B], x0) * x0
        + _bcast(sched.posterior_mean_coef2[t_B], xt) * xt
    )
    if variance == "fixed_small":
        log_var = sched.posterior_log_variance_clipped[t_B]
    elif variance == "fixed_large":
        large = jnp.log(jnp.append(sched.posterior_variance[1], sched.betas[1:]))
        log_var = large[t_B]
    else:
        raise ValueError(f"variance={variance!r}: expected one of {VARIANCES}")
    return mean, _bcast(log_var, xt)


# Conversions between the three parameterisations of the network's output, at x_t and timestep t.
def x0_from_eps(sched: Schedule, xt, t_B, eps):
    abar = _bcast(sched.alphas_cumprod[t_B], xt)
    return (xt - jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(abar)


def eps_from_x0(sched: Schedule, xt, t_B, x0):
    abar = _bcast(sched.alphas_cumprod[t_B], xt)
    return (xt - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)


def v_from_eps_x0(sched: Schedule, t_B, eps, x0):
    """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022)."""
    abar = _bcast(sched.alphas_cumprod[t_B], x0)
    return jnp.sqrt(abar) * eps - jnp.sqrt(1.0 - abar) * x0


def x0_from_v(sched: Schedule, xt, t_B, v):
    abar = _bcast(sched.alphas_cumprod[t_B], xt)
    return jnp.sqrt(abar) * xt - jnp.sqrt(1.0 - abar) * v


def eps_from_v(sched: Schedule, xt, t_B, v):
    abar = _bcast(sched.alphas_cumprod[t_B], xt)
    return jnp.sqrt(1.0 - abar) * xt + jnp.sqrt(abar) * v


def predict_x0_eps(sched: Schedule, prediction: str, xt, t_B, model_out):
    """(x0, eps) implied by the network's output under the `prediction` parameterisation."""
    if prediction == "eps":
        return x0_from_eps(sched, xt, t_B, model_out), model_out
    if prediction == "x0":
        return model_out, eps_from_x0(sched, xt, t_B, model_out)
    if prediction == "v":
        return x0_from_v(sched, xt, t_B, model_out), eps_from_v(sched, xt, t_B, model_out)
    raise ValueError(f"prediction={prediction!r}: expected one of {PREDICTIONS}")


def snr(sched: Schedule, t_B: jax.Array) -> jax.Array:
    abar = sched.alphas_cumprod[t_B]
    return abar / (1.0 - abar)


# The continuous VP view used by the few-step solvers: x_t = alpha_t x0 + sigma_t eps with
# alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), and the half log-SNR
# lambda_t = log(alpha_t / sigma_t) (DPM-Solver's notation). t = -1 stands for the clean data
# (abar = 1, sigma = 0, lambda = +inf), where every solver's last step lands.
def abar_at(sched: Schedule, t: jax.Array) -> jax.Array:
    """abar_t for integer t of any shape, 1 at t = -1."""
    return jnp.where(t >= 0, sched.alphas_cumprod[jnp.maximum(t, 0)], 1.0)


def alpha_sigma(sched: Schedule, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    abar = abar_at(sched, t)
    return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)


def q_forward(sched: Schedule, x_s: jax.Array, s, t, eps: jax.Array) -> jax.Array:
    """x_t ~ q(x_t | x_s) for timesteps s < t (s = -1: x_s is the clean data), the forward
    process run on from s: N(sqrt(abar_t / abar_s) x_s, (1 - abar_t / abar_s) I). RePaint's
    resampling goes back up the chain with it (editing.py)."""
    ratio = abar_at(sched, t) / abar_at(sched, s)
    return jnp.sqrt(ratio) * x_s + jnp.sqrt(1.0 - ratio) * eps


def log_snr(sched: Schedule, t: jax.Array) -> jax.Array:
    """lambda_t = log(alpha_t / sigma_t), decreasing in t; +inf at t = -1."""
    abar = abar_at(sched, t)
    return 0.5 * (jnp.log(abar) - jnp.log1p(-abar))


def loss_weight(sched: Schedule, t_B, prediction: str, min_snr_gamma: float | None):
    """Per-example weight making each target's MSE equal min(SNR, gamma)-weighted x0 MSE.

    Min-SNR-gamma (Hang et al. 2023): the x0-space weight is min(SNR, gamma); in eps space this
    is min(SNR, gamma) / SNR and in v space min(SNR, gamma) / (SNR + 1). With no gamma every
    target is unweighted (L_simple for eps).
    """
    if not min_snr_gamma:
        return jnp.ones(t_B.shape, sched.alphas_cumprod.dtype)
    s = snr(sched, t_B)
    clipped = jnp.minimum(s, min_snr_gamma)
    return {"eps": clipped / s, "x0": clipped, "v": clipped / (s + 1.0)}[prediction]


def loss_per_example(
    sched: Schedule,
    model_out: jax.Array,
    x0: jax.Array,
    eps: jax.Array,
    t_B: jax.Array,
    prediction: str = "eps",
    min_snr_gamma: float | None = None,
) -> jax.Array:
    """Weighted MSE between the network output and its target, mean over pixels: [B]."""
    if prediction == "eps":
        target = eps
    elif prediction == "x0":
        target = x0
    elif prediction == "v":
        target = v_from_eps_x0(sched, t_B, eps, x0)
    else:
        raise ValueError(f"prediction={prediction!r}: expected one of {PREDICTIONS}")
    # bf16 network outputs are compared in the target's (float32 or, in tests, float64) precision.
    err = jnp.square(model_out.astype(target.dtype) - target)
    mse_B = jnp.mean(err, axis=tuple(range(1, err.ndim)))
    return loss_weight(sched, t_B, prediction, min_snr_gamma) * mse_B


# The variational bound in bits per dimension (DDPM eq. 5; hojonathanho/diffusion
# diffusion_utils_2.py `_vb_terms_bpd`, `_prior_bpd`, `calc_bpd_loop`): -log p(x_0) <=
# L_T + sum_{t>=1} L_{t-1} + L_0, with L_T = KL(q(x_T | x_0) || N(0, I)), L_{t-1} the KL of the true
# posterior q(x_{t-1} | x_t, x_0) from the model's p(x_{t-1} | x_t), and L_0 the discretised
# Gaussian decoder's -log p(x_0 | x_1). Every term is a mean over pixels divided by log 2.
def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """DDPM's tanh approximation of the standard normal CDF (abs. error < 2e-4), kept so the
    bound is the one DDPM reported."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(bin of x) under N(means, e^(2 log_scales)), for 8-bit data scaled to [-1, 1].

    A pixel's bin is x +- 1/255; the end bins reach to -inf (x = -1) and +inf (x = 1), so the 256
    bins' probabilities sum to one. Probabilities are floored at 1e-12, as DDPM.
    """
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus,
                     jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_bits(x: jax.Array) -> jax.Array:
    """Mean over all but the batch axis, nats -> bits: [B]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim))) / math.log(2.0)


def prior_bpd(sched: Schedule, x0: jax.Array) -> jax.Array:
    """L_T in bits/dim: KL(q(x_T | x_0) || N(0, I)), [B]."""
    abar = _bcast(jnp.full(x0.shape[:1], sched.alphas_cumprod[-1]), x0)
    return _mean_bits(normal_kl(jnp.sqrt(abar) * x0, jnp.log1p(-abar), 0.0, 0.0))


def vb_term_bpd(sched: Schedule, x0: jax.Array, xt: jax.Array, t_B: jax.Array,
                x0_pred: jax.Array, variance: str) -> jax.Array:
    """The bound's term at timestep t in bits/dim, [B]: the decoder's -log p(x_0 | x_1) where
    t = 0, else KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)).

    The model's p is the posterior at its predicted `x0_pred` with the `variance` of ancestral
    sampling ('fixed_large' or 'fixed_small', as `q_posterior`); the true posterior has its exact
    variance (clipped at t = 0, where it is unused).
    """
    true_mean, true_log_var = q_posterior(sched, x0, xt, t_B, "fixed_small")
    model_mean, model_log_var = q_posterior(sched, x0_pred, xt, t_B, variance)
    kl = _mean_bits(normal_kl(true_mean, true_log_var, model_mean, model_log_var))
    decoder_nll = -_mean_bits(
        discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var))
    return jnp.where(t_B == 0, decoder_nll, kl)
