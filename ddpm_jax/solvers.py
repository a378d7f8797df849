"""The samplers: each one `lax.scan` over a grid of timesteps, from noise at t = T - 1 to x_0.

* `ddpm`: ancestral sampling (DDPM algorithm 2); with `num_steps` < T on Improved DDPM's respaced
  schedule (openai/improved-diffusion `respace.py`).
* `ddim`: DDIM (Song et al. 2021, eq. 12); eta = 0 is the first-order solver of the ODE.
* `dpm_solver++`: DPM-Solver++(2M) (Lu et al. 2022, algorithm 2; LuChengTHU/dpm-solver
  `multistep_dpm_solver_second_update`, solver_type 'dpmsolver'), data prediction.
* `heun`: EDM's deterministic second-order sampler (Karras et al. 2022, algorithm 1 with
  S_churn = 0; NVlabs/edm `edm_sampler`) on the VP model's noise levels.

The network is discrete-time, so every sampler evaluates it only at integer timesteps: the grid
(`timesteps`) is T - 1 = t_0 > t_1 > ... > t_{n-1} = 0, and the deterministic solvers step
between those points in the VP process's continuous variables (alpha, sigma, log-SNR lambda;
diffusion.py). The last step goes from t = 0 to the clean data (sigma = 0) and returns the x0
predicted at t = 0, as DDIM does and as DPM-Solver's `denoise_to_zero`.

`num_steps` counts network evaluations per image (NFE). Heun evaluates twice per step but once
for the last, so it takes (num_steps + 1) // 2 grid points and 2 * that - 1 evaluations.

Every image draws its noise from `fold_in(image_key, t)`: an image depends only on its key.

Every sampler can also start part-way, as image-to-image editing does (editing.py): `t_max` keeps
only the grid's timesteps <= t_max, and `x_init` is x at the first of them (default: the noise
`image_noise(image_keys, T)` that sampling from scratch starts from).

A sampler calls its `model` only through `model.apply({"params": params}, x, t_B)`, so a
class-conditional network enters every sampler the same way, as a `Guided` model: its labels bound,
and classifier-free guidance computed in that call, inside the sampler's scan.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax import diffusion

SAMPLERS = ("ddpm", "ddim", "dpm_solver++", "heun")
SPACINGS = ("uniform", "logsnr", "quadratic", "karras")
# 'auto' spacing: each paper's choice. Improved DDPM respaces evenly in t, as DDIM's code does
# (and as this project's DDIM always did); DPM-Solver recommends uniform log-SNR for
# low-resolution pixel models; EDM spaces sigma = exp(-lambda) with rho = 7.
DEFAULT_SPACING = {"ddpm": "uniform", "ddim": "uniform", "dpm_solver++": "logsnr",
                   "heun": "karras"}
KARRAS_RHO = 7.0
# DPM-Solver takes its last step at first order when it has fewer than 10 steps ("lower_order
# final"), which its authors found key to stable sampling with very few steps.
LOWER_ORDER_FINAL_BELOW = 10


@dataclasses.dataclass(frozen=True)
class Guided:
    """A class-conditional network as the samplers call it: labels bound, and classifier-free
    guidance (Ho & Salimans 2022) out = uncond + w (cond - uncond) = (1 - w) uncond + w cond, with
    `uncond` the output for the null class `model.num_classes`. w = 0 is the unconditional model,
    w = 1 the conditional one, w > 1 guided (Ho & Salimans' w' is our w - 1).

    Guidance combines the network's outputs in whatever it predicts (eps, x0 or v). For fixed x_t
    and t each of these is an affine function of eps with the same coefficients for both terms, and
    the weights (1 - w) and w sum to 1, so this is the same as guiding eps and converting.

    w = 0 and w = 1 cost one B-sized call; otherwise one call on 2B images, each image's
    conditional and unconditional rows next to each other so that every device computes its own
    images' pairs (the batch stays sharded as it was).
    """

    model: Any
    label_B: jax.Array
    guidance_scale: float

    def apply(self, variables, x, t_B):
        w, null = self.guidance_scale, self.model.num_classes
        if w in (0.0, 1.0):
            label_B = jnp.full_like(self.label_B, null) if w == 0.0 else self.label_B
            return self.model.apply(variables, x, t_B, label_B=label_B)
        null_B = jnp.full_like(self.label_B, null)
        out = self.model.apply(variables, _interleave(x, x), _interleave(t_B, t_B),
                               label_B=_interleave(self.label_B, null_B))
        out = out.reshape(x.shape[0], 2, *out.shape[1:])
        cond, uncond = out[:, 0], out[:, 1]
        return uncond + w * (cond - uncond)


def _interleave(a: jax.Array, b: jax.Array) -> jax.Array:
    """[a_0, b_0, a_1, b_1, ...]: rows of a sharded batch stay on the device that holds them."""
    return jnp.stack([a, b], axis=1).reshape(-1, *a.shape[1:])


def conditioned(model, label_B: jax.Array | None, guidance_scale: float = 1.0):
    """`model` for the samplers: as it is when unconditional (`label_B` None), else `Guided`."""
    return model if label_B is None else Guided(model, label_B, float(guidance_scale))


def image_noise(image_keys: jax.Array, t, shape) -> jax.Array:
    """Per-image standard normal noise for step t: [B, *shape]."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, t), shape))(image_keys)


def predict(model, params, sched, prediction, clip_x0, x, t):
    """(x0, eps) the network predicts at integer timestep t, x0 clipped to [-1, 1] if asked."""
    t_B = jnp.full((x.shape[0],), t, jnp.int32)
    x0, eps = diffusion.predict_x0_eps(sched, prediction, x, t_B, model.apply({"params": params},
                                                                               x, t_B))
    if clip_x0:
        x0 = jnp.clip(x0, -1.0, 1.0)
        eps = diffusion.eps_from_x0(sched, x, t_B, x0)  # keep eps consistent with the clipped x0
    return x0, eps


# ---------------------------------------------------------------------------------------------
# Timestep grids


def timesteps(sched: diffusion.Schedule, num_steps: int, spacing: str = "uniform") -> np.ndarray:
    """`num_steps` distinct integer timesteps from T - 1 down to 0 (both ends included, but
    just T - 1 for one step).

    'uniform' is even in t, 'quadratic' even in sqrt(t) (dense at low noise), 'logsnr' even in
    lambda and 'karras' even in sigma^(1/rho) with sigma = exp(-lambda) (EDM, eq. 5). The last
    two are mapped to the nearest timestep; where several land on one (lambda jumps between the
    first few timesteps), they are pushed apart to keep `num_steps` distinct ones.
    """
    T = sched.num_timesteps
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps={num_steps}: expected 1 to T={T}")
    # 0 at t = 0, 1 at t = T - 1; one step starts where the noise is (then returns its x0).
    u = np.linspace(0.0, 1.0, num_steps) if num_steps > 1 else np.ones(1)
    if spacing == "uniform":
        t = u * (T - 1)
    elif spacing == "quadratic":
        t = u**2 * (T - 1)
    elif spacing in ("logsnr", "karras"):
        with jax.ensure_compile_time_eval():  # a constant of the schedule, also inside a jit
            lam = np.asarray(diffusion.log_snr(sched, jnp.arange(T)), np.float64)  # decreasing
        # Finite where abar_{T-1} = 0 (DDPM's linear betas stretched to T = 20 reach 1).
        lam = np.clip(lam, -20.0, 20.0)
        if spacing == "logsnr":
            target = lam[0] + u * (lam[-1] - lam[0])
        else:
            lo, hi = np.exp(-lam[0]) ** (1 / KARRAS_RHO), np.exp(-lam[-1]) ** (1 / KARRAS_RHO)
            target = -KARRAS_RHO * np.log(lo + u * (hi - lo))
        t = np.interp(-target, -lam, np.arange(T))  # np.interp needs increasing x: use -lambda
    else:
        raise ValueError(f"sampling.spacing={spacing!r}: expected one of {SPACINGS}")
    t = np.round(t).astype(np.int64)
    i = np.arange(num_steps)
    t = np.maximum.accumulate(t - i) + i  # each at least one above the one before...
    t = np.minimum(t, T - num_steps + i)  # ...leaving room below T for the ones after
    return t[::-1].astype(np.int32)


def resolve_spacing(sampler: str, spacing: str) -> str:
    return DEFAULT_SPACING[sampler] if spacing == "auto" else spacing


def num_evaluations(sampler: str, num_steps: int) -> int:
    """Network evaluations per image for `num_steps` (already resolved from 0 to T)."""
    return 2 * ((num_steps + 1) // 2) - 1 if sampler == "heun" else num_steps


# ---------------------------------------------------------------------------------------------
# Samplers: (model, params, sched, image_keys [B], image_shape, *, settings) -> x_0 [B, ...]


def ddpm_sample(model, params, sched: diffusion.Schedule, image_keys: jax.Array, image_shape,
                *, num_steps: int | None = None, spacing="uniform", variance="fixed_large",
                clip_x0=True, prediction="eps", record=None, t_max=None,
                x_init=None) -> jax.Array:
    """Ancestral sampling over `num_steps` (default all T) timesteps. Returns x_0 (and with
    `record`, the predicted x_0 at those timesteps: see `_record`)."""
    T = sched.num_timesteps
    ts = timesteps(sched, num_steps or T, spacing)
    # All T steps: the schedule itself (respace would re-derive its constants from the cast
    # betas, which can move them by a float32 ulp), so this is DDPM's sampler bit for bit.
    sub = sched if len(ts) == T else diffusion.respace(sched, ts)
    skip = num_skipped(ts, t_max)
    x = _start(image_keys, T, image_shape, x_init)

    def step(carry, i_t):
        (x, frames), (i, t) = carry, i_t  # i indexes the respaced chain; the network and the
        x0, _ = predict(model, params, sched, prediction, clip_x0, x, t)  # noise see the real t
        x = ancestral_step(sub, x, x0, i, image_noise(image_keys, t, image_shape), variance)
        return (x, _record(frames, record, t, x0)), None

    carry = (x, _frames(record, x))
    chain = np.arange(len(ts) - 1, -1, -1, dtype=np.int32)
    (x, frames), _ = jax.lax.scan(step, carry, (jnp.asarray(chain[skip:]), jnp.asarray(ts[skip:])))
    return _result(x, frames, record)


def ancestral_step(sched: diffusion.Schedule, x, x0, i, noise, variance: str) -> jax.Array:
    """x at step i - 1 of the chain: the mean of q(x_{i-1} | x_i, x0) at the predicted x0 plus
    `noise` at the `variance`'s scale, except at i = 0 (DDPM's last step is the mean)."""
    i_B = jnp.full((x.shape[0],), i, jnp.int32)
    mean, log_var = diffusion.q_posterior(sched, x0, x, i_B, variance)
    return mean + jnp.where(i > 0, jnp.exp(0.5 * log_var), 0.0) * noise


def ddim_sample(model, params, sched: diffusion.Schedule, image_keys: jax.Array, image_shape,
                *, num_steps=100, spacing="uniform", eta=0.0, clip_x0=True,
                prediction="eps", record=None, t_max=None, x_init=None) -> jax.Array:
    """DDIM (Song et al. 2021, eq. 12): eta=0 deterministic, eta=1 matches DDPM's fixed-small."""
    ts = timesteps(sched, num_steps, spacing)
    skip = num_skipped(ts, t_max)
    x = _start(image_keys, sched.num_timesteps, image_shape, x_init)

    def step(carry, t_pair):
        (x, frames), (t, t_prev) = carry, t_pair
        x0, eps = predict(model, params, sched, prediction, clip_x0, x, t)
        x = ddim_step(sched, x0, eps, t, t_prev, eta, image_noise(image_keys, t, image_shape))
        return (x, _record(frames, record, t, x0)), None

    t, t_prev = _pairs(ts)
    (x, frames), _ = jax.lax.scan(step, (x, _frames(record, x)), (t[skip:], t_prev[skip:]))
    return _result(x, frames, record)


def ddim_step(sched: diffusion.Schedule, x0, eps, t, t_next, eta: float, noise) -> jax.Array:
    """DDIM's update from timestep t to t_next (-1: the clean data) given the x0 and eps
    predicted at t. At eta = 0 it is deterministic and also steps up (t_next > t: DDIM
    inversion, where t may be -1)."""
    abar_next = diffusion.abar_at(sched, t_next)
    var = 0.0
    if eta:  # a Python float: eta = 0 leaves the noise out (and needs no abar_t < 1)
        abar = diffusion.abar_at(sched, t)
        var = eta**2 * (1.0 - abar_next) / (1.0 - abar) * (1.0 - abar / abar_next)
    dir_coef = jnp.sqrt(jnp.maximum(1.0 - abar_next - var, 0.0))
    x = jnp.sqrt(abar_next) * x0 + dir_coef * eps
    return x + jnp.sqrt(var) * noise if eta else x


def dpm_solver_pp_sample(model, params, sched: diffusion.Schedule, image_keys: jax.Array,
                         image_shape, *, num_steps=20, spacing="logsnr", clip_x0=True,
                         prediction="eps", record=None, t_max=None, x_init=None) -> jax.Array:
    """DPM-Solver++(2M): second-order multistep in lambda on the data (x0) prediction.

    With h = lambda_next - lambda, x_next = sigma_next / sigma x - alpha_next expm1(-h) D, where
    D = x0 (first order: DDIM) or x0 + h / (2 h_prev) (x0 - x0_prev), the second-order
    correction from the previous step's x0 (h_prev its lambda step). The first step has no
    previous x0 and the last (into sigma = 0) needs none: both are first order, and so is the
    step into t = 0 when there are fewer than LOWER_ORDER_FINAL_BELOW steps.
    """
    ts = timesteps(sched, num_steps, spacing)
    n = len(ts)
    second = np.arange(n) > 0
    second[-1] = False
    if n - 1 < LOWER_ORDER_FINAL_BELOW and n > 1:
        second[-2] = False
    skip = num_skipped(ts, t_max)
    second[skip:skip + 1] = False  # a late start has no previous x0 either
    x = _start(image_keys, sched.num_timesteps, image_shape, x_init)

    def step(carry, inputs):
        x, x0_prev, lam_prev, frames = carry
        (t, t_next), second_order = inputs
        x0, _ = predict(model, params, sched, prediction, clip_x0, x, t)
        lam, lam_next = diffusion.log_snr(sched, t), diffusion.log_snr(sched, t_next)
        _, sigma = diffusion.alpha_sigma(sched, t)
        alpha_next, sigma_next = diffusion.alpha_sigma(sched, t_next)
        h = lam_next - lam  # +inf on the last step, where the update is x0 exactly
        d = x0 + jnp.where(second_order, h / (2.0 * (lam - lam_prev)), 0.0) * (x0 - x0_prev)
        x_next = (sigma_next / sigma) * x - alpha_next * jnp.expm1(-h) * d
        return (x_next, x0, lam, _record(frames, record, t, x0)), None

    carry = (x, jnp.zeros_like(x), jnp.zeros((), x.dtype), _frames(record, x))
    t, t_next = _pairs(ts)
    (x, _, _, frames), _ = jax.lax.scan(step, carry, ((t[skip:], t_next[skip:]),
                                                      jnp.asarray(second[skip:])))
    return _result(x, frames, record)


def heun_sample(model, params, sched: diffusion.Schedule, image_keys: jax.Array, image_shape,
                *, num_steps=19, spacing="karras", clip_x0=True, prediction="eps",
                record=None, t_max=None, x_init=None) -> jax.Array:
    """EDM's Heun sampler: in EDM's variables x / alpha and sigma / alpha = exp(-lambda) the
    probability-flow ODE is d(x / alpha) = eps d(sigma / alpha); an Euler step (= DDIM) then a
    trapezoidal correction with eps at the Euler point. Returns the x0 predicted at t = 0."""
    ts = timesteps(sched, (num_steps + 1) // 2, spacing)
    skip = num_skipped(ts, t_max)
    x = _start(image_keys, sched.num_timesteps, image_shape, x_init)

    def step(carry, t_pair):
        (x, frames), (t, t_next) = carry, t_pair
        alpha, sigma = diffusion.alpha_sigma(sched, t)
        alpha_next, sigma_next = diffusion.alpha_sigma(sched, t_next)
        ds = sigma_next / alpha_next - sigma / alpha
        x0, eps = predict(model, params, sched, prediction, clip_x0, x, t)
        x_euler = alpha_next * (x / alpha + ds * eps)
        _, eps_next = predict(model, params, sched, prediction, clip_x0, x_euler, t_next)
        x = alpha_next * (x / alpha + ds * 0.5 * (eps + eps_next))
        return (x, _record(frames, record, t, x0)), None

    carry = (x, _frames(record, x))
    (x, frames), _ = jax.lax.scan(step, carry, (jnp.asarray(ts[skip:-1]),
                                                jnp.asarray(ts[skip + 1:])))
    x0, _ = predict(model, params, sched, prediction, clip_x0, x, ts[-1])  # into sigma = 0
    return _result(x0, _record(frames, record, ts[-1], x0), record)


def num_skipped(ts: np.ndarray, t_max: int | None) -> int:
    """How many of the grid's timesteps (descending) lie above `t_max` (None: none do); at
    least one is kept."""
    if t_max is None:
        return 0
    skip = int(np.sum(ts > t_max))
    if skip == len(ts):
        raise ValueError(f"t_max={t_max}: below the grid's last timestep {ts[-1]}")
    return skip


def _start(image_keys, T: int, image_shape, x_init):
    return image_noise(image_keys, T, image_shape) if x_init is None else x_init


def _frames(record, x):
    """The recording buffer: one slot per recorded timestep and a last one that takes the rest."""
    return None if record is None else jnp.zeros((len(record) + 1, *x.shape), x.dtype)


def _record(frames, record, t, x0):
    """`frames` with x0 in the slot of timestep t (the spare last slot if t is not recorded).

    A buffer in the scan's carry, not a scan output: a picture of 10 steps out of 1000 keeps 10.
    """
    if record is None:
        return None
    slot = jnp.argmax(jnp.append(jnp.asarray(record) == t, True))
    return frames.at[slot].set(x0)


def _result(x, frames, record):
    return x if record is None else (x, frames[:-1])


def _pairs(ts: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """(t, the next t) for every grid point, -1 (the clean data) after the last."""
    return jnp.asarray(ts), jnp.asarray(np.append(ts[1:], -1).astype(np.int32))


SAMPLE_FNS = {"ddpm": ddpm_sample, "ddim": ddim_sample, "dpm_solver++": dpm_solver_pp_sample,
              "heun": heun_sample}


def from_config(s: ml_collections.ConfigDict, num_timesteps: int) -> Callable:
    """The sampler `s.sampler` with the settings of sampling config `s` bound; call it as
    fn(model, params, sched, image_keys, image_shape, clip_x0=..., prediction=...)."""
    return functools.partial(SAMPLE_FNS[s.sampler], **settings(s, num_timesteps))


def visited_timesteps(s: ml_collections.ConfigDict, sched: diffusion.Schedule) -> np.ndarray:
    """The grid of timesteps the sampler of config `s` evaluates the network at, T - 1 to 0."""
    kw = settings(s, sched.num_timesteps)
    n = kw["num_steps"]
    return timesteps(sched, (n + 1) // 2 if s.sampler == "heun" else n, kw["spacing"])


def settings(s: ml_collections.ConfigDict, num_timesteps: int) -> dict:
    """Sampler keywords of sampling config `s`: num_steps (resolved), spacing, variance or eta."""
    if s.sampler not in SAMPLE_FNS:
        raise ValueError(f"sampling.sampler={s.sampler!r}: expected one of {SAMPLERS}")
    num_steps = s.num_steps or num_timesteps
    if "spacing" not in s and s.sampler == "ddpm":
        # A config saved before respacing existed, when the ancestral sampler took all T steps
        # whatever num_steps said: sample its checkpoints as they were sampled then.
        num_steps = num_timesteps
    kw = dict(num_steps=num_steps, spacing=resolve_spacing(s.sampler, s.get("spacing", "auto")))
    if s.sampler == "ddpm":
        kw["variance"] = s.variance
    elif s.sampler == "ddim":
        kw["eta"] = s.eta
    return kw
