"""The model card (README.md) of an export: what was trained, on what, how well, how to use it."""

from __future__ import annotations

import json


def _data_name(data: dict) -> str:
    source = data.get("source", "")
    if source == "folder":
        return f"images from a folder ({data.get('path', '')})"
    if source == "tfds":
        split = data.get("split", "train")
        return f"{data.get('name', '')} (TensorFlow Datasets, split {split})"
    return f"{data.get('name', '')} ({source})"


def _eval_lines(record: dict | None) -> list[str]:
    if record is None:
        return ["Not evaluated (`python -m ddpm_jax.main --workdir W --mode=eval` writes "
                "FID and IS, which the next export puts here)."]
    s = record.get("sampling", {})
    rows = [("FID", f"{record['fid']:.2f}"),
            ("Inception Score", f"{record['is_mean']:.2f} ± {record['is_std']:.2f}"),
            ("KID", f"{record['kid_mean']:.4f} ± {record['kid_std']:.4f}"),
            ("samples", f"{record['num_samples']:,} from checkpoint step "
                        f"{record['checkpoint_step']:,}"),
            ("sampler", ", ".join(f"{k}={v}" for k, v in s.items()) if s else "")]
    if "reference_split" in record:
        rows.append(("reference statistics", str(record["reference_split"])))
    return ["| metric | value |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)]


def _usage(repo: str, conditional: bool, num_classes: int) -> list[str]:
    if not conditional:
        return ["```python", "from diffusers import DDPMPipeline", "",
                f'pipe = DDPMPipeline.from_pretrained("{repo}")',
                "images = pipe(batch_size=4, num_inference_steps=1000).images  # PIL images",
                "```"]
    return ["DDPMPipeline passes no class labels, so a class-conditional model is sampled with "
            "its scheduler and UNet directly:", "", "```python", "import torch",
            "from diffusers import DDPMScheduler, UNet2DModel", "",
            f'unet = UNet2DModel.from_pretrained("{repo}", subfolder="unet").eval()',
            f'scheduler = DDPMScheduler.from_pretrained("{repo}", subfolder="scheduler")',
            f"labels = torch.tensor([0, 1, 2, 3])  # classes 0..{num_classes - 1}; "
            f"{num_classes}: none (unconditional)",
            "size = unet.config.sample_size",
            "size = (size, size) if isinstance(size, int) else tuple(size)",
            "x = torch.randn(len(labels), unet.config.in_channels, *size)",
            "scheduler.set_timesteps(1000)",
            "with torch.no_grad():",
            "    for t in scheduler.timesteps:",
            "        out = unet(x, t, class_labels=labels).sample",
            "        x = scheduler.step(out, t, x).prev_sample",
            "images = (x / 2 + 0.5).clamp(0, 1)  # [B, C, H, W] in [0, 1]",
            "```"]


def model_card(config: dict, step: int, which: str, eval_record: dict | None,
               grid_name: str | None, repo_id: str | None) -> str:
    m, d, dif, s = config["model"], config["data"], config["diffusion"], config["sampling"]
    k = m.get("num_classes", 0)
    tags = ["ddpm_jax", "ddpm", "diffusers", "jax",
            "class-conditional" if k else "unconditional-image-generation"]
    size = d["image_size"]
    size = f"{size}x{size}" if isinstance(size, int) else f"{size[0]}x{size[1]}"
    names = list(d.get("class_names", ()))
    classes = (f"{k} classes" + (f" ({', '.join(names)})" if names else "")
               + f"; label {k} is the null class (no label)") if k else "unconditional"
    rows = [("steps trained", f"{step:,}"), ("weights", "EMA" if which == "ema" else "raw"),
            ("data", _data_name(d)), ("images", f"{size}, {d['channels']} channels"),
            ("conditioning", classes),
            ("network", f"ch={m['ch']}, ch_mult={tuple(m['ch_mult'])}, num_res_blocks="
                        f"{m['num_res_blocks']}, attn_resolutions={tuple(m['attn_resolutions'])},"
                        f" dropout={m['dropout']}"),
            ("diffusion", f"T={dif['num_timesteps']}, {dif['beta_schedule']} betas, predicts "
                          f"{dif['prediction']}"),
            ("sampling (scheduler)", f"variance {s['variance']}, clip x0 {s['clip_x0']}")]
    lines = ["---", "library_name: diffusers", "tags:", *(f"- {t}" for t in tags),
             *([] if k else ["pipeline_tag: unconditional-image-generation"]), "---", "",
             f"# DDPM ({_data_name(d)}, {size})", "",
             "A denoising diffusion probabilistic model (Ho et al. 2020) trained with ddpm_jax "
             "(JAX/Flax) and exported with `python -m ddpm_jax.export`: diffusers' "
             "`UNet2DModel` and `DDPMScheduler`, loadable with no code of ddpm_jax.", "",
             "| | |", "| --- | --- |", *(f"| {a} | {b} |" for a, b in rows), "",
             "## Evaluation", "", *_eval_lines(eval_record), ""]
    if grid_name:
        lines += ["## Samples", "", f"![samples drawn during training or sampling]({grid_name})",
                  ""]
    lines += ["## Use with diffusers", "", *_usage(repo_id or "path/to/this/folder", bool(k), k),
              "", "## Training config", "", "<details><summary>config (JSON)</summary>", "",
              "```json", json.dumps(config, indent=2, sort_keys=True), "```", "", "</details>",
              ""]
    return "\n".join(lines)
