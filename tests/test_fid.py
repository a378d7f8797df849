"""Tests for the FID/KID metrics, the FID InceptionV3 port and its weight converter.

Nothing here downloads anything or needs torch: .pth files are written by hand in both of torch's
container formats, and the network runs on NumPy-seeded random weights.
"""

from __future__ import annotations

import collections
import importlib.util
import io
import os
import pickle
import re
import struct
import sys
import types
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from ddpm_jax import convert_inception, fid, inception

# ---------------------------------------------------------------------------------------------
# Reference architecture, transcribed from torchvision's Inception3 / InceptionA-E constructors
# (the modules pytorch-fid's fid_inception_v3 patches): (torch module path, out, in, kh, kw).


def _block_a(name: str, cin: int, pool: int) -> list[tuple]:
    return [
        (f"{name}.branch1x1", 64, cin, 1, 1),
        (f"{name}.branch5x5_1", 48, cin, 1, 1),
        (f"{name}.branch5x5_2", 64, 48, 5, 5),
        (f"{name}.branch3x3dbl_1", 64, cin, 1, 1),
        (f"{name}.branch3x3dbl_2", 96, 64, 3, 3),
        (f"{name}.branch3x3dbl_3", 96, 96, 3, 3),
        (f"{name}.branch_pool", pool, cin, 1, 1),
    ]


def _block_c(name: str, c7: int) -> list[tuple]:
    return [
        (f"{name}.branch1x1", 192, 768, 1, 1),
        (f"{name}.branch7x7_1", c7, 768, 1, 1),
        (f"{name}.branch7x7_2", c7, c7, 1, 7),
        (f"{name}.branch7x7_3", 192, c7, 7, 1),
        (f"{name}.branch7x7dbl_1", c7, 768, 1, 1),
        (f"{name}.branch7x7dbl_2", c7, c7, 7, 1),
        (f"{name}.branch7x7dbl_3", c7, c7, 1, 7),
        (f"{name}.branch7x7dbl_4", c7, c7, 7, 1),
        (f"{name}.branch7x7dbl_5", 192, c7, 1, 7),
        (f"{name}.branch_pool", 192, 768, 1, 1),
    ]


def _block_e(name: str, cin: int) -> list[tuple]:
    return [
        (f"{name}.branch1x1", 320, cin, 1, 1),
        (f"{name}.branch3x3_1", 384, cin, 1, 1),
        (f"{name}.branch3x3_2a", 384, 384, 1, 3),
        (f"{name}.branch3x3_2b", 384, 384, 3, 1),
        (f"{name}.branch3x3dbl_1", 448, cin, 1, 1),
        (f"{name}.branch3x3dbl_2", 384, 448, 3, 3),
        (f"{name}.branch3x3dbl_3a", 384, 384, 1, 3),
        (f"{name}.branch3x3dbl_3b", 384, 384, 3, 1),
        (f"{name}.branch_pool", 192, cin, 1, 1),
    ]


REFERENCE_CONVS = [
    ("Conv2d_1a_3x3", 32, 3, 3, 3),
    ("Conv2d_2a_3x3", 32, 32, 3, 3),
    ("Conv2d_2b_3x3", 64, 32, 3, 3),
    ("Conv2d_3b_1x1", 80, 64, 1, 1),
    ("Conv2d_4a_3x3", 192, 80, 3, 3),
    *_block_a("Mixed_5b", 192, 32),
    *_block_a("Mixed_5c", 256, 64),
    *_block_a("Mixed_5d", 288, 64),
    ("Mixed_6a.branch3x3", 384, 288, 3, 3),
    ("Mixed_6a.branch3x3dbl_1", 64, 288, 1, 1),
    ("Mixed_6a.branch3x3dbl_2", 96, 64, 3, 3),
    ("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 3),
    *_block_c("Mixed_6b", 128),
    *_block_c("Mixed_6c", 160),
    *_block_c("Mixed_6d", 160),
    *_block_c("Mixed_6e", 192),
    ("Mixed_7a.branch3x3_1", 192, 768, 1, 1),
    ("Mixed_7a.branch3x3_2", 320, 192, 3, 3),
    ("Mixed_7a.branch7x7x3_1", 192, 768, 1, 1),
    ("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7),
    ("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1),
    ("Mixed_7a.branch7x7x3_4", 192, 192, 3, 3),
    *_block_e("Mixed_7b", 1280),
    *_block_e("Mixed_7c", 2048),
]
# Trainable parameters without the 1008-way fc: every conv weight plus BN weight and bias.
# Cross-check: torchvision's inception_v3 has 27,161,264 parameters; minus AuxLogits (3,326,696)
# and its 1000-way fc (2,049,000) leaves the same 21,785,568.
REFERENCE_PARAM_COUNT = 21_785_568


def reference_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """A pytorch-fid-shaped state_dict (torch layouts) with He-scaled random values."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, cout, cin, kh, kw in REFERENCE_CONVS:
        std = np.sqrt(2.0 / (cin * kh * kw))
        state[f"{name}.conv.weight"] = rng.normal(0, std, (cout, cin, kh, kw)).astype(np.float32)
        state[f"{name}.bn.weight"] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
        state[f"{name}.bn.bias"] = rng.normal(0, 0.1, cout).astype(np.float32)
        state[f"{name}.bn.running_mean"] = rng.normal(0, 0.1, cout).astype(np.float32)
        state[f"{name}.bn.running_var"] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
        state[f"{name}.bn.num_batches_tracked"] = np.array(0, np.int64)
    state["fc.weight"] = rng.normal(0, 0.01, (1008, 2048)).astype(np.float32)
    state["fc.bias"] = np.zeros(1008, np.float32)
    return state


@pytest.fixture(scope="module")
def variables() -> inception.Variables:
    state = convert_inception.to_flax_layout(reference_state_dict())
    return inception.variables_from_state_dict(state)


# ---------------------------------------------------------------------------------------------
# Frechet distance


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    # Tr (S1 S2)^(1/2) = Tr (S1^(1/2) S2 S1^(1/2))^(1/2): symmetric PSD, so eigh suffices.
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum())


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 2, 6), rng.uniform(0.1, 2, 6)
    want = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(want, rel=1e-10)


def test_frechet_distance_general_covariances():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(40, 12)), rng.normal(size=(40, 12)) * 1.5 + 0.3
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * _trace_sqrt_product(s1, s2)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)
    assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_singular_covariances_are_finite():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(4, 10)), rng.normal(size=(4, 10))  # rank 3 covariances in 10-d
    d = fid.frechet_distance(a.mean(0), np.cov(a.T), b.mean(0), np.cov(b.T))
    assert np.isfinite(d) and d > 0


# ---------------------------------------------------------------------------------------------
# KID


def _mmd2_loops(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2, cubic polynomial kernel, written as the textbook double sums."""
    m, d = x.shape

    def k(a, b):
        return (float(np.dot(a, b)) / d + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / (m * m)


def test_kid_matches_direct_double_sum():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 8)).astype(np.float32)
    y = (rng.normal(size=(30, 8)) + 0.5).astype(np.float32)
    want = _mmd2_loops(np.float64(x), np.float64(y))
    # subset_size >= n: every subset is a permutation of all rows, so the value is exact.
    mean, std = fid.kernel_inception_distance(x, y, num_subsets=3, subset_size=1000)
    assert mean == pytest.approx(want, rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-9 * abs(want))


def test_kid_same_distribution_near_zero_and_shift_positive():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same, same_std = fid.kernel_inception_distance(a, b, num_subsets=20, subset_size=200)
    shifted, _ = fid.kernel_inception_distance(a, b + 0.5, num_subsets=20, subset_size=200)
    assert abs(same) < 3 * same_std + 1e-3
    assert shifted > 10 * abs(same) and shifted > 0.05


def test_kid_is_deterministic_and_clips_subset_size():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(50, 4)), rng.normal(size=(20, 4))
    r1 = fid.kernel_inception_distance(a, b, num_subsets=5, subset_size=1000, seed=7)
    r2 = fid.kernel_inception_distance(a, b, num_subsets=5, subset_size=1000, seed=7)
    assert r1 == r2 and np.isfinite(r1).all()


# ---------------------------------------------------------------------------------------------
# Streaming statistics


def test_streaming_stats_match_numpy():
    rng = np.random.default_rng(6)
    feats = (rng.normal(size=(257, 32)) * rng.uniform(0.1, 3, 32) + 100.0).astype(np.float32)
    acc = fid.FeatureStats(dim=32, max_kept=50, seed=0)
    for lo, hi in [(0, 1), (1, 100), (100, 101), (101, 257)]:  # uneven batches, size-1 first
        acc.update(feats[lo:hi])
    mu, sigma = acc.mean_cov()
    want_mu, want_sigma = np.mean(np.float64(feats), 0), np.cov(np.float64(feats), rowvar=False)
    np.testing.assert_allclose(mu, want_mu, rtol=1e-12)
    np.testing.assert_allclose(sigma, want_sigma, rtol=1e-9, atol=1e-12)
    ref_mu, ref_sigma = fid.statistics(feats)
    np.testing.assert_allclose(ref_sigma, want_sigma, rtol=1e-12)
    assert mu.dtype == sigma.dtype == ref_mu.dtype == np.float64
    kept = acc.kept_features()
    assert kept.shape == (50, 32) and len(np.unique(kept, axis=0)) == 50
    assert all((feats == row).all(1).any() for row in kept)  # a subset of the real rows


def test_reservoir_is_roughly_uniform():
    counts = np.zeros(100)
    for seed in range(200):
        acc = fid.FeatureStats(dim=1, max_kept=10, seed=seed)
        for lo in range(0, 100, 7):
            acc.update(np.arange(lo, min(lo + 7, 100), dtype=np.float32)[:, None])
        counts[acc.kept_features()[:, 0].astype(int)] += 1
    # Each row is kept with probability 0.1: 20 of 200 runs expected; early rows not favoured.
    assert counts.sum() == 2000
    assert abs(counts[:50].sum() - counts[50:].sum()) < 200


# ---------------------------------------------------------------------------------------------
# The network


def _torch_bilinear(img_HWC: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """NumPy port of PyTorch's upsample_bilinear2d(align_corners=False), float64."""

    def taps(n_in: int, n_out: int):
        src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    h0, h1, lh = taps(img_HWC.shape[0], out_h)
    w0, w1, lw = taps(img_HWC.shape[1], out_w)
    rows = img_HWC[h0] * (1 - lh)[:, None, None] + img_HWC[h1] * lh[:, None, None]
    return rows[:, w0] * (1 - lw)[None, :, None] + rows[:, w1] * lw[None, :, None]


@pytest.mark.parametrize("h,w", [(32, 32), (75, 75), (40, 64), (300, 600)])
def test_preprocess_matches_pytorch_bilinear(h, w):
    img = np.random.default_rng(h * w).integers(0, 256, (1, h, w, 3), dtype=np.uint8)
    got = np.asarray(inception.preprocess(jnp.asarray(img)))[0]
    want = 2 * _torch_bilinear(img[0] / 255.0, 299, 299) - 1
    assert got.shape == (299, 299, 3) and got.dtype == np.float32
    # float32 sample positions: errors grow with the input size (~1e-4 at 600 px), far below
    # one 8-bit level (2/255 here). JAX's default antialias=True would be off by up to ~0.9.
    np.testing.assert_allclose(got, want, atol=2e-4)
    assert np.abs(got - want).mean() < 2e-5


def test_tf_style_pools_match_numpy():
    x = np.random.default_rng(7).normal(size=(1, 5, 6, 2)).astype(np.float32) - 3.0
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=np.nan)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2))
    want_avg = np.nanmean(windows, axis=(-2, -1))  # only real pixels count (TF SAME)
    want_max = np.nanmax(windows, axis=(-2, -1))  # padding never wins, even for negatives
    np.testing.assert_allclose(inception._avg_pool_3x3_tf(jnp.asarray(x)), want_avg, rtol=1e-6)
    np.testing.assert_allclose(inception._max_pool_3x3_s1(jnp.asarray(x)), want_max, rtol=1e-6)


def test_parameter_names_shapes_and_count_match_reference():
    shapes = inception.variable_shapes()
    shapes["params"] = dict(shapes["params"])
    assert shapes["params"].pop("fc")["kernel"].shape == (2048, inception.NUM_LOGITS)
    count = sum(x.size for x in jax.tree_util.tree_leaves(shapes["params"]))
    derived = sum(o * i * kh * kw + 2 * o for _, o, i, kh, kw in REFERENCE_CONVS)
    assert len(REFERENCE_CONVS) == 94
    assert count == derived == REFERENCE_PARAM_COUNT
    state = convert_inception.to_flax_layout(reference_state_dict())
    got = inception.variables_from_state_dict(state)
    got["params"].pop("fc")
    assert jax.tree_util.tree_map(np.shape, got) == jax.tree_util.tree_map(
        lambda s: s.shape, shapes
    )
    # Spot checks of the naming rule and the (1, 7) kernel orientation.
    k = got["params"]["Mixed_6e"]["branch7x7_2"]["conv"]["kernel"]
    assert k.shape == (1, 7, 192, 192)
    assert got["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"].shape == (192,)
    assert inception.flax_path_for_torch_key("fc.bias") is None  # the IS logits are unbiased
    assert inception.flax_path_for_torch_key("Mixed_5b.branch1x1.bn.num_batches_tracked") is None
    for key in ["Mixed_7b.branch3x3_2a.conv.weight", "Conv2d_1a_3x3.bn.running_var", "fc.weight"]:
        path = inception.flax_path_for_torch_key(key)
        assert inception.torch_key_for_flax_path(path) == key


@pytest.fixture(scope="module")
def apply_fn():
    return inception.make_apply_fn()  # one jitted function, so tests share compilations


def test_network_golden_features(variables, apply_fn):
    images = np.random.default_rng(8).integers(0, 256, (2, 75, 75, 3), dtype=np.uint8)
    feats = np.asarray(apply_fn(variables, images))
    assert feats.shape == (2, 2048) and feats.dtype == np.float32
    assert np.isfinite(feats).all() and (feats >= 0).all()  # mean of post-ReLU activations
    # Golden values for NumPy-seeded weights (reference_state_dict(0)) and this input. Update
    # them only for a deliberate change to the network or preprocessing (and then also bump
    # fid.FEATURES_VERSION), never to make a refactor pass.
    np.testing.assert_allclose(feats.sum(), GOLDEN_SUM, rtol=1e-4)
    np.testing.assert_allclose(feats[:, :4], GOLDEN_FIRST, rtol=1e-4, atol=1e-5)
    # Examples do not interact (BatchNorm uses stored statistics), so the batch is shardable:
    # image 1 gives the same features next to a different neighbour (same shape, no recompile).
    other = np.stack([images[1], 255 - images[0]])
    again = np.asarray(apply_fn(variables, other))
    np.testing.assert_allclose(again[0], feats[1], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Parity with torch-fidelity (tests/fixtures/make_torch_fidelity_fixture.py wrote the fixture)


def _fixture_maker():
    path = os.path.join(os.path.dirname(__file__), "fixtures", "make_torch_fidelity_fixture.py")
    spec = importlib.util.spec_from_file_location("make_torch_fidelity_fixture", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # NumPy only at import: torch is imported in its main()
    return module


def test_network_matches_torch_fidelity_on_fixture():
    # The same name-seeded random weights in both networks; CIFAR-sized inputs go through our
    # preprocessing (resize to 299 px) here and pytorch-fid's in the fixture script.
    maker = _fixture_maker()
    shapes = {k: np.shape(v) for k, v in reference_state_dict().items()}
    state = convert_inception.to_flax_layout(maker.random_state_dict(shapes))
    variables = inception.variables_from_state_dict(state)
    with np.load(maker.FIXTURE) as f:
        ref = {k: f[k] for k in f.files}
    model = inception.FIDInceptionV3(with_logits=True)
    features, logits = jax.jit(model.apply)(variables, ref["images"])
    for got, want in [(features, ref["features"]), (logits, ref["logits_unbiased"])]:
        rel = np.abs(np.float64(got) - want).max() / np.abs(want).max()
        assert rel < 1e-5, rel  # measured 3.6e-7 (features), 7.0e-7 (logits)
    # 'logits_unbiased' leaves out fc.bias (non-zero in these weights).
    np.testing.assert_allclose(logits, np.float64(features) @ state["fc.weight"], rtol=1e-4,
                               atol=1e-4)


def test_inception_score_matches_torch_fidelity_on_fixture():
    with np.load(_fixture_maker().FIXTURE) as f:
        mean, std = fid.inception_score(f["isc_logits"])
        assert mean == pytest.approx(float(f["isc_mean"]), rel=1e-12)
        assert std == pytest.approx(float(f["isc_std"]), rel=1e-10)


def test_inception_score_of_certain_predictions_is_exp_entropy_of_each_split():
    # With one-hot p(y|x), KL(p(y|x) || p(y)) = -log p(y = class of x), so a split's score is
    # exp(H(class histogram of the split)): C classes equally often in every split give C.
    n, num_classes, splits = 57, 5, 4
    labels = np.random.default_rng(0).integers(0, num_classes, n)
    logits = np.where(np.arange(num_classes) == labels[:, None], 60.0, 0.0)
    shuffled = labels[np.random.RandomState(2020).permutation(n)]
    want = []
    for i in range(splits):
        freq = np.bincount(shuffled[i * n // splits:(i + 1) * n // splits], minlength=num_classes)
        q = freq[freq > 0] / freq.sum()
        want.append(np.exp(-(q * np.log(q)).sum()))
    mean, std = fid.inception_score(logits, splits=splits)
    assert mean == pytest.approx(np.mean(want), rel=1e-12)
    assert std == pytest.approx(np.std(want), rel=1e-9)
    # Identical predictions carry no information: IS = 1 whatever they are.
    same = np.tile(np.random.default_rng(1).normal(size=7), (30, 1))
    assert fid.inception_score(same) == pytest.approx((1.0, 0.0), abs=1e-12)
    with pytest.raises(ValueError, match="splits=10"):
        fid.inception_score(logits[:9])


GOLDEN_SUM = 26788.35
GOLDEN_FIRST = np.array(
    [[2.5079675, 36.9443, 22.475943, 22.18327], [2.403726, 37.511375, 22.299583, 22.210419]]
)


def test_extract_features_streams_and_pads(variables, apply_fn):
    # Batches of 2 at 75 px, the shape the golden test already compiled.
    images = np.random.default_rng(9).integers(0, 256, (5, 75, 75, 3), dtype=np.uint8)
    direct = np.float64(np.concatenate([apply_fn(variables, images[i : i + 2]) for i in (0, 2)]))
    direct = np.concatenate([direct, np.float64(apply_fn(variables, images[3:]))[1:]])
    batches = [images[:2], images[2:4], images[4:]]  # the last one is padded
    stats = fid.extract_features(variables, batches, apply_fn)
    mu, sigma = stats.mean_cov()
    np.testing.assert_allclose(mu, direct.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(direct, rowvar=False), rtol=1e-3, atol=1e-5)
    assert stats.count == 5 and stats.kept_features().shape == (5, 2048)
    if jax.device_count() >= 2:  # e.g. with --xla_force_host_platform_device_count=8
        mesh = Mesh(np.asarray(jax.devices()[:2]), ("data",))
        sharded = fid.extract_features(variables, batches, apply_fn, mesh=mesh)
        np.testing.assert_allclose(sharded.mean_cov()[0], mu, rtol=1e-5, atol=1e-6)


def test_greyscale_batches_are_scored_as_rgb(variables, apply_fn):
    grey = np.random.default_rng(3).integers(0, 256, (2, 75, 75, 1), dtype=np.uint8)
    as_rgb = fid.extract_features(variables, [np.repeat(grey, 3, axis=-1)], apply_fn)
    direct = fid.extract_features(variables, [grey], apply_fn)
    np.testing.assert_array_equal(direct.kept_features(), as_rgb.kept_features())


# ---------------------------------------------------------------------------------------------
# Weight conversion (hand-written .pth files, no torch)


class _Storage:
    def __init__(self, dtype: str, data: np.ndarray):
        self.dtype, self.data = dtype, np.ascontiguousarray(data)


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.args = (storage, offset, size, stride)

    def __reduce__(self):
        return sys.modules["torch._utils"]._rebuild_tensor_v2, (
            *self.args,
            False,
            collections.OrderedDict(),
        )


def _fake_torch_modules(monkeypatch) -> dict[str, type]:
    """Register stand-ins under torch's names so the stdlib Pickler writes torch's globals."""
    torch_mod, utils_mod = types.ModuleType("torch"), types.ModuleType("torch._utils")
    storage_types = {}
    for name in ["FloatStorage", "LongStorage"]:
        cls = type(name, (), {"__module__": "torch"})
        setattr(torch_mod, name, cls)
        storage_types[name] = cls

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called while pickling")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch_mod._utils = utils_mod
    monkeypatch.setitem(sys.modules, "torch", torch_mod)
    monkeypatch.setitem(sys.modules, "torch._utils", utils_mod)
    return storage_types


def _pickle_state(state: dict, storage_types: dict, legacy: bool) -> tuple[bytes, list]:
    storages: list[_Storage] = []

    class _Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if not isinstance(obj, _Storage):
                return None
            if obj not in storages:
                storages.append(obj)
            key = str(storages.index(obj))
            pid = ("storage", storage_types[obj.dtype], key, "cpu", obj.data.size)
            return (*pid, None) if legacy else pid

    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(state)
    return buf.getvalue(), storages


def _write_pth(path, state: dict, monkeypatch, legacy: bool = False) -> None:
    """torch.save's zip layout, or (legacy=True) the pre-1.6 stream layout."""
    with monkeypatch.context() as m:
        data_pkl, storages = _pickle_state(state, _fake_torch_modules(m), legacy)
    if legacy:
        with open(path, "wb") as f:
            for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
                pickle.dump(header, f, protocol=2)
            f.write(data_pkl)
            pickle.dump([str(i) for i in range(len(storages))], f, protocol=2)
            f.writelines(struct.pack("<q", s.data.size) + s.data.tobytes() for s in storages)
        return
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("pt_inception/data.pkl", data_pkl)
        zf.writestr("pt_inception/byteorder", "little")
        for i, s in enumerate(storages):
            zf.writestr(f"pt_inception/data/{i}", s.data.tobytes())
        zf.writestr("pt_inception/version", "3\n")


def _small_state():
    rng = np.random.default_rng(10)
    conv = rng.normal(size=(4, 3, 3, 2)).astype(np.float32)  # OIHW
    shared = rng.normal(size=13).astype(np.float32)  # two BN vectors inside one storage
    fc = rng.normal(size=(5, 3)).astype(np.float32)  # stored transposed: [3, 5] storage
    arrays = {
        "Conv2d_1a_3x3.conv.weight": conv,
        "Conv2d_1a_3x3.bn.running_mean": shared[5:9],
        "Conv2d_1a_3x3.bn.running_var": shared[0:8:2],
        "fc.weight": fc,
    }
    s_conv, s_shared = _Storage("FloatStorage", conv.ravel()), _Storage("FloatStorage", shared)
    s_fc = _Storage("FloatStorage", fc.T.ravel())
    s_long = _Storage("LongStorage", np.array([123], np.int64))
    state = collections.OrderedDict(
        [
            ("Conv2d_1a_3x3.conv.weight", _Tensor(s_conv, 0, (4, 3, 3, 2), (18, 6, 2, 1))),
            ("Conv2d_1a_3x3.bn.running_mean", _Tensor(s_shared, 5, (4,), (1,))),
            ("Conv2d_1a_3x3.bn.running_var", _Tensor(s_shared, 0, (4,), (2,))),
            ("Conv2d_1a_3x3.bn.num_batches_tracked", _Tensor(s_long, 0, (), ())),
            ("fc.weight", _Tensor(s_fc, 0, (5, 3), (1, 5))),
        ]
    )
    return state, arrays


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_convert_round_trip(tmp_path, monkeypatch, legacy):
    state, arrays = _small_state()
    src, dst = tmp_path / "w.pth", tmp_path / "out" / "w.npz"
    _write_pth(src, state, monkeypatch, legacy)
    assert sys.modules.get("torch") is None  # the stand-ins are gone again
    raw = convert_inception.load_torch_state_dict(str(src))
    assert int(raw["Conv2d_1a_3x3.bn.num_batches_tracked"]) == 123
    for k, v in arrays.items():
        np.testing.assert_array_equal(raw[k], v)
    assert convert_inception.main([str(src), str(dst)]) == 0
    with np.load(dst, allow_pickle=False) as out:
        assert set(out.files) == set(arrays) | {inception.FORMAT_KEY}
        np.testing.assert_array_equal(
            out["Conv2d_1a_3x3.conv.weight"],
            arrays["Conv2d_1a_3x3.conv.weight"].transpose(2, 3, 1, 0),
        )
        # HWIO: [kh, kw, in, out][i, j, c, o] == OIHW[o, c, i, j]
        assert (
            out["Conv2d_1a_3x3.conv.weight"][2, 1, 0, 3]
            == arrays["Conv2d_1a_3x3.conv.weight"][3, 0, 2, 1]
        )
        np.testing.assert_array_equal(out["fc.weight"], arrays["fc.weight"].T)
        np.testing.assert_array_equal(
            out["Conv2d_1a_3x3.bn.running_var"], arrays["Conv2d_1a_3x3.bn.running_var"]
        )


def test_convert_refuses_foreign_globals(tmp_path):
    class Evil:
        def __reduce__(self):
            return os.system, ("echo pwned",)

    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"x": Evil()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        convert_inception.load_torch_state_dict(str(path))


def test_convert_full_network_then_load_params(tmp_path, monkeypatch):
    # Every pytorch-fid tensor at full shape, but backed by one-element storages (stride 0), so
    # the .pth stays tiny; load_params then checks names and shapes against the Flax model.
    one = _Storage("FloatStorage", np.array([0.5], np.float32))
    state = collections.OrderedDict(
        (k, _Tensor(one, 0, v.shape, (0,) * v.ndim))
        for k, v in reference_state_dict().items()
        if v.dtype == np.float32
    )
    src, dst = tmp_path / "full.pth", tmp_path / "full.npz"
    _write_pth(src, state, monkeypatch)
    assert os.path.getsize(src) < 100_000
    convert_inception.convert(str(src), str(dst))
    loaded = inception.load_params(str(dst))
    leaves = jax.tree_util.tree_leaves(loaded)
    assert len(leaves) == 94 * 5 + 1 and all(float(x.ravel()[0]) == 0.5 for x in leaves)
    np.savez(tmp_path / "raw.npz", a=np.zeros(1))
    with pytest.raises(ValueError, match="convert_inception"):
        inception.load_params(str(tmp_path / "raw.npz"))


# ---------------------------------------------------------------------------------------------
# Weights resolution and reference-statistics cache


def test_offline_without_weights_raises_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_JAX_OFFLINE", "1")
    monkeypatch.setenv("DDPM_JAX_CACHE", str(tmp_path / "cache"))
    expected = str(tmp_path / "cache" / "pt_inception-2015-12-05.npz")
    with pytest.raises(fid.WeightsUnavailableError) as e:
        fid.inception_weights_path()
    msg = str(e.value)
    assert isinstance(e.value, RuntimeError) and "\n" not in msg
    assert expected in msg and fid.WEIGHTS_URL in msg
    assert "python -m ddpm_jax.convert_inception pt_inception-2015-12-05-6726825d.pth" in msg
    with pytest.raises(fid.WeightsUnavailableError, match="missing"):
        fid.inception_weights_path(str(tmp_path / "nope.npz"))
    os.makedirs(tmp_path / "cache")
    open(expected, "wb").close()
    assert fid.inception_weights_path() == expected
    assert fid.inception_weights_path(expected) == expected


def test_explicit_pth_is_converted_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_JAX_CACHE", str(tmp_path / "cache"))
    state, arrays = _small_state()
    _write_pth(tmp_path / "mine.pth", state, monkeypatch)
    with pytest.warns(UserWarning, match="not the pytorch-fid release"):
        path = fid.inception_weights_path(str(tmp_path / "mine.pth"))
    assert path == str(tmp_path / "cache" / "mine.npz")
    with np.load(path, allow_pickle=False) as out:
        np.testing.assert_array_equal(out["fc.weight"], arrays["fc.weight"].T)


def test_download_with_wrong_hash_is_rejected(tmp_path, monkeypatch):
    monkeypatch.delenv("DDPM_JAX_OFFLINE", raising=False)
    monkeypatch.setenv("DDPM_JAX_CACHE", str(tmp_path))
    urls = []

    def fake_urlopen(url, timeout):
        urls.append(url)
        return io.BytesIO(b"not the weights")

    monkeypatch.setattr(fid.urllib.request, "urlopen", fake_urlopen)
    with pytest.raises(fid.WeightsUnavailableError, match="sha256"):
        fid.inception_weights_path()
    assert urls == [fid.WEIGHTS_URL] and os.listdir(tmp_path) == []  # nothing half-written


def test_reference_stats_cached_once(tmp_path):
    calls = []
    feats = np.random.default_rng(11).normal(size=(20, 2048)).astype(np.float32)

    def compute():
        calls.append(1)
        acc = fid.FeatureStats(max_kept=15)
        acc.update(feats)
        return acc

    key = fid.stats_key("cifar10", "train", 32, 50000)
    mu1, sigma1, kid1 = fid.reference_stats(str(tmp_path), key, compute)
    mu2, sigma2, kid2 = fid.reference_stats(str(tmp_path), key, compute)
    assert len(calls) == 1 and (tmp_path / "fid_stats" / f"{key}.npz").is_file()
    np.testing.assert_array_equal(mu1, mu2)
    np.testing.assert_array_equal(sigma1, sigma2)
    np.testing.assert_array_equal(kid1, kid2)
    np.testing.assert_allclose(mu1, feats.mean(0), rtol=1e-5, atol=1e-6)
    assert kid1.shape == (15, 2048) and mu1.dtype == sigma1.dtype == np.float64


def test_stats_key_is_filesystem_safe_and_distinct():
    keys = {
        fid.stats_key("cifar10", "train", 32, 50000),
        fid.stats_key("cifar10", "train", 32, None),
        fid.stats_key("celeb_a/hq", "train[:50%]", 256, 30000),
        fid.stats_key("celeb_a/hq", "train(50)", 256, 30000),
        fid.stats_key("../..", "x y", 64, 10),
    }
    assert len(keys) == 5
    for key in keys:
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", key) and ".." not in key, key
    assert fid.stats_key("cifar10", "train", 32, 50000).startswith("cifar10_train_32px_n50000_")
    with pytest.raises(ValueError, match="unsafe"):
        fid.reference_stats("/tmp", "../escape", lambda: None)
