"""The DDPM U-Net (Ho et al. 2020, appendix B), in Flax Linen.

A faithful rebuild of the network in DDPM's TensorFlow code (and score_sde's `ddpm.py`): with
ch=128, ch_mult=(1, 2, 2, 2), two res blocks per level, attention at 16x16 and dropout 0.1 it has
DDPM's 35.7M parameters at 32x32. Parameters are always float32; `dtype` sets the compute
precision (bf16 on accelerators), and the output is float32.

With `num_classes` > 0 the network is class-conditional: a learned embedding of the label is added
to the time embedding after its MLP, as in improved-diffusion's class-conditional models and Ho &
Salimans' classifier-free guidance. Label `num_classes` is the null class (no label), which
training substitutes with probability `model.label_dropout` so that one network learns both the
conditional and the unconditional model. With `num_classes` = 0 there are no label parameters.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax import data


def _init(scale: float = 1.0):
    # DDPM's default_init: variance scaling, fan_avg, uniform. Layers whose output is added to a
    # residual stream start near zero (scale 1e-10) so each block starts as the identity.
    return nn.initializers.variance_scaling(max(scale, 1e-10), "fan_avg", "uniform")


def upsample_nearest(x_BHWC: jax.Array) -> jax.Array:
    """2x nearest-neighbour upsampling as a broadcast: its gradient is a sum over each 2x2 block,
    where jax.image.resize's gather lowers to a scatter-add (~30x slower on XLA:CPU)."""
    B, H, W, C = x_BHWC.shape
    x = jnp.broadcast_to(x_BHWC[:, :, None, :, None, :], (B, H, 2, W, 2, C))
    return x.reshape(B, 2 * H, 2 * W, C)


def timestep_embedding(t_B: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal embedding of (integer) timesteps, [B] -> [B, dim], sin half then cos half."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
    args = t_B.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def dropout(x: jax.Array, rate: float, rng: jax.Array, example_B=None) -> jax.Array:
    """Inverted dropout: each element is zeroed with probability `rate` (rounded to a multiple of
    2^-16) and the rest are divided by the keep probability, so E[output] = x exactly.

    Each 32-bit random word decides two elements (16 bits each), where jax.random.bernoulli
    (nn.Dropout) spends a word per element: for the 22 dropouts of DDPM's CIFAR-10 network at
    batch 16, forward and backward take 48 ms against nn.Dropout's 87 on 2 CPU cores. The words
    are drawn at x's leading shape, so the mask does not depend on how the batch is sharded.

    With `example_B` (int [B], each row's index in the global batch) row i's words come from
    `fold_in(rng, example_B[i])` instead: a row's mask is then the same in any sub-batch, which
    makes a micro-batch of gradient accumulation see the masks of the whole batch.
    """
    threshold = round(rate * 2**16)
    if threshold == 0:
        return x
    *lead, C = x.shape
    if example_B is None:
        words = jax.random.bits(rng, (*lead, -(-C // 2)), jnp.uint32)
    else:
        words = jax.vmap(lambda i: jax.random.bits(
            jax.random.fold_in(rng, i), (*lead[1:], -(-C // 2)), jnp.uint32))(example_B)
    draws = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(*lead, -1)[..., :C]
    keep_prob = 1.0 - threshold / 2**16
    return jnp.where(draws >= threshold, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros_like(x))


class Dropout(nn.Module):
    """`dropout` as a Flax module, drawing from the "dropout" RNG stream like nn.Dropout."""

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool, example_B=None):
        if deterministic or self.rate == 0.0:
            return x
        return dropout(x, self.rate, self.make_rng("dropout"), example_B)


def group_norm(x_BHWC: jax.Array, scale_C: jax.Array, bias_C: jax.Array, num_groups: int,
               epsilon: float = 1e-6) -> jax.Array:
    """GroupNorm as a per-channel affine map: y = x a + b, with a = scale / std and b = bias -
    mean a per image and channel, from one pass of sums of x and x^2 over H and W (float32).

    The same function as nn.GroupNorm (its fast variance, E[x^2] - E[x]^2 clipped at 0, and
    epsilon inside the square root) up to float rounding, but cheaper on XLA:CPU: nn.GroupNorm
    reduces and normalises a [B, H, W, G, C/G] view and broadcasts mean and variance back per
    element, which with its gradient took 53 ms against 23 for this at [16, 32, 32, 128] (24 vs 3
    at [16, 16, 16, 256]) on 2 cores. Returns float32; the caller casts.
    """
    B, H, W, C = x_BHWC.shape
    x = x_BHWC.astype(jnp.float32)
    n = H * W * (C // num_groups)
    mean_BG = x.sum((1, 2)).reshape(B, num_groups, -1).sum(-1) / n
    mean_sq_BG = (x * x).sum((1, 2)).reshape(B, num_groups, -1).sum(-1) / n
    inv_std_BG = jax.lax.rsqrt(jnp.maximum(mean_sq_BG - mean_BG * mean_BG, 0.0) + epsilon)
    a_BC = jnp.repeat(inv_std_BG, C // num_groups, axis=1) * scale_C
    b_BC = bias_C - jnp.repeat(mean_BG, C // num_groups, axis=1) * a_BC
    return x * a_BC[:, None, None, :] + b_BC[:, None, None, :]


class GroupNorm(nn.Module):
    """nn.GroupNorm's parameters (`scale`, `bias`) and defaults, computed by `group_norm`: a
    checkpoint of either loads into the other."""

    num_groups: int = 32
    dtype: jnp.dtype | None = None  # output dtype; statistics are float32 whatever it is
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x_BHWC):
        C = x_BHWC.shape[-1]
        if C % self.num_groups:
            raise ValueError(f"GroupNorm: {self.num_groups} groups do not divide {C} channels")
        scale = self.param("scale", nn.initializers.ones, (C,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (C,), jnp.float32)
        y = group_norm(x_BHWC, scale, bias, self.num_groups, self.epsilon)
        return y.astype(self.dtype or x_BHWC.dtype)


class ResBlock(nn.Module):
    out_ch: int
    dropout: float
    dtype: jnp.dtype
    norm_groups: int

    @nn.compact
    def __call__(self, x_BHWC, temb_BD, train: bool, example_B=None):
        conv = functools.partial(nn.Conv, kernel_size=(3, 3), dtype=self.dtype)
        norm = functools.partial(GroupNorm, num_groups=self.norm_groups, dtype=self.dtype)
        h = conv(self.out_ch, kernel_init=_init())(nn.swish(norm()(x_BHWC)))
        temb = nn.Dense(self.out_ch, kernel_init=_init(), dtype=self.dtype)(nn.swish(temb_BD))
        h = h + temb[:, None, None, :]
        h = Dropout(self.dropout)(nn.swish(norm()(h)), deterministic=not train,
                                  example_B=example_B)
        h = conv(self.out_ch, kernel_init=_init(0.0))(h)
        if x_BHWC.shape[-1] != self.out_ch:
            x_BHWC = nn.Dense(self.out_ch, kernel_init=_init(), dtype=self.dtype)(x_BHWC)
        return x_BHWC + h


def attention(q_BTNH, k_BSNH, v_BSNH, implementation: str) -> jax.Array:
    """jax.nn.dot_product_attention, where "auto" means cuDNN's fused (flash) kernel on a GPU
    that takes these inputs (bf16 or fp16, a head size it supports) and XLA's otherwise.

    jax's own default (implementation=None) is XLA's on every backend, so "auto" has to choose.
    cuDNN's checks run while tracing, so an unsupported case falls back before any compile.
    """
    if implementation == "auto":
        if _on_gpu():
            try:
                return jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, implementation="cudnn")
            except (RuntimeError, ValueError, NotImplementedError, TypeError) as e:
                _log_attention_fallback(f"{type(e).__name__}: {e}")
        implementation = "xla"
    return jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, implementation=implementation)


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


@functools.cache
def _log_attention_fallback(reason: str) -> None:  # cached: once per reason, not per trace
    logging.info("Attention: cuDNN's fused kernel does not apply (%s); using XLA's.", reason)


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions."""

    dtype: jnp.dtype
    implementation: str  # "auto" (cuDNN's fused kernel on GPUs where it applies), "xla", "cudnn"
    norm_groups: int

    @nn.compact
    def __call__(self, x_BHWC):
        B, H, W, C = x_BHWC.shape
        h = GroupNorm(num_groups=self.norm_groups, dtype=self.dtype)(x_BHWC)
        dense = functools.partial(nn.Dense, C, dtype=self.dtype)
        q, k, v = (dense(kernel_init=_init(), name=n)(h).reshape(B, H * W, 1, C) for n in "qkv")
        # Softmax runs in float32 inside dot_product_attention even for bf16 inputs.
        h = attention(q, k, v, self.implementation)
        h = dense(kernel_init=_init(0.0), name="proj_out")(h.reshape(B, H, W, C))
        return x_BHWC + h


class UNet(nn.Module):
    """eps/x0/v-prediction network: (x_t [B, H, W, C], t [B], label [B] if num_classes > 0)
    -> [B, H, W, out_ch] float32."""

    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)  # feature maps whose shorter side is one of these
    dropout: float = 0.1
    out_ch: int = 3
    dtype: jnp.dtype = jnp.float32
    attention_impl: str = "auto"
    norm_groups: int = 32  # GroupNorm's groups in every layer (DDPM: 32); see `norm_groups`
    remat: bool = False  # recompute res blocks in the backward pass: less memory, ~1/3 more FLOPs
    num_classes: int = 0  # > 0: class-conditional, with label num_classes the null class

    @nn.compact
    def __call__(self, x_BHWC, t_B, train: bool = False, label_B=None, example_B=None):
        """`example_B`: the rows' indices in the global batch, for per-example dropout masks
        (see `dropout`); training passes them, other callers need not."""
        block_cls = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock
        block = functools.partial(block_cls, dropout=self.dropout, dtype=self.dtype,
                                  norm_groups=self.norm_groups)
        attn = functools.partial(AttnBlock, dtype=self.dtype, implementation=self.attention_impl,
                                 norm_groups=self.norm_groups)
        conv = functools.partial(nn.Conv, kernel_size=(3, 3), dtype=self.dtype)

        temb = timestep_embedding(t_B, self.ch)
        temb = nn.Dense(4 * self.ch, kernel_init=_init(), dtype=self.dtype, name="temb0")(temb)
        temb = nn.Dense(4 * self.ch, kernel_init=_init(), dtype=self.dtype, name="temb1")(
            nn.swish(temb)
        )
        if self.num_classes:
            if label_B is None:
                raise ValueError(f"a class-conditional UNet (num_classes={self.num_classes}) needs "
                                 "labels; pass label_B (num_classes for none)")
            # improved-diffusion's nn.Embedding init, N(0, 1): at init each class already moves
            # the time embedding by about its own size, so labels matter from the first step.
            temb = temb + nn.Embed(self.num_classes + 1, 4 * self.ch, dtype=self.dtype,
                                   embedding_init=nn.initializers.normal(1.0),
                                   name="label_emb")(label_B)

        # Explicit names: readable checkpoints, and the same names with or without remat.
        hs = [conv(self.ch, kernel_init=_init(), name="conv_in")(x_BHWC.astype(self.dtype))]
        for level, mult in enumerate(self.ch_mult):
            for i in range(self.num_res_blocks):
                h = block(self.ch * mult, name=f"down{level}_res{i}")(hs[-1], temb, train,
                                                                      example_B)
                if min(h.shape[1:3]) in self.attn_resolutions:  # shorter side: H != W
                    h = attn(name=f"down{level}_attn{i}")(h)
                hs.append(h)
            if level != len(self.ch_mult) - 1:
                down = conv(hs[-1].shape[-1], strides=(2, 2), kernel_init=_init(),
                            name=f"down{level}_downsample")
                hs.append(down(hs[-1]))

        h = hs[-1]
        h = block(h.shape[-1], name="mid_res0")(h, temb, train, example_B)
        h = attn(name="mid_attn")(h)
        h = block(h.shape[-1], name="mid_res1")(h, temb, train, example_B)

        for level, mult in reversed(list(enumerate(self.ch_mult))):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = block(self.ch * mult, name=f"up{level}_res{i}")(h, temb, train, example_B)
                if min(h.shape[1:3]) in self.attn_resolutions:
                    h = attn(name=f"up{level}_attn{i}")(h)
            if level != 0:
                h = conv(h.shape[-1], kernel_init=_init(), name=f"up{level}_upsample")(
                    upsample_nearest(h)
                )
        assert not hs, "every skip connection is consumed"

        h = nn.swish(GroupNorm(self.norm_groups, dtype=self.dtype, name="norm_out")(h))
        h = conv(self.out_ch, kernel_init=_init(0.0), name="conv_out")(h)
        return h.astype(jnp.float32)


def check_image_size(image_size, ch_mult: Sequence[int]) -> None:
    """The U-Net halves the resolution len(ch_mult) - 1 times; skips must line up exactly.
    `image_size` is `data.image_size`: an int (square) or (height, width)."""
    factor = 2 ** (len(ch_mult) - 1)
    if isinstance(image_size, int):
        if image_size % factor:
            raise ValueError(f"data.image_size={image_size} is not divisible by "
                             f"2^(len(model.ch_mult)-1)={factor}")
        return
    for name, side in zip(("height", "width"), image_size, strict=True):
        if side % factor:
            raise ValueError(
                f"data.image_size={tuple(image_size)}: {name} {side} cannot be halved "
                f"{len(ch_mult) - 1} times (len(model.ch_mult)-1); it must be divisible by "
                f"{factor}")


# DDPM normalises every layer with 32 groups, which at its width (ch=128) is 4 or more channels
# per group. At ch=32 the same 32 groups are one channel each: instance norm, which subtracts each
# channel's spatial mean (an image's colour, or a grey image's brightness), and norm_out then
# leaves conv_out almost no way to predict the mean colour of eps. Small RGB models drew the right
# shapes in the wrong colours (issue 15). The default keeps DDPM's 4 channels per group at the base
# width: 32 groups for ch >= 128 (DDPM's networks unchanged), ch // 4 below.
MAX_NORM_GROUPS = 32
MIN_CHANNELS_PER_GROUP = 4
LEGACY_NORM_GROUPS = 32  # checkpoints saved before model.norm_groups existed used 32


def norm_groups(model_config) -> int:
    """GroupNorm's group count for the `model` config (a ConfigDict, or the dict a checkpoint
    saved): `norm_groups`, or for 0 min(32, ch // 4). Without the field (a config saved before it
    existed) it is 32."""
    groups = model_config.get("norm_groups", LEGACY_NORM_GROUPS)
    if groups == 0:
        groups = max(1, min(MAX_NORM_GROUPS, model_config["ch"] // MIN_CHANNELS_PER_GROUP))
    return groups


def from_config(config) -> UNet:
    """The typed module from the `model` ConfigDict (the module is itself a frozen dataclass)."""
    m = config.model
    return UNet(
        ch=m.ch,
        ch_mult=tuple(m.ch_mult),
        num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions),
        dropout=m.dropout,
        out_ch=data.image_shape(config.data)[-1],
        dtype=jnp.dtype(m.dtype),
        attention_impl=m.attention_impl,
        norm_groups=norm_groups(m),
        remat=m.remat,
        num_classes=m.get("num_classes", 0),  # configs saved before the field: unconditional
    )


def init_params(model: UNet, rng: jax.Array, image_shape: Sequence[int]):
    """Freshly initialised parameters for images of `image_shape` (H, W, C)."""
    x, t = jnp.zeros((1, *image_shape), jnp.float32), jnp.zeros((1,), jnp.int32)
    label = jnp.zeros((1,), jnp.int32) if model.num_classes else None
    return model.init(rng, x, t, train=False, label_B=label)["params"]


def abstract_params(model: UNet, image_shape: Sequence[int]):
    """The parameter tree as shapes and dtypes (jax.ShapeDtypeStruct), computing nothing: what
    restoring parameters from a checkpoint needs to know."""
    return jax.eval_shape(lambda: init_params(model, jax.random.key(0), tuple(image_shape)))
