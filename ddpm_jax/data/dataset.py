"""The training dataset: images ordered by (seed, step) alone, sliced per process, prefetched.

`create_datasets` opens the source `config.data` names, holds out the eval images, checks that
enough usable data is left, and returns an `ImageDataset` over the rest; see split.py for the
order and sources.py for the sources. Images stay uint8 on the host; scaling to [-1, 1] and
random flips happen on device (model_input.to_model_input).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from typing import Any, Self

import jax
import numpy as np

from ddpm_jax.data import decode, prefetch, sources, split
from ddpm_jax.data.settings import InputError, Settings, image_hw, read_settings

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
    if not isinstance(global_batch_size, int) or global_batch_size < 1:
        raise InputError(f"global_batch_size={global_batch_size!r} must be a positive integer")
    if global_batch_size % process_count:
        raise InputError(
            f"global_batch_size={global_batch_size} is not divisible by the "
            f"{process_count} processes"
        )
    if not 0 <= process_index < process_count:
        raise InputError(f"process_index={process_index} is not in [0, {process_count})")

    pool = (
        concurrent.futures.ThreadPoolExecutor(s.num_workers, thread_name_prefix="input-decode")
        if s.num_workers > 1
        else None
    )
    decoder = decode.Decoder(image_hw(s.image_size), s.channels, s.resize, pool, s.num_workers)
    try:
        return _build(s, decoder, seed, global_batch_size, process_index, process_count,
                      num_classes)
    except BaseException:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        raise



def _eval_from_split(s: Settings, decoder: decode.Decoder,
                     num_classes: int) -> tuple[np.ndarray, np.ndarray | None, int]:
    """The first num_eval_examples images of the tfds eval_split -> (images, their labels if
    num_classes, unreadable count)."""
    eval_source = sources.open_tfds(s.name, s.eval_split, s.data_dir, limit=s.num_eval_examples,
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


def _build(
    s: Settings,
    decoder: decode.Decoder,
    seed: int,
    global_batch_size: int,
    process_index: int,
    process_count: int,
    num_classes: int = 0,
) -> tuple[ImageDataset, np.ndarray]:
    source = sources.open_source(s, decoder.pool, num_classes)
    hold_out = not (s.source == "tfds" and s.eval_split)
    n_usable = int(source.usable.sum())
    n_held = split.eval_hold_out(s, n_usable) if hold_out else 0
    skipped = len(source.items) - n_usable
    if n_usable < n_held + 1:  # fail before decoding anything
        raise InputError(
            f"{source.key}: {n_usable} usable images (of {len(source.items)}; {skipped} "
            f"unreadable) leave no training image after num_eval_examples={n_held}"
        )
    if s.source == "folder":
        logger.info(
            "%s: %d usable images, %d held out for the validation loss (data.folder_eval_fraction"
            "=%g of them, at most data.num_eval_examples=%d)%s",
            source.key, n_usable, n_held, s.folder_eval_fraction, s.num_eval_examples,
            "" if n_held else "; no validation loss",
        )

    in_train = source.usable.copy()
    eval_ids = np.zeros(0, np.int64)
    eval_labels = None
    if hold_out:
        order = split.hold_out_order(len(source.items))
        eval_ids, eval_images, failed = split.take_decodable(
            source, order[source.usable[order]], n_held, decoder
        )
        in_train[eval_ids] = False
        in_train[failed] = False
        skipped += len(failed)
        if source.labels is not None:
            eval_labels = source.labels[eval_ids].astype(np.int32)
    elif s.num_eval_examples:
        eval_images, eval_labels, n_failed = _eval_from_split(s, decoder, num_classes)
        skipped += n_failed
    else:
        eval_images = np.zeros((0, *decoder.shape), np.uint8)
        eval_labels = None if source.labels is None else np.zeros(0, np.int32)
    train_ids = np.flatnonzero(in_train)
    if len(eval_images) < n_held or not len(train_ids):
        raise InputError(
            f"{source.key}: {len(eval_images)} eval + {len(train_ids)} training images after "
            f"{skipped} unreadable; need num_eval_examples={n_held} + at least one for training"
        )
    if len(train_ids) < global_batch_size:
        # The order spans several epochs per batch (see global_indices): every image is in a
        # batch about global_batch / N times, still each once per epoch.
        logger.warning(
            "%s: %d training images, fewer than global_batch_size=%d: images repeat within a "
            "batch", source.key, len(train_ids), global_batch_size,
        )

    size_gb = len(source.items) * int(np.prod(decoder.shape)) / 2**30
    cache = bool(s.cache) and size_gb <= s.cache_max_gb
    logger.info(
        "%s: %d training + %d eval images at %dx%d (HxW), %d unreadable skipped; %s",
        source.key,
        len(train_ids),
        len(eval_images),
        *decoder.shape[:2],
        skipped,
        f"caching decoded images in memory ({size_gb:.2f} GiB)"
        if cache
        else f"decoding every batch from the source (cache={s.cache}, {size_gb:.2f} GiB "
        f"vs cache_max_gb={s.cache_max_gb})",
    )
    dataset = ImageDataset(
        source,
        train_ids,
        eval_ids,
        decoder=decoder,
        seed=seed % 2**64,  # default_rng needs a non-negative seed
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
        cache=cache,
        skipped_files=skipped,
        prefetch=s.prefetch,
        eval_labels=eval_labels,
    )
    return dataset, eval_images


class ImageDataset:
    """Training images, ordered by (seed, step) alone; see the module docstring.

    Dataset indices index the source (sorted file list / tfds split / embedded array), so
    `train_indices` and `eval_indices` (held-out, empty with a tfds eval_split) are disjoint
    subsets of them. Decoded images are cached in memory when `cache` is set; otherwise every
    batch is decoded from the source.

    A file that passed the header probe but fails to decode later (e.g. a truncated JPEG) is
    logged, counted in `skipped_files` and replaced, wherever it occurs, by the next decodable
    training example in index order; that replacement is deterministic, but the count grows
    as such files are met, and differs between processes. Its label comes with it.

    With labels (`class_names` non-empty), `iterate` yields {'image': ..., 'label': ...} and
    `eval_labels` holds the held-out images' classes.
    """

    def __init__(
        self,
        source: sources.Source,
        train_indices: np.ndarray,
        eval_indices: np.ndarray,
        *,
        decoder: decode.Decoder,
        seed: int,
        global_batch_size: int,
        process_index: int,
        process_count: int,
        cache: bool,
        skipped_files: int,
        prefetch: int,
        eval_labels: np.ndarray | None = None,
    ):
        self.num_examples = len(train_indices)
        self.image_shape = decoder.shape
        self.train_indices = np.asarray(train_indices, np.int64)
        self.eval_indices = np.asarray(eval_indices, np.int64)
        self.global_batch_size = global_batch_size
        self.process_index = process_index
        self.process_count = process_count
        self.seed = seed
        self.prefetch = prefetch
        self._source = source
        self._decoder = decoder
        local = global_batch_size // process_count
        self._local_rows = np.arange(process_index * local, (process_index + 1) * local)
        # np.empty commits memory page by page as images are decoded into it.
        shape = (len(source.items), *self.image_shape)
        self._cache = np.empty(shape, np.uint8) if cache else None
        self._filled = np.zeros(len(source.items), bool)
        self._bad: set[int] = set()  # training ids that failed to decode after the probe
        self._lock = threading.Lock()
        self._skipped = skipped_files
        self._substitute: dict[int, int] = {}  # unreadable id -> the id whose image replaced it
        self.class_names = source.class_names
        self.eval_labels = eval_labels

    @property
    def skipped_files(self) -> int:
        """Unreadable examples skipped so far (folder source; 0 for the others in practice)."""
        return self._skipped

    @property
    def cached(self) -> bool:
        return self._cache is not None

    def global_indices(self, step: int) -> np.ndarray:
        """Dataset indices (int64 [global_batch]) of the global batch at `step`."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        n, b = self.num_examples, self.global_batch_size
        positions = step * b + np.arange(b, dtype=np.int64)
        epochs, offsets = np.divmod(positions, n)
        out = np.empty(b, np.int64)
        for epoch in np.unique(epochs):  # two at most, unless global_batch > num_examples
            mask = epochs == epoch
            order = split.epoch_order(self.seed, int(epoch), n)
            out[mask] = self.train_indices[order[offsets[mask]]]
        return out

    def labels(self, ids: np.ndarray) -> np.ndarray:
        """int32 [len(ids)]: the class of each of `images(ids)` (after any replacement)."""
        if self._source.labels is None:
            raise ValueError(f"{self._source.key} has no labels")
        ids = [self._substitute.get(int(i), int(i)) for i in np.asarray(ids)]
        return self._source.labels[np.asarray(ids, np.int64)].astype(np.int32)

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

        def produce(k: int) -> jax.Array | dict[str, jax.Array]:
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

        return prefetch.PrefetchIterator(produce, self.prefetch)

    def images(self, ids: np.ndarray) -> np.ndarray:
        """uint8 [len(ids), H, W, C] for dataset indices `ids`, through the cache if enabled."""
        ids = np.asarray(ids, np.int64)
        unique = np.unique(ids)
        if self._cache is None:
            return self._decode(unique)[np.searchsorted(unique, ids)]
        missing = unique[~self._filled[unique]]
        if missing.size:
            self._cache[missing] = self._decode(missing)
            self._filled[missing] = True
        return self._cache[ids]

    def close(self) -> None:
        """Stops the decoding threads."""
        if self._decoder.pool is not None:
            self._decoder.pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _decode(self, ids: np.ndarray) -> np.ndarray:
        """Decodes ids (unique), replacing any that fail; see the class docstring."""
        todo = np.array([int(i) not in self._bad for i in ids], bool)
        images = np.empty((len(ids), *self.image_shape), np.uint8)
        images[todo], errors = self._decoder.many(self._source.items, ids[todo])
        for row, err in errors.items():
            self._mark_bad(int(ids[todo][row]), err)
        for row in np.flatnonzero([int(i) in self._bad for i in ids]):
            images[row] = self._replacement(int(ids[row]))
        return images

    def _mark_bad(self, i: int, err: Exception) -> None:
        with self._lock:
            if i in self._bad:
                return
            self._bad.add(i)
            self._skipped += 1
        logger.warning(
            "Skipping unreadable image %s (%s: %s); %d skipped so far",
            self._source.label(i),
            type(err).__name__,
            err,
            self._skipped,
        )

    def _replacement(self, i: int) -> np.ndarray:
        """The next training example after i (cyclically, in index order) that decodes.
        Deterministic: whether a file decodes does not depend on when it is tried."""
        n = self.num_examples
        pos = int(np.searchsorted(self.train_indices, i))
        for k in range(1, n):
            j = int(self.train_indices[(pos + k) % n])
            if j in self._bad:
                continue
            if self._cache is not None and self._filled[j]:
                self._substitute[i] = j
                return self._cache[j].copy()
            try:
                image = self._decoder.one(self._source.items[j])
                self._substitute[i] = j
                return image
            except Exception as err:  # noqa: BLE001 -- reported; try the next one
                self._mark_bad(j, err)
        raise InputError(f"{self._source.key}: none of the {n} training images can be decoded")
