"""Where training examples come from: a folder, a TFDS split, or the embedded faces.

Each opens as a `Source`: random-access raw items (paths, encoded bytes or arrays, all decoded by
decode.load_image), which of them passed an up-front check, and their labels if any.
`open_source` is the one entry point the dataset uses.

  * 'folder': every jpg/jpeg/png/webp/bmp below `data.path` (recursive, sorted, so dataset index i
    is the i-th path in sorted order; names starting with '.' are ignored). Headers are probed up
    front; pixels are decoded lazily, only for the examples a process needs.
  * 'tfds': the encoded 'image' feature of `data.name`/`data.split`, kept in memory as bytes and
    decoded exactly like files (index i is the i-th example of the split).
  * 'embedded': 'lfw_faces', the 100 LFW face crops that ship with scikit-image.

Labels (class-conditional models, `num_classes` > 0): for a folder with `data.labels='subdirs'`,
one class per top-level sub-directory of `data.path`, in sorted order of the names; for tfds, the
feature `data.label_key`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ddpm_jax.data import decode
from ddpm_jax.data.settings import InputError, Settings

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
EMBEDDED_DATASETS = ("lfw_faces",)
_LFW_NUM_FACES = 100  # skimage.data.lfw_subset(): the first 100 of its 200 crops are faces


@dataclasses.dataclass(frozen=True)
class Source:
    """Random-access raw examples plus which of them passed the up-front probe."""

    key: str  # names the culprit in messages, e.g. "data.path='/photos'"
    items: Sequence[decode.Item]
    usable: np.ndarray  # bool [len(items)]
    labels: np.ndarray | None = None  # int32 [len(items)], the class of each item
    class_names: tuple[str, ...] = ()

    def label(self, i: int) -> str:
        item = self.items[i]
        return item if isinstance(item, str) else f"{self.key}[{i}]"


def open_source(s: Settings, pool: concurrent.futures.Executor | None,
                num_classes: int) -> Source:
    """The training source `s` names, with the labels a model of `num_classes` classes needs
    (none for 0), checked."""
    if s.source == "folder":
        source = _open_folder(s.path, pool, s.labels)
    elif s.source == "tfds":
        source = open_tfds(s.name, s.split, s.data_dir, label_key=s.label_key * bool(num_classes))
    else:
        source = _open_embedded(s.name)
    check_labels(source, num_classes)
    if source.labels is not None and not source.class_names:  # e.g. a tfds integer feature
        source = dataclasses.replace(source, class_names=tuple(map(str, range(num_classes))))
    return source


def check_labels(source: Source, num_classes: int) -> None:
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


# ---------------------------------------------------------------------------------------------
# Folder


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
                 labels: str = "") -> Source:
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
    errors = decode.parallel_map(pool, decode.probe, paths)
    for p, err in zip(paths, errors, strict=True):
        if err is not None:
            logger.warning("Skipping unreadable image %s (%s)", p, err)
    return Source(key, paths, np.array([e is None for e in errors]), classes, names)


# ---------------------------------------------------------------------------------------------
# TFDS


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


def open_tfds(name: str, split: str, data_dir: str, limit: int | None = None,
              label_key: str = "") -> Source:
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
    return Source(f"tfds {key}", items, np.ones(len(items), bool),
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


# ---------------------------------------------------------------------------------------------
# Embedded


def _open_embedded(name: str) -> Source:
    if name not in EMBEDDED_DATASETS:
        raise InputError(f"data.name={name!r} is not an embedded dataset {EMBEDDED_DATASETS}")
    import skimage.data

    faces = np.asarray(skimage.data.lfw_subset()[:_LFW_NUM_FACES])
    if faces.dtype != np.uint8:  # documented as uint8, but skimage 0.26 returns floats in [0, 1]
        faces = np.clip(np.rint(faces * 255.0), 0, 255).astype(np.uint8)
    # Greyscale crops: decoded like any image, to RGB (three equal channels) or to one channel.
    return Source(f"data.name={name!r}", list(faces), np.ones(len(faces), bool))
