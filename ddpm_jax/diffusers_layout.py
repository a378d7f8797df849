"""How diffusers' UNet2DModel and DDPMScheduler lay out DDPM's network, written once for
import_weights (theirs -> ours) and export (ours -> theirs).

* `layer_plan`: every layer of our U-Net with its name in diffusers' state_dict and its scope in
  the DDPM release (TF; pesser/pytorch_diffusion's names are the same with dots): the three share
  one structure, so one table serves all three formats.
* `to_ours` / `to_torch`: source tensors (torch or TF layout) into our parameter tree, and our
  tree into UNet2DModel's state_dict (each the other's exact inverse: transposes only).
* `unet_fields` / `unet_config`: a UNet2DModel config.json as our model fields, and back; each
  refuses in one line, naming the field, what the other side does not compute.
* `scheduler_fields` / `scheduler_config`: a DDPMScheduler config as our diffusion and sampling
  fields, and back (with the betas diffusers computes from it checked against ours).

A class-conditional U-Net maps to UNet2DModel's class embedding (class_embed_type null,
num_class_embeds): both add a learned [classes, 4 ch] table's row to the time embedding after its
MLP, before any res block. Ours has num_classes + 1 rows, the last the null class (no label), so
the export's num_class_embeds is num_classes + 1 and diffusers' class_labels=num_classes draws
unconditionally; an import takes the last row as the null class.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

DIFFUSERS_VERSION = "0.42.1"  # the diffusers this layout was checked against
PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}  # ours: diffusers'


class LayoutError(ValueError):
    """A network or schedule one side cannot express, or tensors that do not fit the layout."""


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


def layer_plan(num_levels: int, num_res_blocks: int, attn_levels, has_shortcut) -> list[tuple]:
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


def pesser_name(tf_scope: str) -> str:
    """The DDPM release's TF scope as pesser/pytorch_diffusion names the module."""
    name = re.sub(r"^(down|up)_(\d+)/", r"\1.\2.", tf_scope)
    name = re.sub(r"\.(block|attn)_(\d+)", r".\1.\2", name)
    return name.replace("temb/dense", "temb.dense.").replace("/", ".")


# diffusers' attention blocks before 0.14 (e.g. google/ddpm-* as uploaded) used these names.
OLD_DIFFUSERS_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value",
                            "to_out.0": "proj_attn"}


def to_ours(tensors: dict, plan, name_of, torch_layout: bool, describe: str) -> dict:
    """Our parameter tree from source `tensors` laid out as `plan` says; every tensor of the
    source must find its place, and every layer of ours its tensors."""
    used = set()

    def fetch(module: str, leaf: str) -> np.ndarray:
        candidates = [f"{module}{leaf}"]
        for new, old in OLD_DIFFUSERS_ATTENTION.items():
            if module.endswith(f".{new}."):
                candidates.append(f"{module[:-len(new) - 1]}{old}.{leaf}")
        for c in candidates:
            if c in tensors:
                used.add(c)
                return np.asarray(tensors[c], np.float32)
        raise LayoutError(f"{describe}: has no tensor {candidates[0]!r}, which DDPM's "
                          "U-Net of this shape needs")

    params: dict = {}
    for ours, src_name, kind in ((o, name_of(tf, hf), k) for o, tf, hf, k in plan):
        sep = "." if torch_layout else "/"
        module = f"{src_name}{sep}"
        if kind == "norm":
            scale, bias = ("weight", "bias") if torch_layout else ("gamma", "beta")
            layer = {"scale": fetch(module, scale), "bias": fetch(module, bias)}
        elif kind == "embed":  # nn.Embedding's [rows, dim] is nn.Embed's
            layer = {"embedding": fetch(module, "weight")}
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
        raise LayoutError(f"{describe}: tensor {unused[0]!r} has no place in DDPM's U-Net "
                          f"({len(unused)} such tensors); not a DDPM model of this layout")
    return params


def to_torch(params, plan) -> dict[str, np.ndarray]:
    """UNet2DModel's state_dict (NumPy, torch layout) from our parameter tree: `to_ours`'s
    inverse, so export then import gives back every parameter bit for bit."""
    tensors, used = {}, 0
    for ours, _, hf, kind in plan:
        layer = params
        for part in ours.split("/"):
            layer = layer[part]
        layer = {k: np.asarray(v, np.float32) for k, v in layer.items()}
        used += len(layer)
        if kind == "norm":
            weight, bias = layer["scale"], layer["bias"]
        elif kind == "embed":
            weight, bias = layer["embedding"], None
        else:
            weight, bias = layer["kernel"], layer["bias"]
            if weight.ndim == 4:  # [kh, kw, in, out] -> [out, in, kh, kw]
                weight = weight.transpose(3, 2, 0, 1)
            elif kind == "dense" and hf.endswith("conv_shortcut"):  # a 1x1 Conv2d in diffusers
                weight = weight.T[:, :, None, None]
            else:  # Linear: [in, out] -> [out, in]
                weight = weight.T
        tensors[f"{hf}.weight"] = np.ascontiguousarray(weight)
        if bias is not None:
            tensors[f"{hf}.bias"] = bias
    total = sum(1 for _ in leaves(params))
    if used != total:
        raise LayoutError(f"{total - used} of our {total} parameters have no place in "
                          "UNet2DModel's layout")
    return tensors


def leaves(tree):
    """The arrays of a nested dict of parameters."""
    if isinstance(tree, dict):
        for v in tree.values():
            yield from leaves(v)
    else:
        yield tree


def diffusers_plan(model: dict, attn_levels) -> list[tuple]:
    """`layer_plan` of a UNet2DModel with our `model` fields, its class embedding included."""
    widths = [model["ch"] * m for m in model["ch_mult"]]
    plan = layer_plan(len(widths), model["num_res_blocks"], attn_levels,
                      lambda kind, i, j: j == 0 and i > 0 and widths[i] != widths[i - 1])
    if model.get("num_classes"):
        plan.insert(3, ("label_emb", None, "class_embedding", "embed"))
    return plan


# ---------------------------------------------------------------------------------------------
# diffusers' configs


# UNet2DModel's defaults (diffusers' unet_2d.py), for configs written before a field existed.
DIFFUSERS_DEFAULTS = dict(
    in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type="positional",
    time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True, mid_block_type="UNetMidBlock2D",
    layers_per_block=2, mid_block_scale_factor=1, downsample_padding=1, downsample_type="conv",
    upsample_type="conv", dropout=0.0, act_fn="silu", attention_head_dim=8, norm_num_groups=32,
    attn_norm_num_groups=None, norm_eps=1e-5, resnet_time_scale_shift="default",
    add_attention=True, class_embed_type=None, num_class_embeds=None,
)
# Fields that must hold these values: anything else computes a function DDPM's U-Net does not.
DIFFUSERS_REQUIRED = dict(
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
    class_embed_type=(None, "our labels index a table added to the time embedding "
                            "(class_embed_type null, with num_class_embeds)"),
    norm_eps=(1e-6, "DDPM's GroupNorm epsilon is 1e-6"),
)


def refuse(describe: str, field: str, value, why: str):
    raise LayoutError(f"{describe}: {field}={value!r} is not supported: {why}")


def unet_fields(cfg: dict, describe: str) -> tuple[dict, dict, list]:
    """(model fields, data fields, attention levels) of a UNet2DModel config.json."""
    if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        refuse(describe, "_class_name", cfg.get("_class_name"), "expected UNet2DModel")
    c = {**DIFFUSERS_DEFAULTS, **cfg}
    for field, (value, why) in DIFFUSERS_REQUIRED.items():
        ok = math.isclose(c[field], value) if isinstance(value, float) else c[field] == value
        if not ok:
            refuse(describe, field, c[field], why)
    if c["act_fn"] not in ("silu", "swish"):
        refuse(describe, "act_fn", c["act_fn"], "DDPM's nonlinearity is swish")
    widths = list(c["block_out_channels"])
    ch = widths[0]
    if any(w % ch for w in widths):
        refuse(describe, "block_out_channels", widths, "each must be a multiple of the first")
    if c["time_embedding_dim"] not in (None, 4 * ch):
        refuse(describe, "time_embedding_dim", c["time_embedding_dim"], f"DDPM's is 4 x {ch}")
    if c["in_channels"] != c["out_channels"] or c["in_channels"] not in (1, 3):
        refuse(describe, "out_channels", c["out_channels"],
               f"expected in_channels={c['in_channels']} channels out, 1 or 3 (a learned "
               "variance doubles them)")
    attn_levels = _attention_levels(c, widths, describe)
    groups = c["norm_num_groups"]
    if c["attn_norm_num_groups"] not in (None, groups):
        refuse(describe, "attn_norm_num_groups", c["attn_norm_num_groups"],
               f"our attention normalises with norm_num_groups={groups}")
    size = _sample_size(c.get("sample_size"), describe)
    side = min(size) if isinstance(size, list) else size  # attention goes by the shorter side
    model = dict(ch=ch, ch_mult=[w // ch for w in widths], num_res_blocks=c["layers_per_block"],
                 attn_resolutions=[side // 2**i for i in attn_levels], dropout=c["dropout"],
                 norm_groups=groups)
    rows = c["num_class_embeds"]
    if rows is not None:
        if not isinstance(rows, int) or rows < 2:
            refuse(describe, "num_class_embeds", rows, "expected the classes and a null class "
                   "(the last row), at least 2")
        model["num_classes"] = rows - 1
    return model, dict(image_size=size, channels=c["in_channels"]), attn_levels


def _attention_levels(c: dict, widths: list, describe: str) -> list[int]:
    """The levels with (single-head) attention, the same on the way down and up."""
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    for field, blocks, kinds in (("down_block_types", down, ("DownBlock2D", "AttnDownBlock2D")),
                                 ("up_block_types", up, ("UpBlock2D", "AttnUpBlock2D"))):
        bad = [b for b in blocks if b not in kinds]
        if bad or len(blocks) != len(widths):
            refuse(describe, field, blocks, f"expected {len(widths)} of {kinds}")
    attn_levels = [i for i, b in enumerate(down) if b == "AttnDownBlock2D"]
    if [len(widths) - 1 - k for k, b in enumerate(up) if b == "AttnUpBlock2D"][::-1] != attn_levels:
        refuse(describe, "up_block_types", up,
               "DDPM has attention on the way up at the levels it has it on the way down")
    head_dim = c["attention_head_dim"]
    for level in [*attn_levels, len(widths) - 1]:  # the middle block too
        if head_dim is not None and widths[level] // head_dim != 1:
            refuse(describe, "attention_head_dim", head_dim,
                   f"{widths[level] // head_dim} heads at {widths[level]} channels; DDPM's "
                   "attention has one head (attention_head_dim null)")
    return attn_levels


def _sample_size(size, describe: str) -> int | list[int]:
    """The image size: an int (square) or [height, width]."""
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or not all(isinstance(s, int) for s in size):
            refuse(describe, "sample_size", size, "expected [height, width]")
        return size[0] if size[0] == size[1] else list(size)
    if not isinstance(size, int):
        refuse(describe, "sample_size", size, "expected the image size")
    return size


def scheduler_fields(s: dict | None, describe: str, image_size: int) -> tuple[dict, dict, str]:
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
        refuse(describe, "trained_betas", "[...]", "only linear and cosine schedules exist here")
    if name == "linear":
        scale = 1000.0 / T  # our linear schedule keeps DDPM's end points for any T
        for field, ours in (("beta_start", scale * 1e-4), ("beta_end", scale * 0.02)):
            if not math.isclose(s.get(field, ours), ours, rel_tol=1e-9):
                refuse(describe, field, s[field], f"our linear schedule has {ours:g} at T={T}")
        schedule = "linear"
    elif name == "squaredcos_cap_v2":
        schedule = "cosine"
    else:
        refuse(describe, "beta_schedule", name, "expected linear or squaredcos_cap_v2")
    prediction = {theirs: ours for ours, theirs in PREDICTION_TYPES.items()}.get(
        s.get("prediction_type", "epsilon"))
    if prediction is None:
        refuse(describe, "prediction_type", s["prediction_type"], "expected epsilon, sample or "
                "v_prediction")
    variance = s.get("variance_type", "fixed_small").removesuffix("_log")
    if variance not in ("fixed_small", "fixed_large"):
        refuse(describe, "variance_type", s["variance_type"], "no learned variances here")
    for field, ok in (("thresholding", not s.get("thresholding", False)),
                      ("rescale_betas_zero_snr", not s.get("rescale_betas_zero_snr", False)),
                      ("clip_sample_range", s.get("clip_sample_range", 1.0) == 1.0)):
        if not ok:
            refuse(describe, field, s[field], "our samplers clip x0 to [-1, 1] or not at all")
    clip = bool(s.get("clip_sample", True))
    return (dict(num_timesteps=T, beta_schedule=schedule, prediction=prediction),
            dict(variance=variance, clip_x0=clip),
            f"scheduler: {schedule} betas, T={T}, {prediction}, {variance}, clip_x0={clip}")

def from_diffusers(cfg: dict, tensors: dict, describe: str) -> tuple[dict, dict, dict]:
    """(model fields, data fields, our params) of a UNet2DModel's config and state_dict."""
    model, data, attn_levels = unet_fields(cfg, f"{describe} config.json")
    plan = diffusers_plan(model, attn_levels)
    return model, data, to_ours(tensors, plan, lambda tf, hf: hf, True, describe)



# ---------------------------------------------------------------------------------------------
# Ours -> diffusers' configs (export)


def unet_config(model: dict, image_size, channels: int) -> dict:
    """The UNet2DModel config.json that computes our U-Net of `model` fields (ch, ch_mult,
    num_res_blocks, attn_resolutions, dropout, norm_groups resolved, num_classes) on images of
    `image_size` (an int or (height, width)) with `channels` channels. Read back by
    `unet_fields`, it gives the same network, or this refuses naming our setting."""
    ch, mult = model["ch"], list(model["ch_mult"])
    if mult[0] != 1:
        raise LayoutError(f"model.ch_mult={tuple(mult)}: not expressible in UNet2DModel, whose "
                          "conv_in and timestep embedding are as wide as its first level "
                          "(block_out_channels[0]); ours are model.ch wide, so ch_mult[0] must "
                          "be 1")
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    levels = [i for i in range(len(mult)) if min(h, w) // 2**i in model["attn_resolutions"]]
    num_classes = model.get("num_classes", 0)
    cfg = {"_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION,
           **{field: value for field, (value, _) in DIFFUSERS_REQUIRED.items()},
           "sample_size": h if h == w else [h, w], "in_channels": channels,
           "out_channels": channels, "time_embedding_dim": None, "act_fn": "silu",
           "block_out_channels": [ch * m for m in mult],
           "down_block_types": ["AttnDownBlock2D" if i in levels else "DownBlock2D"
                                for i in range(len(mult))],
           "up_block_types": ["AttnUpBlock2D" if i in levels else "UpBlock2D"
                              for i in reversed(range(len(mult)))],
           "layers_per_block": model["num_res_blocks"], "dropout": float(model["dropout"]),
           "attention_head_dim": None, "norm_num_groups": model["norm_groups"],
           "attn_norm_num_groups": None,
           "num_class_embeds": num_classes + 1 if num_classes else None,
           "num_train_timesteps": None}  # read by time_embedding_type='learned' only
    back, _, back_levels = unet_fields(cfg, "the exported config.json")
    if back_levels != levels or back.get("num_classes", 0) != num_classes or any(
            back[k] != model[k] for k in ("ch", "ch_mult", "num_res_blocks", "norm_groups")):
        raise LayoutError(f"the exported config.json does not read back as model {model}")
    return cfg


def diffusers_betas(cfg: dict) -> np.ndarray:
    """The betas DDPMScheduler computes from a scheduler config, in float64 (diffusers rounds
    them to float32): torch.linspace for linear, betas_for_alpha_bar for squaredcos_cap_v2."""
    T = cfg["num_train_timesteps"]
    if cfg["beta_schedule"] == "linear":
        return np.linspace(cfg["beta_start"], cfg["beta_end"], T, dtype=np.float64)
    if cfg["beta_schedule"] == "squaredcos_cap_v2":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999)
                         for i in range(T)])
    raise LayoutError(f"beta_schedule={cfg['beta_schedule']!r}: expected linear or "
                      "squaredcos_cap_v2")


def scheduler_config(diffusion: dict, sampling: dict, our_betas: np.ndarray) -> dict:
    """DDPMScheduler's config for our `diffusion` and `sampling` fields; `our_betas` (float64,
    diffusion.beta_schedule's) must be what diffusers computes from it, else this refuses."""
    T, schedule = diffusion["num_timesteps"], diffusion["beta_schedule"]
    names = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
    if schedule not in names:
        raise LayoutError(f"diffusion.beta_schedule={schedule!r}: DDPMScheduler has no such "
                          "schedule")
    scale = 1000.0 / T  # our linear schedule keeps DDPM's end points for any T
    cfg = {"_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
           "num_train_timesteps": T, "beta_start": scale * 1e-4, "beta_end": scale * 0.02,
           "beta_schedule": names[schedule], "trained_betas": None,
           "variance_type": sampling["variance"], "clip_sample": bool(sampling["clip_x0"]),
           "prediction_type": PREDICTION_TYPES[diffusion["prediction"]],
           "thresholding": False, "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0,
           "sample_max_value": 1.0, "timestep_spacing": "leading", "steps_offset": 0,
           "rescale_betas_zero_snr": False}
    if schedule == "cosine":  # not read by squaredcos_cap_v2
        cfg.update(beta_start=0.0001, beta_end=0.02)
    theirs = diffusers_betas(cfg)
    worst = float(np.max(np.abs(theirs - our_betas) / our_betas))
    # 1 - f(t2)/f(t1) cancels: float64 rounding reaches ~1e-13 relative at T = 4000; another
    # formula (e.g. another offset s) is off by more than 1e-4.
    if worst > 1e-9:
        raise LayoutError(f"diffusion.beta_schedule={schedule!r}: diffusers' {names[schedule]} "
                          f"betas differ from ours (relative {worst:.1e}); not exportable")
    return cfg
