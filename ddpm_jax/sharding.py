"""The device mesh and the shardings used everywhere: batch split on 'data', the rest replicated.

Data parallelism is plain `jax.jit` over a one-axis `Mesh`: the compiler inserts the gradient
all-reduce, and every random draw is made at the global shape, so results do not depend on the
number of devices.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh(devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def rep(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def replicated(mesh: Mesh, tree):
    """The replicated sharding for every leaf of `tree` (params, EMA, optimizer state)."""
    return jax.tree.map(lambda _: rep(mesh), tree)


def batch(mesh: Mesh, leading_dims: int = 0) -> NamedSharding:
    """Shards the batch axis, which follows `leading_dims` unsharded axes (e.g. fused steps)."""
    return NamedSharding(mesh, P(*([None] * leading_dims), "data"))


def with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs carrying shardings: orbax's restore target for any device layout."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings
    )


def global_batch(mesh: Mesh, array: np.ndarray) -> jax.Array:
    """A host array that every process holds in full, sharded on its first axis."""
    s = batch(mesh)
    return jax.make_array_from_callback(array.shape, s, lambda index: array[index])
