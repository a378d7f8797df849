"""Training and sampling throughput: `python -m ddpm_jax.benchmark --config CONFIG.py [...]`.

    python -m ddpm_jax.benchmark --config configs/cifar10.py --config.model.dtype=bfloat16
    python -m ddpm_jax.benchmark --config configs/cifar10.py --config.training.batch_size=16 \
        --repeats=3 --steps=2 --skip_sampling          # a 2-core CPU: minutes, not hours

Measures the jitted training step exactly as `train.train_and_evaluate` runs it (same shardings,
donated state) on a batch already on device, so the figure is the step's and not the input
pipeline's (see benchmarks/bench_input_pipeline.py for that). Reports images/s, model FLOPs per
image from XLA's cost analysis of the compiled step, achieved TFLOP/s and MFU, peak device memory,
XLA's planned per-device buffer sizes (`compiled_temp_bytes`: activations and gradients, the
figure training.grad_accum_steps lowers; known on CPU too), trace/compile time, and the images/s
of every sampler (solvers.SAMPLERS). Every timing is the median of `--repeats` repeats after a
warm-up, read after `jax.block_until_ready`. `--compile_only` stops after the compiled figures:

    python -m ddpm_jax.benchmark --config configs/cifar10.py --compile_only \
        --config.training.grad_accum_steps=4

`--skip_training --samplers=ddim` times one sampler alone (network evaluations per second are
`ddim_sample_images_per_s` x `ddim_sample_steps`), as benchmarks/compare_peer_cpu.sh does.

Prints a table, then ONE line of JSON (the last line of stdout) for scripts to parse.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

# Config files import their base as `from configs import default` (as in ddpm_jax/main.py).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    from ddpm_jax import hugepages, quiet

    hugepages.reexec_with_hugepages()  # first: glibc reads it at start-up (see hugepages.py)
    quiet.silence_tensorflow()  # before anything imports TensorFlow (see quiet.py)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from ddpm_jax import (  # noqa: E402
    config_renames,
    data,
    diffusion,
    sampling,
    sharding,
    solvers,
    train,
    unet,
    validate,
)

# Dense bf16 peak TFLOP/s per chip (vendor figures), matched as substrings of device_kind.
# Order matters: the first match wins ("TPU v5 lite" before "TPU v5").
PEAK_TFLOPS_BY_KIND: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("TPU v6 lite", 918.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v5", 459.0),  # v5p
    ("TPU v4", 275.0),
    ("TPU v3", 123.0),
)

# On a CPU a sampler call at 1000 (ancestral) or 100 (DDIM) steps takes minutes.
CPU_SAMPLING_TIMESTEPS = 10
CPU_SAMPLE_IMAGES = 8


@dataclasses.dataclass(frozen=True)
class Options:
    """What to measure and how long; the command-line flags of the same names."""

    repeats: int = 5
    steps: int = 10  # training steps per timed repeat (rounded up to whole steps_per_call calls)
    warmup: int = 1  # untimed calls after compilation
    peak_tflops: float | None = None  # per device; None: from PEAK_TFLOPS_BY_KIND
    sample_images: int | None = None  # None: a few on CPU, a full sampling batch elsewhere
    sampling_timesteps: int | None = None  # None: few on CPU, the config's num_steps elsewhere
    skip_sampling: bool = False
    skip_training: bool = False  # time the samplers only, on freshly initialised parameters
    samplers: tuple[str, ...] = ()  # () : every sampler in solvers.SAMPLERS
    compile_only: bool = False  # compile and report XLA's memory analysis; run nothing


class RecompileError(RuntimeError):
    """The training step compiled (or traced) more than once during the benchmark."""


def default_peak_tflops(device_kind: str) -> float | None:
    """Peak dense bf16 TFLOP/s of one device of this kind, or None (CPU, unknown kinds)."""
    for key, peak in PEAK_TFLOPS_BY_KIND:
        if key.lower() in device_kind.lower():
            return peak
    return None


def cost_flops(compiled: Any) -> float | None:
    """FLOPs of one device's program from XLA's cost analysis, or None where it has none.

    jax 0.10 returns a dict; older versions returned a list with one dict per program.
    """
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # some backends raise instead of returning nothing
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def peak_memory_bytes(devices: list) -> int | None:
    """Largest `peak_bytes_in_use` over the devices; None without memory_stats (CPU)."""
    peaks = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def compiled_memory_bytes(compiled: Any) -> dict[str, int | None]:
    """Per-device buffer sizes XLA planned for the compiled step: temporaries (activations kept
    for the backward pass, gradients), arguments, outputs. Known without running, on any backend
    (CPU included), so it compares settings such as training.grad_accum_steps anywhere."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # some backends raise instead of returning nothing
        m = None
    names = ("temp", "argument", "output")
    return {f"compiled_{n}_bytes": (int(getattr(m, f"{n}_size_in_bytes")) if m else None)
            for n in names}


def median_seconds(run_once: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    """Median wall time of `run_once` (which must block until its work is done) over repeats."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_once()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def jit_cache_size(jitted: Any) -> int | None:
    """Entries in a jitted function's executable cache (a private jax API, hence the guard)."""
    size = getattr(jitted, "_cache_size", None)
    return int(size()) if callable(size) else None


def make_train_step(config: ml_collections.ConfigDict, model: unet.UNet, tx, mesh,
                    state_sharding) -> tuple[Callable, list, Callable]:
    """(the step jitted as train_and_evaluate jits it, a list that grows once per trace of it,
    the unjitted step)."""
    sched = diffusion.make_schedule(config.diffusion.beta_schedule, config.diffusion.num_timesteps)
    body = functools.partial(train.train_steps, model=model, tx=tx, sched=sched, config=config)
    step, traces = train.count_traces(body)
    return train.jit_train_steps(step, mesh, state_sharding), traces, body


def fake_batches(mesh, steps_per_call: int, batch_size: int, shape: tuple,
                 num_classes: int = 0) -> jax.Array | dict[str, jax.Array]:
    """Random uint8 images [K, B, H, W, C] (and labels [K, B] for a class-conditional model),
    sharded on the batch axis and already on device."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (steps_per_call, batch_size, *shape), np.uint8)
    if num_classes:
        labels = rng.integers(0, num_classes, (steps_per_call, batch_size), np.int32)
        images = {"image": images, "label": labels}
    return jax.device_put(images, sharding.batch(mesh, leading_dims=1))


def _one_label(model: unet.UNet) -> dict:
    """The label argument of a one-image network call: none for an unconditional model."""
    return {"label_B": jax.ShapeDtypeStruct((1,), jnp.int32)} if model.num_classes else {}


def train_flops_per_image(body: Callable, state, batches: jax.Array, rng, compiled,
                          num_devices: int, grad_accum_steps: int = 1) -> float | None:
    """Model FLOPs of one training step per image, from XLA's cost analysis.

    The compiled program is one device's share of the step, so its count is divided by that
    device's share of the batch. XLA counts a while loop's body once whatever its trip count, so
    with steps_per_call > 1 (a lax.scan) the count comes from a one-step program instead, and
    with grad_accum_steps > 1 it covers one micro-batch (the optimizer update, counted once,
    is small next to the network).
    """
    K, B = jax.tree.leaves(batches)[0].shape[:2]  # images, or images and labels
    per_device_batch = B // num_devices // grad_accum_steps
    if K == 1:
        flops = cost_flops(compiled)
    else:
        one = jax.tree.map(lambda b: jax.ShapeDtypeStruct((1, *b.shape[1:]), b.dtype,
                                                          sharding=b.sharding), batches)
        # Its own jit of the uncounted step: the timed step keeps one trace and one cache entry.
        flops = cost_flops(jax.jit(body).lower(state, one, rng).compile())
    return flops / per_device_batch if flops else None


def forward_flops_per_image(model: unet.UNet, params, shape: tuple) -> float | None:
    """FLOPs of one network evaluation (what a sampler pays per step) for one image."""
    x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    apply = jax.jit(functools.partial(model.apply, train=False))
    return cost_flops(apply.lower({"params": params}, x, t, **_one_label(model)).compile())


def _sub_jaxprs(value):
    """The jaxprs inside an equation's parameter (pjit, remat, custom_vjp, cond branches...)."""
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):  # a ClosedJaxpr
        yield value.jaxpr
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _sub_jaxprs(v)


def matmul_flops(jaxpr) -> int:
    """2 x multiply-adds of every convolution and dot in `jaxpr`, nested ones included (a scan's
    body times its length): the convention of torch.utils.flop_counter, so that FLOP-normalised
    figures compare with PyTorch's. It counts a padded convolution's full window, where XLA's
    cost analysis counts only the products inside the image and adds the elementwise work."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            kernel = eqn.invars[1].aval.shape
            spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, spatial...)
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * kernel[spec[1]] * math.prod(
                kernel[i] for i in spec[2:])
        elif name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
        times = eqn.params.get("length", 1) if name == "scan" else 1
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                total += times * matmul_flops(sub)
    return total


def forward_matmul_flops_per_image(model: unet.UNet, params, shape: tuple) -> float:
    """`matmul_flops` of one network evaluation for one image (attention traced as XLA einsums,
    which a cuDNN kernel would hide)."""
    x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    xla_model = model.clone(attention_impl="xla")
    label = _one_label(model)
    jaxpr = jax.make_jaxpr(lambda p, x, t, kw: xla_model.apply({"params": p}, x, t, **kw))(
        params, x, t, label)
    return float(matmul_flops(jaxpr.jaxpr))


def initial_state(config: ml_collections.ConfigDict, mesh, model, tx):
    """(the training state as training initialises it, replicated; its sharding; the step key)."""
    shape = data.image_shape(config.data)
    init_fn = functools.partial(train.init_state, model=model, tx=tx, image_shape=shape)
    init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
    state_sharding = sharding.replicated(mesh, jax.eval_shape(init_fn, init_rng))
    return jax.jit(init_fn, out_shardings=state_sharding)(init_rng), state_sharding, train_rng


def bench_train(config: ml_collections.ConfigDict, mesh, opts: Options) -> tuple[dict, Any]:
    """Times the training step; returns its figures and the final state (for the samplers)."""
    model = unet.from_config(config)
    tx = train.make_optimizer(config)
    shape, n_dev = data.image_shape(config.data), mesh.devices.size
    state, state_sharding, train_rng = initial_state(config, mesh, model, tx)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))

    K, B = config.training.steps_per_call, config.training.batch_size
    batches = fake_batches(mesh, K, B, shape, config.model.num_classes)
    jitted, traces, body = make_train_step(config, model, tx, mesh, state_sharding)

    t0 = time.perf_counter()
    lowered = jitted.lower(state, batches, train_rng)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    flops_img = train_flops_per_image(body, state, batches, train_rng, compiled, n_dev,
                                      config.training.grad_accum_steps)
    compiled_figures = {
        "params": int(num_params),
        "flops_per_image": flops_img,
        **compiled_memory_bytes(compiled),
        "lower_s": t1 - t0,
        "compile_s": t2 - t1,
    }
    if opts.compile_only:
        return compiled_figures, state

    # The calls below reuse the executable compiled above (jax caches the lowering and the
    # compilation), which the trace count and cache size checked at the end confirm.
    holder = {"state": state}

    def run_calls(num_calls: int) -> None:
        s = holder["state"]
        for _ in range(num_calls):
            s, metrics = jitted(s, batches, train_rng)
        holder["state"] = jax.block_until_ready(s)
        jax.block_until_ready(metrics)

    t3 = time.perf_counter()
    run_calls(max(opts.warmup, 1))
    first_calls_s = time.perf_counter() - t3
    calls = max(1, math.ceil(opts.steps / K))
    median_s, times = median_seconds(functools.partial(run_calls, calls), opts.repeats)

    step_s = median_s / (calls * K)
    images_per_s = B / step_s
    result = {
        **compiled_figures,
        "train_images_per_s": images_per_s,
        "train_step_s": step_s,
        "train_repeat_s": times,
        "train_steps_per_repeat": calls * K,
        # `state` was donated to the first call: its arrays are gone, the current ones are here.
        "forward_flops_per_image": forward_flops_per_image(model, holder["state"].params, shape),
        "forward_matmul_flops_per_image": forward_matmul_flops_per_image(
            model, holder["state"].params, shape),
        "achieved_tflops": flops_img * images_per_s / 1e12 if flops_img else None,
        "peak_memory_bytes": peak_memory_bytes(mesh.devices.flat),
        "warmup_s": first_calls_s,
        "compile_count": jit_cache_size(jitted),
        "trace_count": len(traces),
    }
    return result, holder["state"]


def sampler_settings(config: ml_collections.ConfigDict, sampler: str, num_steps: int | None
                     ) -> tuple[ml_collections.ConfigDict, int]:
    """(sampling config, network evaluations per image) for one sampler at `num_steps` (None:
    the config's). A step costs the same whichever step it is, so images/s scale as
    1 / evaluations."""
    s = ml_collections.ConfigDict(config.sampling.to_dict())
    s.sampler = sampler
    T = config.diffusion.num_timesteps
    s.num_steps = min(num_steps or s.num_steps or T, T)
    return s, solvers.num_evaluations(sampler, s.num_steps)


def bench_sampler(config: ml_collections.ConfigDict, mesh, params, sampler: str,
                  num_images: int, timesteps: int | None, repeats: int) -> dict:
    """Images/s of one sampler (median of repeats after a compiling call), one call per draw."""
    s, evals = sampler_settings(config, sampler, timesteps)
    s.per_device_batch = num_images // mesh.devices.size  # the whole draw in one jitted call
    d = config.diffusion
    sched = diffusion.make_schedule(d.beta_schedule, d.num_timesteps)
    draw = sampling.make_sampler(unet.from_config(config), sched, s, d.prediction,
                                 data.image_shape(config.data), mesh)
    rng = jax.random.key(config.seed)
    t0 = time.perf_counter()
    draw(params, rng, num_images)  # returns a host array: already synchronised
    first_s = time.perf_counter() - t0
    median_s, _ = median_seconds(lambda: draw(params, rng, num_images), repeats)
    _, config_evals = sampler_settings(config, sampler, None)
    return {
        f"{sampler}_sample_steps": evals,
        f"{sampler}_sample_images_per_s": num_images / median_s,
        # What the config's own step count (e.g. T = 1000) would give, from the per-step rate.
        f"{sampler}_sample_images_per_s_at_config_steps": num_images / median_s * evals
        / config_evals,
        f"{sampler}_sample_config_steps": config_evals,
        f"{sampler}_sample_first_call_s": first_s,
    }


def run(config: ml_collections.ConfigDict, opts: Options) -> dict:
    """Benchmark `config` on all devices; returns the flat dict printed as the JSON line."""
    validate.check_config(config, jax.device_count())
    mesh = sharding.make_mesh()
    devices = list(mesh.devices.flat)
    kind, n_dev = devices[0].device_kind, len(devices)
    on_cpu = devices[0].platform == "cpu"
    if warning := validate.slow_on_platform(config, devices[0].platform):
        print(f"warning: {warning}", file=sys.stderr)
    peak = opts.peak_tflops if opts.peak_tflops is not None else default_peak_tflops(kind)

    result: dict[str, Any] = {
        "benchmark": "ddpm_jax",
        "jax_version": jax.__version__,
        "platform": devices[0].platform,
        "device_kind": kind,
        "device_count": n_dev,
        "batch_size": config.training.batch_size,
        "steps_per_call": config.training.steps_per_call,
        "grad_accum_steps": config.training.grad_accum_steps,
        "image_size": config.data.image_size,
        "dtype": config.model.dtype,
        "attention_impl": config.model.attention_impl,
        "remat": config.model.remat,
        # glibc.malloc.hugetlb=1 is worth ~14% of a CPU step (hugepages.py): say whether it was on.
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }
    if opts.skip_training and not opts.compile_only:
        state, _, _ = initial_state(config, mesh, unet.from_config(config),
                                    train.make_optimizer(config))
        result["params"] = int(sum(x.size for x in jax.tree.leaves(state.params)))
    else:
        train_result, state = bench_train(config, mesh, opts)
        result.update(train_result)
        achieved = result.get("achieved_tflops")
        result["peak_tflops_per_device"] = peak
        result["mfu"] = achieved / (peak * n_dev) if achieved and peak else None

    if not (opts.skip_sampling or opts.compile_only):
        per_dev = opts.sample_images or (
            CPU_SAMPLE_IMAGES if on_cpu else config.sampling.per_device_batch * n_dev)
        num_images = -(-per_dev // n_dev) * n_dev  # a whole number of images per device
        timesteps = opts.sampling_timesteps or (CPU_SAMPLING_TIMESTEPS if on_cpu else None)
        result["sample_images"] = num_images
        for sampler in opts.samplers or sampling.SAMPLERS:
            result.update(bench_sampler(config, mesh, state.ema_params, sampler, num_images,
                                        timesteps, opts.repeats))
    result["repeats"] = opts.repeats
    return result


def check_compiled_once(result: dict) -> None:
    """The step must trace and compile once: a second entry means a shape/sharding/dtype drift."""
    counts = (result.get("compile_count"), result.get("trace_count"))
    if any(c is not None and c != 1 for c in counts):
        raise RecompileError(
            f"the training step compiled {counts[0]} and traced {counts[1]} times (expected 1)")


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def format_table(result: dict) -> str:
    """Human-readable two-column table, with FLOPs in GFLOPs and memory in GiB."""
    shown = dict(result)
    for key in ("flops_per_image", "forward_flops_per_image", "forward_matmul_flops_per_image"):
        if shown.get(key):
            shown[key.replace("flops", "gflops")] = shown.pop(key) / 1e9
    if shown.get("peak_memory_bytes"):
        shown["peak_memory_gib"] = shown.pop("peak_memory_bytes") / 2**30
    shown["params_M"] = shown.pop("params") / 1e6
    width = max(len(k) for k in shown)
    return "\n".join(f"{k:<{width}}  {_fmt(v)}" for k, v in shown.items())


def to_json_line(result: dict) -> str:
    """One line of strict JSON (no NaN/Infinity: non-finite floats become null)."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
             for k, v in result.items()}
    return json.dumps(clean, allow_nan=False)


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
flags.DEFINE_float("peak_tflops", None,
                   "Peak TFLOP/s per device for MFU. Default: dense bf16 peak by device kind "
                   "(H100/H200 989, A100 312, TPU v5e 197, v4 275, v3 123); none on CPU.")
flags.DEFINE_integer("repeats", 5, "Timed repeats; the median is reported.")
flags.DEFINE_integer("steps", 10, "Training steps per timed repeat.")
flags.DEFINE_integer("warmup", 1, "Untimed training calls after compilation.")
flags.DEFINE_integer("sample_images", None,
                     f"Images per sampler call. Default: {CPU_SAMPLE_IMAGES} on CPU, else "
                     "sampling.per_device_batch per device.")
flags.DEFINE_integer("sampling_timesteps", None,
                     f"Every sampler's sampling.num_steps (network evaluations per sample; Heun "
                     f"rounds down to odd). Default: {CPU_SAMPLING_TIMESTEPS} on CPU, else the "
                     "config's.")
flags.DEFINE_bool("skip_sampling", False, "Time the training step only.")
flags.DEFINE_bool("skip_training", False,
                  "Time the samplers only (on freshly initialised parameters: the same cost).")
flags.DEFINE_list("samplers", [], f"Samplers to time; default all ({', '.join(solvers.SAMPLERS)}).")
flags.DEFINE_bool("compile_only", False,
                  "Compile the training step and report XLA's memory analysis and FLOPs; run "
                  "nothing (seconds where a CPU step takes minutes).")
flags.mark_flags_as_required(["config"])


def report(result: dict) -> None:
    """The table, then the JSON line last (what scripts read)."""
    print(format_table(result))
    print(to_json_line(result), flush=True)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if unknown := [s for s in FLAGS.samplers if s not in solvers.SAMPLERS]:
        raise app.UsageError(f"--samplers: unknown {', '.join(unknown)} (known: "
                             f"{', '.join(solvers.SAMPLERS)})")
    opts = Options(repeats=FLAGS.repeats, steps=FLAGS.steps, warmup=FLAGS.warmup,
                   peak_tflops=FLAGS.peak_tflops, sample_images=FLAGS.sample_images,
                   sampling_timesteps=FLAGS.sampling_timesteps, skip_sampling=FLAGS.skip_sampling,
                   skip_training=FLAGS.skip_training, samplers=tuple(FLAGS.samplers),
                   compile_only=FLAGS.compile_only)
    try:
        result = run(config_renames.rename_keys(FLAGS.config), opts)
    except validate.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    report(result)
    check_compiled_once(result)


if __name__ == "__main__":
    # Old config key names, renamed where config_flags reads its overrides: sys.argv.
    sys.argv = config_renames.rename_overrides(sys.argv)
    app.run(main)
