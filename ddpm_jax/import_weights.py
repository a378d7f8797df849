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
import json
import math
import os
import re
import sys
import zipfile

import numpy as np

HUB_FILES = ("config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json")
NON_EMA_NOTE = (
    "google/ddpm-cifar10-32 holds the non-EMA weights (FID about 12, not the paper's 3.17); the "
    "EMA CIFAR-10 model is in the DDPM release (diffusion_cifar10_model/model.ckpt-790000, or "
    "pesser/pytorch_diffusion's ema_cifar10)"
)


class WeightsImportError(ValueError):
    """A source that cannot be read, or whose network our U-Net cannot compute."""


@dataclasses.dataclass
class Imported:
    """A published model as our config fields and our parameter tree."""

    model: dict  # model.* config fields
    data: dict  # data.* config fields
    diffusion: dict  # diffusion.* config fields
    sampling: dict  # sampling.* config fields
    params: dict  # our U-Net's parameter tree, float32 NumPy
    notes: list[str]  # what the user should know about the source (printed)


# ---------------------------------------------------------------------------------------------
# Layer names: ours, the DDPM release's (TF scopes; pesser's are the same with dots), diffusers'.


def _layer_plan(num_levels: int, num_res_blocks: int, attn_levels, has_shortcut) -> list[tuple]:
    """(our layer path, the DDPM release's scope, diffusers' module, kind) for every layer of
    the network; kind is 'conv', 'dense' or 'norm'. `has_shortcut(level_kind, level, block)`
    says whether a res block changes width (then it has a 1x1 shortcut)."""
    plan = [("conv_in", "conv_in", "conv_in", "conv"),
            ("temb0", "temb/dense0", "time_embedding.linear_1", "dense"),
            ("temb1", "temb/dense1", "time_embedding.linear_2", "dense")]

    def res(ours, tf, hf, shortcut):
        plan.extend([(f"{ours}/GroupNorm_0", f"{tf}/norm1", f"{hf}.norm1", "norm"),
                     (f"{ours}/Conv_0", f"{tf}/conv1", f"{hf}.conv1", "conv"),
                     (f"{ours}/Dense_0", f"{tf}/temb_proj", f"{hf}.time_emb_proj", "dense"),
                     (f"{ours}/GroupNorm_1", f"{tf}/norm2", f"{hf}.norm2", "norm"),
                     (f"{ours}/Conv_1", f"{tf}/conv2", f"{hf}.conv2", "conv")])
        if shortcut:
            plan.append((f"{ours}/Dense_1", f"{tf}/nin_shortcut", f"{hf}.conv_shortcut", "dense"))

    def attn(ours, tf, hf):
        plan.append((f"{ours}/GroupNorm_0", f"{tf}/norm", f"{hf}.group_norm", "norm"))
        for ours_name, tf_name, hf_name in (("q", "q", "to_q"), ("k", "k", "to_k"),
                                            ("v", "v", "to_v"), ("proj_out", "proj_out",
                                                                 "to_out.0")):
            plan.append((f"{ours}/{ours_name}", f"{tf}/{tf_name}", f"{hf}.{hf_name}", "dense"))

    last = num_levels - 1
    for i in range(num_levels):
        for j in range(num_res_blocks):
            res(f"down{i}_res{j}", f"down_{i}/block_{j}", f"down_blocks.{i}.resnets.{j}",
                has_shortcut("down", i, j))
            if i in attn_levels:
                attn(f"down{i}_attn{j}", f"down_{i}/attn_{j}", f"down_blocks.{i}.attentions.{j}")
        if i != last:
            plan.append((f"down{i}_downsample", f"down_{i}/downsample/conv",
                         f"down_blocks.{i}.downsamplers.0.conv", "conv"))
    res("mid_res0", "mid/block_1", "mid_block.resnets.0", False)
    attn("mid_attn", "mid/attn_1", "mid_block.attentions.0")
    res("mid_res1", "mid/block_2", "mid_block.resnets.1", False)
    for i in reversed(range(num_levels)):
        k = last - i  # diffusers numbers its up blocks from the bottom
        for j in range(num_res_blocks + 1):
            res(f"up{i}_res{j}", f"up_{i}/block_{j}", f"up_blocks.{k}.resnets.{j}", True)
            if i in attn_levels:
                attn(f"up{i}_attn{j}", f"up_{i}/attn_{j}", f"up_blocks.{k}.attentions.{j}")
        if i != 0:
            plan.append((f"up{i}_upsample", f"up_{i}/upsample/conv",
                         f"up_blocks.{k}.upsamplers.0.conv", "conv"))
    plan.extend([("norm_out", "norm_out", "conv_norm_out", "norm"),
                 ("conv_out", "conv_out", "conv_out", "conv")])
    return plan


def _pesser_name(tf_scope: str) -> str:
    """The DDPM release's TF scope as pesser/pytorch_diffusion names the module."""
    name = re.sub(r"^(down|up)_(\d+)/", r"\1.\2.", tf_scope)
    name = re.sub(r"\.(block|attn)_(\d+)", r".\1.\2", name)
    return name.replace("temb/dense", "temb.dense.").replace("/", ".")


# diffusers' attention blocks before 0.14 (e.g. google/ddpm-* as uploaded) used these names.
_OLD_DIFFUSERS_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value",
                            "to_out.0": "proj_attn"}


def _to_ours(tensors: dict, plan, name_of, torch_layout: bool, describe: str) -> dict:
    """Our parameter tree from source `tensors` laid out as `plan` says; every tensor of the
    source must find its place, and every layer of ours its tensors."""
    used = set()

    def fetch(module: str, leaf: str) -> np.ndarray:
        candidates = [f"{module}{leaf}"]
        for new, old in _OLD_DIFFUSERS_ATTENTION.items():
            if module.endswith(f".{new}."):
                candidates.append(f"{module[:-len(new) - 1]}{old}.{leaf}")
        for c in candidates:
            if c in tensors:
                used.add(c)
                return np.asarray(tensors[c], np.float32)
        raise WeightsImportError(f"{describe}: has no tensor {candidates[0]!r}, which DDPM's "
                                 "U-Net of this shape needs")

    params: dict = {}
    for ours, src_name, kind in ((o, name_of(tf, hf), k) for o, tf, hf, k in plan):
        sep = "." if torch_layout else "/"
        module = f"{src_name}{sep}"
        if kind == "norm":
            scale, bias = ("weight", "bias") if torch_layout else ("gamma", "beta")
            layer = {"scale": fetch(module, scale), "bias": fetch(module, bias)}
        else:
            w = fetch(module, "weight" if torch_layout else "W")
            if torch_layout:  # [out, in, kh, kw] -> [kh, kw, in, out]; Linear [out, in]
                w = w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T
            if kind == "dense" and w.ndim == 4:  # a 1x1 convolution is our Dense
                w = w[0, 0]
            layer = {"kernel": w, "bias": fetch(module, "bias" if torch_layout else "b")}
        node = params
        for part in ours.split("/")[:-1]:
            node = node.setdefault(part, {})
        node[ours.split("/")[-1]] = layer
    unused = sorted(set(tensors) - used)
    if unused:
        raise WeightsImportError(f"{describe}: tensor {unused[0]!r} has no place in DDPM's U-Net "
                                 f"({len(unused)} such tensors); not a DDPM model of this layout")
    return params


# ---------------------------------------------------------------------------------------------
# diffusers


# UNet2DModel's defaults (diffusers' unet_2d.py), for configs written before a field existed.
_DIFFUSERS_DEFAULTS = dict(
    in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type="positional",
    time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True, mid_block_type="UNetMidBlock2D",
    layers_per_block=2, mid_block_scale_factor=1, downsample_padding=1, downsample_type="conv",
    upsample_type="conv", dropout=0.0, act_fn="silu", attention_head_dim=8, norm_num_groups=32,
    attn_norm_num_groups=None, norm_eps=1e-5, resnet_time_scale_shift="default",
    add_attention=True, class_embed_type=None, num_class_embeds=None,
)
# Fields that must hold these values: anything else computes a function DDPM's U-Net does not.
_DIFFUSERS_REQUIRED = dict(
    center_input_sample=(False, "scales the input to 2x - 1 first"),
    time_embedding_type=("positional", "DDPM embeds timesteps sinusoidally"),
    flip_sin_to_cos=(False, "DDPM's timestep embedding puts sin before cos"),
    freq_shift=(1, "DDPM's frequencies are exp(-log(10000) i / (half - 1))"),
    mid_block_type=("UNetMidBlock2D", "DDPM's middle is res, attention, res"),
    add_attention=(True, "DDPM's middle block has attention"),
    mid_block_scale_factor=(1, "DDPM's residual sums are not rescaled"),
    downsample_padding=(0, "DDPM's stride-2 convolution pads right and bottom only (TF 'SAME'); "
                           "1 pads all sides"),
    downsample_type=("conv", "DDPM downsamples with a stride-2 convolution"),
    upsample_type=("conv", "DDPM upsamples by nearest neighbour and a convolution"),
    resnet_time_scale_shift=("default", "DDPM adds the timestep embedding (no scale-shift)"),
    class_embed_type=(None, "DDPM's U-Net is unconditional"),
    num_class_embeds=(None, "DDPM's U-Net is unconditional"),
    norm_eps=(1e-6, "DDPM's GroupNorm epsilon is 1e-6"),
)


def _refuse(describe: str, field: str, value, why: str):
    raise WeightsImportError(f"{describe}: {field}={value!r} is not supported: {why}")


def _diffusers_model(cfg: dict, describe: str) -> tuple[dict, dict, list]:
    """(model fields, data fields, attention levels) of a UNet2DModel config.json."""
    if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        _refuse(describe, "_class_name", cfg.get("_class_name"), "expected UNet2DModel")
    c = {**_DIFFUSERS_DEFAULTS, **cfg}
    for field, (value, why) in _DIFFUSERS_REQUIRED.items():
        ok = math.isclose(c[field], value) if isinstance(value, float) else c[field] == value
        if not ok:
            _refuse(describe, field, c[field], why)
    if c["act_fn"] not in ("silu", "swish"):
        _refuse(describe, "act_fn", c["act_fn"], "DDPM's nonlinearity is swish")
    widths = list(c["block_out_channels"])
    ch = widths[0]
    if any(w % ch for w in widths):
        _refuse(describe, "block_out_channels", widths, "each must be a multiple of the first")
    if c["time_embedding_dim"] not in (None, 4 * ch):
        _refuse(describe, "time_embedding_dim", c["time_embedding_dim"], f"DDPM's is 4 x {ch}")
    if c["in_channels"] != c["out_channels"] or c["in_channels"] not in (1, 3):
        _refuse(describe, "out_channels", c["out_channels"],
                f"expected in_channels={c['in_channels']} channels out, 1 or 3 (a learned "
                "variance doubles them)")
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    for field, blocks, kinds in (("down_block_types", down, ("DownBlock2D", "AttnDownBlock2D")),
                                 ("up_block_types", up, ("UpBlock2D", "AttnUpBlock2D"))):
        bad = [b for b in blocks if b not in kinds]
        if bad or len(blocks) != len(widths):
            _refuse(describe, field, blocks, f"expected {len(widths)} of {kinds}")
    attn_levels = [i for i, b in enumerate(down) if b == "AttnDownBlock2D"]
    if [len(widths) - 1 - k for k, b in enumerate(up) if b == "AttnUpBlock2D"][::-1] != attn_levels:
        _refuse(describe, "up_block_types", up,
                "DDPM has attention on the way up at the levels it has it on the way down")
    head_dim = c["attention_head_dim"]
    for level in [*attn_levels, len(widths) - 1]:  # the middle block too
        if head_dim is not None and widths[level] // head_dim != 1:
            _refuse(describe, "attention_head_dim", head_dim,
                    f"{widths[level] // head_dim} heads at {widths[level]} channels; DDPM's "
                    "attention has one head (attention_head_dim null)")
    groups = c["norm_num_groups"]
    if c["attn_norm_num_groups"] not in (None, groups):
        _refuse(describe, "attn_norm_num_groups", c["attn_norm_num_groups"],
                f"our attention normalises with norm_num_groups={groups}")
    size = c.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            _refuse(describe, "sample_size", size, "our images are square")
        size = size[0]
    if not isinstance(size, int):
        _refuse(describe, "sample_size", size, "expected the image size")
    model = dict(ch=ch, ch_mult=[w // ch for w in widths], num_res_blocks=c["layers_per_block"],
                 attn_resolutions=[size // 2**i for i in attn_levels], dropout=c["dropout"],
                 norm_groups=groups)
    return model, dict(image_size=size, channels=c["in_channels"]), attn_levels


def _scheduler_fields(s: dict | None, describe: str, image_size: int) -> tuple[dict, dict, str]:
    """(diffusion fields, sampling fields, a note) from diffusers' scheduler_config.json; DDPM's
    settings when there is none."""
    if s is None:
        # DDPM's samples: fixed_large (beta) for CIFAR-10, fixed_small (beta-tilde) at 256.
        variance = "fixed_large" if image_size == 32 else "fixed_small"
        return (dict(num_timesteps=1000, beta_schedule="linear", prediction="eps"),
                dict(variance=variance, clip_x0=True),
                f"no scheduler config: DDPM's linear betas 1e-4..0.02, T=1000, eps, {variance}")
    describe = f"{describe} scheduler_config.json"
    T = s.get("num_train_timesteps", 1000)
    name = s.get("beta_schedule", "linear")
    if s.get("trained_betas") is not None:
        _refuse(describe, "trained_betas", "[...]", "only linear and cosine schedules exist here")
    if name == "linear":
        scale = 1000.0 / T  # our linear schedule keeps DDPM's end points for any T
        for field, ours in (("beta_start", scale * 1e-4), ("beta_end", scale * 0.02)):
            if not math.isclose(s.get(field, ours), ours, rel_tol=1e-9):
                _refuse(describe, field, s[field], f"our linear schedule has {ours:g} at T={T}")
        schedule = "linear"
    elif name == "squaredcos_cap_v2":
        schedule = "cosine"
    else:
        _refuse(describe, "beta_schedule", name, "expected linear or squaredcos_cap_v2")
    prediction = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}.get(
        s.get("prediction_type", "epsilon"))
    if prediction is None:
        _refuse(describe, "prediction_type", s["prediction_type"], "expected epsilon, sample or "
                "v_prediction")
    variance = s.get("variance_type", "fixed_small").removesuffix("_log")
    if variance not in ("fixed_small", "fixed_large"):
        _refuse(describe, "variance_type", s["variance_type"], "no learned variances here")
    for field, ok in (("thresholding", not s.get("thresholding", False)),
                      ("rescale_betas_zero_snr", not s.get("rescale_betas_zero_snr", False)),
                      ("clip_sample_range", s.get("clip_sample_range", 1.0) == 1.0)):
        if not ok:
            _refuse(describe, field, s[field], "our samplers clip x0 to [-1, 1] or not at all")
    clip = bool(s.get("clip_sample", True))
    return (dict(num_timesteps=T, beta_schedule=schedule, prediction=prediction),
            dict(variance=variance, clip_x0=clip),
            f"scheduler: {schedule} betas, T={T}, {prediction}, {variance}, clip_x0={clip}")


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise WeightsImportError(f"{path}: cannot read it ({e})") from None


def from_diffusers(cfg: dict, tensors: dict, describe: str) -> tuple[dict, dict, dict]:
    """(model fields, data fields, our params) of a UNet2DModel's config and state_dict."""
    model, data, attn_levels = _diffusers_model(cfg, f"{describe} config.json")
    widths = [model["ch"] * m for m in model["ch_mult"]]
    plan = _layer_plan(len(widths), model["num_res_blocks"], attn_levels,
                       lambda kind, i, j: j == 0 and i > 0 and widths[i] != widths[i - 1])
    return model, data, _to_ours(tensors, plan, lambda tf, hf: hf, True, describe)


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
        raise WeightsImportError(f"{unet_dir}: no diffusion_pytorch_model.safetensors (or .bin) "
                                 "beside config.json")
    model, data, params = from_diffusers(_read_json(os.path.join(unet_dir, "config.json")),
                                         _read_torch_tensors(weights[0]), weights[0])
    sched_paths = [os.path.join(d, "scheduler_config.json") for d in sched_dirs]
    sched_path = next((p for p in sched_paths if os.path.exists(p)), None)
    sched = _read_json(sched_path) if sched_path else None
    diffusion, sampling, note = _scheduler_fields(sched, folder, data["image_size"])
    return Imported(model, data, diffusion, sampling, params, [note])


def _read_torch_tensors(path: str) -> dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            return load_file(path)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise WeightsImportError(f"{path}: cannot read it ({type(e).__name__}: {e})") from None
    from ddpm_jax import convert_inception  # its restricted unpickler reads torch.save files

    try:
        return convert_inception.load_torch_state_dict(path)
    except (OSError, EOFError, ValueError, TypeError, KeyError) as e:
        raise WeightsImportError(f"{path}: not a readable torch state_dict "
                                 f"({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------
# The DDPM release: TensorFlow checkpoints and pesser/pytorch_diffusion's conversion of them


EMA_SUFFIX = "/ExponentialMovingAverage"


def _original_architecture(shape_of, sep: str, image_size: int | None,
                           describe: str) -> tuple[dict, dict, list]:
    """(model fields, data fields, attention levels) of a DDPM-release network, read off its
    tensor shapes: `shape_of(name)` is a tensor's shape or None. Scopes use `sep` ('/' for TF,
    '.' for pesser's names)."""
    torch_layout = sep == "."
    weight = "weight" if torch_layout else "W"

    def scope(tf_scope):
        return _pesser_name(tf_scope) if torch_layout else tf_scope

    def out_channels(tf_scope):
        shape = shape_of(f"{scope(tf_scope)}{sep}{weight}")
        return None if shape is None else (shape[0] if torch_layout else shape[-1])

    conv_in = shape_of(f"conv_in{sep}{weight}")
    if conv_in is None:
        raise WeightsImportError(f"{describe}: no conv_in{sep}{weight}: not a DDPM checkpoint")
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
            raise WeightsImportError(f"{describe}: no attention level to infer the image size "
                                     "from; pass --image_size")
        # Every DDPM release model has attention at 16x16 only (attn_resolutions=(16,)).
        image_size = 16 * 2 ** attn_levels[0]
    model = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                 attn_resolutions=[image_size // 2**i for i in attn_levels],
                 dropout=0.1 if image_size == 32 else 0.0, norm_groups=32)
    return model, dict(image_size=image_size, channels=channels), attn_levels


def _original_plan(model: dict, attn_levels) -> list:
    widths = [model["ch"] * m for m in model["ch_mult"]]
    return _layer_plan(len(widths), model["num_res_blocks"], attn_levels,
                       lambda kind, i, j: j == 0 and widths[i] != (widths[i - 1] if i else
                                                                   model["ch"]))


def read_tf_checkpoint(path: str, image_size: int | None = None) -> Imported:
    """The DDPM release's TF checkpoint (`.../model.ckpt-790000`, or its folder): the EMA
    variables when it has them (as the paper's samples used), else the raw ones."""
    import tensorflow as tf

    try:
        reader = tf.train.load_checkpoint(path)
    except (tf.errors.OpError, ValueError) as e:
        raise WeightsImportError(f"{path}: not a readable TF checkpoint ({e})") from None
    shapes = reader.get_variable_to_shape_map()
    ema = any(n.endswith(EMA_SUFFIX) for n in shapes)
    prefix = "model/"

    def name_in_ckpt(name):
        return f"{prefix}{name}{EMA_SUFFIX if ema else ''}"

    model, data, attn_levels = _original_architecture(
        lambda n: shapes.get(name_in_ckpt(n)), "/", image_size, path)
    # Only the network's variables: not the optimizer's slots, the step or the other copy.
    wanted = {n[len(prefix):len(n) - (len(EMA_SUFFIX) if ema else 0)]: n for n in shapes
              if n.startswith(prefix) and n.endswith(EMA_SUFFIX) == ema
              and not re.search(r"/(Adam|Adam_1|Momentum)$", n.removesuffix(EMA_SUFFIX))}
    tensors = {short: reader.get_tensor(full) for short, full in wanted.items()}
    params = _to_ours(tensors, _original_plan(model, attn_levels), lambda tf_, hf: tf_, False,
                      path)
    diffusion, sampling, note = _scheduler_fields(None, path, data["image_size"])
    which = ("EMA variables (as the paper's samples)" if ema else
             "raw variables: the checkpoint has no EMA copy")
    return Imported(model, data, diffusion, sampling, params, [f"TF checkpoint: {which}", note])


def read_pesser(path: str, image_size: int | None = None) -> Imported:
    """pesser/pytorch_diffusion's `torch.save`d state_dict (`ema_*` files hold the EMA
    weights), read with ddpm_jax's restricted unpickler."""
    tensors = _read_torch_tensors(path)
    model, data, attn_levels = _original_architecture(
        lambda n: tensors[n].shape if n in tensors else None, ".", image_size, path)
    plan = [(o, _pesser_name(tf), hf, k) for o, tf, hf, k in _original_plan(model, attn_levels)]
    params = _to_ours(tensors, plan, lambda tf, hf: tf, True, path)
    diffusion, sampling, note = _scheduler_fields(None, path, data["image_size"])
    which = ("EMA weights: the path says ema" if "ema" in path.lower() else
             "pesser names the EMA files ema_*; this path does not say ema")
    return Imported(model, data, diffusion, sampling, params,
                    [f"pesser/pytorch_diffusion checkpoint ({which})", note])


# ---------------------------------------------------------------------------------------------
# Sources


def _is_tf_checkpoint(path: str) -> bool:
    if os.path.isdir(path):
        return os.path.exists(os.path.join(path, "checkpoint"))
    return os.path.exists(f"{path}.index")


def read_source(source: str, image_size: int | None = None) -> Imported:
    """Read `source` (a local folder or file, or a Hub id) into our config fields and params."""
    path = os.path.expanduser(source)
    if not os.path.exists(path) and not _is_tf_checkpoint(path):
        path = _download(source)
    if _is_tf_checkpoint(path):
        imported = read_tf_checkpoint(path, image_size)
    elif os.path.isdir(path):
        if not (os.path.exists(os.path.join(path, "config.json"))
                or os.path.exists(os.path.join(path, "unet", "config.json"))):
            raise WeightsImportError(f"{path}: neither a diffusers folder (config.json) nor a TF "
                                     "checkpoint folder (checkpoint)")
        imported = read_diffusers(path)
    elif zipfile.is_zipfile(path) or path.endswith((".ckpt", ".pt", ".pth", ".bin")):
        imported = read_pesser(path, image_size)
    else:
        raise WeightsImportError(f"{path}: not a diffusers folder, a TF checkpoint or a torch "
                                 "state_dict")
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


def _download(repo_id: str) -> str:
    """The local snapshot of Hub model `repo_id` (its config, weights and scheduler only)."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise WeightsImportError(f"{repo_id}: no such file or folder (and not a Hub id)")
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
        raise WeightsImportError(
            f"cannot download {repo_id} from the Hugging Face Hub ({type(e).__name__}): fetch "
            f"{urls} into a folder {folder}/ and pass the folder as SOURCE instead: python -m "
            f"ddpm_jax.import_weights {folder} --workdir ...") from None


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

    from ddpm_jax import checkpoint, input_pipeline, train, unet, validate

    config = make_config(imported)
    validate.check_config(config, num_devices=1)
    validate.check_workdir(workdir)
    ckpt = checkpoint.Checkpointer(workdir, config)
    if ckpt.all_steps():
        raise WeightsImportError(f"{workdir}: already has checkpoints {ckpt.all_steps()}; import "
                                 "into a new work directory")
    model = unet.from_config(config)
    abstract = unet.abstract_params(model, input_pipeline.image_shape(config.data))
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
    n = sum(np.size(x) for x in _leaves(imported.params))
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


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


if __name__ == "__main__":
    from ddpm_jax import quiet

    quiet.silence_tensorflow()  # TensorFlow is imported lazily, after this (see quiet.py)
    raise SystemExit(main())
