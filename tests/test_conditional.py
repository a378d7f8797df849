"""Class-conditional models: labels from the data, into the network, and classifier-free guidance.

A model that ignores its labels fails here: the label embedding must change the output and be
trained on the labels the batch holds, guidance must combine the conditional and unconditional
outputs in every sampler, and a tiny model trained on two classes must draw the class asked for.
"""

import dataclasses
import functools
import io
import subprocess

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image

from ddpm_jax import (
    checkpoint,
    data,
    diffusion,
    sampling,
    sharding,
    solvers,
    train,
    unet,
    validate,
)
from ddpm_jax.data import InputError


def small(**kw):
    return unet.UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), **kw)


def perturbed(params, seed=0):
    """Params moved off DDPM's init, where every residual branch ends in a near-zero layer (so
    the time and label embeddings barely reach the output yet)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([p + 0.1 * jax.random.normal(k, p.shape)
                              for p, k in zip(leaves, keys, strict=True)])


# ---------------------------------------------------------------------------------------------
# The network and the training step


def test_unet_label_embedding_changes_the_output_and_only_conditional_models_have_one():
    x, t = jnp.ones((3, 8, 8, 3)), jnp.array([5, 5, 5])
    plain = unet.abstract_params(small(), (8, 8, 3))
    model = small(num_classes=3)

    @jax.jit
    def init_and_apply(key):  # one compile
        params = unet.init_params(model, key, (8, 8, 3))
        label = jnp.array([0, 1, 3])
        return params, model.apply({"params": perturbed(params)}, x, t, label_B=label)

    params, out = init_and_apply(jax.random.key(0))
    assert "label_emb" not in plain and params["label_emb"]["embedding"].shape == (4, 128)
    size = sum(a.size for a in jax.tree.leaves(params))
    assert size - sum(a.size for a in jax.tree.leaves(plain)) == 4 * 128  # 3 classes + null
    out = np.asarray(out)
    scale = np.abs(out).max()
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert np.abs(out[a] - out[b]).max() > 0.05 * scale, (a, b)
    with pytest.raises(ValueError, match="needs labels"):
        model.apply({"params": params}, x, t)


def conditional_config(num_classes=3, label_dropout=0.5):
    config = tiny_config()
    config.model.num_classes, config.model.label_dropout = num_classes, label_dropout
    config.optim.warmup_steps = 1  # a full-size first step
    return config


def test_train_step_trains_the_embeddings_of_the_batch_labels_and_of_the_null_class():
    """Adam moves a parameter only where its gradient is non-zero: with every label 1 and half of
    them dropped, rows 1 and 3 (null) of the embedding move, rows 0 and 2 stay. (Two steps: the
    warm-up's learning rate is 0 at step 0.)"""
    config = conditional_config()
    model, tx = unet.from_config(config), train.make_optimizer(config)
    sched = diffusion.make_schedule("linear", config.diffusion.num_timesteps)
    state = jax.jit(functools.partial(train.init_state, model=model, tx=tx,
                                      image_shape=(8, 8, 3)))(jax.random.key(0))
    state = state.replace(params=perturbed(state.params))  # gradients of a useful size
    images = np.random.default_rng(0).integers(0, 256, (1, 8, 8, 8, 3), np.uint8)
    batch = {"image": images, "label": np.ones((1, 8), np.int32)}
    step = jax.jit(functools.partial(train.train_steps, model=model, tx=tx, sched=sched,
                                     config=config))
    before = np.asarray(state.params["label_emb"]["embedding"])
    new, _ = step(step(state, batch, jax.random.key(1))[0], batch, jax.random.key(1))
    moved = np.abs(np.asarray(new.params["label_emb"]["embedding"]) - before).max(axis=1)
    assert (moved[[1, 3]] > 1e-5).all() and (moved[[0, 2]] == 0).all(), moved
    with pytest.raises(ValueError, match="needs labels"):
        step(state, images, jax.random.key(1))


def test_label_dropout_rate_and_sharding_independence():
    labels = jnp.zeros((4096,), jnp.int32)
    drop = jax.jit(functools.partial(train.drop_labels, rate=0.1, num_classes=7))
    dropped = np.asarray(drop(labels, jax.random.key(3)))
    assert set(np.unique(dropped)) == {0, 7} and abs(np.mean(dropped == 7) - 0.1) < 0.015
    sharded = jax.device_put(labels, sharding.batch(sharding.make_mesh()))
    np.testing.assert_array_equal(np.asarray(drop(sharded, jax.random.key(3))), dropped)


# ---------------------------------------------------------------------------------------------
# Guidance


@dataclasses.dataclass(frozen=True)
class ShiftByClass:
    """A toy conditional eps-model, cheap to compile: each class (and the null class 2) adds its
    own offset. Records the batch size of every call it is traced with."""

    calls: list = dataclasses.field(default_factory=list)
    num_classes: int = 2

    def apply(self, variables, x, t_B, label_B):
        self.calls.append(x.shape[0])
        offset = jnp.array([0.3, -0.5, 0.1])[label_B][:, None, None, None]
        return 0.5 * x + offset + 1e-3 * t_B[:, None, None, None]


@dataclasses.dataclass(frozen=True)
class Reference:
    """What guidance must compute, spelt out: two separate calls of `ShiftByClass`."""

    label: int
    w: float

    def apply(self, variables, x, t_B):
        fn = functools.partial(ShiftByClass().apply, variables, x, t_B)
        cond = fn(jnp.full(t_B.shape, self.label))
        return (1 - self.w) * fn(jnp.full(t_B.shape, 2)) + self.w * cond


def draw(model, sampler, **fields):
    sched = diffusion.make_schedule("linear", 50)
    cfg = ml_collections.ConfigDict(dict(sampler=sampler, num_steps=9, eta=1.0, spacing="auto",
                                         variance="fixed_large", clip_x0=True, per_device_batch=2,
                                         **fields))
    fn = sampling.make_sampler(model, sched, cfg, "eps", (2, 2, 1), sharding.make_mesh())
    return fn(None, jax.random.key(0), 16)


@pytest.mark.parametrize("sampler", solvers.SAMPLERS)
def test_every_sampler_guides_in_one_call_per_evaluation(sampler):
    """w = 0 is the unconditional model and w = 1 the conditional one, each in B-sized calls;
    w = 3 is (1 - w) uncond + w cond in 2B-sized calls, on 8 devices."""
    for w in (0.0, 1.0, 3.0):
        model = ShiftByClass()
        got = draw(model, sampler, label=1, guidance_scale=w)
        want = draw(Reference(label=1, w=w), sampler)
        if w in (0.0, 1.0):
            np.testing.assert_array_equal(got, want)
        else:  # another summation order; uint8 rounding can flip a value by one
            assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
        assert set(model.calls) == {2 * 16 if w == 3.0 else 16}, model.calls
    assert (draw(Reference(label=1, w=0.0), sampler) != draw(Reference(label=0, w=3.0),
                                                             sampler)).any()


def test_all_classes_in_turn_by_image_index():
    index = jnp.arange(7)
    def labels(label, num_classes):
        return sampling.image_labels(index, ml_collections.ConfigDict({"label": label}),
                                     num_classes)

    assert labels(-1, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert labels(2, 3).tolist() == [2] * 7 and labels(-1, 0) is None


# ---------------------------------------------------------------------------------------------
# Labels from the data


RED, BLUE = (220, 40, 30), (30, 50, 210)


def two_class_folder(root, per_class=16, size=8):
    """root/blue/*.png and root/red/*.png: class 0 ('blue') is a yellow square on blue, class 1
    ('red') white bars on red (sorted names give the class indices)."""
    yy, xx = np.mgrid[:size, :size]
    looks = {"blue": (BLUE, (230, 210, 40), (yy >= 2) & (yy < 6) & (xx >= 2) & (xx < 6)),
             "red": (RED, (250, 250, 250), (yy % 4) < 2)}
    for name, (background, foreground, shape) in looks.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = np.full((size, size, 3), background, np.uint8)
            img[shape] = foreground
            Image.fromarray(img).save(root / name / f"{i:02d}.png")
    return root


def redness(images):
    """Mean red minus mean blue per image, on [-1, 1]: > 0 for the red class, < 0 for blue."""
    mean = images.astype(float).mean(axis=(1, 2)) / 255
    return mean[:, 0] - mean[:, 2]


def folder_config(path, **overrides):
    fields = dict(source="folder", path=str(path), labels="subdirs", image_size=8,
                  num_eval_examples=4, num_workers=1, prefetch=0)
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def test_folder_labels_are_the_sorted_sub_directories_and_follow_the_images(tmp_path):
    folder = two_class_folder(tmp_path / "data", per_class=10)
    ds, eval_images = data.create_datasets(folder_config(folder), seed=0,
                                           global_batch_size=8, num_classes=2)
    assert ds.class_names == ("blue", "red")
    np.testing.assert_array_equal(redness(eval_images) > 0, ds.eval_labels == 1)
    for step in range(3):
        ids = ds.global_indices(step)
        np.testing.assert_array_equal(redness(ds.images(ids)) > 0, ds.labels(ids) == 1)
    mesh = sharding.make_mesh()
    with ds.iterate(0, sharding.batch(mesh, leading_dims=1), steps_per_call=2) as batches:
        batch = next(batches)
    assert batch["label"].shape == (2, 8) and batch["label"].dtype == np.int32
    assert batch["label"].sharding.is_equivalent_to(batch["image"].sharding, 2)
    np.testing.assert_array_equal(redness(np.asarray(batch["image"][1])) > 0,
                                  np.asarray(batch["label"][1]) == 1)


def test_unreadable_image_is_replaced_with_its_label(tmp_path):
    """blue/zz.jpg passes the header probe but fails to decode; the next example in index order,
    red/00.png, takes its place, and with it its class (red), not the file's (blue)."""
    folder = two_class_folder(tmp_path / "data", per_class=6)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), np.uint8)).save(
        buf, "JPEG")
    (folder / "blue" / "zz.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    ds, _ = data.create_datasets(folder_config(folder, num_eval_examples=0), seed=0,
                                 global_batch_size=13, num_classes=2)
    ids = ds.global_indices(0)
    assert 6 in ids  # the truncated file, by sorted path
    np.testing.assert_array_equal(redness(ds.images(ids)) > 0, ds.labels(ids) == 1)
    assert ds.skipped_files == 1 and ds.labels([6]).tolist() == [1]


@pytest.mark.parametrize("layout, num_classes, match", [
    ({"a": 4, "b": 4}, 3, r"has 2 classes \('a', 'b'\) but model.num_classes=3; set "
                          r"--config.model.num_classes=2"),
    ({"a": 4, "b": 4}, 0, r"has 2 classes \('a', 'b'\); set --config.model.num_classes=2"),
    ({"a": 8}, 1, r"1 class sub-directory with images \('a',\); need at least 2"),
    ({"a": 4, "b": 4, "": 1}, 2, r"1 images directly in data.path=.* belong to no class"),
])
def test_folder_label_errors_are_one_line(tmp_path, layout, num_classes, match):
    for name, n in layout.items():
        (tmp_path / name).mkdir(exist_ok=True)
        for i in range(n):
            Image.new("RGB", (8, 8)).save(tmp_path / name / f"{name}{i}.png")
    with pytest.raises(InputError, match=match) as err:
        data.create_datasets(folder_config(tmp_path, num_eval_examples=0), seed=0,
                                       global_batch_size=2, num_classes=num_classes)
    assert "\n" not in str(err.value)


def test_tfds_labels_and_their_checks():
    tfds = pytest.importorskip("tensorflow_datasets")
    config = ml_collections.ConfigDict(dict(source="tfds", name="cifar10", image_size=8,
                                            eval_split="test", num_eval_examples=4, num_workers=1,
                                            prefetch=0))
    with tfds.testing.mock_data(num_examples=16):
        ds, _ = data.create_datasets(config, seed=0, global_batch_size=8,
                                               num_classes=10)
        unlabelled, _ = data.create_datasets(config, seed=0, global_batch_size=8)
        with pytest.raises(InputError, match=r"has 10 classes .* but model.num_classes=4"):
            data.create_datasets(config, seed=0, global_batch_size=8, num_classes=4)
        config.label_key = "labels"
        with pytest.raises(InputError, match=r"data.label_key='labels' is not a feature of TFDS "
                                             r"data.name='cifar10'.*features: id, image, label"):
            data.create_datasets(config, seed=0, global_batch_size=8, num_classes=10)
    # The ClassLabel's names (tfds' mock metadata has none for cifar10, so '0'..'9' here).
    assert len(ds.class_names) == 10 and all(isinstance(n, str) for n in ds.class_names)
    labels = ds.labels(np.arange(16))
    assert labels.dtype == np.int32 and 0 <= labels.min() and labels.max() < 10
    assert ds.eval_labels.shape == (4,) and not unlabelled.class_names


@pytest.mark.parametrize("overrides, message", [
    ({"model.num_classes": 2}, "model.num_classes=2: data.source='embedded' has no labels"),
    ({"model.num_classes": 2, "data.source": "folder", "data.path": "/x"},
     "model.num_classes=2 needs labels: add --config.data.labels=subdirs"),
    ({"data.labels": "subdirs"}, "data.labels='subdirs' is for data.source='folder'"),
    ({"data.labels": "dirs", "data.source": "folder", "data.path": "/x"},
     "data.labels='dirs': expected one of ('', 'subdirs')"),
    ({"model.label_dropout": 1.0}, "model.label_dropout=1.0: expected 0 <= label_dropout < 1"),
    ({"sampling.guidance_scale": 2.0}, "sampling.guidance_scale=2.0: guidance needs a class-"),
    ({"sampling.label": 0}, "sampling.label=0: the model is unconditional"),
    ({"model.num_classes": 2, "data.source": "tfds", "sampling.label": 2},
     "sampling.label=2: expected a class in [0, model.num_classes=2) or -1"),
    ({"model.num_classes": 2, "data.source": "tfds", "sampling.guidance_scale": -1.0},
     "sampling.guidance_scale=-1.0: expected >= 0"),
    ({"model.num_classes": 2, "data.source": "tfds", "sampling.guidance_scale": 2.0,
      "model.label_dropout": 0.0}, "model.label_dropout=0 never trains"),
])
def test_config_errors(overrides, message):
    config = tiny_config()
    for key, value in overrides.items():
        group, field = key.split(".")
        config[group][field] = value
    with pytest.raises(validate.ConfigError) as err:
        validate.check_config(config, 8)
    assert message in str(err.value), str(err.value)


# ---------------------------------------------------------------------------------------------
# As a user runs it


def test_tiny_model_trained_on_two_classes_draws_the_class_asked_for(tmp_path, monkeypatch,
                                                                     caplog):
    """White bars on red (class 1) and yellow squares on blue (class 0): label k gives class-k
    images, and the class names travel with the checkpoint. On one device, as
    tests/test_learning.py explains."""
    from test_learning import learning_config, on_one_device

    on_one_device(monkeypatch)
    config = learning_config(str(two_class_folder(tmp_path / "data")), batch_size=16)
    config.data.labels = "subdirs"
    config.model.num_classes, config.model.label_dropout = 2, 0.1
    train.train_and_evaluate(config, str(tmp_path / "run"))
    assert config.data.class_names == ()  # the caller's config is left alone
    assert "traced and compiled again" not in caplog.text  # labels in the batch: one compile

    sampler = sampling.Sampler.from_workdir(str(tmp_path / "run"))
    assert tuple(sampler.config.data.class_names) == ("blue", "red")
    for label in (0, 1):
        for w in (1.0, 2.0):
            images = sampler.sample(16, seed=1, label=label, guidance_scale=w)
            red = redness(images) > 0
            assert np.mean(red == bool(label)) >= 0.85, (label, w, np.round(redness(images), 2))
    mixed = redness(sampler.sample(16, seed=1)) > 0  # label -1: classes 0, 1, 0, 1, ...
    assert np.mean(mixed == (np.arange(16) % 2 == 1)) >= 0.85, mixed


def test_resume_is_exact_and_sample_mode_draws_one_class(tmp_path):
    """A folder of two classes on 8 devices: 2 steps, then resumed to 4, equal 4 straight steps
    bit for bit (labels and their dropout are functions of the step too); then the command line's
    --mode=sample draws class 1 with guidance (on one device: it compiles faster there)."""
    from test_end_to_end import env, main_cmd

    config = tiny_config()
    config.data.source, config.data.labels = "folder", "subdirs"
    config.data.path = str(two_class_folder(tmp_path / "data", per_class=8))
    config.model.num_classes = 2
    config.training.num_train_steps = 2  # the grid at step 4 (sample_every_steps) draws classes
    train.train_and_evaluate(config, str(tmp_path / "w"))
    config.training.num_train_steps = 4
    resumed = jax.device_get(train.train_and_evaluate(config, str(tmp_path / "w")))
    config.training.sample_every_steps = 100  # the reference run needs no grid
    straight = jax.device_get(train.train_and_evaluate(config, str(tmp_path / "straight")))
    for name in ("params", "ema_params", "opt_state"):
        jax.tree.map(np.testing.assert_array_equal, getattr(straight, name),
                     getattr(resumed, name))
    saved = checkpoint.Checkpointer(str(tmp_path / "w"), read_only=True).saved_config(4)
    assert saved["data"]["class_names"] == ["blue", "red"] and saved["model"]["num_classes"] == 2

    result = subprocess.run(main_cmd(config, tmp_path / "w", "--mode=sample",
                                     "--config.sampling.label=1",
                                     "--config.sampling.guidance_scale=3"),
                            env=env(1), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Classes drawn: 1 (red); guidance scale 3" in result.stderr
    out = tmp_path / "w" / "samples" / "step_4"
    npz = np.load(out / "samples.npz")
    assert npz["images"].shape == (8, 8, 8, 3) and npz["labels"].tolist() == [1] * 8
    assert (out / "grid.png").exists() and (out / "00007.png").exists()
