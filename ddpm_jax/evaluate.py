"""FID, KID, IS and NLL of a model: `--mode=eval`, in-loop FID during training, best checkpoint.

* `evaluate(config, workdir)` (`python -m ddpm_jax.main --mode=eval`): `eval.num_samples` EMA
  samples of one checkpoint against reference statistics of the unaugmented training data (FID,
  KID) and their Inception Score (torch-fidelity's: 1008 logits without the fc bias,
  `eval.is_splits` splits), and with `eval.nll_num_examples` the variational bound in bits/dim on
  held-out images (likelihood.py); written to `WORKDIR/eval/step_<N>.json` and to TensorBoard as
  `eval/fid`, `eval/kid`, `eval/is` and `eval/nll_bpd` (with its parts `eval/nll_*_bpd`).
* `make_in_loop_evaluator(...)`: the same pipeline on `eval.training_fid_num_samples` samples
  every `eval.training_fid_every_steps` training steps. Its `fid_in_loop` / `kid_in_loop` track
  progress within one run; they are biased upwards by the small sample and NOT comparable with
  50k-sample paper FIDs.
* `save_if_best(...)`: `eval.keep_best`, keeps the EMA params with the lowest in-loop FID in
  `WORKDIR/best/`, a work directory of its own (see `save_if_best`).

Pipeline: the Inception weights are resolved first, so a machine without them fails within a
second, before any checkpoint is read or image sampled. Reference statistics come from every
decodable image of the training split (`eval.reference_split`, including the few images training
holds out for its validation loss, as in the usual 50k-image CIFAR-10 statistics; or a fixed
random subset of `eval.reference_num_examples`), resized to `data.image_size` exactly as for
training but never flipped, and cached under `<cache dir>/fid_stats/`. Samples are drawn in
chunks of `sampling.per_device_batch` images per device and streamed through Inception in batches
of `eval.batch_size`, so memory does not grow with `eval.num_samples`. Sample i uses the key
`fold_in(key(config.seed), i)`, as in `--mode=sample`: the samples are the same whatever the chunk
size or device count, so a score is reproducible from the seed and sampler settings alone.

Multi-process: every process receives all samples (the sampler all-gathers them) and runs
Inception on its local devices over all of them, so every process holds identical statistics;
the redundant Inception work is small next to sampling. Only process 0 writes files.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from ddpm_jax import (
    data,
    diffusion,
    fid,
    inception,
    likelihood,
    sampling,
    sharding,
    solvers,
    unet,
    validate,
)
from ddpm_jax import progress as progress_lib  # `progress` is a flag here

PyTree = Any
InLoopEvaluator = Callable[..., dict[str, float] | None]

BEST_DIR = "best"  # under WORKDIR: a work directory holding the best checkpoint
BEST_METRIC = "fid_in_loop"
_REFERENCE_SUBSET_SEED = 0  # fixed, so a subset's cache key stays valid whatever config.seed is


# ---------------------------------------------------------------------------------------------
# Settings


def check_eval_config(config: ml_collections.ConfigDict) -> None:
    """Raise validate.ConfigError naming the first unusable `eval` (or sampler) setting."""
    ev = config.eval
    minimums = {
        "num_samples": 2,  # a covariance needs two samples
        "batch_size": 1,
        "kid_subsets": 1,
        "kid_subset_size": 2,  # the unbiased MMD divides by m (m - 1)
        "max_kid_features": 2,
        "reference_num_examples": 0,
        "training_fid_every_steps": 0,
        "training_fid_num_samples": 2,
        "is_splits": 1,
        "nll_num_examples": -1,  # -1: all, 0: no NLL
    }
    for key, minimum in minimums.items():
        value = ev[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise validate.ConfigError(f"eval.{key}={value!r}: expected an integer >= {minimum}")
    if ev.reference_num_examples == 1:
        raise validate.ConfigError("eval.reference_num_examples=1: use 0 (all) or at least 2")
    if ev.num_samples < ev.is_splits:
        raise validate.ConfigError(f"eval.num_samples={ev.num_samples} is fewer than "
                                   f"eval.is_splits={ev.is_splits} (the IS splits the samples)")
    validate.check_sampling(config)


def cache_dir(config: ml_collections.ConfigDict) -> str:
    """`eval.cache_dir`, else $DDPM_JAX_CACHE, else ~/.cache/ddpm_jax."""
    explicit = config.eval.cache_dir
    return os.path.expanduser(explicit) if explicit else fid.default_cache_dir()


@contextlib.contextmanager
def _cache_env(directory: str) -> Iterator[None]:
    # fid.inception_weights_path reads its cache directory from $DDPM_JAX_CACHE only; point it at
    # eval.cache_dir for the call so weights and statistics share the configured directory.
    old = os.environ.get(fid.CACHE_ENV)
    os.environ[fid.CACHE_ENV] = directory
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(fid.CACHE_ENV, None)
        else:
            os.environ[fid.CACHE_ENV] = old


def inception_weights(config: ml_collections.ConfigDict) -> str:
    """Path of the .npz FID Inception weights (WeightsUnavailableError when offline without)."""
    with _cache_env(cache_dir(config)):
        return fid.inception_weights_path(config.eval.inception_weights)


def sampler_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The sampling settings that determine the samples, for the result record."""
    s = config.sampling
    out: dict[str, Any] = {
        "sampler": s.sampler,
        "clip_x0": bool(s.clip_x0),
        "num_timesteps": config.diffusion.num_timesteps,
    }
    num_steps = s.num_steps or config.diffusion.num_timesteps
    out.update(num_steps=num_steps, spacing=solvers.resolve_spacing(s.sampler, s.spacing),
               network_evaluations=solvers.num_evaluations(s.sampler, num_steps))
    if s.sampler == "ddim":
        out.update(eta=float(s.eta))
    elif s.sampler == "ddpm":
        out.update(variance=s.variance)
    return out


# ---------------------------------------------------------------------------------------------
# Reference statistics


def _reference_split(config: ml_collections.ConfigDict) -> str:
    # Only TFDS has splits; a folder or the embedded set is one split, all of it.
    return config.eval.reference_split if config.data.source == "tfds" else "all"


def reference_key(config: ml_collections.ConfigDict) -> str:
    """Cache key of the reference statistics: dataset, split, resolution, resize, example count.

    Built from the config alone, so a cache hit opens no data. A folder is keyed by its absolute
    path: statistics of a folder whose contents changed must be deleted by hand.
    """
    d = config.data
    where = os.path.abspath(os.path.expanduser(d.path)) if d.source == "folder" else d.name
    name = f"{d.source}:{where}:{d.resize}"
    if data.image_shape(d)[-1] == 1:  # greyscale statistics differ from RGB ones
        name += ":grey"
    h, w = data.image_hw(d.image_size)
    size = h if h == w else f"{h}x{w}"  # square keys as before: their caches stay valid
    return fid.stats_key(
        name, _reference_split(config), size, config.eval.reference_num_examples or None
    )


def _reference_dataset(config: ml_collections.ConfigDict) -> data.ImageDataset:
    """The whole reference split as an ImageDataset: nothing held out, nothing cached."""
    data_config = ml_collections.ConfigDict(config.data.to_dict())
    data_config.split = config.eval.reference_split
    data_config.eval_split = ""  # with num_eval_examples=0, nothing is held out of the split
    data_config.num_eval_examples = 0
    data_config.cache = False  # each image is read once
    dataset, _ = data.create_datasets(
        data_config, seed=config.seed, global_batch_size=jax.process_count()
    )
    return dataset


def _reference_ids(dataset: data.ImageDataset, num_examples: int) -> np.ndarray:
    """All training ids, or a fixed random subset of `num_examples` of them (sorted)."""
    ids = dataset.train_indices
    if num_examples and num_examples > len(ids):
        logging.warning(
            "eval.reference_num_examples=%d exceeds the %d usable images; using all of them.",
            num_examples, len(ids),
        )
    if not num_examples or num_examples >= len(ids):
        return ids
    # Random, not the first N: folders sort by path, so the first N could be a single class.
    rng = np.random.default_rng(_REFERENCE_SUBSET_SEED)
    return np.sort(rng.choice(ids, num_examples, replace=False))


def _prefetched(produce: Callable[[int], np.ndarray], n: int) -> Iterator[np.ndarray]:
    """produce(0), ..., produce(n - 1), each computed on a thread while the previous is used."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fid-reference") as pool:
        future = pool.submit(produce, 0) if n else None
        for i in range(n):
            batch = future.result()
            future = pool.submit(produce, i + 1) if i + 1 < n else None
            yield batch


def _reference_batches(config: ml_collections.ConfigDict) -> Iterator[np.ndarray]:
    """uint8 [B, S, S, C] batches of the unaugmented reference images."""
    dataset = _reference_dataset(config)
    try:
        ids = _reference_ids(dataset, config.eval.reference_num_examples)
        b = config.eval.batch_size
        logging.info("Computing FID reference statistics over %d images.", len(ids))
        num_batches = -(-len(ids) // b)
        yield from _prefetched(lambda i: dataset.images(ids[i * b : (i + 1) * b]), num_batches)
    finally:
        dataset.close()


def _compute_reference_stats(
    config: ml_collections.ConfigDict,
    params: inception.Variables,
    apply_fn: Callable,
    mesh: Mesh,
) -> fid.FeatureStats:
    """Inception statistics of the reference set (the cache-miss path of `reference`)."""
    return fid.extract_features(
        params, _reference_batches(config), apply_fn,
        max_kept=config.eval.max_kid_features, mesh=mesh,
    )


def reference(
    config: ml_collections.ConfigDict,
    params: inception.Variables,
    apply_fn: Callable,
    mesh: Mesh,
) -> tuple[fid.StatsTuple, str]:
    """((mu, sigma, KID features), cache key): from the cache, else computed and cached.

    The cache keeps at most fid.KID_REFERENCE_FEATURES reference features for KID, whatever
    `eval.max_kid_features` was when it was written (the setting is not part of the key).
    """
    key = reference_key(config)
    t0 = time.time()
    stats = fid.reference_stats(
        cache_dir(config), key, lambda: _compute_reference_stats(config, params, apply_fn, mesh)
    )
    logging.info("FID reference statistics %s ready in %.1f s.", key, time.time() - t0)
    return stats, key


# ---------------------------------------------------------------------------------------------
# Samples -> features


def _inception_apply_fn() -> Callable:
    """The jitted FID Inception (299 px) -> (features, logits). Tests swap in a smaller input size
    here."""
    return inception.make_apply_fn(inception.FIDInceptionV3(with_logits=True))


def _local_mesh() -> Mesh:
    # Inception runs on this process's devices only: fid.extract_features reads its outputs back
    # with np.asarray, which needs every shard to be addressable.
    return sharding.make_mesh(jax.local_devices())


def _make_draw(config: ml_collections.ConfigDict, model: unet.UNet, mesh: Mesh,
               image_shape: tuple[int, ...]) -> Callable:
    c = config
    sched = diffusion.make_schedule(c.diffusion.beta_schedule, c.diffusion.num_timesteps)
    return sampling.make_sampler(model, sched, c.sampling, c.diffusion.prediction,
                                 tuple(image_shape), mesh)


def sample_chunk_size(config: ml_collections.ConfigDict, mesh: Mesh) -> int:
    """Images per sampling call: `sampling.per_device_batch` on every device of `mesh`."""
    return config.sampling.per_device_batch * mesh.devices.size


def _sample_batches(
    draw: Callable, params: PyTree, rng: jax.Array, num_samples: int, chunk: int,
    batch_size: int, progress: bool = False,
) -> Iterator[np.ndarray]:
    """Draw `num_samples` images `chunk` at a time, re-cut into batches of `batch_size`.

    Every call draws a full chunk (one compiled shape; the surplus of the last is dropped). Image
    i is `draw`'s image i of `rng` whatever the chunk size, so the samples (and the FID) do not
    depend on `sampling.per_device_batch` or the device count. At most one chunk plus one batch
    is held at a time.
    """
    pending: np.ndarray | None = None
    num_chunks = -(-num_samples // chunk)
    shown = progress_lib.ImageProgress(num_samples, desc="eval") if progress else None
    for i in range(num_chunks):
        images = draw(params, rng, chunk, start=i * chunk)[: num_samples - i * chunk]
        pending = images if pending is None else np.concatenate([pending, images])
        while len(pending) >= batch_size:
            yield pending[:batch_size]
            pending = pending[batch_size:]
        if shown:
            shown.update(min((i + 1) * chunk, num_samples))
    if shown:
        shown.close()
    if pending is not None and len(pending):
        yield pending


def sample_stats(
    config: ml_collections.ConfigDict,
    draw: Callable,
    params: PyTree,
    num_samples: int,
    chunk: int,
    inception_params: inception.Variables,
    apply_fn: Callable,
    progress: bool = False,
    keep_logits: bool = False,
) -> fid.FeatureStats:
    """Inception statistics of `num_samples` fresh samples, streamed chunk by chunk (and their
    logits, for the IS, with `keep_logits`)."""
    batches = _sample_batches(draw, params, jax.random.key(config.seed), num_samples, chunk,
                              config.eval.batch_size, progress)
    return fid.extract_features(inception_params, batches, apply_fn,
                                max_kept=config.eval.max_kid_features, mesh=_local_mesh(),
                                keep_logits=keep_logits)


def _write_json(path: str, record: dict[str, Any]) -> None:
    """Atomic write: a reader never sees half a file, an interrupted run leaves none."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".json", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---------------------------------------------------------------------------------------------
# --mode=eval


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """FID, KID, IS (and NLL) of checkpoint `sampling.checkpoint_step` (-1: latest) in `workdir`.

    Writes WORKDIR/eval/step_<N>.json and TensorBoard scalars eval/fid, eval/kid, eval/is (and
    eval/nll_*) at step N, and returns the record written. Raises fid.WeightsUnavailableError
    before touching the checkpoint when the Inception weights are missing and cannot be
    downloaded; unusable NLL data fails before any image is sampled.
    """
    from clu import metric_writers  # imports TensorFlow: keep it off import time

    t0 = time.time()
    ev = config.eval
    check_eval_config(config)
    weights = inception_weights(config)  # first: an offline machine fails here, in a second
    inception_params = inception.load_params(weights)
    apply_fn = _inception_apply_fn()
    sampler = sampling.Sampler.from_workdir(workdir, config, config.sampling.checkpoint_step)
    logging.info("Evaluating checkpoint step %d of %s with %d samples.", sampler.step, workdir,
                 ev.num_samples)
    nll_images = likelihood.nll_images(config) if ev.nll_num_examples else None
    ref, key = reference(config, inception_params, apply_fn, _local_mesh())

    draw = _make_draw(config, sampler.model, sampler.mesh,
                      data.image_shape(config.data))
    chunk = sample_chunk_size(config, sampler.mesh)
    stats = sample_stats(config, draw, sampler.params, ev.num_samples, chunk, inception_params,
                         apply_fn, progress=True, keep_logits=True)
    metrics = fid.fid_kid(stats, ref, ev.kid_subsets, ev.kid_subset_size)
    is_mean, is_std = fid.inception_score(stats.logits(), ev.is_splits)

    record = {
        "fid": metrics["fid"],
        "kid_mean": metrics["kid_mean"],
        "kid_std": metrics["kid_std"],
        "is_mean": is_mean,
        "is_std": is_std,
        "is_splits": ev.is_splits,
        "num_samples": ev.num_samples,
        "checkpoint_step": sampler.step,
        "sampling": sampler_settings(config),
        "seed": config.seed,
        "sample_chunk": chunk,
        "reference_key": key,
        "reference_split": _reference_split(config),
        "kid_subsets": ev.kid_subsets,
        "kid_subset_size": ev.kid_subset_size,
        "kid_features": [len(stats.kept_features()), len(ref[2])],
        "inception_weights": os.path.abspath(weights),
        "features_version": fid.FEATURES_VERSION,
    }
    if nll_images is not None:
        record.update(likelihood.evaluate_nll(config, sampler.model, sampler.params, sampler.mesh,
                                              nll_images))
        record.update(nll_split=config.eval.nll_split if config.data.source == "tfds"
                      else "held_out", nll_variance=config.sampling.variance,
                      nll_clip_x0=bool(config.sampling.clip_x0))
    record["wall_s"] = round(time.time() - t0, 1)
    path = os.path.join(workdir, "eval", f"step_{sampler.step}.json")
    if jax.process_index() == 0:
        _write_json(path, record)
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    scalars = {"eval/fid": record["fid"], "eval/kid": record["kid_mean"], "eval/is": is_mean}
    scalars.update({f"eval/{k}": v for k, v in record.items()
                    if k.startswith("nll_") and k.endswith("_bpd")})
    writer.write_scalars(sampler.step, scalars)
    writer.close()
    nll = (f"; NLL {record['nll_bpd']:.4f} bits/dim on {record['nll_num_examples']} images"
           if nll_images is not None else "")
    logging.info("Step %d: FID %.4f, KID %.6f +- %.6f, IS %.3f +- %.3f (%d samples, %s)%s; "
                 "wrote %s", sampler.step, record["fid"], record["kid_mean"], record["kid_std"],
                 is_mean, is_std, ev.num_samples, config.sampling.sampler, nll, path)
    return record


# ---------------------------------------------------------------------------------------------
# During training


def make_in_loop_evaluator(
    config: ml_collections.ConfigDict,
    workdir: str,
    mesh: Mesh,
    image_shape: tuple[int, ...],
) -> InLoopEvaluator | None:
    """None when `eval.training_fid_every_steps` is 0; else `fn(step, ema_params, force=False)`.

    Weights and reference statistics are prepared here, once (so a missing download fails at the
    start of training, not hours in). `fn` returns None unless `step` is a multiple of
    `eval.training_fid_every_steps` (or `force`); otherwise it samples
    `eval.training_fid_num_samples` images with
    the same keys every time (so differences between steps come from the model, not the noise)
    and returns {'fid_in_loop', 'kid_in_loop'}, also appended to WORKDIR/eval/in_loop.jsonl.
    """
    ev = config.eval
    if ev.keep_best and not ev.training_fid_every_steps:
        raise validate.ConfigError(
            "eval.keep_best needs in-loop FID: set eval.training_fid_every_steps > 0")
    if not ev.training_fid_every_steps:
        return None
    check_eval_config(config)
    k = config.training.steps_per_call
    if ev.training_fid_every_steps % k:
        # The loop only sees every k-th step, so other multiples would never come round.
        raise validate.ConfigError(f"eval.training_fid_every_steps={ev.training_fid_every_steps} "
                                   "is not a multiple of "
                                   f"training.steps_per_call={k}")
    inception_params = inception.load_params(inception_weights(config))
    apply_fn = _inception_apply_fn()
    ref, key = reference(config, inception_params, apply_fn, _local_mesh())
    draw = _make_draw(config, unet.from_config(config), mesh, image_shape)
    chunk = sample_chunk_size(config, mesh)
    log_path = os.path.join(workdir, "eval", "in_loop.jsonl")

    def evaluate_in_loop(step: int, ema_params: PyTree,
                         force: bool = False) -> dict[str, float] | None:
        if step % ev.training_fid_every_steps and not force:
            return None
        t0 = time.time()
        stats = sample_stats(config, draw, ema_params, ev.training_fid_num_samples, chunk,
                             inception_params, apply_fn)
        m = fid.fid_kid(stats, ref, ev.kid_subsets, ev.kid_subset_size)
        out = {"fid_in_loop": m["fid"], "kid_in_loop": m["kid_mean"]}
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(log_path), exist_ok=True)
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": int(step), **out, "num_samples":
                                    ev.training_fid_num_samples, "reference_key": key}) + "\n")
        logging.info("Step %d: in-loop FID %.3f, KID %.5f (%d samples, %.0f s; not comparable "
                     "with 50k-sample FIDs).", step, out["fid_in_loop"], out["kid_in_loop"],
                     ev.training_fid_num_samples, time.time() - t0)
        return out

    return evaluate_in_loop


def _best_manager(workdir: str):
    import orbax.checkpoint as ocp

    # Synchronous: a best save is rare and small (EMA params only), and the caller's state is
    # donated to the next training step right after. A killed save leaves a tmp dir: cleared.
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, cleanup_tmp_directories=True,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), BEST_DIR, "checkpoints"),
        options=options,
        item_handlers={
            "ema_params": ocp.StandardCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        },
    )


def best_record(workdir: str) -> dict[str, Any] | None:
    """The {'step', metric, ...} record stored with the best checkpoint, or None."""
    if not os.path.isdir(os.path.join(workdir, BEST_DIR, "checkpoints")):
        return None
    manager = _best_manager(workdir)
    try:
        steps = manager.all_steps()
        if not steps:
            return None
        # orbax writes `metrics` only when it ranks checkpoints (best_fn): use custom metadata.
        record = manager.metadata(max(steps)).custom_metadata
        return dict(record) if record else None
    finally:
        manager.close()


def save_if_best(
    config: ml_collections.ConfigDict,
    workdir: str,
    step: int,
    ema_params: PyTree,
    metrics: dict[str, float],
    metric: str = BEST_METRIC,
) -> bool:
    """Keep `ema_params` in WORKDIR/best/ if `metrics[metric]` is lower than the stored best.

    WORKDIR/best/ is laid out like a work directory with one checkpoint (EMA params and config
    only, no optimizer state), so everything that reads checkpoints works on it unchanged:
    `Sampler.from_workdir(WORKDIR/best)`, `--mode=sample|eval --workdir WORKDIR/best`. The
    metrics are stored in that checkpoint (orbax custom metadata), so the comparison survives
    restarts and can never disagree with the saved params; WORKDIR/best/best.json is a readable
    copy. Call it on every process (orbax saves collectively). Returns True when it saved.

    Why not orbax's `best_fn` on the training CheckpointManager: with `best_fn`, `max_to_keep`
    retains the best-scoring checkpoints instead of the newest, so the one needed to resume can
    be deleted, and every periodic save would need an FID.
    """
    import orbax.checkpoint as ocp

    value = float(metrics[metric])
    if not math.isfinite(value):
        return False
    previous = best_record(workdir)
    if previous is not None and value >= previous[metric]:
        return False
    record = {"step": int(step), metric: value,
              **{k: float(v) for k, v in metrics.items() if k != metric}}
    # Host copies: orbax's replica-parallel device-to-host path compiles a slice per parameter
    # shape on first use (15 s for the tiny test model on a loaded CPU). EMA params are
    # replicated, so every process can read them whole.
    host_params = jax.device_get(ema_params)
    manager = _best_manager(workdir)
    try:
        # After a resume from an older checkpoint, `step` can be <= the stored best's step; orbax
        # would then keep the old (higher) step as the newest and drop the new one.
        for old in manager.all_steps():
            if old >= step:
                manager.delete(old)
        manager.save(step, args=ocp.args.Composite(
            ema_params=ocp.args.StandardSave(host_params),
            config=ocp.args.JsonSave(json.loads(config.to_json())),
        ), custom_metadata=record, force=True)
        manager.wait_until_finished()
    finally:
        manager.close()
    if jax.process_index() == 0:
        _write_json(os.path.join(workdir, BEST_DIR, "best.json"), record)
    logging.info("Step %d: new best %s %.4f (previous %s); EMA params kept in %s.", step, metric,
                 value, "none" if previous is None else f"{previous[metric]:.4f}",
                 os.path.join(workdir, BEST_DIR))
    return True
