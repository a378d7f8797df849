"""Brightness of a quickstart model's samples against its training faces, and why (issue 15).

    python -m ddpm_jax.main --config configs/quickstart.py --mode=sample \
        --config.sampling.num_samples=64
    python benchmarks/quickstart_brightness.py runs/quickstart

Prints the spread (std over images) and range of per-image mean brightness, on [0, 1], of the
100 training faces and of WORKDIR's newest `samples/step_<N>/samples.npz`; then, on the training
faces noised at a few timesteps, how much of the image mean of eps the checkpoint's network
predicts (regression slope; at t = T - 1, x_t is nearly eps, so the right slope is about 1) and
the RMS error of the image mean of its x0 (at best the faces' own brightness spread there).
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import quickstart  # noqa: E402
from ddpm_jax import data, diffusion, sampling  # noqa: E402


def brightness(name: str, images_uint8: np.ndarray) -> None:
    mean = images_uint8.astype(np.float64).mean(axis=(1, 2, 3)) / 255
    print(f"{name}: {len(mean)} images, brightness spread {mean.std():.3f}, "
          f"range {mean.min():.2f} to {mean.max():.2f}")


def main(workdir: str) -> None:
    data_config = quickstart.get_config().data
    data_config.num_eval_examples = 0
    dataset, _ = data.create_datasets(data_config, seed=0, global_batch_size=1)
    faces = dataset.images(dataset.train_indices)
    brightness("training faces", faces)
    steps = sorted(int(d[5:]) for d in os.listdir(os.path.join(workdir, "samples"))
                   if d.startswith("step_"))
    if steps:
        samples = np.load(os.path.join(workdir, "samples", f"step_{steps[-1]}", "samples.npz"))
        brightness(f"samples of step {steps[-1]}", samples["images"])

    sampler = sampling.Sampler.from_workdir(workdir)
    c = sampler.config
    sched = diffusion.make_schedule(c.diffusion.beta_schedule, c.diffusion.num_timesteps)
    apply = jax.jit(lambda x, t: sampler.model.apply({"params": sampler.params}, x, t))
    x0 = jnp.asarray(faces, jnp.float32) / 127.5 - 1
    image_mean = lambda x: x.mean(axis=(1, 2, 3))  # noqa: E731
    T = sched.num_timesteps
    for t in (T - 1, T - 50, T - 100, T - 200, T // 2):
        eps = jax.random.normal(jax.random.key(t), x0.shape)
        t_B = jnp.full((len(x0),), t)
        xt = diffusion.q_sample(sched, x0, t_B, eps)
        x0_hat, eps_hat = diffusion.predict_x0_eps(sched, c.diffusion.prediction, xt, t_B,
                                                   apply(xt, t_B))
        slope = jnp.sum(image_mean(eps) * image_mean(eps_hat)) / jnp.sum(image_mean(eps) ** 2)
        error = jnp.sqrt(jnp.mean((image_mean(jnp.clip(x0_hat, -1, 1)) - image_mean(x0)) ** 2))
        print(f"t={t} (abar {float(sched.alphas_cumprod[t]):.1e}): image mean of eps predicted "
              f"with slope {float(slope):.2f}; RMS error of x0's image mean {float(error) / 2:.3f}"
              f" on [0, 1] (faces' spread {float(image_mean(x0).std()) / 2:.3f})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart")
