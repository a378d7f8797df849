"""The FID InceptionV3 (pytorch-fid's `fid_inception_v3`) as a Flax Linen module.

This is the network behind every published FID number: TensorFlow's 2015-12-05 Inception graph as
ported to PyTorch by mseitzer/pytorch-fid (weights `pt_inception-2015-12-05-6726825d.pth`), with
torchvision's InceptionV3 layout and pytorch-fid's TF-compatibility patches:

* BatchNorm eps 1e-3 after every bias-free conv (torchvision's `BasicConv2d`), eval mode.
* The 3x3/stride-1 average pools inside Mixed_5b-d, Mixed_6b-e and Mixed_7b exclude the zero
  padding from the average (TF semantics, PyTorch's `count_include_pad=False`).
* Mixed_7c (FIDInceptionE_2) pools its branch_pool with a 3x3 *max* pool, not an average pool.
* Input: `F.interpolate(x, (299, 299), mode="bilinear", align_corners=False)` on x in [0, 1],
  then `2 * x - 1`. Features: the 2048-d global average pool after Mixed_7c ("pool3").
* Logits (`with_logits=True`, for the Inception Score): pool3 times the 1008-way classifier's
  weight without its bias, torch-fidelity's 'logits_unbiased' (its IS feature).

Resize note: `jax.image.resize(..., "bilinear", antialias=False)` samples at half-pixel centres
and renormalises the edge taps, which is exactly PyTorch's `align_corners=False` rule (source
index clamped at 0, last pixel repeated), for up- and downsampling alike; tests/test_fid.py
checks it against a NumPy port of PyTorch's kernel: they agree to float32 rounding of the sample
positions (<=2e-5 upsampling, ~1e-4 from 600 px, on the [-1, 1] scale; one 8-bit level is 8e-3).
JAX's default `antialias=True` differs by up to ~0.9 when downsampling, so it is switched off.

Parameter-name mapping rule (pytorch-fid state_dict key -> Flax variables), see
`flax_path_for_torch_key`: module names are kept verbatim as nested dict keys (`Mixed_6e`,
`branch7x7dbl_3`, `conv`, `bn`, ...) and only the leaf is renamed:

    <path>.conv.weight     -> variables["params"][...path...]["conv"]["kernel"]  (OIHW -> HWIO)
    <path>.bn.weight       -> variables["params"][...path...]["bn"]["scale"]
    <path>.bn.bias         -> variables["params"][...path...]["bn"]["bias"]
    <path>.bn.running_mean -> variables["batch_stats"][...path...]["bn"]["mean"]
    <path>.bn.running_var  -> variables["batch_stats"][...path...]["bn"]["var"]
    *.num_batches_tracked  -> dropped (training counter)
    fc.weight              -> variables["params"]["fc"]["kernel"]  ([out, in] -> [in, out])
    fc.bias                -> not used (torch-fidelity's IS takes the logits without it)

The OIHW -> HWIO (and Linear [out, in] -> [in, out]) transposes happen once, in
`ddpm_jax.convert_inception`, so the .npz holds Flax layouts under the original torch key names.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

FEATURE_DIM = 2048
NUM_LOGITS = 1008  # the 2015 graph's classifier: 1000 ImageNet classes and 8 unused ones
INPUT_SIZE = 299
BN_EPS = 1e-3
# Written by convert_inception into every .npz; load_params refuses files without it so a raw
# (OIHW) dump of the state_dict cannot be loaded by mistake.
FORMAT_KEY = "__ddpm_jax_format__"
FORMAT_VALUE = "ddpm_jax.inception/v1: torch keys, conv HWIO, linear [in,out]"

Variables = dict[str, Any]


class BasicConv2d(nn.Module):
    """torchvision's BasicConv2d: bias-free conv -> BatchNorm(eps=1e-3, eval) -> ReLU."""

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)  # symmetric (pad_h, pad_w), as in torch.nn.Conv2d
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        ph, pw = self.padding
        x_BHWC = nn.Conv(
            self.features,
            self.kernel_size,
            strides=self.strides,
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            precision=self.precision,
            name="conv",
        )(x_BHWC)
        x_BHWC = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x_BHWC)
        return nn.relu(x_BHWC)


def _avg_pool_3x3_tf(x_BHWC: jax.Array) -> jax.Array:
    # TF's SAME average pool divides by the number of *real* pixels under the window.
    return nn.avg_pool(x_BHWC, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s1(x_BHWC: jax.Array) -> jax.Array:
    # reduce_window pads with -inf, matching F.max_pool2d(padding=1).
    return nn.max_pool(x_BHWC, (3, 3), (1, 1), ((1, 1), (1, 1)))


def _max_pool_3x3_s2(x_BHWC: jax.Array) -> jax.Array:
    return nn.max_pool(x_BHWC, (3, 3), (2, 2), "VALID")


class FIDInceptionA(nn.Module):
    """Mixed_5b/5c/5d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | TF avg pool-1x1."""

    pool_features: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b1 = conv(64, (1, 1), name="branch1x1")(x)
        b5 = conv(48, (1, 1), name="branch5x5_1")(x)
        b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3_tf(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a (grid reduction 35 -> 17), unpatched torchvision InceptionB."""

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b3 = conv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
        bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = conv(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionC(nn.Module):
    """Mixed_6b-6e: factorised 7x7 convolutions, TF avg pool."""

    channels_7x7: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        c7 = self.channels_7x7
        b1 = conv(192, (1, 1), name="branch1x1")(x)
        b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3_tf(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a (grid reduction 17 -> 8), unpatched torchvision InceptionD."""

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b3 = conv(192, (1, 1), name="branch3x3_1")(x)
        b3 = conv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
        b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionE(nn.Module):
    """Mixed_7b (FIDInceptionE_1, TF avg pool) and Mixed_7c (FIDInceptionE_2, max pool)."""

    use_max_pool: bool
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b1 = conv(320, (1, 1), name="branch1x1")(x)
        b3 = conv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        # pytorch-fid: the TF graph's last block max-pools here (a quirk of that graph).
        pooled = _max_pool_3x3_s1(x) if self.use_max_pool else _avg_pool_3x3_tf(x)
        bp = conv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def preprocess(images_BHWC: jax.Array, resize: bool = True) -> jax.Array:
    """uint8 or float images in [0, 255], any size -> float32 299x299 in [-1, 1].

    Same order of operations as pytorch-fid (ToTensor's /255, bilinear resize, then 2x - 1).
    """
    x = images_BHWC.astype(jnp.float32) / 255.0
    b, h, w, c = x.shape
    if resize and (h, w) != (INPUT_SIZE, INPUT_SIZE):
        x = jax.image.resize(x, (b, INPUT_SIZE, INPUT_SIZE, c), "bilinear", antialias=False)
    return 2.0 * x - 1.0


class FIDInceptionV3(nn.Module):
    """[N, H, W, 3] images (uint8 or float in [0, 255]) -> [N, 2048] float32 pool3 features, or
    with `with_logits` (features, [N, 1008] logits without the classifier's bias).

    `resize_input=False` skips the resize (the network itself accepts any size >= 75 px); it
    exists for cheap tests and must stay True for FID. `precision` defaults to HIGHEST so GPUs and
    TPUs do not silently run the convolutions in TF32/bf16 passes.
    """

    resize_input: bool = True
    with_logits: bool = False
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, images_BHWC: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        blk = {"precision": self.precision}
        x = preprocess(images_BHWC, self.resize_input)
        x = conv(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)
        x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = FIDInceptionA(32, **blk, name="Mixed_5b")(x)
        x = FIDInceptionA(64, **blk, name="Mixed_5c")(x)
        x = FIDInceptionA(64, **blk, name="Mixed_5d")(x)
        x = InceptionB(**blk, name="Mixed_6a")(x)
        x = FIDInceptionC(128, **blk, name="Mixed_6b")(x)
        x = FIDInceptionC(160, **blk, name="Mixed_6c")(x)
        x = FIDInceptionC(160, **blk, name="Mixed_6d")(x)
        x = FIDInceptionC(192, **blk, name="Mixed_6e")(x)
        x = InceptionD(**blk, name="Mixed_7a")(x)
        x = FIDInceptionE(use_max_pool=False, **blk, name="Mixed_7b")(x)
        x = FIDInceptionE(use_max_pool=True, **blk, name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2)).astype(jnp.float32)
        # Always built, so the variables are the same either way; unused, XLA drops the matmul.
        logits = nn.Dense(NUM_LOGITS, use_bias=False, precision=self.precision, name="fc")(pool)
        return (pool, logits) if self.with_logits else pool


# ---------------------------------------------------------------------------------------------
# Parameters


_LEAF_MAP = {
    ("conv", "weight"): ("params", "kernel"),
    ("bn", "weight"): ("params", "scale"),
    ("bn", "bias"): ("params", "bias"),
    ("bn", "running_mean"): ("batch_stats", "mean"),
    ("bn", "running_var"): ("batch_stats", "var"),
}


def flax_path_for_torch_key(key: str) -> tuple[str, ...] | None:
    """Map a pytorch-fid state_dict key to (collection, *module path, leaf); None if unused.

    e.g. "Mixed_6e.branch7x7_2.conv.weight" -> ("params", "Mixed_6e", "branch7x7_2", "conv",
    "kernel"). The classifier's bias and BN step counters map to None.
    """
    if key == "fc.weight":
        return ("params", "fc", "kernel")
    parts = key.split(".")
    if len(parts) < 3 or parts[0] == "fc":
        return None
    target = _LEAF_MAP.get((parts[-2], parts[-1]))
    if target is None:
        return None
    collection, leaf = target
    return (collection, *parts[:-2], parts[-2], leaf)


def torch_key_for_flax_path(path: tuple[str, ...]) -> str:
    """Inverse of `flax_path_for_torch_key` (path includes the collection name)."""
    if tuple(path) == ("params", "fc", "kernel"):
        return "fc.weight"
    inverse = {v: k for k, v in _LEAF_MAP.items()}
    collection, *modules, layer, leaf = path
    torch_layer, torch_leaf = inverse[(collection, leaf)]
    if torch_layer != layer:
        raise KeyError(f"no torch key for {path}")
    return ".".join([*modules, layer, torch_leaf])


def variables_from_state_dict(state: Mapping[str, np.ndarray]) -> Variables:
    """Converted (HWIO) state_dict arrays -> {"params": ..., "batch_stats": ...} for apply."""
    variables: Variables = {}
    for key, value in state.items():
        path = flax_path_for_torch_key(key)
        if path is None:
            continue
        node = variables
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = jnp.asarray(value, dtype=jnp.float32)
    return variables


def load_params(path: str) -> Variables:
    """Read a `convert_inception` .npz (no pickle) into FIDInceptionV3 variables.

    Returns the full variables dict ({"params", "batch_stats"}) to pass to `model.apply`.
    """
    with np.load(path, allow_pickle=False) as data:
        if FORMAT_KEY not in data.files or str(data[FORMAT_KEY]) != FORMAT_VALUE:
            raise ValueError(
                f"{path} was not written by ddpm_jax.convert_inception ({FORMAT_VALUE!r})"
            )
        state = {k: data[k] for k in data.files if k != FORMAT_KEY}
    variables = variables_from_state_dict(state)
    _check_against_model(variables, path)
    return variables


def variable_shapes() -> Variables:
    """Shapes/dtypes of FIDInceptionV3's variables, without running the network."""
    model = FIDInceptionV3(resize_input=False)
    x = jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.uint8)
    return jax.eval_shape(model.init, jax.random.key(0), x)


def _check_against_model(variables: Variables, source: str) -> None:
    # A missing or misshapen tensor would otherwise fail deep inside apply, or not at all.
    want = {k: tuple(v.shape) for k, v in flatten_dict(variable_shapes(), sep="/").items()}
    got = {k: tuple(np.shape(v)) for k, v in flatten_dict(variables, sep="/").items()}
    bad = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
    if bad:
        detail = ", ".join(f"{k}: want {want.get(k)} got {got.get(k)}" for k in bad[:3])
        raise ValueError(f"{source}: {len(bad)} variables do not match FIDInceptionV3 ({detail})")


def make_apply_fn(
    model: FIDInceptionV3 | None = None,
) -> Callable[[Variables, jax.Array], jax.Array]:
    """Jitted `(variables, images_BHWC) -> features_BD`.

    Every example is independent (BatchNorm runs on stored statistics), so the batch axis can be
    sharded across devices: pass a batch placed with a NamedSharding over the batch axis and
    replicated variables, and XLA partitions the computation accordingly.
    """
    model = FIDInceptionV3() if model is None else model
    return jax.jit(model.apply)
