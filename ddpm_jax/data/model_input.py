"""Training batches as the model sees them: uint8 images -> floats in [-1, 1], randomly flipped.

Runs on device, inside the jitted train step; images stay uint8 on the host until then.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
