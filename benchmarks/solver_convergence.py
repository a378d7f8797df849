"""Each deterministic sampler's error against the exact probability-flow ODE, on an exact model.

    python benchmarks/solver_convergence.py [--steps 10 20 50] [--beta_schedule linear]

For Gaussian data x0 ~ N(mu, s^2 I) the optimal denoiser is closed-form, and so is the ODE's
solution from a given x_T: it keeps z = (x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2)
fixed. So a sampler's error is exactly its discretisation error. The script prints, per sampler
(at its default spacing) and number of network evaluations, the RMS error of the final x0 over a
batch of starting points, in float64, and the slope of log error against log evaluations.
tests/test_solvers.py asserts those slopes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddpm_jax import diffusion, solvers  # noqa: E402

MU, SCALE = 0.3, 0.5  # the data: N(MU, SCALE^2) in every pixel
DETERMINISTIC = ("ddim", "dpm_solver++", "heun")


@dataclasses.dataclass(frozen=True)
class GaussianDenoiser:
    """The exact network for x0 ~ N(MU, SCALE^2 I), in any of the three parameterisations."""

    sched: diffusion.Schedule
    prediction: str = "eps"

    def apply(self, variables, x, t_B):
        abar = diffusion._bcast(self.sched.alphas_cumprod[t_B], x)
        alpha, sigma = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
        x0 = MU + alpha * SCALE**2 / (abar * SCALE**2 + sigma**2) * (x - alpha * MU)
        eps = (x - alpha * x0) / sigma
        return {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[self.prediction]


def exact_x0(sched: diffusion.Schedule, x_T: jax.Array) -> jax.Array:
    """E[x0 | x at t = 0] after the exact ODE from x_T at t = T - 1: what every sampler returns
    (they end with the x0 predicted at t = 0) without discretisation error."""
    abar_T, abar_0 = sched.alphas_cumprod[-1], sched.alphas_cumprod[0]
    z = (x_T - jnp.sqrt(abar_T) * MU) / jnp.sqrt(abar_T * SCALE**2 + 1.0 - abar_T)
    return MU + jnp.sqrt(abar_0) * SCALE**2 * z / jnp.sqrt(abar_0 * SCALE**2 + 1.0 - abar_0)


def errors(sampler: str, steps, *, beta_schedule="linear", num_timesteps=1000, spacing="auto",
           num_images=16, prediction="eps") -> np.ndarray:
    """RMS error of the sampler's x0 against the exact one, for each `steps` (the sampler's
    num_steps), computed in float64 (errors go down to 1e-4 and below)."""
    with jax.enable_x64(True):
        return _errors(sampler, steps, beta_schedule, num_timesteps, spacing, num_images,
                       prediction)


def _errors(sampler, steps, beta_schedule, num_timesteps, spacing, num_images, prediction):
    sched = diffusion.make_schedule(beta_schedule, num_timesteps, jnp.float64)
    model = GaussianDenoiser(sched, prediction)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(num_images))
    shape = (2, 2, 1)
    exact = exact_x0(sched, solvers.image_noise(keys, num_timesteps, shape))
    fn = solvers.SAMPLE_FNS[sampler]
    out = []
    for n in steps:
        x = fn(model, None, sched, keys, shape, num_steps=n, clip_x0=False, prediction=prediction,
               spacing=solvers.resolve_spacing(sampler, spacing))
        out.append(float(jnp.sqrt(jnp.mean((x - exact) ** 2))))
    return np.array(out)


def slope(steps, errs) -> float:
    """Least-squares slope of -log(error) against log(evaluations): the order of convergence."""
    return float(-np.polyfit(np.log(steps), np.log(errs), 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--beta_schedule", default="linear")
    parser.add_argument("--spacing", default="auto")
    args = parser.parse_args()
    print(f"RMS error of x0 against the exact ODE, {args.beta_schedule} schedule, T = 1000\n")
    header = " | ".join(f"{n} NFE" for n in args.steps)
    print(f"| sampler | spacing | {header} | slope |")
    print("|" + " --- |" * (len(args.steps) + 3))
    for sampler in DETERMINISTIC:
        nfe = [solvers.num_evaluations(sampler, n) for n in args.steps]
        errs = errors(sampler, args.steps, beta_schedule=args.beta_schedule, spacing=args.spacing)
        cells = " | ".join(f"{e:.2e}" for e in errs)
        spacing = solvers.resolve_spacing(sampler, args.spacing)
        print(f"| {sampler} | {spacing} | {cells} | {slope(nfe, errs):.2f} |")


if __name__ == "__main__":
    main()
