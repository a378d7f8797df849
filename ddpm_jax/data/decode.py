"""Decoding one image to uint8 pixels of a given size, and many of them on a thread pool.

Every image becomes RGB (transparency composited on white, 16-bit greyscale scaled to 8 bits,
EXIF orientation applied), or greyscale (PIL's luma of that RGB) with `channels=1`, and then
(height, width) by `resize`: 'center_crop' (the largest centred box of that aspect ratio, then
resized) or 'stretch' (the whole image squashed to it), with Lanczos resampling.

Imports nothing from ddpm_jax: `load_image` is the one way to read an image file the way training
reads it, for any caller.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageOps

_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")

Item = str | bytes | np.ndarray  # a file path, encoded image bytes, or a decoded array


def load_image(item: Item, size_hw: tuple[int, int], resize: str, channels: int) -> np.ndarray:
    """Decodes one path / encoded bytes / array into uint8 [height, width, channels], exactly as
    training images are decoded (`resize` is one of settings.RESIZE_POLICIES, `channels` 1 or 3).
    Raises (PIL's or the OS's error) if unreadable."""
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


def probe(path: str) -> str | None:
    """Cheap integrity check without decoding pixels: None if fine, else the error text.

    Catches non-images, bad headers and (through PNG chunk CRCs) truncated PNGs; a truncated JPEG
    still passes and is caught when decoded (see store.ImageStore).
    """
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as err:  # noqa: BLE001 -- any failure means "skip this file"
        return f"{type(err).__name__}: {err}"
    return None


def parallel_map(pool: concurrent.futures.Executor | None, fn: Callable, items: Sequence):
    """list(map(fn, items)), on `pool` if there is one."""
    return list(pool.map(fn, items) if pool is not None else map(fn, items))


@dataclasses.dataclass(frozen=True)
class Decoder:
    """Decodes batches of items on a thread pool (PIL releases the GIL while decoding)."""

    size_hw: tuple[int, int]
    channels: int
    resize: str
    pool: concurrent.futures.ThreadPoolExecutor | None
    num_workers: int

    @classmethod
    def start(cls, size_hw: tuple[int, int], channels: int, resize: str,
              num_workers: int) -> Decoder:
        """A decoder with `num_workers` threads (none for 1: decodes in the caller's thread)."""
        pool = (
            concurrent.futures.ThreadPoolExecutor(num_workers, thread_name_prefix="input-decode")
            if num_workers > 1
            else None
        )
        return cls(size_hw, channels, resize, pool, num_workers)

    def close(self) -> None:
        """Stops the decoding threads."""
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.size_hw, self.channels)

    def one(self, item: Item) -> np.ndarray:
        return load_image(item, self.size_hw, self.resize, self.channels)

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
        for chunk_errors in parallel_map(self.pool, work, chunks):
            errors.update(chunk_errors)
        return out, errors
