"""The training dataset: images ordered by (seed, step) alone, sliced per process, prefetched.

`create_datasets` opens the source `config.data` names (sources.py), holds out the eval images
(split.py), checks that enough usable data is left, and returns an `ImageDataset` over the rest.
Images stay uint8 on the host; scaling to [-1, 1] and random flips happen on device
(model_input.py).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Self

import jax
import numpy as np

from ddpm_jax.data import decode, prefetch, sources, split
from ddpm_jax.data.settings import InputError, Settings, image_hw, read_settings
from ddpm_jax.data.store import ImageStore

logger = logging.getLogger(__name__)


def create_datasets(
    data_config: Any,
    *,
    seed: int,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    num_classes: int = 0,
) -> tuple[ImageDataset, np.ndarray]:
    """Returns (train dataset, held-out eval images as uint8 [n_eval, H, W, C]).

    With `num_classes` > 0 (a class-conditional model) the data must have labels, all in
    [0, num_classes), and as many classes as it says it has.

    All validation happens here, eagerly: bad settings or too little usable data raise InputError
    with a one-line message naming the culprit and the counts.
    """
    s = read_settings(data_config)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    _check_processes(global_batch_size, process_index, process_count)
    decoder = decode.Decoder.start(image_hw(s.image_size), s.channels, s.resize, s.num_workers)
    try:
        return _build(s, decoder, seed, global_batch_size, process_index, process_count,
                      num_classes)
    except BaseException:
        decoder.close()
        raise


def _check_processes(global_batch_size: int, process_index: int, process_count: int) -> None:
    if not isinstance(global_batch_size, int) or global_batch_size < 1:
        raise InputError(f"global_batch_size={global_batch_size!r} must be a positive integer")
    if global_batch_size % process_count:
        raise InputError(
            f"global_batch_size={global_batch_size} is not divisible by the "
            f"{process_count} processes"
        )
    if not 0 <= process_index < process_count:
        raise InputError(f"process_index={process_index} is not in [0, {process_count})")


def _build(
    s: Settings,
    decoder: decode.Decoder,
    seed: int,
    global_batch_size: int,
    process_index: int,
    process_count: int,
    num_classes: int = 0,
) -> tuple[ImageDataset, np.ndarray]:
    """create_datasets after its argument checks, with the decoder it started."""
    source = sources.open_source(s, decoder.pool, num_classes)
    hold_out = not (s.source == "tfds" and s.eval_split)
    n_usable = int(source.usable.sum())
    n_held = split.eval_hold_out(s, n_usable) if hold_out else 0
    _check_usable(s, source, n_usable, n_held)  # before decoding anything
    held = _eval_images(s, source, decoder, hold_out, n_held, num_classes)
    in_train = source.usable.copy()
    in_train[held.ids] = False
    in_train[held.failed_ids] = False
    train_ids = np.flatnonzero(in_train).astype(np.int64)
    skipped = len(source.items) - n_usable + held.num_failed
    _check_training_left(source, held, train_ids, n_held, skipped, global_batch_size)
    cache = _use_cache(s, source, decoder, len(train_ids), len(held.images), skipped)
    store = ImageStore(source, decoder, train_ids, cache=cache, skipped_files=skipped)
    dataset = ImageDataset(
        store,
        train_ids,
        held.ids,
        seed=seed % 2**64,  # default_rng needs a non-negative seed
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
        prefetch=s.prefetch,
        eval_labels=held.labels,
    )
    return dataset, held.images


def _check_usable(s: Settings, source: sources.Source, n_usable: int, n_held: int) -> None:
    """Raises unless a training image is left after holding out n_held; logs a folder's split."""
    if n_usable < n_held + 1:
        raise InputError(
            f"{source.key}: {n_usable} usable images (of {len(source.items)}; "
            f"{len(source.items) - n_usable} unreadable) leave no training image after "
            f"num_eval_examples={n_held}"
        )
    if s.source == "folder":
        logger.info(
            "%s: %d usable images, %d held out for the validation loss (data.folder_eval_fraction"
            "=%g of them, at most data.num_eval_examples=%d)%s",
            source.key, n_usable, n_held, s.folder_eval_fraction, s.num_eval_examples,
            "" if n_held else "; no validation loss",
        )


@dataclasses.dataclass(frozen=True)
class _EvalImages:
    """The eval images, and what choosing them took from the training source."""

    images: np.ndarray  # uint8 [n_eval, H, W, C]
    labels: np.ndarray | None  # int32 [n_eval], when the source has labels
    ids: np.ndarray  # int64: their indices in the training source (none from a tfds eval_split)
    failed_ids: np.ndarray  # int64: training-source examples that failed to decode meanwhile
    num_failed: int  # unreadable examples met, an eval split's included


def _eval_images(s: Settings, source: sources.Source, decoder: decode.Decoder, hold_out: bool,
                 n_held: int, num_classes: int) -> _EvalImages:
    """n_held images held out of `source`, or (without hold_out) those of the tfds eval_split."""
    none = np.zeros(0, np.int64)
    if hold_out:
        order = split.hold_out_order(len(source.items))
        ids, images, failed = split.take_decodable(
            source, order[source.usable[order]], n_held, decoder
        )
        labels = None if source.labels is None else source.labels[ids].astype(np.int32)
        return _EvalImages(images, labels, ids, np.array(failed, np.int64), len(failed))
    if s.num_eval_examples:
        images, labels, n_failed = _eval_from_split(s, decoder, num_classes)
        return _EvalImages(images, labels, none, none, n_failed)
    labels = None if source.labels is None else np.zeros(0, np.int32)
    return _EvalImages(np.zeros((0, *decoder.shape), np.uint8), labels, none, none, 0)


def _eval_from_split(s: Settings, decoder: decode.Decoder,
                     num_classes: int) -> tuple[np.ndarray, np.ndarray | None, int]:
    """The first num_eval_examples images of the tfds eval_split -> (images, their labels if
    num_classes, unreadable count)."""
    eval_source = sources.open_tfds(s.name, s.eval_split, s.data_dir,
                                    limit=s.num_eval_examples,
                                    label_key=s.label_key * bool(num_classes))
    sources.check_labels(eval_source, num_classes)
    ids, images, failed = split.take_decodable(
        eval_source, np.arange(len(eval_source.items)), s.num_eval_examples, decoder
    )
    if len(images) < s.num_eval_examples:
        raise InputError(
            f"{eval_source.key}: {len(images)} decodable images (of {len(eval_source.items)}), "
            f"fewer than num_eval_examples={s.num_eval_examples}"
        )
    labels = None if eval_source.labels is None else eval_source.labels[ids].astype(np.int32)
    return images, labels, len(failed)


def _check_training_left(source: sources.Source, held: _EvalImages, train_ids: np.ndarray,
                         n_held: int, skipped: int, global_batch_size: int) -> None:
    """Raises unless all eval images and a training image decoded; warns if images will repeat
    within a batch."""
    if len(held.images) < n_held or not len(train_ids):
        raise InputError(
            f"{source.key}: {len(held.images)} eval + {len(train_ids)} training images after "
            f"{skipped} unreadable; need num_eval_examples={n_held} + at least one for training"
        )
    if len(train_ids) < global_batch_size:
        # The order spans several epochs per batch (see split.global_indices): every image is in
        # a batch about global_batch / N times, still each once per epoch.
        logger.warning(
            "%s: %d training images, fewer than global_batch_size=%d: images repeat within a "
            "batch", source.key, len(train_ids), global_batch_size,
        )


def _use_cache(s: Settings, source: sources.Source, decoder: decode.Decoder, n_train: int,
               n_eval: int, skipped: int) -> bool:
    """Whether the decoded images fit `data.cache_max_gb` (with `data.cache`); logs the counts."""
    size_gb = len(source.items) * int(np.prod(decoder.shape)) / 2**30
    cache = bool(s.cache) and size_gb <= s.cache_max_gb
    logger.info(
        "%s: %d training + %d eval images at %dx%d (HxW), %d unreadable skipped; %s",
        source.key,
        n_train,
        n_eval,
        *decoder.shape[:2],
        skipped,
        f"caching decoded images in memory ({size_gb:.2f} GiB)"
        if cache
        else f"decoding every batch from the source (cache={s.cache}, {size_gb:.2f} GiB "
        f"vs cache_max_gb={s.cache_max_gb})",
    )
    return cache


class ImageDataset:
    """Training images, ordered by (seed, step) alone; see split.py for the order.

    Dataset indices index the source (sorted file list / tfds split / embedded array), so
    `train_indices` and `eval_indices` (held-out, empty with a tfds eval_split) are disjoint
    subsets of them. Decoded images are cached in memory when the store caches; otherwise every
    batch is decoded from the source. A file found unreadable only when decoded is counted in
    `skipped_files` and replaced by the next decodable training example (see store.py).

    With labels (`class_names` non-empty), `iterate` yields {'image': ..., 'label': ...} and
    `eval_labels` holds the held-out images' classes.
    """

    def __init__(
        self,
        store: ImageStore,
        train_indices: np.ndarray,
        eval_indices: np.ndarray,
        *,
        seed: int,
        global_batch_size: int,
        process_index: int,
        process_count: int,
        prefetch: int,
        eval_labels: np.ndarray | None = None,
    ):
        self.num_examples = len(train_indices)
        self.image_shape = store.decoder.shape
        self.train_indices = np.asarray(train_indices, np.int64)
        self.eval_indices = np.asarray(eval_indices, np.int64)
        self.global_batch_size = global_batch_size
        self.process_index = process_index
        self.process_count = process_count
        self.seed = seed
        self.prefetch = prefetch
        self.class_names = store.source.class_names
        self.eval_labels = eval_labels
        self._store = store
        local = global_batch_size // process_count
        self._local_rows = np.arange(process_index * local, (process_index + 1) * local)

    @property
    def skipped_files(self) -> int:
        """Unreadable examples skipped so far (folder source; 0 for the others in practice)."""
        return self._store.skipped_files

    @property
    def cached(self) -> bool:
        return self._store.cached

    def global_indices(self, step: int) -> np.ndarray:
        """Dataset indices (int64 [global_batch]) of the global batch at `step`."""
        return split.global_indices(self.train_indices, self.seed, step, self.global_batch_size)

    def images(self, ids: np.ndarray) -> np.ndarray:
        """uint8 [len(ids), H, W, C] for dataset indices `ids`, through the cache if enabled."""
        return self._store.images(ids)

    def labels(self, ids: np.ndarray) -> np.ndarray:
        """int32 [len(ids)]: the class of each of `images(ids)` (after any replacement)."""
        return self._store.labels(ids)

    def local_batch(self, step: int) -> np.ndarray:
        """uint8 [global_batch // process_count, H, W, C]: this process's slice at `step`."""
        return self.images(self.global_indices(step)[self._local_rows])

    def iterate(
        self,
        start_step: int,
        sharding: jax.sharding.NamedSharding,
        steps_per_call: int = 1,
    ) -> prefetch.PrefetchIterator:
        """Global uint8 arrays [steps_per_call, global_batch, H, W, C] (with labels, dicts of
        them and int32 labels [steps_per_call, global_batch]); call k holds steps
        start_step + k * steps_per_call + (0 .. steps_per_call - 1), sharded by `sharding`
        (NamedSharding(mesh, P(None, 'data'))). `data.prefetch` arrays are built ahead on a
        daemon thread; close() the iterator (or use `with`) to stop it early.

        Each process loads exactly the batch rows its devices hold (with the usual meshes, the
        contiguous slice `process_index` of local_batch).
        """
        if steps_per_call < 1 or start_step < 0:
            raise ValueError(
                f"need steps_per_call >= 1 and start_step >= 0, got {steps_per_call}, {start_step}"
            )
        global_shape = (steps_per_call, self.global_batch_size, *self.image_shape)
        rows = split.batch_rows(sharding, global_shape)
        produce = functools.partial(self._global_batch, start_step, steps_per_call, rows,
                                    sharding)
        return prefetch.PrefetchIterator(produce, self.prefetch)

    def _global_batch(self, start_step: int, steps_per_call: int, rows: np.ndarray,
                      sharding: jax.sharding.NamedSharding,
                      k: int) -> jax.Array | dict[str, jax.Array]:
        """Call k of iterate(start_step, sharding, steps_per_call), built from this process's
        `rows` of each global batch."""
        global_shape = (steps_per_call, self.global_batch_size, *self.image_shape)
        first = start_step + k * steps_per_call
        ids = np.concatenate(
            [self.global_indices(first + i)[rows] for i in range(steps_per_call)]
        )
        local = self.images(ids).reshape(steps_per_call, len(rows), *self.image_shape)
        images = jax.make_array_from_process_local_data(sharding, local, global_shape)
        if not self.class_names:
            return images
        labels = self.labels(ids).reshape(steps_per_call, len(rows))  # after images(ids)
        return {"image": images, "label": jax.make_array_from_process_local_data(
            sharding, labels, global_shape[:2])}

    def close(self) -> None:
        """Stops the decoding threads."""
        self._store.decoder.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
