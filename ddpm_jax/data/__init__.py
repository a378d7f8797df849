"""Training images: sources, a step-indexed deterministic order, caching and device prefetch.

Import the public names from here (`from ddpm_jax import data`; `data.create_datasets(...)`).
The modules, each importing only those above it:

  settings.py     `config.data` parsed into `Settings`, InputError, image_hw / image_shape
  decode.py       one image -> uint8 pixels (RGB or grey, fit to size); a thread-pool Decoder
  sources.py      folder / tfds / embedded faces, opened as a `Source` by `open_source`
  split.py        the held-out eval examples, the (seed, step) epoch order, a process's rows
  store.py        decoded images by index: the in-memory cache, stand-ins for unreadable files
  prefetch.py     PrefetchIterator: batches built ahead on a daemon thread
  dataset.py      create_datasets and ImageDataset (order, per-process rows, iterate)
  model_input.py  to_model_input: uint8 batches -> [-1, 1] floats, random flips (on device)
"""

from ddpm_jax.data.dataset import ImageDataset, create_datasets
from ddpm_jax.data.decode import load_image
from ddpm_jax.data.model_input import to_model_input
from ddpm_jax.data.prefetch import PrefetchIterator
from ddpm_jax.data.settings import (
    CHANNELS,
    LABEL_SOURCES,
    RESIZE_POLICIES,
    SOURCES,
    InputError,
    image_hw,
    image_shape,
)
from ddpm_jax.data.sources import EMBEDDED_DATASETS, IMAGE_EXTENSIONS
from ddpm_jax.data.split import eval_hold_out

__all__ = [
    "CHANNELS",
    "EMBEDDED_DATASETS",
    "IMAGE_EXTENSIONS",
    "LABEL_SOURCES",
    "RESIZE_POLICIES",
    "SOURCES",
    "ImageDataset",
    "InputError",
    "PrefetchIterator",
    "create_datasets",
    "eval_hold_out",
    "image_hw",
    "image_shape",
    "load_image",
    "to_model_input",
]
