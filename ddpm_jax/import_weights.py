"""Import a published DDPM model into a work directory that every mode reads.

    python -m ddpm_jax.import_weights SOURCE --workdir DIR
    python -m ddpm_jax.main --workdir DIR --mode=sample      # the config comes from the checkpoint

SOURCE is one of
* a diffusers folder: `config.json` (a `UNet2DModel`) and `diffusion_pytorch_model.safetensors`
  (or `.bin`), with `scheduler_config.json` beside it or in `../scheduler/` (google/ddpm-cifar10-32,
  google/ddpm-ema-church-256, ...); a folder with `unet/` in it works too;
* a Hugging Face Hub id of such a model (downloaded with huggingface_hub when online);
* the DDPM paper's TensorFlow checkpoint (`diffusion_cifar10_model/model.ckpt-790000`), read with
  TensorFlow; its EMA variables are taken when present;
* pesser/pytorch_diffusion's PyTorch conversion of those (`ema_cifar10`'s `model-790000.ckpt`),
  read without torch and without unpickling arbitrary code.

The work directory gets an ordinary ddpm_jax checkpoint at step 0: the weights as both `params`
and `ema_params`, a fresh optimizer state and the config (model and diffusion settings from the
source), so `--mode=sample`, `--mode=eval`, `Sampler.from_workdir` and fine-tuning read it as any
other. A source whose network our U-Net cannot compute is refused in one line naming the field.
"""


from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable

import numpy as np

from ddpm_jax import diffusers_layout, import_ddpm_release, import_diffusers
from ddpm_jax.diffusers_layout import Imported

# The readers' names, as other modules and tests know them from here.
WeightsImportError = diffusers_layout.LayoutError  # a source we cannot read or compute
HUB_FILES = import_diffusers.HUB_FILES
NON_EMA_NOTE = import_diffusers.NON_EMA_NOTE
EMA_SUFFIX = import_ddpm_release.EMA_SUFFIX
from_diffusers = diffusers_layout.from_diffusers
read_diffusers = import_diffusers.read_diffusers
read_tf_checkpoint = import_ddpm_release.read_tf_checkpoint
read_pesser = import_ddpm_release.read_pesser
_layer_plan = diffusers_layout.layer_plan
_read_torch_tensors = import_diffusers.read_torch_tensors

__all__ = ["EMA_SUFFIX", "HUB_FILES", "NON_EMA_NOTE", "Imported", "WeightsImportError",
           "from_diffusers", "main", "make_config", "read_diffusers", "read_pesser",
           "read_source", "read_tf_checkpoint", "write_workdir"]


@dataclasses.dataclass(frozen=True)
class SourceFormat:
    """One kind of SOURCE: `matches(path)` recognises it, `read(path, image_size)` reads it.
    A new format is a module with these two functions and a line in FORMATS."""

    name: str
    matches: Callable[[str], bool]
    read: Callable[[str, int | None], Imported]


# Tried in order: a TF checkpoint folder is a folder too, so it comes before diffusers'.
FORMATS = (
    SourceFormat("the DDPM release's TF checkpoint", import_ddpm_release.is_tf_checkpoint,
                 import_ddpm_release.read_tf_checkpoint),
    SourceFormat("a diffusers folder", import_diffusers.is_folder, import_diffusers.read),
    SourceFormat("pesser/pytorch_diffusion's torch state_dict", import_ddpm_release.is_torch_file,
                 import_ddpm_release.read_pesser),
)


def read_format(path: str, image_size: int | None = None) -> Imported:
    """`path` (on disk) read by the first of FORMATS that recognises it."""
    for fmt in FORMATS:
        if fmt.matches(path):
            return fmt.read(path, image_size)
    if os.path.isdir(path):
        raise WeightsImportError(f"{path}: neither a diffusers folder (config.json) nor a TF "
                                 "checkpoint folder (checkpoint)")
    raise WeightsImportError(f"{path}: not a diffusers folder, a TF checkpoint or a torch "
                             "state_dict")


def read_source(source: str, image_size: int | None = None) -> Imported:
    """Read `source` (a local folder or file, or a Hub id) into our config fields and params."""
    path = os.path.expanduser(source)
    if not os.path.exists(path) and not import_ddpm_release.is_tf_checkpoint(path):
        path = import_diffusers.download(source)
    imported = read_format(path, image_size)
    if "cifar10" in source.lower() and imported.data["image_size"] == 32:
        # --mode=eval's reference statistics: CIFAR-10's training set, as configs/cifar10.py.
        imported.data.update(source="tfds", name="cifar10")
        imported.notes.append("data: CIFAR-10 through tfds (the source's name says cifar10)")
    else:
        imported.notes.append("data: for --mode=eval's reference statistics, add the dataset "
                              "with --config.data.source=... (and .name or .path)")
    if "ddpm-cifar10-32" in source:
        imported.notes.append(NON_EMA_NOTE)
    return imported


# ---------------------------------------------------------------------------------------------
# The work directory


def make_config(imported: Imported):
    """configs/default.py with the source's model, image and diffusion settings."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/
    from configs import default

    config = default.get_config()
    for group in ("model", "data", "diffusion", "sampling"):
        for key, value in getattr(imported, group).items():
            config[group][key] = tuple(value) if isinstance(value, list) else value
    config.model.dropout = float(config.model.dropout)
    config.sampling.sampler = "ddpm"
    config.sampling.num_steps = 0  # all T steps, as the paper sampled
    return config


def write_workdir(imported: Imported, workdir: str):
    """An ordinary checkpoint at step 0 in WORKDIR/checkpoints: the weights as params and EMA
    params, a fresh optimizer state, the config. Returns the config."""
    import jax
    import jax.numpy as jnp

    from ddpm_jax import checkpoint, data, train, unet, validate

    config = make_config(imported)
    validate.check_config(config, num_devices=1)
    validate.check_workdir(workdir)
    ckpt = checkpoint.Checkpointer(workdir, config)
    if ckpt.all_steps():
        raise WeightsImportError(f"{workdir}: already has checkpoints {ckpt.all_steps()}; import "
                                 "into a new work directory")
    model = unet.from_config(config)
    abstract = unet.abstract_params(model, data.image_shape(config.data))
    try:
        checkpoint.check_compatible(imported.params, abstract, "params", "the imported weights")
    except checkpoint.CheckpointError as e:
        raise WeightsImportError(str(e)) from None
    params = jax.tree.map(jnp.asarray, imported.params)
    tx = train.make_optimizer(config)
    zero = jnp.zeros((), jnp.int32)
    state = train.TrainState(zero, params, jax.tree.map(jnp.copy, params), tx.init(params),
                             zero, zero)
    ckpt.save(0, state, force=True)
    ckpt.wait()
    ckpt.close()
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddpm_jax.import_weights",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("source", help="diffusers folder, Hub id, DDPM TF checkpoint or "
                        "pesser/pytorch_diffusion .ckpt")
    parser.add_argument("--workdir", required=True, help="new work directory to write")
    parser.add_argument("--image_size", type=int, default=None,
                        help="DDPM release checkpoints only: the image size (default: 16 x 2^ the "
                        "first attention level, as in every DDPM release model)")
    args = parser.parse_args(argv)
    from ddpm_jax import validate

    try:
        imported = read_source(args.source, args.image_size)
        config = write_workdir(imported, args.workdir)
    except (WeightsImportError, validate.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n = sum(np.size(x) for x in diffusers_layout.leaves(imported.params))
    m = config.model
    size = config.data.image_size
    print(f"Imported {args.source}: {n:,} parameters, {size}x{size}x{config.data.channels}, "
          f"ch={m.ch}, ch_mult={tuple(m.ch_mult)}, num_res_blocks={m.num_res_blocks}, "
          f"attn_resolutions={tuple(m.attn_resolutions)}")
    for note in imported.notes:
        print(f"  {note}")
    print(f"Wrote {args.workdir}/checkpoints/0; sample with: python -m ddpm_jax.main --workdir "
          f"{args.workdir} --mode=sample")
    return 0


if __name__ == "__main__":
    from ddpm_jax import quiet

    quiet.silence_tensorflow()  # TensorFlow is imported lazily, after this (see quiet.py)
    raise SystemExit(main())
