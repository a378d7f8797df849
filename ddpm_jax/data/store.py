"""Decoded images by dataset index: an optional in-memory cache, and stand-ins for bad files.

A file that passed the header probe but fails to decode later (e.g. a truncated JPEG) is logged,
counted in `skipped_files` and replaced, wherever it occurs, by the next decodable training
example in index order. That replacement is deterministic (whether a file decodes does not depend
on when it is tried), but the count grows as such files are met, and differs between processes.
The replacement's label comes with it.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from ddpm_jax.data import decode, sources
from ddpm_jax.data.settings import InputError

logger = logging.getLogger(__name__)


class ImageStore:
    """uint8 images of a source's examples, decoded on first use (and cached, with `cache`)."""

    def __init__(self, source: sources.Source, decoder: decode.Decoder,
                 train_indices: np.ndarray, *, cache: bool, skipped_files: int):
        self.source = source
        self.decoder = decoder
        self._train_indices = train_indices  # the stand-ins for bad files come from these
        # np.empty commits memory page by page as images are decoded into it.
        shape = (len(source.items), *decoder.shape)
        self._cache = np.empty(shape, np.uint8) if cache else None
        self._filled = np.zeros(len(source.items), bool)
        self._bad: set[int] = set()  # training ids that failed to decode after the probe
        self._lock = threading.Lock()
        self._skipped = skipped_files
        self._substitute: dict[int, int] = {}  # unreadable id -> the id whose image replaced it

    @property
    def skipped_files(self) -> int:
        return self._skipped

    @property
    def cached(self) -> bool:
        return self._cache is not None

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

    def labels(self, ids: np.ndarray) -> np.ndarray:
        """int32 [len(ids)]: the class of each of `images(ids)` (after any replacement)."""
        if self.source.labels is None:
            raise ValueError(f"{self.source.key} has no labels")
        ids = [self._substitute.get(int(i), int(i)) for i in np.asarray(ids)]
        return self.source.labels[np.asarray(ids, np.int64)].astype(np.int32)

    def _decode(self, ids: np.ndarray) -> np.ndarray:
        """Decodes ids (unique), replacing any that fail; see the module docstring."""
        todo = np.array([int(i) not in self._bad for i in ids], bool)
        images = np.empty((len(ids), *self.decoder.shape), np.uint8)
        images[todo], errors = self.decoder.many(self.source.items, ids[todo])
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
            self.source.label(i),
            type(err).__name__,
            err,
            self._skipped,
        )

    def _replacement(self, i: int) -> np.ndarray:
        """The next training example after i (cyclically, in index order) that decodes."""
        n = len(self._train_indices)
        pos = int(np.searchsorted(self._train_indices, i))
        for k in range(1, n):
            j = int(self._train_indices[(pos + k) % n])
            if j in self._bad:
                continue
            if self._cache is not None and self._filled[j]:
                self._substitute[i] = j
                return self._cache[j].copy()
            try:
                image = self.decoder.one(self.source.items[j])
                self._substitute[i] = j
                return image
            except Exception as err:  # noqa: BLE001 -- reported; try the next one
                self._mark_bad(j, err)
        raise InputError(f"{self.source.key}: none of the {n} training images can be decoded")
