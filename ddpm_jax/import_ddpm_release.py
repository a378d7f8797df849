"""import_weights' readers of the DDPM release: the paper's TensorFlow checkpoints and
pesser/pytorch_diffusion's PyTorch conversion of them (the same scopes, with dots)."""

from __future__ import annotations

import os
import re
import zipfile

from ddpm_jax import diffusers_layout as layout
from ddpm_jax import import_diffusers
from ddpm_jax.diffusers_layout import Imported, LayoutError

EMA_SUFFIX = "/ExponentialMovingAverage"


def original_architecture(shape_of, sep: str, image_size: int | None,
                           describe: str) -> tuple[dict, dict, list]:
    """(model fields, data fields, attention levels) of a DDPM-release network, read off its
    tensor shapes: `shape_of(name)` is a tensor's shape or None. Scopes use `sep` ('/' for TF,
    '.' for pesser's names)."""
    torch_layout = sep == "."
    weight = "weight" if torch_layout else "W"

    def scope(tf_scope):
        return layout.pesser_name(tf_scope) if torch_layout else tf_scope

    def out_channels(tf_scope):
        shape = shape_of(f"{scope(tf_scope)}{sep}{weight}")
        return None if shape is None else (shape[0] if torch_layout else shape[-1])

    conv_in = shape_of(f"conv_in{sep}{weight}")
    if conv_in is None:
        raise LayoutError(f"{describe}: no conv_in{sep}{weight}: not a DDPM checkpoint")
    ch = out_channels("conv_in")
    channels = conv_in[1] if torch_layout else conv_in[2]
    ch_mult = []
    while (w := out_channels(f"down_{len(ch_mult)}/block_0/conv1")) is not None:
        ch_mult.append(w // ch)
    num_res_blocks = 0
    while out_channels(f"down_0/block_{num_res_blocks}/conv1") is not None:
        num_res_blocks += 1
    attn_levels = [i for i in range(len(ch_mult)) if out_channels(f"down_{i}/attn_0/q")]
    if image_size is None:
        if not attn_levels:
            raise LayoutError(f"{describe}: no attention level to infer the image size "
                              "from; pass --image_size")
        # Every DDPM release model has attention at 16x16 only (attn_resolutions=(16,)).
        image_size = 16 * 2 ** attn_levels[0]
    model = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                 attn_resolutions=[image_size // 2**i for i in attn_levels],
                 dropout=0.1 if image_size == 32 else 0.0, norm_groups=32)
    return model, dict(image_size=image_size, channels=channels), attn_levels


def original_plan(model: dict, attn_levels) -> list:
    widths = [model["ch"] * m for m in model["ch_mult"]]
    return layout.layer_plan(len(widths), model["num_res_blocks"], attn_levels,
                             lambda kind, i, j: j == 0 and widths[i] != (widths[i - 1] if i else
                                                                         model["ch"]))


def read_tf_checkpoint(path: str, image_size: int | None = None) -> Imported:
    """The DDPM release's TF checkpoint (`.../model.ckpt-790000`, or its folder): the EMA
    variables when it has them (as the paper's samples used), else the raw ones."""
    import tensorflow as tf

    try:
        reader = tf.train.load_checkpoint(path)
    except (tf.errors.OpError, ValueError) as e:
        raise LayoutError(f"{path}: not a readable TF checkpoint ({e})") from None
    shapes = reader.get_variable_to_shape_map()
    ema = any(n.endswith(EMA_SUFFIX) for n in shapes)
    prefix = "model/"

    def name_in_ckpt(name):
        return f"{prefix}{name}{EMA_SUFFIX if ema else ''}"

    model, data, attn_levels = original_architecture(
        lambda n: shapes.get(name_in_ckpt(n)), "/", image_size, path)
    # Only the network's variables: not the optimizer's slots, the step or the other copy.
    wanted = {n[len(prefix):len(n) - (len(EMA_SUFFIX) if ema else 0)]: n for n in shapes
              if n.startswith(prefix) and n.endswith(EMA_SUFFIX) == ema
              and not re.search(r"/(Adam|Adam_1|Momentum)$", n.removesuffix(EMA_SUFFIX))}
    tensors = {short: reader.get_tensor(full) for short, full in wanted.items()}
    params = layout.to_ours(tensors, original_plan(model, attn_levels), lambda tf_, hf: tf_,
                            False, path)
    diffusion, sampling, note = layout.scheduler_fields(None, path, data["image_size"])
    which = ("EMA variables (as the paper's samples)" if ema else
             "raw variables: the checkpoint has no EMA copy")
    return Imported(model, data, diffusion, sampling, params, [f"TF checkpoint: {which}", note])


def read_pesser(path: str, image_size: int | None = None) -> Imported:
    """pesser/pytorch_diffusion's `torch.save`d state_dict (`ema_*` files hold the EMA
    weights), read with ddpm_jax's restricted unpickler."""
    tensors = import_diffusers.read_torch_tensors(path)
    model, data, attn_levels = original_architecture(
        lambda n: tensors[n].shape if n in tensors else None, ".", image_size, path)
    plan = [(o, layout.pesser_name(tf), hf, k)
            for o, tf, hf, k in original_plan(model, attn_levels)]
    params = layout.to_ours(tensors, plan, lambda tf, hf: tf, True, path)
    diffusion, sampling, note = layout.scheduler_fields(None, path, data["image_size"])
    which = ("EMA weights: the path says ema" if "ema" in path.lower() else
             "pesser names the EMA files ema_*; this path does not say ema")
    return Imported(model, data, diffusion, sampling, params,
                    [f"pesser/pytorch_diffusion checkpoint ({which})", note])


def is_tf_checkpoint(path: str) -> bool:
    if os.path.isdir(path):
        return os.path.exists(os.path.join(path, "checkpoint"))
    return os.path.exists(f"{path}.index")


def is_torch_file(path: str) -> bool:
    return os.path.isfile(path) and (zipfile.is_zipfile(path)
                                     or path.endswith((".ckpt", ".pt", ".pth", ".bin")))
