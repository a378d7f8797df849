"""Training images: sources, a step-indexed deterministic order, caching and device prefetch.

The order of training examples is a pure function of (seed, step): global example position
`p = step * global_batch + j` lies in epoch `p // N`, whose order is
`np.random.default_rng([seed, epoch]).permutation(N)`. Resuming therefore needs only the step, and
the batches do not depend on how many processes or devices share them: process i of P loads the
contiguous slice i of every global batch. Images stay uint8 on the host; scaling to [-1, 1] and
random flips happen on device in `to_model_input`.

Sources (`data.source`):
  * 'folder': every jpg/jpeg/png/webp/bmp below `data.path` (recursive, sorted, so dataset index i
    is the i-th path in sorted order; names starting with '.' are ignored). Headers are probed up
    front; pixels are decoded lazily, only for the examples a process needs.
  * 'tfds': the encoded 'image' feature of `data.name`/`data.split`, kept in memory as bytes and
    decoded exactly like files (index i is the i-th example of the split).
  * 'embedded': 'lfw_faces', the 100 LFW face crops that ship with scikit-image.

Labels (class-conditional models, `num_classes` > 0): for a folder with `data.labels='subdirs'`,
one class per top-level sub-directory of `data.path`, in sorted order of the names; for tfds, the
feature `data.label_key`. Batches are then {'image': uint8 images, 'label': int32 classes}.

Every image becomes RGB (transparency composited on white, 16-bit greyscale scaled to 8 bits,
EXIF orientation applied), or greyscale (PIL's luma of that RGB) with `data.channels=1`, and
`data.image_size` (an int for squares, or (height, width)) by `data.resize`: 'center_crop' (the
largest centred box of that aspect ratio, then resized) or 'stretch' (the whole image squashed to
it), with Lanczos resampling.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import io
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SOURCES = ("folder", "tfds", "embedded")
CHANNELS = (1, 3)  # greyscale or RGB
RESIZE_POLICIES = ("center_crop", "stretch")
LABEL_SOURCES = ("", "subdirs")  # data.labels: none, or the folder's top-level sub-directories
EMBEDDED_DATASETS = ("lfw_faces",)
_LFW_NUM_FACES = 100  # skimage.data.lfw_subset(): the first 100 of its 200 crops are faces
_HOLD_OUT_SEED = 0  # the held-out eval examples must not change with the training seed
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")

Item = str | bytes | np.ndarray  # a file path, encoded image bytes, or a decoded array


class InputError(ValueError):
    """Unusable data settings or data, reported before anything is compiled."""


# ---------------------------------------------------------------------------------------------
# Settings


@dataclasses.dataclass(frozen=True)
class _Settings:
    """The `config.data` fields this module reads, validated."""

    source: str = "embedded"
    name: str = "lfw_faces"
    path: str = ""
    split: str = "train"
    eval_split: str = ""
    data_dir: str = ""
    image_size: int | Sequence[int] = 32
    channels: int = 3
    resize: str = "center_crop"
    cache: bool = True
    cache_max_gb: float = 4.0
    num_eval_examples: int = 16
    folder_eval_fraction: float = 0.05
    prefetch: int = 2
    num_workers: int = 8
    labels: str = ""
    label_key: str = "label"


def _read_settings(data_config: Any) -> _Settings:
    """Reads `data_config` (a ConfigDict or any object with these attributes; missing ones take
    their defaults) and validates it."""
    fields = {
        f.name: getattr(data_config, f.name, f.default) for f in dataclasses.fields(_Settings)
    }
    s = _Settings(**fields)
    if s.source not in SOURCES:
        raise InputError(f"data.source={s.source!r} is not one of {SOURCES}")
    if s.channels not in CHANNELS or isinstance(s.channels, bool):
        raise InputError(f"data.channels={s.channels!r} is not one of {CHANNELS} (grey, RGB)")
    if s.resize not in RESIZE_POLICIES:
        raise InputError(f"data.resize={s.resize!r} is not one of {RESIZE_POLICIES}")
    image_hw(s.image_size)  # raises on anything but a positive int or (height, width)
    for key, minimum in (
        ("num_eval_examples", 0),
        ("prefetch", 0),
        ("num_workers", 1),
    ):
        value = getattr(s, key)
        # bool is an int subclass; True as a count is a config mistake, not 1.
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise InputError(f"data.{key}={value!r} must be an integer >= {minimum}")
    fraction = s.folder_eval_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not (
            0 <= fraction <= 1):
        raise InputError(f"data.folder_eval_fraction={fraction!r} must be a number in [0, 1]")
    if not isinstance(s.cache_max_gb, int | float) or s.cache_max_gb < 0:
        raise InputError(f"data.cache_max_gb={s.cache_max_gb!r} must be a number >= 0")
    if s.labels not in LABEL_SOURCES:
        raise InputError(f"data.labels={s.labels!r} is not one of {LABEL_SOURCES}")
    if s.labels and s.source != "folder":
        raise InputError(f"data.labels={s.labels!r} is for data.source='folder' (tfds labels "
                         "come from data.label_key)")
    if s.source == "folder" and not s.path:
        raise InputError(
            "data.path is empty: data.source='folder' needs --config.data.path=/path/to/images"
        )
    return s


# ---------------------------------------------------------------------------------------------
# Decoding


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparent pixels are composited on white (dropping alpha would
    expose whatever colour the encoder left under them, often black or noise)."""
    if im.mode == "RGB":
        return im
    if im.mode in _SIXTEEN_BIT_MODES:
        # PIL's own I -> L conversion clips at 255 instead of scaling the 16-bit range.
        wide = np.asarray(im).astype(np.float32)
        im = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8))
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
    return im.convert("RGB")


def _fit(im: Image.Image, size_hw: tuple[int, int], resize: str) -> Image.Image:
    """Resizes to (height, width): the largest centred box of that aspect ratio ('center_crop')
    or the whole image ('stretch')."""
    w, h = im.size
    th, tw = size_hw
    if (w, h) == (tw, th):
        return im
    box = None
    if resize == "center_crop":
        # Crop the longer side (relative to the target's aspect): w / h against tw / th.
        cw, ch = (h * tw / th, h) if w * th > h * tw else (w, w * th / tw)
        box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
    # reducing_gap: a fast integer reduce() first for big downscales, still Lanczos quality.
    return im.resize((tw, th), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)


def image_hw(image_size: Any) -> tuple[int, int]:
    """`data.image_size` as (height, width): an int is a square; a pair (a tuple, or the list a
    saved config's JSON holds) is (height, width)."""
    pair = (image_size, image_size) if isinstance(image_size, int) else image_size
    ok = isinstance(pair, Sequence) and not isinstance(pair, str) and len(pair) == 2 and all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in pair)
    if not ok:  # bool is an int subclass; True as an image size is a config mistake, not 1
        raise InputError(f"data.image_size={image_size!r} must be an integer >= 1 or a "
                         "(height, width) pair of them")
    return int(pair[0]), int(pair[1])


def image_shape(data_config: Any) -> tuple[int, int, int]:
    """(H, W, C) of the training images, and so of the model's input, output and samples.
    Configs saved before `data.channels` existed were RGB."""
    return (*image_hw(data_config.image_size), data_config.get("channels", 3))


def _load(item: Item, size_hw: tuple[int, int], resize: str, channels: int) -> np.ndarray:
    """Decodes one path / encoded bytes / array into uint8 [height, width, channels]. Raises if
    unreadable."""
    if isinstance(item, np.ndarray):
        im = Image.fromarray(item)
    else:
        im = Image.open(io.BytesIO(item) if isinstance(item, bytes) else item)
    with im:
        # JPEG only: decode at the smallest DCT scale still >= the size on both sides (much
        # faster). The crop box is then still at least the target size: its short side is one
        # of the image's.
        im.draft(None, (size_hw[1], size_hw[0]))
        im.load()
        ImageOps.exif_transpose(im, in_place=True)
        im = _fit(_to_rgb(im), size_hw, resize)
        if channels == 1:
            return np.asarray(im.convert("L"), dtype=np.uint8)[..., None]
        return np.asarray(im, dtype=np.uint8)


def _probe(path: str) -> str | None:
    """Cheap integrity check without decoding pixels: None if fine, else the error text.

    Catches non-images, bad headers and (through PNG chunk CRCs) truncated PNGs; a truncated JPEG
    still passes and is caught when decoded (see ImageDataset._decode).
    """
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as err:  # noqa: BLE001 -- any failure means "skip this file"
        return f"{type(err).__name__}: {err}"
    return None


def _parallel_map(pool: concurrent.futures.Executor | None, fn: Callable, items: Sequence):
    return list(pool.map(fn, items) if pool is not None else map(fn, items))


@dataclasses.dataclass(frozen=True)
class _Decoder:
    """Decodes batches of items on a thread pool (PIL releases the GIL while decoding)."""

    size_hw: tuple[int, int]
    channels: int
    resize: str
    pool: concurrent.futures.ThreadPoolExecutor | None
    num_workers: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.size_hw, self.channels)

    def one(self, item: Item) -> np.ndarray:
        return _load(item, self.size_hw, self.resize, self.channels)

    def many(
        self, items: Sequence[Item], ids: np.ndarray
    ) -> tuple[np.ndarray, dict[int, Exception]]:
        """Decodes items[ids] -> (uint8 [len(ids), S, S, C], {row: error} for failed rows)."""
        out = np.zeros((len(ids), *self.shape), np.uint8)

        def work(rows: np.ndarray) -> dict[int, Exception]:
            errors = {}
            for r in rows:
                try:
                    out[r] = self.one(items[ids[r]])
                except Exception as err:  # noqa: BLE001 -- reported and handled by the caller
                    errors[int(r)] = err
            return errors

        # A few chunks per worker: balances uneven decode times without per-image task overhead.
        chunks = np.array_split(np.arange(len(ids)), min(len(ids), 4 * self.num_workers) or 1)
        errors: dict[int, Exception] = {}
        for chunk_errors in _parallel_map(self.pool, work, chunks):
            errors.update(chunk_errors)
        return out, errors


# ---------------------------------------------------------------------------------------------
# Sources


@dataclasses.dataclass(frozen=True)
class _Source:
    """Random-access raw examples plus which of them passed the up-front probe."""

    key: str  # names the culprit in messages, e.g. "data.path='/photos'"
    items: Sequence[Item]
    usable: np.ndarray  # bool [len(items)]
    labels: np.ndarray | None = None  # int32 [len(items)], the class of each item
    class_names: tuple[str, ...] = ()

    def label(self, i: int) -> str:
        item = self.items[i]
        return item if isinstance(item, str) else f"{self.key}[{i}]"


def _list_images(root: Path) -> list[str]:
    """Image files below root, sorted by relative path; hidden files and folders are skipped
    (e.g. macOS '._x.jpg' resource forks, '.ipynb_checkpoints')."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [
            os.path.join(dirpath, f)
            for f in filenames
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
        ]
    return sorted(found, key=lambda p: Path(p).relative_to(root).as_posix())


def _subdir_labels(root: Path, paths: list[str], key: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """data.labels='subdirs': (class of each path, sorted class names), a class per top-level
    sub-directory that holds images."""
    top = [Path(p).relative_to(root).parts for p in paths]
    loose = [os.path.join(*parts) for parts in top if len(parts) == 1]
    if loose:
        raise InputError(f"data.labels='subdirs': {len(loose)} images directly in {key} belong to "
                         f"no class sub-directory (e.g. {loose[0]!r})")
    names = tuple(sorted({parts[0] for parts in top}))
    if len(names) < 2:
        raise InputError(f"data.labels='subdirs': {key} has {len(names)} class sub-directory "
                         f"with images {names}; need at least 2")
    index = {name: i for i, name in enumerate(names)}
    return np.array([index[parts[0]] for parts in top], np.int32), names


def _open_folder(path: str, pool: concurrent.futures.Executor | None,
                 labels: str = "") -> _Source:
    root = Path(path).expanduser()
    key = f"data.path={str(root)!r}"
    if not root.exists():
        raise InputError(f"{key} does not exist (0 images)")
    if not root.is_dir():
        raise InputError(f"{key} is not a directory (0 images)")
    paths = _list_images(root)
    if not paths:
        raise InputError(f"{key}: 0 images found (extensions {', '.join(IMAGE_EXTENSIONS)})")
    classes, names = _subdir_labels(root, paths, key) if labels else (None, ())
    errors = _parallel_map(pool, _probe, paths)
    for p, err in zip(paths, errors, strict=True):
        if err is not None:
            logger.warning("Skipping unreadable image %s (%s)", p, err)
    return _Source(key, paths, np.array([e is None for e in errors]), classes, names)


def _import_tfds():
    """tensorflow_datasets imports TensorFlow (seconds): only for data.source='tfds'."""
    import tensorflow as tf

    # TF must not claim the accelerator memory JAX is about to use (RuntimeError: TF already
    # initialised its devices, nothing to do then).
    with contextlib.suppress(RuntimeError):
        tf.config.set_visible_devices([], "GPU")
    import tensorflow_datasets as tfds

    return tfds


_TFDS_WAY_OUT = (
    "To train without TFDS, use --config.data.source=folder --config.data.path=/path/to/images; "
    "or download and prepare it by hand and pass --config.data.data_dir=/that/dir"
)
_REACHABLE_TIMEOUT_S = 4.0


def _open_tfds(name: str, split: str, data_dir: str, limit: int | None = None,
               label_key: str = "") -> _Source:
    """The encoded 'image' feature of a TFDS split (first `limit` examples), kept as bytes, and
    with `label_key` that feature's classes."""
    tfds = _import_tfds()
    key = f"data.name={name!r} split={split!r}"
    load = functools.partial(tfds.load, name, split=split, data_dir=data_dir or None,
                             decoders={"image": tfds.decode.SkipDecoding()}, with_info=True)
    try:
        try:  # prepared data (e.g. downloaded by hand into data.data_dir) needs no network
            ds, info = load(download=False)
        except Exception:  # noqa: BLE001 -- not prepared, or not a dataset: the download says
            _check_download_reachable(tfds, name, data_dir, key)
            ds, info = load()
        names = ()
        if label_key:
            if label_key not in info.features:
                raise InputError(f"data.label_key={label_key!r} is not a feature of TFDS {key} "
                                 f"(features: {', '.join(sorted(info.features))})")
            names = tuple(getattr(info.features[label_key], "names", None) or ())
        examples = ds.map(lambda ex: (ex["image"], ex[label_key] if label_key else 0))
        if limit is not None:
            examples = examples.take(limit)
        items, labels = [], []
        for images, classes in tfds.as_numpy(examples.batch(4096)):
            items += images.tolist()
            labels += np.asarray(classes).tolist()
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 -- download/prepare fail in many types
        summary = (str(err).strip().splitlines() or [""])[0]
        summary = summary if len(summary) <= 300 else summary[:300] + " [...]"
        raise InputError(
            f"could not load TFDS {key} ({type(err).__name__}: {summary}). {_TFDS_WAY_OUT}"
        ) from None
    return _Source(f"tfds {key}", items, np.ones(len(items), bool),
                   np.array(labels, np.int64) if label_key else None, names)


def _check_download_reachable(tfds, name: str, data_dir: str, key: str) -> None:
    """Raise InputError at once when a server the download needs does not answer.

    Offline, tfds retries each failed connection with backoff for about 3.5 minutes before it
    gives up; this asks each host once, all within seconds. The URLs come from the builder's
    registered checksums; a builder without them is left to tfds.
    """
    from urllib.parse import urlsplit

    urls = tfds.builder(name, data_dir=data_dir or None).url_infos or {}
    hosts = sorted({f"{u.scheme}://{u.netloc}/" for u in map(urlsplit, urls) if u.netloc})
    for host in hosts:
        if not _reachable(host, _REACHABLE_TIMEOUT_S):
            raise InputError(
                f"could not load TFDS {key}: it is not prepared"
                f"{f' in {data_dir}' if data_dir else ''} and its download server {host} does "
                f"not answer (offline?). {_TFDS_WAY_OUT}"
            )


def _reachable(url: str, timeout_s: float) -> bool:
    """Whether an HTTP server answers `url` within `timeout_s` seconds, name lookup included.

    Any HTTP answer counts (an error status or a redirect, which is not followed): the question
    is whether a download could start, not whether this URL serves anything. A name that does
    not resolve, a refused or timed-out connection or a TLS failure count as unreachable. The
    request honours the *_proxy environment variables, as tfds' downloads do.
    """
    import urllib.error
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None  # the 3xx surfaces as an HTTPError: an answer

    answered: list[bool] = []

    def probe():
        opener = urllib.request.build_opener(NoRedirect)
        try:
            opener.open(urllib.request.Request(url, method="HEAD"), timeout=timeout_s).close()
            answered.append(True)
        except urllib.error.HTTPError:
            answered.append(True)
        except Exception:  # noqa: BLE001 -- URLError, OSError, timeouts, TLS errors
            answered.append(False)

    # A thread, because name lookup (getaddrinfo) takes no timeout.
    thread = threading.Thread(target=probe, name="tfds-reachable", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(answered and answered[0])


def _open_embedded(name: str) -> _Source:
    if name not in EMBEDDED_DATASETS:
        raise InputError(f"data.name={name!r} is not an embedded dataset {EMBEDDED_DATASETS}")
    import skimage.data

    faces = np.asarray(skimage.data.lfw_subset()[:_LFW_NUM_FACES])
    if faces.dtype != np.uint8:  # documented as uint8, but skimage 0.26 returns floats in [0, 1]
        faces = np.clip(np.rint(faces * 255.0), 0, 255).astype(np.uint8)
    # Greyscale crops: decoded like any image, to RGB (three equal channels) or to one channel.
    return _Source(f"data.name={name!r}", list(faces), np.ones(len(faces), bool))


def _take_decodable(
    source: _Source, candidates: np.ndarray, n: int, decoder: _Decoder
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The first n candidates that decode -> (ids, uint8 images, ids that failed)."""
    chosen, images, failed = [], [], []
    start = 0
    while len(chosen) < n and start < len(candidates):
        ids = candidates[start : start + n - len(chosen)]
        start += len(ids)
        decoded, errors = decoder.many(source.items, ids)
        for row, i in enumerate(ids):
            if row in errors:
                logger.warning("Skipping unreadable image %s (%s)", source.label(i), errors[row])
                failed.append(int(i))
            else:
                chosen.append(int(i))
                images.append(decoded[row])
    stacked = np.stack(images) if images else np.zeros((0, *decoder.shape), np.uint8)
    return np.array(chosen, np.int64), stacked, failed


def eval_hold_out(s: Any, num_usable: int) -> int:
    """Images held out of the training source for the validation loss.

    tfds and embedded: `num_eval_examples`, sized for datasets of thousands. A folder of photos
    is often ~100-1,000 images, where 256 held out would be a quarter of it or all of it: it
    keeps `folder_eval_fraction` (rounded down), at most `num_eval_examples` (24 photos -> 1,
    972 -> 48, 100,000 -> num_eval_examples).
    """
    if s.source != "folder":
        return s.num_eval_examples
    # The epsilon: 0.29 * 100 is 28.999999999999996 in floats, and means 29.
    share = int(np.floor(s.folder_eval_fraction * num_usable + 1e-9))
    return min(s.num_eval_examples, share)


def _hold_out_order(n: int) -> np.ndarray:
    """Preference order for held-out examples: seed-independent, so eval never sees training."""
    return np.random.default_rng(_HOLD_OUT_SEED).permutation(n)[::-1]


# ---------------------------------------------------------------------------------------------
# Order


@functools.lru_cache(maxsize=8)
def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """Positions 0..n-1 of the training set in the order epoch `epoch` visits them."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    order.flags.writeable = False  # shared through the cache
    return order


def _batch_rows(sharding: jax.sharding.NamedSharding, global_shape: tuple) -> np.ndarray:
    """Batch rows (axis 1) held by this process's devices, in the order that
    jax.make_array_from_process_local_data expects them in the local array."""
    starts = set()
    for index in sharding.addressable_devices_indices_map(global_shape).values():
        for axis, (slc, n) in enumerate(zip(index, global_shape, strict=True)):
            if axis != 1 and slc.indices(n) != (0, n, 1):
                raise ValueError(f"iterate() shards only the batch axis (1), not {sharding.spec}")
        starts.add(index[1].indices(global_shape[1])[0])
    rows_per_shard = sharding.shard_shape(global_shape)[1]
    return np.concatenate([np.arange(s, s + rows_per_shard) for s in sorted(starts)])


# ---------------------------------------------------------------------------------------------
# Prefetching


@dataclasses.dataclass(frozen=True)
class _Failure:
    error: BaseException


def _put(q: queue.Queue, stop: threading.Event, item: Any) -> None:
    # Never block forever on a full queue: close() must be able to end the thread.
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _produce_forever(produce: Callable[[int], Any], q: queue.Queue, stop: threading.Event):
    # A plain function, not a method: the thread must not keep its iterator alive, so that
    # dropping the iterator (-> __del__ -> stop) ends the thread.
    k = 0
    try:
        while not stop.is_set():
            _put(q, stop, produce(k))
            k += 1
    except BaseException as err:  # noqa: BLE001 -- re-raised by the consumer
        _put(q, stop, _Failure(err))


class PrefetchIterator(Iterator):
    """Calls `produce(k)` for k = 0, 1, ... on a daemon thread, keeping up to `depth` results
    queued (depth 0: produce on demand in the caller's thread). next() re-raises errors from the
    thread. close(), `with`, or dropping the iterator stops the thread."""

    def __init__(self, produce: Callable[[int], Any], depth: int):
        self._produce = produce
        self._k = 0  # next k, when producing in the caller's thread
        self._closed = False
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._thread = None
        if depth > 0:
            self._thread = threading.Thread(
                target=_produce_forever,
                args=(produce, self._queue, self._stop),
                daemon=True,
                name="input-prefetch",
            )
            self._thread.start()

    def __next__(self) -> Any:
        if self._closed:
            raise StopIteration
        if self._thread is None:
            self._k += 1
            return self._produce(self._k - 1)
        item = self._queue.get()
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        return item

    def close(self) -> None:
        """Stops the thread (waiting for the batch it is building) and ends the iteration."""
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self._stop.set()


# ---------------------------------------------------------------------------------------------
# Dataset


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
        source: _Source,
        train_indices: np.ndarray,
        eval_indices: np.ndarray,
        *,
        decoder: _Decoder,
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
            out[mask] = self.train_indices[_epoch_order(self.seed, int(epoch), n)[offsets[mask]]]
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
    ) -> PrefetchIterator:
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
        rows = _batch_rows(sharding, global_shape)

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

        return PrefetchIterator(produce, self.prefetch)

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


# ---------------------------------------------------------------------------------------------
# Public entry points


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
    s = _read_settings(data_config)
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
    decoder = _Decoder(image_hw(s.image_size), s.channels, s.resize, pool, s.num_workers)
    try:
        return _build(s, decoder, seed, global_batch_size, process_index, process_count,
                      num_classes)
    except BaseException:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        raise


def _open_source(s: _Settings, pool: concurrent.futures.Executor | None,
                 num_classes: int) -> _Source:
    if s.source == "folder":
        source = _open_folder(s.path, pool, s.labels)
    elif s.source == "tfds":
        source = _open_tfds(s.name, s.split, s.data_dir, label_key=s.label_key * bool(num_classes))
    else:
        source = _open_embedded(s.name)
    _check_labels(source, num_classes)
    if source.labels is not None and not source.class_names:  # e.g. a tfds integer feature
        source = dataclasses.replace(source, class_names=tuple(map(str, range(num_classes))))
    return source


def _check_labels(source: _Source, num_classes: int) -> None:
    """The labels a model of `num_classes` classes needs (none for 0), all in range."""
    n_names = len(source.class_names)
    if source.labels is None or not num_classes:
        if num_classes:
            raise InputError(f"model.num_classes={num_classes} needs labels, and {source.key} has "
                             "none (folders: --config.data.labels=subdirs; tfds: data.label_key)")
        if n_names:
            raise InputError(f"data.labels='subdirs': {source.key} has {n_names} classes "
                             f"{source.class_names}; set --config.model.num_classes={n_names}")
        return
    if n_names and n_names != num_classes:
        raise InputError(f"{source.key} has {n_names} classes {source.class_names[:20]} but "
                         f"model.num_classes={num_classes}; set "
                         f"--config.model.num_classes={n_names}")
    bad = np.flatnonzero((source.labels < 0) | (source.labels >= num_classes))
    if bad.size:
        raise InputError(f"{source.key}: label {source.labels[bad[0]]} of example {bad[0]} ("
                         f"{bad.size} such) is outside [0, model.num_classes={num_classes})")


def _eval_from_split(s: _Settings, decoder: _Decoder,
                     num_classes: int) -> tuple[np.ndarray, np.ndarray | None, int]:
    """The first num_eval_examples images of the tfds eval_split -> (images, their labels if
    num_classes, unreadable count)."""
    eval_source = _open_tfds(s.name, s.eval_split, s.data_dir, limit=s.num_eval_examples,
                             label_key=s.label_key * bool(num_classes))
    _check_labels(eval_source, num_classes)
    ids, images, failed = _take_decodable(
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
    s: _Settings,
    decoder: _Decoder,
    seed: int,
    global_batch_size: int,
    process_index: int,
    process_count: int,
    num_classes: int = 0,
) -> tuple[ImageDataset, np.ndarray]:
    source = _open_source(s, decoder.pool, num_classes)
    hold_out = not (s.source == "tfds" and s.eval_split)
    n_usable = int(source.usable.sum())
    n_held = eval_hold_out(s, n_usable) if hold_out else 0
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
        order = _hold_out_order(len(source.items))
        eval_ids, eval_images, failed = _take_decodable(
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


def to_model_input(images_uint8: jax.Array, rng: jax.Array, random_flip: bool) -> jax.Array:
    """uint8 [..., H, W, C] -> float32 in [-1, 1], each image flipped left-right with probability
    1/2 when `random_flip` (a Python bool: static under jit).

    The flips are drawn at the global shape from `rng`, so the result does not depend on how the
    input is sharded.
    """
    if images_uint8.ndim < 3 or images_uint8.dtype != jnp.uint8:
        raise TypeError(
            f"expected uint8 [..., H, W, C] images, got {images_uint8.dtype} {images_uint8.shape}"
        )
    # The clip matters: XLA turns the division into a reciprocal multiply, and 255 -> 1.0000001.
    x = jnp.clip(images_uint8.astype(jnp.float32) / 127.5 - 1.0, -1.0, 1.0)
    if not random_flip:
        return x
    flip = jax.random.bernoulli(rng, 0.5, images_uint8.shape[:-3])
    return jnp.where(flip[..., None, None, None], jnp.flip(x, axis=-2), x)
