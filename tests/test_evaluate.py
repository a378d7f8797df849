"""Tests for FID/KID evaluation: --mode=eval, in-loop FID and the best-checkpoint keeper.

Kept light for 2 CPU cores: the tiny model trains for 2 steps, Inception runs on random weights
at its minimum input size (75 px instead of 299, swapped in through `_inception_apply_fn`), and
the Frechet distance of the rank-deficient 2048-d covariances is computed exactly in a low-rank
form (scipy's sqrtm takes ~40 s at 2048-d here; tests/test_fid.py covers it).
"""

from __future__ import annotations

import functools
import glob
import json
import os
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from test_fid import reference_state_dict

from ddpm_jax import convert_inception, evaluate, fid, inception, sampling, train, validate

SMALL_INPUT = 75  # FIDInceptionV3's smallest input


def low_rank_frechet(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, rank: int = 48) -> float:
    """frechet_distance for covariances of rank <= `rank`, exactly, in O(d^2 rank).

    Tr sqrt(S1 S2) = Tr sqrt(L^T S2 L) for S1 = L L^T, and a range finder gives L exactly when
    the rank of S1 is below `rank` (here: fewer than `rank` features per set).
    """
    del eps
    q, _ = np.linalg.qr(sigma1 @ np.random.default_rng(0).normal(size=(len(mu1), rank)))
    w, v = np.linalg.eigh(q.T @ sigma1 @ q)
    factor = q @ (v * np.sqrt(np.clip(w, 0, None)))
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(factor.T @ sigma2 @ factor), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * cross)


def test_low_rank_frechet_matches_fid():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(12, 40)), rng.normal(size=(9, 40)) * 1.5 + 0.3
    args = (*fid.statistics(a), *fid.statistics(b))
    with warnings.catch_warnings():  # singular covariances: fid may warn and regularise
        warnings.simplefilter("ignore")
        want = fid.frechet_distance(*args)
    np.testing.assert_allclose(low_rank_frechet(*args, rank=24), want, rtol=1e-4)


@pytest.fixture(scope="module")
def small_apply_fn():
    """Inception on images upsampled to 75 px: one jitted function shared by every test."""
    model = inception.FIDInceptionV3(resize_input=False, with_logits=True)

    def apply(variables, images):
        x = jnp.asarray(images, jnp.float32)
        x = jax.image.resize(x, (x.shape[0], SMALL_INPUT, SMALL_INPUT, 3), "bilinear")
        return model.apply(variables, x)

    return jax.jit(apply)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(config, workdir): random FID weights saved as .npz, and a tiny model trained 2 steps."""
    root = tmp_path_factory.mktemp("evaluate")
    weights = str(root / "inception.npz")
    arrays = convert_inception.to_flax_layout(reference_state_dict())
    np.savez(weights, **arrays, **{inception.FORMAT_KEY: np.array(inception.FORMAT_VALUE)})
    config = tiny_config()
    # Smaller still than tiny_config (one level, no attention, no validation loss): compiling
    # the training step and three samplers dominates this file's run time.
    config.data.num_eval_examples = 0
    config.model.ch_mult, config.model.attn_resolutions = (1,), ()
    t = config.training
    t.num_train_steps = t.log_every_steps = t.eval_every_steps = 2
    t.checkpoint_every_steps = t.sample_every_steps = 2
    ev = config.eval
    ev.num_samples, ev.batch_size, ev.training_fid_num_samples = 16, 8, 8
    ev.reference_num_examples = 16
    ev.kid_subsets, ev.kid_subset_size = 2, 8
    ev.inception_weights, ev.cache_dir = weights, str(root / "cache")
    workdir = str(root / "run")
    train.train_and_evaluate(config, workdir)
    return config, workdir


@pytest.fixture
def fast_fid(monkeypatch, small_apply_fn):
    monkeypatch.setattr(evaluate, "_inception_apply_fn", lambda: small_apply_fn)
    monkeypatch.setattr(fid, "frechet_distance", low_rank_frechet)


def _scalar_tags(path: str) -> set[str]:
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(path)
    acc.Reload()
    return set(acc.Tags()["scalars"]) | set(acc.Tags()["tensors"])


def _count_reference_computations(monkeypatch) -> list[int]:
    calls = []
    compute = evaluate._compute_reference_stats

    def counting(*args, **kwargs):
        calls.append(1)
        return compute(*args, **kwargs)

    monkeypatch.setattr(evaluate, "_compute_reference_stats", counting)
    return calls


def test_evaluate_then_in_loop_and_best(trained, fast_fid, monkeypatch):
    config, workdir = trained
    calls = _count_reference_computations(monkeypatch)
    events_before = len(glob.glob(os.path.join(workdir, "events.out.tfevents*")))

    # NLL on images held out at evaluation time (the tiny run trained without holding any out).
    config.data.num_eval_examples = config.eval.nll_num_examples = 8
    record = evaluate.evaluate(config, workdir)
    config.data.num_eval_examples = config.eval.nll_num_examples = 0
    with open(os.path.join(workdir, "eval", "step_2.json")) as f:
        assert json.load(f) == record
    assert np.isfinite(record["fid"]) and record["fid"] >= 0
    # 16 samples in 10 splits; random Inception weights still give varied logits.
    assert 1.0 < record["is_mean"] < 1008 and record["is_std"] >= 0 and record["is_splits"] == 10
    assert record["nll_num_examples"] == 8 and record["nll_variance"] == "fixed_large"
    parts = [record[f"nll_{k}_bpd"] for k in ("prior", "kl", "decoder")]
    assert all(np.isfinite(parts)) and min(parts) >= 0 and 0 < record["nll_bpd"] < 100
    assert record["nll_bpd"] == pytest.approx(sum(parts), rel=1e-6)
    assert np.isfinite(record["kid_mean"]) and np.isfinite(record["kid_std"])
    assert record["num_samples"] == 16 and record["checkpoint_step"] == 2
    assert record["sampling"]["sampler"] == "ddpm" and record["kid_features"] == [16, 16]
    key = evaluate.reference_key(config)
    assert record["reference_key"] == key and "embedded" in key and "8px_n16" in key
    assert os.path.isfile(os.path.join(config.eval.cache_dir, "fid_stats", f"{key}.npz"))
    assert calls == [1]
    events = sorted(glob.glob(os.path.join(workdir, "events.out.tfevents*")))
    assert len(events) == events_before + 1
    assert {"eval/is", "eval/nll_bpd", "eval/nll_prior_bpd", "eval/nll_kl_bpd",
            "eval/nll_decoder_bpd", "eval/fid"} <= _scalar_tags(events[-1])

    # The in-loop evaluator reuses the cached reference and the training-time inputs.
    config.eval.training_fid_every_steps = 2
    sampler = sampling.Sampler.from_workdir(workdir, config)
    run = evaluate.make_in_loop_evaluator(config, workdir, sampler.mesh, (8, 8, 3))
    assert calls == [1]
    assert run(1, sampler.params) is None
    metrics = run(2, sampler.params)
    assert set(metrics) == {"fid_in_loop", "kid_in_loop"}
    assert all(np.isfinite(v) for v in metrics.values()) and metrics["fid_in_loop"] >= 0
    assert run(2, sampler.params) == metrics  # same keys every call: only the model changes
    with open(os.path.join(workdir, "eval", "in_loop.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert [line["step"] for line in lines] == [2, 2] and lines[0]["num_samples"] == 8

    # keep_best: WORKDIR/best is a work directory that the samplers read unchanged.
    save = functools.partial(evaluate.save_if_best, config, workdir)
    assert save(2, sampler.params, metrics)
    assert not save(4, sampler.params, {"fid_in_loop": metrics["fid_in_loop"] + 1.0})
    assert not save(4, sampler.params, {"fid_in_loop": float("nan")})
    doubled = jax.tree.map(lambda x: 2 * x, sampler.params)
    assert save(6, doubled, {"fid_in_loop": metrics["fid_in_loop"] - 1.0, "kid_in_loop": 0.5})
    assert save(4, sampler.params, {"fid_in_loop": metrics["fid_in_loop"] - 2.0})  # a resume
    best = evaluate.best_record(workdir)
    assert best == {"step": 4, "fid_in_loop": metrics["fid_in_loop"] - 2.0}
    with open(os.path.join(workdir, "best", "best.json")) as f:
        assert json.load(f) == best
    restored = sampling.Sampler.from_workdir(os.path.join(workdir, "best"))
    assert restored.step == 4
    assert sorted(os.listdir(os.path.join(workdir, "best", "checkpoints"))) == ["4"]
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(sampler.params),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_offline_without_weights_fails_before_sampling(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_JAX_OFFLINE", "1")
    config = tiny_config()
    config.eval.cache_dir = str(tmp_path / "empty")

    def must_not_run(*args, **kwargs):
        pytest.fail("evaluation went past the weights check")

    monkeypatch.setattr(sampling.Sampler, "from_workdir", must_not_run)
    monkeypatch.setattr(evaluate, "_reference_dataset", must_not_run)
    t0 = time.time()
    with pytest.raises(fid.WeightsUnavailableError) as e:
        evaluate.evaluate(config, str(tmp_path / "run"))
    assert time.time() - t0 < 10
    assert "\n" not in str(e.value) and str(tmp_path / "empty") in str(e.value)
    assert os.environ.get(fid.CACHE_ENV) != str(tmp_path / "empty")  # restored afterwards
    config.eval.training_fid_every_steps = 100
    with pytest.raises(fid.WeightsUnavailableError):
        evaluate.make_in_loop_evaluator(config, str(tmp_path / "run"), None, (8, 8, 3))
    config.eval.training_fid_every_steps = 0
    assert evaluate.make_in_loop_evaluator(config, str(tmp_path / "run"), None, (8, 8, 3)) is None


@pytest.mark.parametrize(
    "key, value", [("num_samples", 1), ("batch_size", 0), ("reference_num_examples", 1),
                   ("kid_subset_size", 1), ("training_fid_every_steps", -1),
                   ("training_fid_num_samples", 1),
                   ("is_splits", 0), ("nll_num_examples", -2), ("num_samples", 9)]
)
def test_bad_eval_settings_are_config_errors(key, value):
    config = tiny_config()
    config.eval[key] = value
    with pytest.raises(validate.ConfigError, match=f"eval.{key}"):
        evaluate.check_eval_config(config)


def test_reference_key_names_the_data():
    config = tiny_config()
    keys = {evaluate.reference_key(config)}
    config.data.resize = "stretch"
    keys.add(evaluate.reference_key(config))
    config.eval.reference_num_examples = 50
    keys.add(evaluate.reference_key(config))
    config.data.source, config.data.path = "folder", "/data/a"
    keys.add(evaluate.reference_key(config))
    config.data.path = "/data/b"
    keys.add(evaluate.reference_key(config))
    config.data.source, config.data.name = "tfds", "cifar10"
    keys.add(evaluate.reference_key(config))
    config.eval.reference_split = "test"
    keys.add(evaluate.reference_key(config))
    assert len(keys) == 7
    assert evaluate.reference_key(config).startswith("tfds-cifar10-stretch_test_8px_n50")


def test_sample_batches_stream_in_chunks():
    drawn = []

    def draw(params, rng, n, start):  # image value = its index
        drawn.append(n)
        return np.broadcast_to(np.arange(start, start + n, dtype=np.uint8)[:, None, None, None],
                               (n, 2, 2, 3))

    batches = list(evaluate._sample_batches(draw, None, jax.random.key(0), 23, 8, 5))
    assert drawn == [8, 8, 8]  # always full chunks: one compiled shape
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    np.testing.assert_array_equal(np.concatenate(batches)[:, 0, 0, 0], np.arange(23))


def test_in_loop_settings_are_checked():
    config = tiny_config()
    config.eval.training_fid_every_steps, config.training.steps_per_call = 3, 2
    with pytest.raises(validate.ConfigError, match="steps_per_call"):
        evaluate.make_in_loop_evaluator(config, "unused", None, (8, 8, 3))
    config.eval.training_fid_every_steps, config.eval.keep_best = 0, True
    with pytest.raises(validate.ConfigError, match="keep_best"):
        evaluate.make_in_loop_evaluator(config, "unused", None, (8, 8, 3))
