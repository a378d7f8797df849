"""Check an export against diffusers itself: the same x_t, t (and labels) give the same eps from
our U-Net and from diffusers' UNet2DModel loaded from the export, and DDPMPipeline samples.

Not run by the suite (it needs torch). Run once where torch and diffusers are installed in a
separate virtual environment (a CPU torch: don't let pip pull a CUDA one):

    python -m venv /tmp/export-venv
    /tmp/export-venv/bin/pip install torch==2.13.0 diffusers==0.42.1 safetensors numpy
    PYTHONPATH=$PWD python benchmarks/export_diffusers_parity.py --torch_python \
        /tmp/export-venv/bin/python --dir /tmp/export-parity

Stage 1 (this Python, with JAX): two work directories with random weights (an unconditional
32x32 network with three levels and attention at 16x16; a class-conditional 16x24 one), exported
with `python -m ddpm_jax.export`, and our network's output on fixed inputs. Stage 2 (the torch
Python, no ddpm_jax): UNet2DModel.from_pretrained and DDPMPipeline.from_pretrained on the export,
the same inputs, the largest difference, and a few pipeline steps. With `--betas_fixture PATH`
stage 2 also writes DDPMScheduler's float32 betas for exported scheduler configs (linear and
cosine, several T), which tests/test_export.py compares with ours:

    PYTHONPATH=$PWD python benchmarks/export_diffusers_parity.py --torch_python \
        /tmp/export-venv/bin/python --betas_fixture tests/fixtures/reference/diffusers_betas.npz
    cp -r /tmp/export-parity/export_small tests/fixtures/reference/

Every export folder gets diffusers' output in `outputs.npz`; the smallest one is committed as
tests/fixtures/reference/export_small (written with torch 2.13.0+cpu and diffusers 0.42.1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import numpy as np

BETAS_FIXTURE = [(schedule, T) for schedule in ("linear", "cosine") for T in (20, 37, 1000)]
RUNS = {  # name: (config overrides)
    "uncond": dict(image_size=32, ch=32, ch_mult=(1, 2, 2), attn=(16,), classes=0,
                   prediction="eps", schedule="linear", res=2, groups=8),
    "cond": dict(image_size=(16, 24), ch=32, ch_mult=(1, 2), attn=(8,), classes=4,
                 prediction="v", schedule="cosine", res=2, groups=8),
    # Committed as tests/fixtures/reference/export_small (0.7 MB): test_export's parity test.
    "export_small": dict(image_size=(8, 12), ch=16, ch_mult=(1, 2), attn=(4,), classes=3,
                         prediction="v", schedule="cosine", res=1, groups=4),
}


def jax_stage(root: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax
    import jax.numpy as jnp

    from configs import default
    from ddpm_jax import checkpoint, data, diffusion, export, train, unet
    from ddpm_jax import diffusers_layout as layout

    configs = {}
    for schedule, T in BETAS_FIXTURE:
        d = dict(num_timesteps=T, beta_schedule=schedule, prediction="eps")
        configs[f"{schedule}_{T}"] = layout.scheduler_config(
            d, dict(variance="fixed_large", clip_x0=True), diffusion.beta_schedule(schedule, T))
    with open(os.path.join(root, "betas_configs.json"), "w") as f:
        json.dump(configs, f)
    for name, o in RUNS.items():
        config = default.get_config()
        config.data.image_size = o["image_size"]
        config.model.update(ch=o["ch"], ch_mult=o["ch_mult"], num_res_blocks=o["res"],
                            attn_resolutions=o["attn"], dropout=0.0, norm_groups=o["groups"],
                            attention_impl="xla", num_classes=o["classes"])
        config.diffusion.update(prediction=o["prediction"], beta_schedule=o["schedule"])
        model = unet.from_config(config)
        shape = data.image_shape(config.data)
        rng = np.random.default_rng(0)

        def draw(path, a, rng=rng):
            if "scale" in jax.tree_util.keystr(path):
                return (1.0 + 0.2 * rng.standard_normal(a.shape)).astype(np.float32)
            fan_in = int(np.prod(a.shape[:-1])) if len(a.shape) > 1 else 1
            return (rng.standard_normal(a.shape) / math.sqrt(fan_in)).astype(np.float32)

        params = jax.tree_util.tree_map_with_path(draw, unet.abstract_params(model, shape))
        tx = train.make_optimizer(config)
        zero = jnp.zeros((), jnp.int32)
        workdir = os.path.join(root, f"{name}_run")
        ckpt = checkpoint.Checkpointer(workdir, config)
        ckpt.save(100, train.TrainState(jnp.asarray(100), params, params, tx.init(params), zero,
                                        zero), force=True)
        ckpt.wait()
        ckpt.close()
        out = os.path.join(root, name)
        assert export.main(["--workdir", workdir, "--out", out, "--overwrite"]) == 0

        x = rng.standard_normal((4, *shape)).astype(np.float32)
        t = np.array([0, 10, 500, 999])
        labels = np.array([0, 1, 3, o["classes"]]) if o["classes"] else None  # last: null
        eps = model.apply({"params": params}, jnp.asarray(x), jnp.asarray(t),
                          label_B=None if labels is None else jnp.asarray(labels))
        np.savez(os.path.join(root, f"{name}_ours.npz"), x_NCHW=x.transpose(0, 3, 1, 2), t=t,
                 out_NCHW=np.asarray(eps).transpose(0, 3, 1, 2),
                 betas=diffusion.beta_schedule(o["schedule"], config.diffusion.num_timesteps),
                 **({} if labels is None else {"labels": labels}))


def torch_stage(root: str, betas_fixture: str | None) -> dict:
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_warning()
    torch.manual_seed(0)
    report = {}
    for name in RUNS:
        folder = os.path.join(root, name)
        ref = np.load(os.path.join(root, f"{name}_ours.npz"))
        net = UNet2DModel.from_pretrained(os.path.join(folder, "unet")).eval()
        labels = torch.from_numpy(ref["labels"]) if "labels" in ref else None
        with torch.no_grad():
            out = net(torch.from_numpy(ref["x_NCHW"]), torch.from_numpy(ref["t"]),
                      class_labels=labels).sample.numpy()
        pipe = DDPMPipeline.from_pretrained(folder)
        betas = pipe.scheduler.betas.numpy()
        r = dict(max_abs_eps_diff=float(np.abs(out - ref["out_NCHW"]).max()),
                 max_abs_eps=float(np.abs(ref["out_NCHW"]).max()),
                 betas_float32_equal=bool((betas == ref["betas"].astype(np.float32)).all()),
                 betas_max_abs_diff=float(np.abs(betas - ref["betas"]).max()),
                 scheduler=f"{pipe.scheduler.config.beta_schedule}, "
                           f"{pipe.scheduler.config.prediction_type}")
        pipe.scheduler.set_timesteps(5)
        if labels is None:
            images = pipe(batch_size=2, num_inference_steps=5, output_type="np").images
        else:  # DDPMPipeline passes no labels: its loop, with them
            size = net.config.sample_size
            x = torch.randn(2, net.config.in_channels, *(size if isinstance(size, list)
                                                          else (size, size)))
            with torch.no_grad():
                for t in pipe.scheduler.timesteps:
                    eps = net(x, t, class_labels=torch.tensor([0, 1])).sample
                    x = pipe.scheduler.step(eps, t, x).prev_sample
            images = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        r["samples"] = f"{images.shape}, finite {bool(np.isfinite(images).all())}, range " \
                       f"[{images.min():.3f}, {images.max():.3f}]"
        report[name] = r
        np.savez(os.path.join(folder, "outputs.npz"), x_NCHW=ref["x_NCHW"], t=ref["t"],
                 out_NCHW=out, **({} if labels is None else {"labels": ref["labels"]}))
    print(json.dumps(report, indent=2))
    if betas_fixture:
        with open(os.path.join(root, "betas_configs.json")) as f:
            configs = json.load(f)
        betas = {k: DDPMScheduler.from_config(c).betas.numpy() for k, c in configs.items()}
        np.savez(betas_fixture, **betas)
        print(f"Wrote {betas_fixture}: DDPMScheduler's betas for {', '.join(betas)}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/tmp/export-parity")
    parser.add_argument("--torch_python", default=None,
                        help="the Python with torch and diffusers (runs stage 2)")
    parser.add_argument("--stage", choices=("jax", "torch", "both"), default="both")
    parser.add_argument("--betas_fixture", default=None,
                        help="also write DDPMScheduler's betas to this .npz (stage 2)")
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    if args.stage in ("jax", "both"):
        jax_stage(args.dir)
    if args.stage == "torch":
        torch_stage(args.dir, args.betas_fixture)
    elif args.stage == "both":
        python = args.torch_python or sys.executable
        fixture = ["--betas_fixture", os.path.abspath(args.betas_fixture)] \
            if args.betas_fixture else []
        subprocess.run([python, os.path.abspath(__file__), "--stage", "torch", "--dir",
                        args.dir, *fixture], check=True)


if __name__ == "__main__":
    main()
