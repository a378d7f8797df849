"""Export a trained model as a diffusers pipeline folder: the sibling of import_weights.

    python -m ddpm_jax.export --workdir runs/quickstart --out exports/quickstart
    python -m ddpm_jax.export --workdir W --out DIR --params=raw --push_to_hub user/my-ddpm

DIR gets what `DDPMPipeline.from_pretrained(DIR)` loads, with no code of ours:

    model_index.json                          DDPMPipeline: unet + scheduler
    unet/config.json                          UNet2DModel computing our U-Net
    unet/diffusion_pytorch_model.safetensors  its weights (EMA by default), torch layout
    scheduler/scheduler_config.json           DDPMScheduler: our betas, T, prediction, clipping
    README.md, samples.png                    a model card, and the newest sample grid

The checkpoint is the newest readable one in WORKDIR/checkpoints. Settings UNet2DModel or
DDPMScheduler cannot express are refused in one line naming the setting, before anything is
written; the folder is written beside DIR under a temporary name and renamed when complete, so a
failure leaves no half-written DIR. docs/export.md has what maps and the PyTorch recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import urllib.parse

import numpy as np

from ddpm_jax import diffusers_layout as layout

PARAMS = ("ema", "raw")


class ExportError(ValueError):
    """A work directory, destination or Hub target that cannot be exported to."""


def read_config(workdir: str) -> dict:
    """The config saved with `workdir`'s newest checkpoint, as a dict."""
    from ddpm_jax import checkpoint

    if not os.path.isdir(workdir):
        raise ExportError(f"--workdir {workdir}: no such directory")
    try:
        return checkpoint.newest_saved_config(workdir)
    except checkpoint.CheckpointError:
        raise ExportError(f"--workdir {workdir}: no checkpoint in {workdir}/checkpoints; train "
                          "first, or check --workdir") from None


def model_fields(config: dict) -> dict:
    """The model fields that decide what the network computes (norm_groups resolved)."""
    from ddpm_jax import unet

    m = config["model"]
    return dict(ch=m["ch"], ch_mult=list(m["ch_mult"]), num_res_blocks=m["num_res_blocks"],
                attn_resolutions=list(m["attn_resolutions"]), dropout=m["dropout"],
                norm_groups=unet.norm_groups(m), num_classes=m.get("num_classes", 0))


def diffusers_configs(config: dict) -> tuple[dict, dict]:
    """(unet/config.json, scheduler/scheduler_config.json) for our `config`, or LayoutError
    naming the setting that does not map."""
    from ddpm_jax import diffusion

    d = config["diffusion"]
    unet_cfg = layout.unet_config(model_fields(config), config["data"]["image_size"],
                                  config["data"].get("channels", 3))  # 3: saved before the field
    betas = diffusion.beta_schedule(d["beta_schedule"], d["num_timesteps"])
    sched = layout.scheduler_config(d, config["sampling"], betas)
    return unet_cfg, sched


def restore_params(workdir: str, config: dict, which: str) -> tuple[int, dict]:
    """(step, parameters as float32 NumPy) of the newest readable checkpoint: the EMA ones, or
    with which='raw' the raw ones."""
    import jax
    import jax.numpy as jnp
    import ml_collections

    from ddpm_jax import checkpoint, data, train, unet

    cfg = ml_collections.ConfigDict(config)
    model = unet.from_config(cfg)
    abstract = unet.abstract_params(model, data.image_shape(cfg.data))
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    try:
        if which == "ema":
            step, params = ckpt.restore_ema_params(abstract)
        else:
            tx = train.make_optimizer(cfg)
            zero = jax.ShapeDtypeStruct((), jnp.int32)
            state = train.TrainState(zero, abstract, abstract, jax.eval_shape(tx.init, abstract),
                                     zero, zero)
            restored = ckpt.restore_train_state(state)
            if restored is None:
                raise ExportError(f"--workdir {workdir}: no readable checkpoint")
            step, params = int(restored.step), restored.params
    except checkpoint.CheckpointError as e:
        raise ExportError(str(e)) from None
    finally:
        ckpt.close()
    return step, jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(params))


def newest_grid(workdir: str) -> str | None:
    """The sample grid of the highest step: samples/step_<N>/grid.png (--mode=sample) or
    samples/train_step_<N>.png (training); at one step, --mode=sample's."""
    found = []
    root = os.path.join(workdir, "samples")
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if (m := re.fullmatch(r"step_(\d+)", name)) and os.path.isfile(
                grid := os.path.join(root, name, "grid.png")):
            found.append((int(m.group(1)), 1, grid))
        elif m := re.fullmatch(r"train_step_(\d+)\.png", name):
            found.append((int(m.group(1)), 0, os.path.join(root, name)))
    return max(found)[2] if found else None


def newest_eval(workdir: str) -> dict | None:
    """The record of --mode=eval on the newest evaluated checkpoint (WORKDIR/eval/step_N.json)."""
    root = os.path.join(workdir, "eval")
    steps = [int(m.group(1)) for n in (os.listdir(root) if os.path.isdir(root) else [])
             if (m := re.fullmatch(r"step_(\d+)\.json", n))]
    for step in sorted(steps, reverse=True):
        try:
            with open(os.path.join(root, f"step_{step}.json")) as f:
                return json.load(f)
        except (OSError, ValueError):
            continue
    return None


def check_destination(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"--out {out}: exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ExportError(f"--out {out}: not empty; pass --overwrite to replace it")


def check_hub(repo_id: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, before anything is written, when the upload cannot happen."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise ExportError(f"--push_to_hub {repo_id}: expected a Hub repository id, user/name")
    try:
        from huggingface_hub import constants, get_token
    except ImportError:
        raise ExportError("--push_to_hub needs huggingface_hub: pip install huggingface_hub"
                          ) from None
    if constants.HF_HUB_OFFLINE:
        raise ExportError(f"--push_to_hub {repo_id}: offline (HF_HUB_OFFLINE is set); export "
                          "without it and upload DIR later with `hf upload`")
    url = urllib.parse.urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
    except OSError as e:
        raise ExportError(f"--push_to_hub {repo_id}: cannot reach {constants.ENDPOINT} "
                          f"({type(e).__name__}: {e}); export without --push_to_hub and "
                          "upload DIR later with `hf upload`") from None
    if get_token() is None:
        raise ExportError(f"--push_to_hub {repo_id}: no Hugging Face token; run `hf auth login` "
                          "or set HF_TOKEN")


def push(out: str, repo_id: str) -> str:
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=out,
                                 commit_message="Upload DDPM model exported by ddpm_jax")
    except Exception as e:  # noqa: BLE001 - HTTP, auth and network errors all mean the same here
        raise ExportError(f"--push_to_hub {repo_id}: upload failed ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); {out} is complete, "
                          "upload it later with `hf upload`") from None
    return getattr(info, "commit_url", f"https://huggingface.co/{repo_id}")


def write_folder(out: str, files: dict[str, bytes | str], copies: dict[str, str],
                 overwrite: bool) -> None:
    """Write `files` (relative path: contents) and `copies` (relative path: source file) as
    folder `out`: into a temporary folder beside it, renamed into place when complete."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.", dir=parent)
    try:
        for rel, content in files.items():
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
            with open(os.path.join(tmp, rel), "wb" if isinstance(content, bytes) else "w") as f:
                f.write(content)
        for rel, src in copies.items():
            shutil.copyfile(src, os.path.join(tmp, rel))
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the export from other users
        if os.path.isdir(out):  # empty, or --overwrite: set aside, then removed once replaced
            check_destination(out, overwrite)
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.old.",
                                   dir=parent)
            os.rename(out, os.path.join(old, "previous"))
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export(workdir: str, out: str, which: str = "ema", overwrite: bool = False,
           push_to_hub: str | None = None) -> dict:
    """Export `workdir`'s newest checkpoint to `out` (and the Hub); returns a summary."""
    from safetensors.numpy import save

    from ddpm_jax import export_card

    if which not in PARAMS:
        raise ExportError(f"--params={which}: expected one of {PARAMS}")
    check_destination(out, overwrite)
    config = read_config(workdir)
    unet_cfg, sched_cfg = diffusers_configs(config)  # every refusal comes here, or before
    if push_to_hub:
        check_hub(push_to_hub)
    step, params = restore_params(workdir, config, which)
    model = model_fields(config)
    levels = [i for i, b in enumerate(unet_cfg["down_block_types"]) if b.startswith("Attn")]
    tensors = layout.to_torch(params, layout.diffusers_plan(model, levels))
    grid = newest_grid(workdir)
    card = export_card.model_card(config, step, which, newest_eval(workdir),
                                  "samples.png" if grid else None, push_to_hub)
    files = {
        "model_index.json": _json({"_class_name": "DDPMPipeline",
                                   "_diffusers_version": layout.DIFFUSERS_VERSION,
                                   "scheduler": ["diffusers", "DDPMScheduler"],
                                   "unet": ["diffusers", "UNet2DModel"]}),
        "unet/config.json": _json(unet_cfg),
        "unet/diffusion_pytorch_model.safetensors": save(tensors, metadata={"format": "pt"}),
        "scheduler/scheduler_config.json": _json(sched_cfg),
        "README.md": card,
    }
    write_folder(out, files, {"samples.png": grid} if grid else {}, overwrite)
    summary = dict(step=step, params=which, tensors=len(tensors),
                   num_params=int(sum(t.size for t in tensors.values())), grid=grid)
    if push_to_hub:
        summary["url"] = push(out, push_to_hub)
    return summary


def _json(obj) -> str:
    return json.dumps(obj, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddpm_jax.export",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="work directory with checkpoints")
    parser.add_argument("--out", required=True, help="folder to write (diffusers' layout)")
    parser.add_argument("--params", default="ema", choices=PARAMS,
                        help="which weights: the EMA ones (default, as sampling uses) or raw")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--push_to_hub", default=None, metavar="REPO_ID",
                        help="also upload the folder to this Hugging Face Hub model repository")
    args = parser.parse_args(argv)
    try:
        s = export(args.workdir, args.out, args.params, args.overwrite, args.push_to_hub)
    except (ExportError, layout.LayoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. --out on a read-only or full disk: nothing was left behind
        print(f"error: cannot write --out {args.out}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"Exported {args.workdir} step {s['step']} ({s['params']} params, {s['num_params']:,} "
          f"parameters in {s['tensors']} tensors) to {args.out}"
          + (f"; sample grid {s['grid']}" if s["grid"] else "; no sample grid in the workdir"))
    if "url" in s:
        print(f"Uploaded to {s['url']}")
    print(f"Load it with: DDPMPipeline.from_pretrained({args.out!r}) (docs/export.md)")
    return 0


if __name__ == "__main__":
    from ddpm_jax import quiet

    quiet.silence_tensorflow()  # TensorFlow is imported lazily, after this (see quiet.py)
    raise SystemExit(main())
