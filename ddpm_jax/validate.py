"""Config and work-directory checks that run before any data loading or compilation.

Every failure is a `ConfigError` whose one-line message names the offending key or path.
"""

from __future__ import annotations

import os
import re
import tempfile

import ml_collections

from ddpm_jax import data, diffusion, solvers, unet

EDIT_MODES = ("inpaint", "interpolate", "img2img")  # --mode= values of editing.py


class ConfigError(ValueError):
    """A config value or work directory that cannot work."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(config, key: str, allowed) -> None:
    value = config
    for part in key.split("."):
        value = value[part]
    _require(value in allowed, f"{key}={value!r}: expected one of {tuple(allowed)}")


def _positive_int(config, key: str) -> int:
    value = config
    for part in key.split("."):
        value = value[part]
    _require(isinstance(value, int) and value > 0, f"{key}={value!r}: expected a positive integer")
    return value


def check_config(config: ml_collections.ConfigDict, num_devices: int,
                 num_processes: int = 1) -> None:
    d, m, t = config.data, config.model, config.training
    _one_of(config, "data.source", data.SOURCES)
    _require(d.source != "folder" or bool(d.path),
             "data.path is empty: data.source='folder' needs --config.data.path=/your/images")
    _one_of(config, "data.resize", data.RESIZE_POLICIES)
    try:
        size = data.image_hw(d.image_size)
    except data.InputError as e:
        raise ConfigError(str(e)) from None
    size = d.image_size if isinstance(d.image_size, int) else size
    _one_of(config, "data.channels", data.CHANNELS)

    _positive_int(config, "model.ch")
    _require(isinstance(m.norm_groups, int) and m.norm_groups >= 0,
             f"model.norm_groups={m.norm_groups!r}: expected 0 (automatic) or a positive integer")
    groups = unet.norm_groups(m)
    # Every layer's width is ch times an integer (skip concatenations are sums of such widths).
    _require(m.ch % groups == 0,
             f"model.ch={m.ch} is not divisible by the {groups} GroupNorm groups (model.norm_groups"
             f"={m.norm_groups}{'; 0 means min(32, ch // 4)' if not m.norm_groups else ''})")
    _require(len(m.ch_mult) > 0 and all(isinstance(x, int) and x > 0 for x in m.ch_mult),
             f"model.ch_mult={tuple(m.ch_mult)!r}: expected positive integers")
    try:
        unet.check_image_size(size, m.ch_mult)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _require(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout}: expected 0 <= dropout < 1")
    _one_of(config, "model.dtype", ("float32", "bfloat16", "float16"))
    _one_of(config, "model.attention_impl", ("auto", "xla", "cudnn"))
    check_labels(config)

    T = _positive_int(config, "diffusion.num_timesteps")
    _require(T >= 2, f"diffusion.num_timesteps={T}: need at least 2")
    _one_of(config, "diffusion.beta_schedule", diffusion.BETA_SCHEDULES)
    _one_of(config, "diffusion.prediction", diffusion.PREDICTIONS)
    _require(config.diffusion.min_snr_gamma >= 0,
             f"diffusion.min_snr_gamma={config.diffusion.min_snr_gamma}: expected >= 0")

    _require(config.optim.learning_rate > 0, "optim.learning_rate must be positive")
    batch = _positive_int(config, "training.batch_size")
    _require(batch % num_devices == 0,
             f"training.batch_size={batch} is not divisible by the {num_devices} devices")
    _require(batch % num_processes == 0,
             f"training.batch_size={batch} is not divisible by the {num_processes} processes")
    accum = _positive_int(config, "training.grad_accum_steps")
    _require(batch % (accum * num_devices) == 0,
             f"training.grad_accum_steps={accum}: training.batch_size={batch} does not split into "
             f"{accum} micro-batches divisible by the {num_devices} devices")
    _positive_int(config, "training.num_train_steps")
    k = _positive_int(config, "training.steps_per_call")
    for key in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps",
                "sample_every_steps"):
        every = _positive_int(config, f"training.{key}")
        _require(every % k == 0,
                 f"training.{key}={every} is not a multiple of training.steps_per_call={k}")
    _require(0.0 <= t.ema_decay < 1.0, f"training.ema_decay={t.ema_decay}: expected [0, 1)")
    _positive_int(config, "training.keep_checkpoints")
    _positive_int(config, "training.num_grid_samples")
    _positive_int(config, "training.max_nonfinite_steps")

    check_sampling(config)
    _positive_int(config, "sampling.num_samples")
    _positive_int(config, "sampling.per_device_batch")


def check_labels(config: ml_collections.ConfigDict) -> None:
    """A class-conditional model's settings, and labels its data source can give."""
    d, m = config.data, config.model
    k = m.num_classes
    _require(isinstance(k, int) and not isinstance(k, bool) and k >= 0,
             f"model.num_classes={k!r}: expected 0 (unconditional) or a number of classes")
    _require(0.0 <= m.label_dropout < 1.0,
             f"model.label_dropout={m.label_dropout}: expected 0 <= label_dropout < 1")
    _one_of(config, "data.labels", data.LABEL_SOURCES)
    _require(not d.labels or d.source == "folder",
             f"data.labels={d.labels!r} is for data.source='folder' (tfds labels come from "
             "data.label_key)")
    if k:
        _require(d.source != "embedded", f"model.num_classes={k}: data.source='embedded' has no "
                 "labels; use a folder (--config.data.labels=subdirs) or tfds")
        _require(d.source != "folder" or d.labels == "subdirs",
                 f"model.num_classes={k} needs labels: add --config.data.labels=subdirs (one "
                 "class per top-level sub-directory of data.path)")


def check_sampling(config: ml_collections.ConfigDict) -> None:
    """The sampler settings (also checked by --mode=eval before it loads anything)."""
    s, T = config.sampling, config.diffusion.num_timesteps
    _one_of(config, "sampling.sampler", solvers.SAMPLERS)
    _one_of(config, "sampling.spacing", ("auto",) + solvers.SPACINGS)
    _one_of(config, "sampling.variance", diffusion.VARIANCES)
    steps = s.num_steps
    _require(isinstance(steps, int) and not isinstance(steps, bool) and 0 <= steps <= T,
             f"sampling.num_steps={steps!r}: expected 0 (all T) to diffusion.num_timesteps={T}")
    _require(s.sampler != "ddpm" or steps != 1,
             "sampling.num_steps=1: the ancestral sampler needs at least 2 steps")
    _require(0.0 <= s.eta <= 1.0, f"sampling.eta={s.eta}: expected 0 <= eta <= 1")
    k, label, w = config.model.num_classes, s.label, s.guidance_scale
    if not k:
        _require(label == -1, f"sampling.label={label}: the model is unconditional "
                 "(model.num_classes=0)")
        _require(w == 1.0, f"sampling.guidance_scale={w}: guidance needs a class-conditional "
                 "model (model.num_classes > 0)")
        return
    _require(isinstance(label, int) and -1 <= label < k,
             f"sampling.label={label!r}: expected a class in [0, model.num_classes={k}) or -1 "
             "(all classes in turn)")
    _require(w >= 0, f"sampling.guidance_scale={w}: expected >= 0 (0: unconditional, 1: "
             "conditional, > 1: guided)")
    _require(w == 1.0 or config.model.label_dropout > 0,
             f"sampling.guidance_scale={w} needs the unconditional model, which "
             "model.label_dropout=0 never trains; use guidance_scale=1")


def check_edit(config: ml_collections.ConfigDict, mode: str) -> None:
    """The settings of an editing mode (`config.edit`, with the sampler's)."""
    check_sampling(config)
    _positive_int(config, "sampling.per_device_batch")
    e, s = config.edit, config.sampling
    if mode in ("inpaint", "img2img"):
        _require(bool(e.images), f"edit.images is empty: --mode={mode} needs "
                 "--config.edit.images=IMAGE_OR_FOLDER")
    if mode == "inpaint":
        _require(bool(e.masks), "edit.masks is empty: --mode=inpaint needs --config.edit.masks="
                 "MASK_OR_FOLDER (white where the model draws)")
        _require(s.sampler in ("ddpm", "ddim"), f"sampling.sampler={s.sampler!r}: inpainting "
                 "takes 'ddpm' or 'ddim'")
        length, repeats = _positive_int(config, "edit.jump_length"), _positive_int(
            config, "edit.jump_n_sample")
        _require(length == 1 or repeats > 1, f"edit.jump_length={length} has no effect with "
                 "edit.jump_n_sample=1 (RePaint resamples each stretch jump_n_sample times)")
        steps = s.num_steps or config.diffusion.num_timesteps
        _require(repeats == 1 or length < steps, f"edit.jump_length={length}: expected fewer "
                 f"than the sampler's {steps} steps")
    elif mode == "img2img":
        _require(isinstance(e.strength, (int, float)) and 0.0 <= e.strength <= 1.0,
                 f"edit.strength={e.strength!r}: expected 0 (the input) to 1 (pure noise)")
    elif mode == "interpolate":
        k = e.num_frames
        _require(isinstance(k, int) and not isinstance(k, bool) and k >= 2,
                 f"edit.num_frames={k!r}: expected an integer >= 2 (both ends included)")
        seeds = tuple(e.seeds)
        _require(bool(e.images) or (len(seeds) >= 2 and len(seeds) % 2 == 0 and all(
            isinstance(x, int) for x in seeds)), f"edit.seeds={seeds!r}: expected pairs of "
            "integer seeds (a, b, c, d: a to b, c to d), or --config.edit.images")
    else:
        raise ConfigError(f"--mode={mode}: expected one of {EDIT_MODES}")


def slow_on_platform(config: ml_collections.ConfigDict, platform: str) -> str | None:
    """A warning for settings that run but are much slower on `platform` ("cpu", "gpu", "tpu")."""
    k = config.training.steps_per_call
    if platform == "cpu" and k > 1:
        # XLA:CPU canonicalises convolutions for its Eigen kernels only outside loops, so the
        # gradient convolutions inside the scan fall back to naive loops (jax-ml/jax#12868):
        # about 40x slower for DDPM's network on jax 0.10.2. K > 1 saves dispatches, which cost
        # nothing next to a CPU step.
        return (f"training.steps_per_call={k} on CPU: XLA:CPU runs convolution gradients inside "
                "the fused lax.scan tens of times slower (jax-ml/jax#12868); use 1 on CPU")
    accum = config.training.grad_accum_steps
    if platform == "cpu" and accum > 1:
        # The same XLA:CPU loop-body slowdown: the micro-batches run in a lax.scan.
        return (f"training.grad_accum_steps={accum} on CPU: the micro-batches run in a lax.scan, "
                "where XLA:CPU runs convolution gradients much slower (jax-ml/jax#12868); use it "
                "on CPU only when memory requires it")
    return None


def require_local(workdir: str) -> None:
    """Refuse URLs such as gs://b/run, which os.makedirs would make as a local ./gs:/b/run."""
    _require(bool(workdir), "--workdir is required")
    _require(not re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", workdir),
             f"--workdir={workdir}: URLs are not supported (the work directory is written with "
             "ordinary file APIs); mount the bucket, e.g. with gcsfuse (launch/README.md), and "
             "pass the mounted path")


def check_workdir(workdir: str) -> None:
    """Create `workdir` if needed and make sure files can be written there."""
    require_local(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir):
            pass
    except OSError as e:
        raise ConfigError(f"--workdir={workdir}: cannot write there ({e.strerror})") from None


def flat_hparams(config: ml_collections.ConfigDict) -> dict:
    """The config as flat {'group.key': scalar} for TensorBoard's hparams tab."""
    out = {}

    def walk(prefix, node):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, (dict, ml_collections.ConfigDict)):
                walk(f"{name}.", value)
            else:
                out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", config)
    return out
