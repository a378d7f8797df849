"""Training state, the pure training step, and the training loop."""

from __future__ import annotations

import functools
import inspect
import logging
import signal
import threading
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from ddpm_jax import (
    checkpoint,
    data,
    diffusion,
    progress,
    sampling,
    sharding,
    unet,
    validate,
)

PyTree = Any
# The label-dropout key is fold_in(step key, this), not a fifth split of the step key: a split into
# five would change the four existing keys, and with them every unconditional run.
_LABEL_DROPOUT_STREAM = 1


class NonFiniteError(RuntimeError):
    """Training produced too many non-finite steps in a row."""


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # int32 scalar: steps taken (the next step's index)
    params: PyTree
    ema_params: PyTree
    opt_state: optax.OptState
    nonfinite_streak: jax.Array  # int32: non-finite steps in a row, ending at `step`
    nonfinite_total: jax.Array  # int32: all skipped steps since the start of training


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """DDPM's recipe: Adam with a linear warm-up and global-norm gradient clipping."""
    o = config.optim
    return optax.chain(
        optax.clip_by_global_norm(o.grad_clip),
        optax.adam(learning_rate_schedule(config), b1=o.b1, b2=o.b2, eps=o.eps),
    )


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    o = config.optim
    return optax.linear_schedule(0.0, o.learning_rate, max(o.warmup_steps, 1))


def ema_decay(step: jax.Array, config: ml_collections.ConfigDict) -> jax.Array:
    """EMA decay at `step`; the warm-up keeps early EMA weights from remembering the init."""
    decay = jnp.asarray(config.training.ema_decay, jnp.float32)
    if config.training.ema_warmup:
        step = step.astype(jnp.float32)
        decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return decay


def jit_train_steps(steps_fn, mesh, state_sharding):
    """`steps_fn(state, batches [K, B, ...], rng) -> (state, metrics)` jitted as training runs it
    (and the benchmark times it): batches sharded on 'data', the state replicated and donated."""
    return jax.jit(
        steps_fn,
        in_shardings=(state_sharding, sharding.batch(mesh, leading_dims=1), sharding.rep(mesh)),
        out_shardings=(state_sharding, sharding.rep(mesh)),
        donate_argnums=0,
    )


def count_traces(fn):
    """(`fn` for jax.jit, a list that gets one entry each time jax traces it).

    An entry is the abstract inputs of that trace, {argument path: "dtype[shape]"}. The append is
    a Python side effect, so it runs only while jax traces: a step that should compile once can
    be checked at the cost of a `len` per call.
    """
    traces: list[dict[str, str]] = []
    names = list(inspect.signature(fn).parameters)

    def describe(path, x) -> tuple[str, str]:
        arg, rest = path[0].idx, jax.tree_util.keystr(path[1:])
        aval = jax.typeof(x)
        # str_short gives "float32[8,32]"; plain str() where a jax version lacks it.
        text = aval.str_short() if hasattr(aval, "str_short") else str(aval)
        return (names[arg] if arg < len(names) else f"arg{arg}") + rest, (
            text + (" (weak type)" if getattr(aval, "weak_type", False) else ""))

    @functools.wraps(fn)
    def traced(*args):
        traces.append(dict(describe(p, x) for p, x in
                           jax.tree_util.tree_flatten_with_path(args)[0]))
        return fn(*args)

    return traced, traces


def describe_retrace(first: dict[str, str], latest: dict[str, str]) -> str:
    """The inputs that differ between two traces' entries, for the warning a retrace gets."""
    changed = [f"{k}: {first.get(k, 'absent')} -> {latest.get(k, 'absent')}"
               for k in sorted(first.keys() | latest.keys()) if first.get(k) != latest.get(k)]
    return "; ".join(changed[:3]) + (f" (and {len(changed) - 3} more)" if len(changed) > 3 else "")


def init_state(rng: jax.Array, model: unet.UNet, tx, image_shape: tuple) -> TrainState:
    params = unet.init_params(model, rng, image_shape)
    # A real copy: the step donates the state, and one buffer cannot be donated twice.
    ema_params = jax.tree.map(jnp.copy, params)
    zero = jnp.zeros((), jnp.int32)
    return TrainState(zero, params, ema_params, tx.init(params), zero, zero)


def split_batch(batch) -> tuple[jax.Array, jax.Array | None]:
    """(images, labels or None) of a batch: images alone, or {'image': ..., 'label': ...}."""
    if isinstance(batch, dict):
        return batch["image"], batch["label"]
    return batch, None


def drop_labels(label_B: jax.Array, rng: jax.Array, rate: float, num_classes: int) -> jax.Array:
    """Each label replaced by the null class `num_classes` with probability `rate`, drawn at the
    global batch shape (independent of sharding): classifier-free guidance's joint training."""
    return jnp.where(jax.random.bernoulli(rng, rate, label_B.shape), num_classes, label_B)


def train_step(
    state: TrainState,
    batch: jax.Array | dict[str, jax.Array],
    rng: jax.Array,
    *,
    model: unet.UNet,
    tx: optax.GradientTransformation,
    sched: diffusion.Schedule,
    config: ml_collections.ConfigDict,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One DDPM step on a global batch of images [B, H, W, 3]: uint8, or float already in [-1, 1];
    for a class-conditional model {'image': images, 'label': int [B]}.

    All randomness comes from `fold_in(rng, step)`, drawn at the global batch shape (dropout per
    example: `unet.dropout`), so the result does not depend on how many devices the batch is split
    over. With `training.grad_accum_steps` = A > 1 the gradient is summed over A micro-batches of
    B / A (see `_loss_and_grad`), which gives the same update with 1/A of the activation memory.
    """
    batch_uint8, label_B = split_batch(batch)
    step_key = jax.random.fold_in(rng, state.step)
    k_aug, k_t, k_eps, k_drop = jax.random.split(step_key, 4)
    if model.num_classes:
        if label_B is None:
            raise ValueError(f"model.num_classes={model.num_classes}: the batch needs labels")
        label_B = drop_labels(label_B, jax.random.fold_in(step_key, _LABEL_DROPOUT_STREAM),
                              config.model.label_dropout, model.num_classes)
    if batch_uint8.dtype == jnp.uint8:
        x0 = data.to_model_input(batch_uint8, k_aug, config.data.random_flip)
    else:  # pre-scaled float images (notebooks, tests)
        x0 = batch_uint8.astype(jnp.float32)
    B, T = x0.shape[0], sched.num_timesteps
    t_B = jax.random.randint(k_t, (B,), 0, T)
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    xt = diffusion.q_sample(sched, x0, t_B, eps)

    def loss_fn(params, xt, t_B, x0, eps, label_B, example_B):
        out = model.apply({"params": params}, xt, t_B, train=True, rngs={"dropout": k_drop},
                          label_B=label_B, example_B=example_B)
        loss_B = diffusion.loss_per_example(
            sched, out, x0, eps, t_B, config.diffusion.prediction, config.diffusion.min_snr_gamma
        )
        return jnp.mean(loss_B), loss_B

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    accum = config.training.grad_accum_steps
    (loss, loss_B), grads = _loss_and_grad(grad_fn, accum, state.params,
                                           (xt, t_B, x0, eps, label_B, jnp.arange(B)))
    grad_norm = optax.tree.norm(grads)
    # A non-finite loss or gradient skips the update: params, EMA and optimizer stay as they were.
    # Params and EMA are kept by zeroing the update and the EMA rate, not by selecting whole trees
    # afterwards: the same values, but XLA:CPU fuses this and not the select (the update alone
    # took ~100 ms instead of ~150 on 2 cores; the whole step's gain was within the noise).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(
        state.params, jax.tree.map(lambda u: jnp.where(finite, u, 0.0), updates))
    ema_params = optax.incremental_update(
        params, state.ema_params, jnp.where(finite, 1.0 - ema_decay(state.step, config), 0.0)
    )
    streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
    new_state = TrainState(
        step=state.step + 1,
        params=params,
        ema_params=ema_params,
        opt_state=jax.tree.map(lambda new, old: jnp.where(finite, new, old), opt_state,
                               state.opt_state),
        nonfinite_streak=streak,
        nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
    )
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "learning_rate": learning_rate_schedule(config)(state.step),
        "nonfinite_streak": streak,
        "nonfinite_total": new_state.nonfinite_total,
    }
    # Loss by timestep quartile (sums and counts; the host divides over the logging window).
    quartile_B = (t_B * 4) // T
    for q in range(4):
        in_q = (quartile_B == q).astype(jnp.float32)
        metrics[f"loss_t_q{q}_sum"] = jnp.sum(jnp.where(in_q > 0, loss_B, 0.0))
        metrics[f"loss_t_q{q}_count"] = jnp.sum(in_q)
    return new_state, metrics


def _loss_and_grad(grad_fn, accum: int, params, examples):
    """((mean loss, loss_B), mean gradient) over a batch, in `accum` micro-batches.

    `examples` (xt, t_B, x0, eps, label_B or None, example_B) are drawn for the whole batch
    beforehand, and dropout masks are drawn per example (from `example_B`, the rows' indices), so
    example i gets the same t, noise, flip and dropout masks whatever `accum` is.
    Micro-batch j holds examples j, j + accum, j + 2 accum, ...: a batch sharded in contiguous
    blocks over D devices splits into micro-batches that are again spread over all D (each
    device's block holds a whole number of rows of every micro-batch when B / accum is divisible
    by D, which validate checks), so the reshape moves no data. A lax.scan carries only the
    gradient sum: one micro-batch's activations are live at a time.
    """
    if accum == 1:
        return grad_fn(params, *examples)
    B = examples[0].shape[0]

    def split(x):  # [B, ...] -> [accum, B / accum, ...]: row a * accum + j -> [j, a]
        return jnp.swapaxes(x.reshape(B // accum, accum, *x.shape[1:]), 0, 1)

    def micro_step(grad_sum, micro):
        (_, loss_b), grads = grad_fn(params, *micro)
        return jax.tree.map(jnp.add, grad_sum, grads), loss_b

    zeros = jax.tree.map(jnp.zeros_like, params)
    grad_sum, loss_AB = jax.lax.scan(micro_step, zeros, jax.tree.map(split, examples))
    loss_B = jnp.swapaxes(loss_AB, 0, 1).reshape(B)  # back to the batch's order
    # Each micro-batch's gradient is of its mean loss: their mean is the batch mean's gradient.
    grads = jax.tree.map(lambda g: g / accum, grad_sum)
    return (jnp.mean(loss_B), loss_B), grads


def train_steps(state, batches_KBHWC, rng, **kwargs):
    """`steps_per_call` (K) training steps in one call: fewer dispatches, same math.

    K > 1 runs a lax.scan, which pays off on accelerators. K = 1 skips the loop: XLA:CPU runs a
    backward pass inside a while loop about 40x slower than the same code outside one, even for
    a one-iteration loop (its convolution canonicalisation skips loop bodies, jax-ml/jax#12868;
    `validate.slow_on_platform` warns about K > 1 on CPU).
    """
    if jax.tree.leaves(batches_KBHWC)[0].shape[0] == 1:
        batch = jax.tree.map(lambda b: b[0], batches_KBHWC)  # images, or images and labels
        state, metrics = train_step(state, batch, rng, **kwargs)
        return state, jax.tree.map(lambda m: m[None], metrics)
    return jax.lax.scan(lambda s, b: train_step(s, b, rng, **kwargs), state, batches_KBHWC)


def eval_loss(params, batch, *, model, sched, config) -> jax.Array:
    """Validation loss with t spread evenly over [0, T) and noise from a fixed key.

    The same images, timesteps and noise at every evaluation, so curves compare across steps and
    runs. No flips, no dropout; a class-conditional model sees the images' own labels.
    """
    images_uint8, label_B = split_batch(batch)
    x0 = data.to_model_input(images_uint8, jax.random.key(0), False)
    n, T = x0.shape[0], sched.num_timesteps
    t_B = (jnp.arange(n) * T) // n
    eps = jax.random.normal(jax.random.key(1), x0.shape, x0.dtype)
    xt = diffusion.q_sample(sched, x0, t_B, eps)
    out = model.apply({"params": params}, xt, t_B, train=False, label_B=label_B)
    return jnp.mean(
        diffusion.loss_per_example(
            sched, out, x0, eps, t_B, config.diffusion.prediction, config.diffusion.min_snr_gamma
        )
    )


def summarize(metrics_list: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Host-side reduction of the per-step metrics of one logging window."""
    stacked = {k: np.concatenate([np.ravel(m[k]) for m in metrics_list]) for k in metrics_list[0]}
    out = {
        "loss": float(np.mean(stacked["loss"])),
        "grad_norm": float(np.mean(stacked["grad_norm"])),
        "learning_rate": float(stacked["learning_rate"][-1]),
        "nonfinite_total": float(stacked["nonfinite_total"][-1]),
    }
    for q in range(4):
        count = stacked[f"loss_t_q{q}_count"].sum()
        if count:
            out[f"loss_t_q{q}"] = float(stacked[f"loss_t_q{q}_sum"].sum() / count)
    out["_max_nonfinite_streak"] = int(stacked["nonfinite_streak"].max())
    return out


class _StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps (the step in flight ends).

    With several processes SIGTERM is left to JAX's preemption notifier, which orbax's
    `reached_preemption` reads so that every process stops at the same step; a per-process flag
    would let one process stop while the others wait in the next step's collectives. Ctrl-C is
    agreed on across processes at logging steps for the same reason.
    """

    def __init__(self):
        self.signum = None
        self._previous = {}
        sigs = (signal.SIGTERM, signal.SIGINT) if jax.process_count() == 1 else (signal.SIGINT,)
        if threading.current_thread() is threading.main_thread():
            for sig in sigs:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: the user means it
            signal.default_int_handler(signum, frame)
        self.signum = signum
        logging.warning("Received %s: stopping after this step.", signal.Signals(signum).name)

    def requested(self, at_log_step: bool) -> bool:
        if jax.process_count() == 1:
            return self.signum is not None
        if not at_log_step:
            return False
        flag = np.int8(self.signum is not None)
        return bool(np.any(multihost_utils.process_allgather(flag)))

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Train (resuming from the latest good checkpoint in `workdir`), log, sample and checkpoint."""
    validate.check_config(config, jax.device_count(), jax.process_count())
    validate.check_workdir(workdir)
    from clu import metric_writers, periodic_actions  # imports TensorFlow: after the checks

    train_ds, eval_images = data.create_datasets(
        config.data, seed=config.seed, global_batch_size=config.training.batch_size,
        num_classes=config.model.num_classes,
    )
    if config.model.num_classes:
        config = config.copy_and_resolve_references()  # the caller's config stays as it was
        config.data.class_names = train_ds.class_names  # saved with every checkpoint
        logging.info("%d classes: %s", len(train_ds.class_names), ", ".join(train_ds.class_names))
        eval_images = {"image": eval_images, "label": train_ds.eval_labels}
    if train_ds.skipped_files:
        logging.warning("Skipped %d unreadable image files.", train_ds.skipped_files)

    mesh = sharding.make_mesh()
    if warning := validate.slow_on_platform(config, mesh.devices.flat[0].platform):
        logging.warning("%s", warning)
    model = unet.from_config(config)
    tx = make_optimizer(config)
    sched = diffusion.make_schedule(config.diffusion.beta_schedule, config.diffusion.num_timesteps)
    init_rng, train_rng, sample_rng = jax.random.split(jax.random.key(config.seed), 3)

    ckpt = checkpoint.Checkpointer(workdir, config)
    init_fn = functools.partial(init_state, model=model, tx=tx, image_shape=train_ds.image_shape)
    state, state_sharding = _restore_or_init(ckpt, init_fn, init_rng, mesh)
    start_step = int(state.step)  # one host sync before the loop
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info("Model: %.2fM parameters; starting at step %d.", num_params / 1e6, start_step)

    steps_fn, traces = count_traces(
        functools.partial(train_steps, model=model, tx=tx, sched=sched, config=config))
    step_fn = jit_train_steps(steps_fn, mesh, state_sharding)
    eval_loss_of = _make_eval_loss(config, model, sched, mesh, state_sharding, eval_images)
    draw_samples = sampling.make_sampler(
        model, sched, config.sampling, config.diffusion.prediction, train_ds.image_shape, mesh
    )
    from ddpm_jax import evaluate  # scipy and Inception: only when training starts

    # Before the writer and the loop: missing Inception weights fail here, not hours in.
    fid_in_loop = evaluate.make_in_loop_evaluator(config, workdir, mesh, train_ds.image_shape)

    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0, asynchronous=True
    )
    if start_step == 0:
        writer.write_hparams(validate.flat_hparams(config))
    t = config.training
    report = periodic_actions.ReportProgress(
        num_train_steps=t.num_train_steps, writer=writer, every_steps=t.log_every_steps
    )
    batches = train_ds.iterate(start_step, sharding.batch(mesh, leading_dims=1), t.steps_per_call)
    stop = _StopRequest()
    bar = progress.TrainingProgress(t.num_train_steps, start_step, t.batch_size)
    train_metrics = _LateMetrics(writer, ckpt, config, bar)
    retraces = _RetraceWarning(traces)
    step = start_step
    try:
        while step < t.num_train_steps:
            state, metrics = step_fn(state, next(batches), train_rng)
            retraces.check(step)
            step += t.steps_per_call
            last = step >= t.num_train_steps
            bar.advance(t.steps_per_call)
            report(step)
            at_log_step = train_metrics.add(step, metrics, state)
            if eval_loss_of is not None and step % t.eval_every_steps == 0:
                writer.write_scalars(step, {"eval/loss": eval_loss_of(state.params),
                                            "eval/loss_ema": eval_loss_of(state.ema_params)})
            if fid_in_loop is not None:
                _fid_in_loop(fid_in_loop, config, workdir, writer, step, state.ema_params)
            if step % t.sample_every_steps == 0 or last:
                images = draw_samples(state.ema_params, jax.random.fold_in(sample_rng, step),
                                      t.num_grid_samples)
                _write_sample_grid(writer, workdir, step, images, config)
            if stop.requested(at_log_step) or ckpt.reached_preemption(step):
                return _checkpoint_and_stop(step, state, ckpt, train_metrics, bar)
            if step % t.checkpoint_every_steps == 0 or last:
                ckpt.save(step, state, force=last)
        train_metrics.flush(state)
    finally:
        bar.close()
        stop.restore()
        ckpt.wait()
        ckpt.close()
        batches.close()
        writer.flush()
    return state


# ---------------------------------------------------------------------------------------------
# The loop's parts: set-up, and the actions it takes every so many steps


def _restore_or_init(ckpt, init_fn, init_rng, mesh):
    """(state, its sharding): the newest good checkpoint, else a fresh state, made replicated."""
    abstract = jax.eval_shape(init_fn, init_rng)
    state_sharding = sharding.replicated(mesh, abstract)
    state = ckpt.restore_train_state(sharding.with_shardings(abstract, state_sharding))
    if state is None:
        state = jax.jit(init_fn, out_shardings=state_sharding)(init_rng)
    return state, state_sharding


def _make_eval_loss(config, model, sched, mesh, state_sharding, eval_batch):
    """`fn(params) -> float`, the validation loss on the held-out images (with labels, a dict of
    images and labels); None without any."""
    n_held = len(jax.tree.leaves(eval_batch)[0])
    n_eval = (n_held // jax.device_count()) * jax.device_count()
    if n_eval < n_held:
        logging.warning("Validation loss on %d of %d held-out images (a multiple of the %d "
                        "devices).", n_eval, n_held, jax.device_count())
    if not n_eval:
        return None
    eval_fn = jax.jit(
        functools.partial(eval_loss, model=model, sched=sched, config=config),
        in_shardings=(state_sharding.params, sharding.batch(mesh)),
    )
    eval_batch = jax.tree.map(lambda a: sharding.global_batch(mesh, a[:n_eval]), eval_batch)
    return lambda params: float(eval_fn(params, eval_batch))


class _RetraceWarning:
    """Warns when the training step is traced (so compiled) again, naming what changed."""

    def __init__(self, traces: list[dict[str, str]]):
        self.traces, self.seen = traces, 0

    def check(self, step: int) -> None:
        if len(self.traces) > self.seen:  # the first trace, or a retrace
            if self.seen:
                logging.warning("The training step was traced and compiled again at step %d; "
                                "its inputs changed: %s", step,
                                describe_retrace(self.traces[0], self.traces[-1]))
            self.seen = len(self.traces)


class _LateMetrics:
    """Training metrics written one log step late, so fetching them never stalls the device.

    Each step's device metrics join the window; at a log step the window is set aside, and it is
    fetched, summarised and written after the next step is dispatched.
    """

    def __init__(self, writer, ckpt, config, bar: progress.TrainingProgress):
        self.writer, self.ckpt, self.config, self.bar = writer, ckpt, config, bar
        self.window: list[dict[str, jax.Array]] = []  # device metrics since the last log step
        self.pending: tuple[int, list] | None = None  # the last window, fetched at the next step

    def add(self, step: int, metrics, state: TrainState) -> bool:
        """Queue one step's metrics, write the previous window; True at a log step."""
        self.window.append(metrics)
        self.flush(state)
        t = self.config.training
        at_log_step = step % t.log_every_steps == 0 or step >= t.num_train_steps
        if at_log_step:
            self.pending, self.window = (step, self.window), []
        return at_log_step

    def flush(self, state: TrainState) -> None:
        if self.pending is not None:
            summary = _write_metrics(self.writer, *self.pending, state, self.ckpt, self.config)
            self.pending = None
            self.bar.show_loss(summary["loss"])


def _fid_in_loop(fid_in_loop, config, workdir, writer, step, ema_params) -> None:
    """In-loop FID at its steps (the evaluator knows which), and the best EMA params kept."""
    from ddpm_jax import evaluate

    fid_metrics = fid_in_loop(step, ema_params)
    if fid_metrics is None:
        return
    writer.write_scalars(step, {f"eval/{k}": v for k, v in fid_metrics.items()})
    if config.eval.keep_best:
        evaluate.save_if_best(config, workdir, step, ema_params, fid_metrics)


def _write_sample_grid(writer, workdir, step, images, config) -> None:
    grid = sampling.make_grid(images, cols=sampling.grid_columns(config, len(images)))
    if jax.process_index() == 0:
        sampling.write_png(f"{workdir}/samples/train_step_{step:08d}.png", grid)
    writer.write_images(step, {"samples": grid[None]})


def _checkpoint_and_stop(step, state, ckpt, train_metrics, bar) -> TrainState:
    """On a stop request or preemption: checkpoint, wait until it is on disk, log what is left."""
    ckpt.save(step, state, force=True)
    ckpt.wait()
    train_metrics.flush(state)
    bar.close()  # before the message, so it is not drawn over
    logging.warning("Stopped at step %d; checkpoint saved. Run again to resume.", step)
    print(f"Stopped at step {step}; checkpoint saved. Run again to resume.")
    return state


def _write_metrics(writer, step, window, state, ckpt, config) -> dict[str, float]:
    summary = summarize(jax.device_get(window))
    streak = summary.pop("_max_nonfinite_streak")
    writer.write_scalars(step, {f"train/{k}": v for k, v in summary.items()})
    if streak >= config.training.max_nonfinite_steps:
        # Non-finite steps leave the state untouched, so the current state is the last good one.
        ckpt.save(int(state.step), state, force=True)
        ckpt.wait()
        raise NonFiniteError(
            f"{streak} non-finite training steps in a row (training.max_nonfinite_steps="
            f"{config.training.max_nonfinite_steps}) before step {step}; the last good state is "
            f"checkpointed at step {int(state.step)}. Lower optim.learning_rate or check the data."
        )
    return summary
