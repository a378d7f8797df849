"""import_weights' reader of diffusers folders (UNet2DModel + DDPMScheduler) and Hub ids."""

from __future__ import annotations

import json
import os
import re

import numpy as np

from ddpm_jax import diffusers_layout as layout
from ddpm_jax.diffusers_layout import Imported, LayoutError

HUB_FILES = ("config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json")
NON_EMA_NOTE = (
    "google/ddpm-cifar10-32 holds the non-EMA weights (FID about 12, not the paper's 3.17); the "
    "EMA CIFAR-10 model is in the DDPM release (diffusion_cifar10_model/model.ckpt-790000, or "
    "pesser/pytorch_diffusion's ema_cifar10)"
)


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise LayoutError(f"{path}: cannot read it ({e})") from None


def read_diffusers(folder: str) -> Imported:
    """A diffusers UNet2DModel folder (or a pipeline folder with unet/ and scheduler/)."""
    if os.path.exists(os.path.join(folder, "unet", "config.json")):
        unet_dir, sched_dirs = os.path.join(folder, "unet"), [os.path.join(folder, "scheduler")]
    else:
        unet_dir, sched_dirs = folder, [folder, os.path.join(folder, "..", "scheduler")]
    weights = [os.path.join(unet_dir, f"diffusion_pytorch_model.{ext}")
               for ext in ("safetensors", "bin")]
    weights = [w for w in weights if os.path.exists(w)]
    if not weights:
        raise LayoutError(f"{unet_dir}: no diffusion_pytorch_model.safetensors (or .bin) "
                          "beside config.json")
    model, data, params = layout.from_diffusers(read_json(os.path.join(unet_dir, "config.json")),
                                                read_torch_tensors(weights[0]), weights[0])
    sched_paths = [os.path.join(d, "scheduler_config.json") for d in sched_dirs]
    sched_path = next((p for p in sched_paths if os.path.exists(p)), None)
    sched = read_json(sched_path) if sched_path else None
    diffusion, sampling, note = layout.scheduler_fields(sched, folder, data["image_size"])
    notes = [note]
    if model.get("num_classes"):
        k = model["num_classes"]
        # A labelled source for the config check; the user names the real one (read_source's
        # note) before training or --mode=eval on it.
        data.update(source="tfds", name="")
        notes.append(f"class-conditional: num_class_embeds={k + 1} rows, read as {k} classes "
                     f"and the null class (row {k}, as ddpm_jax's export writes it)")
    return Imported(model, data, diffusion, sampling, params, notes)


def read_torch_tensors(path: str) -> dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            return load_file(path)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise LayoutError(f"{path}: cannot read it ({type(e).__name__}: {e})") from None
    from ddpm_jax import convert_inception  # its restricted unpickler reads torch.save files

    try:
        return convert_inception.load_torch_state_dict(path)
    except (OSError, EOFError, ValueError, TypeError, KeyError) as e:
        raise LayoutError(f"{path}: not a readable torch state_dict "
                          f"({type(e).__name__}: {e})") from None


def download(repo_id: str) -> str:
    """The local snapshot of Hub model `repo_id` (its config, weights and scheduler only)."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise LayoutError(f"{repo_id}: no such file or folder (and not a Hub id)")
    try:
        from huggingface_hub import snapshot_download

        # The flat layout (google/ddpm-*) or a pipeline's unet/ and scheduler/; only the
        # safetensors weights, unless the repository has none (then the older .bin).
        files = [*HUB_FILES, *(f"unet/{f}" for f in HUB_FILES[:2]),
                 "scheduler/scheduler_config.json"]
        path = snapshot_download(repo_id, allow_patterns=files)
        if not any(os.path.exists(os.path.join(path, d, HUB_FILES[1])) for d in ("", "unet")):
            bins = ["diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.bin"]
            path = snapshot_download(repo_id, allow_patterns=files + bins)
        return path
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, HTTP errors: all say the same
        urls = " ".join(f"https://huggingface.co/{repo_id}/resolve/main/{f}" for f in HUB_FILES)
        folder = repo_id.split("/")[1]
        raise LayoutError(
            f"cannot download {repo_id} from the Hugging Face Hub ({type(e).__name__}): fetch "
            f"{urls} into a folder {folder}/ and pass the folder as SOURCE instead: python -m "
            f"ddpm_jax.import_weights {folder} --workdir ...") from None


def is_folder(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, *p, "config.json"))
                                       for p in ((), ("unet",)))


def read(path: str, image_size: int | None = None) -> Imported:
    """import_weights' entry point (`image_size` is read from the config)."""
    del image_size
    return read_diffusers(path)
