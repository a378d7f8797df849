"""The U-Net: DDPM's parameter count, shapes, embedding, bf16 and remat."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar10
from ddpm_jax import sharding, unet


def count(model, size):
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), jnp.zeros((1,), int))
    )
    return sum(x.size for x in jax.tree.leaves(shapes))


def test_cifar10_config_is_ddpms_35_7m_network():
    n = count(unet.from_config(cifar10.get_config()), 32)
    assert abs(n - 35.7e6) / 35.7e6 < 0.01, n


def test_timestep_embedding_closed_form():
    t = jnp.array([0, 1, 17, 999])
    emb = np.asarray(unet.timestep_embedding(t, 8))
    freqs = np.exp(-math.log(10000.0) * np.arange(4) / 3)
    np.testing.assert_allclose(emb[:, :4], np.sin(t[:, None] * freqs), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(emb[:, 4:], np.cos(t[:, None] * freqs), rtol=1e-5, atol=1e-6)


def small(**kw):
    return unet.UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), **kw)


def test_shapes_and_dtypes_with_bfloat16_compute():
    x, t = jnp.ones((2, 8, 8, 3)), jnp.array([1, 5])
    model = small(dtype=jnp.bfloat16)
    params = model.init(jax.random.key(0), x, t)["params"]
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    out = model.apply({"params": params}, x, t)
    assert out.shape == (2, 8, 8, 3) and out.dtype == jnp.float32
    ref = small().apply({"params": params}, x, t)
    assert 0 < float(jnp.max(jnp.abs(out - ref))) < 0.05 * float(jnp.max(jnp.abs(ref))) + 1e-3


def test_output_depends_on_timestep_and_dropout_is_active_in_training():
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    model = small(dropout=0.5)
    params = model.init(jax.random.key(0), x, jnp.array([0, 0]))["params"]
    # The last conv starts near zero (identity blocks); perturb params to see the dependence.
    params = jax.tree.map(lambda p: p + 0.05 * jnp.sign(jnp.sin(jnp.arange(p.size))).reshape(
        p.shape), params)
    a = model.apply({"params": params}, x, jnp.array([0, 0]))
    b = model.apply({"params": params}, x, jnp.array([9, 9]))
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3
    c = model.apply({"params": params}, x, jnp.array([0, 0]), train=True,
                    rngs={"dropout": jax.random.key(2)})
    assert float(jnp.max(jnp.abs(a - c))) > 1e-3


def test_remat_changes_nothing_but_memory():
    x, t = jax.random.normal(jax.random.key(1), (2, 8, 8, 3)), jnp.array([1, 5])
    params = small().init(jax.random.key(0), x, t)["params"]

    def loss(model, p):
        return jnp.sum(model.apply({"params": p}, x, t, train=True,
                                   rngs={"dropout": jax.random.key(3)}) ** 2)

    g1 = jax.grad(lambda p: loss(small(dropout=0.1), p))(params)
    g2 = jax.grad(lambda p: loss(small(dropout=0.1, remat=True), p))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g2)


def test_image_size_check():
    unet.check_image_size(32, (1, 2, 2, 2))
    with pytest.raises(ValueError, match="data.image_size=36 is not divisible by .*=8"):
        unet.check_image_size(36, (1, 2, 2, 2))


def test_upsample_is_nearest_neighbour_resize():
    x = jax.random.normal(jax.random.key(0), (2, 3, 5, 4))
    want = jax.image.resize(x, (2, 6, 10, 4), "nearest")
    np.testing.assert_array_equal(unet.upsample_nearest(x), want)
    # Each input pixel feeds a 2x2 block, so its gradient is the sum over that block.
    g = jax.random.normal(jax.random.key(1), (2, 6, 10, 4))
    (grad,) = jax.vjp(unet.upsample_nearest, x)[1](g)
    np.testing.assert_allclose(grad, g.reshape(2, 3, 2, 5, 2, 4).sum(axis=(2, 4)), rtol=1e-6)


def attention_inputs(dtype=jnp.bfloat16):
    keys = jax.random.split(jax.random.key(0), 3)
    return [jax.random.normal(k, (2, 16, 1, 64), dtype) for k in keys]


def test_auto_attention_asks_cudnn_first_on_a_gpu(monkeypatch):
    """jax's own default (implementation=None) is XLA everywhere: "auto" must ask for cuDNN."""
    asked = []
    real = jax.nn.dot_product_attention

    def recording(*args, implementation=None, **kwargs):
        asked.append(implementation)
        return real(*args, implementation="xla", **kwargs)  # no cuDNN on this machine

    monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
    monkeypatch.setattr(unet, "_on_gpu", lambda: True)
    unet.attention(*attention_inputs(), "auto")
    assert asked == ["cudnn"]
    monkeypatch.setattr(unet, "_on_gpu", lambda: False)
    unet.attention(*attention_inputs(), "auto")
    assert asked == ["cudnn", "xla"]


def test_auto_attention_falls_back_to_xla_where_cudnn_refuses(monkeypatch, caplog):
    # On this machine cuDNN refuses while tracing ("cuDNN is not detected"), as it does on a GPU
    # for float32 inputs or an unsupported head size: "auto" then gives XLA's result.
    monkeypatch.setattr(unet, "_on_gpu", lambda: True)
    unet._log_attention_fallback.cache_clear()  # logged once per reason and process
    q, k, v = attention_inputs()
    with caplog.at_level("INFO"):
        out = jax.jit(lambda q, k, v: unet.attention(q, k, v, "auto"))(q, k, v)
    np.testing.assert_array_equal(out, unet.attention(q, k, v, "xla"))
    assert "cuDNN's fused kernel does not apply" in caplog.text
    with pytest.raises(RuntimeError):  # asked for explicitly, cuDNN's refusal is the user's error
        unet.attention(q, k, v, "cudnn")


def test_dropout_rate_scale_independence_and_sharding():
    x = jnp.ones((16, 16, 16, 127))  # an odd channel count: the last word is half used
    n, rate = x.size, 0.1
    p = round(rate * 2**16) / 2**16  # the rate rounded to 16 bits
    y = np.asarray(unet.dropout(x, rate, jax.random.key(0)))
    dropped = y == 0
    assert abs(dropped.mean() - p) < 5 * math.sqrt(p * (1 - p) / n)
    np.testing.assert_array_equal(np.unique(y), np.float32([0.0, 1.0 / (1.0 - p)]))
    assert abs(y.mean() - 1.0) < 5 * math.sqrt(p / (1 - p) / n)  # unbiased: E[y] = x
    # The two halves of a random word decide neighbours independently.
    both = (dropped[..., 0:126:2] & dropped[..., 1:127:2]).mean()
    assert abs(both - p * p) < 5 * math.sqrt(p * p / (n // 2))
    # Deterministic in the key, different across keys, the identity at rate 0 (or < 2^-17).
    np.testing.assert_array_equal(y, unet.dropout(x, rate, jax.random.key(0)))
    assert (np.asarray(unet.dropout(x, rate, jax.random.key(1))) != y).any()
    assert unet.dropout(x, 0.0, jax.random.key(0)) is x
    assert unet.dropout(x, 1e-6, jax.random.key(0)) is x
    # Sharded over 8 devices on the batch axis, the mask is the same.
    sharded = jax.device_put(x, sharding.batch(sharding.make_mesh()))
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_array_equal(
        jax.jit(lambda x: unet.dropout(x, rate, jax.random.key(0)))(sharded), y)


def test_non_square_images_use_the_square_network():
    x, t = jax.random.normal(jax.random.key(1), (2, 8, 16, 3)), jnp.array([1, 5])
    model = small()
    params = model.init(jax.random.key(0), x, t)["params"]
    square = jax.eval_shape(model.init, jax.random.key(0), x[:, :, :8], t)["params"]
    # Parameters do not depend on the resolution: a non-square model is the same network.
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, square)
    out = model.apply({"params": params}, x, t)
    assert out.shape == (2, 8, 16, 3) and bool(jnp.all(jnp.isfinite(out)))
    # attn_resolutions=(4,) matches the shorter side: the 4x8 level attends, whichever way round.
    for shape in ((8, 16), (16, 8)):
        names = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *shape, 3)),
                               t[:1])["params"]
        assert sorted(n for n in names if "attn" in n) == ["down1_attn0", "mid_attn",
                                                           "up1_attn0", "up1_attn1"]


@pytest.mark.parametrize("size, name, side", [((36, 64), "height", 36), ((32, 20), "width", 20)])
def test_image_size_check_names_the_side_that_cannot_be_halved(size, name, side):
    unet.check_image_size((32, 64), (1, 2, 2, 2))
    with pytest.raises(ValueError, match=rf"^data\.image_size=\({size[0]}, {size[1]}\): {name} "
                                         rf"{side} cannot be halved 3 times \(len\(model\.ch_mult\)"
                                         r"-1\); it must be divisible by 8$"):
        unet.check_image_size(size, (1, 2, 2, 2))


@pytest.mark.parametrize("groups", [1, 4, 8])
def test_group_norm_is_the_closed_form_and_flax_groupnorm(groups):
    """unet.group_norm (one pass of sums, then x a + b) against GroupNorm's definition in float64,
    and the GroupNorm module against nn.GroupNorm (same parameters, outputs and gradients)."""
    rng = np.random.default_rng(0)
    x = rng.normal(0.5, 2.0, (3, 4, 5, 16))  # a non-zero mean: the sums' cancellation is visible
    scale, bias = rng.normal(size=16), rng.normal(size=16)
    xg = x.reshape(3, 4, 5, groups, 16 // groups)
    mean = xg.mean((1, 2, 4), keepdims=True)
    var = xg.var((1, 2, 4), keepdims=True)
    want = ((xg - mean) / np.sqrt(var + 1e-6)).reshape(x.shape) * scale + bias
    got = unet.group_norm(jnp.asarray(x, jnp.float32), jnp.asarray(scale, jnp.float32),
                          jnp.asarray(bias, jnp.float32), groups)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-5)

    import flax.linen as nn

    ours, ref = unet.GroupNorm(num_groups=groups), nn.GroupNorm(num_groups=groups, epsilon=1e-6)
    xj = jnp.asarray(x, jnp.float32)
    params = ref.init(jax.random.key(0), xj)
    params = jax.tree.map(lambda p: p + jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    assert jax.tree.structure(ours.init(jax.random.key(0), xj)) == jax.tree.structure(params)
    loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))
    grads = [jax.grad(loss(m), (0, 1))(params, xj) for m in (ours, ref)]
    for u, v in zip(*map(jax.tree.leaves, grads), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours.apply(params, xj), ref.apply(params, xj), atol=2e-5)
