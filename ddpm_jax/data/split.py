"""Which examples are held out for the validation loss, and the order training visits the rest.

The order of training examples is a pure function of (seed, step): global example position
`p = step * global_batch + j` lies in epoch `p // N`, whose order is
`np.random.default_rng([seed, epoch]).permutation(N)`. Resuming therefore needs only the step, and
the batches do not depend on how many processes or devices share them: each process loads the
batch rows its devices hold (`batch_rows`).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import jax
import numpy as np

from ddpm_jax.data import decode, sources

logger = logging.getLogger(__name__)

_HOLD_OUT_SEED = 0  # the held-out eval examples must not change with the training seed


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


def hold_out_order(n: int) -> np.ndarray:
    """Preference order for held-out examples: seed-independent, so eval never sees training."""
    return np.random.default_rng(_HOLD_OUT_SEED).permutation(n)[::-1]


def take_decodable(
    source: sources.Source, candidates: np.ndarray, n: int, decoder: decode.Decoder
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


def global_indices(train_indices: np.ndarray, seed: int, step: int,
                   global_batch: int) -> np.ndarray:
    """Dataset indices (int64 [global_batch]) of the global batch at `step`: positions
    step * global_batch + (0 .. global_batch - 1) of the epoch orders, one after another."""
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    n, b = len(train_indices), global_batch
    positions = step * b + np.arange(b, dtype=np.int64)
    epochs, offsets = np.divmod(positions, n)
    out = np.empty(b, np.int64)
    for epoch in np.unique(epochs):  # two at most, unless global_batch > num_examples
        mask = epochs == epoch
        out[mask] = train_indices[epoch_order(seed, int(epoch), n)[offsets[mask]]]
    return out


@functools.lru_cache(maxsize=8)
def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """Positions 0..n-1 of the training set in the order epoch `epoch` visits them."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    order.flags.writeable = False  # shared through the cache
    return order


def batch_rows(sharding: jax.sharding.NamedSharding, global_shape: tuple) -> np.ndarray:
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
