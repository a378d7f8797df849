"""The `config.data` fields the input pipeline reads, validated, and the image shape they give.

The lowest layer of ddpm_jax.data: it imports nothing from the package, and every other module of
it raises `InputError` for bad settings or data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

SOURCES = ("folder", "tfds", "embedded")
CHANNELS = (1, 3)  # greyscale or RGB
RESIZE_POLICIES = ("center_crop", "stretch")
LABEL_SOURCES = ("", "subdirs")  # data.labels: none, or the folder's top-level sub-directories


class InputError(ValueError):
    """Unusable data settings or data, reported before anything is compiled."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """The `config.data` fields this package reads, validated."""

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


def read_settings(data_config: Any) -> Settings:
    """Reads `data_config` (a ConfigDict or any object with these attributes; missing ones take
    their defaults) and validates it."""
    fields = {
        f.name: getattr(data_config, f.name, f.default) for f in dataclasses.fields(Settings)
    }
    s = Settings(**fields)
    if s.source not in SOURCES:
        raise InputError(f"data.source={s.source!r} is not one of {SOURCES}")
    if s.channels not in CHANNELS or isinstance(s.channels, bool):
        raise InputError(f"data.channels={s.channels!r} is not one of {CHANNELS} (grey, RGB)")
    if s.resize not in RESIZE_POLICIES:
        raise InputError(f"data.resize={s.resize!r} is not one of {RESIZE_POLICIES}")
    image_hw(s.image_size)  # raises on anything but a positive int or (height, width)
    _check_numbers(s)
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


def _check_numbers(s: Settings) -> None:
    """The counts, the folder's eval fraction and the cache limit."""
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
