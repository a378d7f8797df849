"""Export to diffusers' format: the round trip through import_weights, the scheduler's betas as
diffusers computes them, the refusals and the folder rules. No torch: the check against diffusers
itself is benchmarks/export_diffusers_parity.py (run once, where torch is installed)."""

import json
import math
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, tiny_config
from safetensors.numpy import load_file

from ddpm_jax import (
    checkpoint,
    data,
    diffusers_layout,
    diffusion,
    export,
    import_weights,
    train,
    unet,
)

STEP = 7


def small_config(num_classes: int = 0, prediction: str = "eps", schedule: str = "linear"):
    config = tiny_config()
    config.model.ch = 16
    config.model.norm_groups = 4
    config.model.dropout = 0.0
    config.model.attention_impl = "xla"
    config.model.num_classes = num_classes
    config.diffusion.prediction = prediction
    config.diffusion.beta_schedule = schedule
    config.diffusion.num_timesteps = 1000
    config.sampling.variance = "fixed_small"
    config.sampling.clip_x0 = prediction != "v"  # both values of clip_sample go through
    if num_classes:
        config.data.update(source="folder", path="/data/shapes", labels="subdirs",
                           class_names=("red", "green", "blue")[:num_classes])
    return config


def random_params(config, seed: int):
    """Every parameter random at its init scale (norm scales around 1), computing no init."""
    rng = np.random.default_rng(seed)
    abstract = unet.abstract_params(unet.from_config(config),
                                    data.image_shape(config.data))

    def draw(path, a):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return (1.0 + 0.2 * rng.standard_normal(a.shape)).astype(np.float32)
        fan_in = int(np.prod(a.shape[:-1])) if len(a.shape) > 1 else 1
        return (rng.standard_normal(a.shape) / math.sqrt(fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def save_run(workdir, config, seed: int = 0):
    """A work directory with one checkpoint at STEP: distinct raw and EMA parameters."""
    params, ema = random_params(config, seed), random_params(config, seed + 1)
    tx = train.make_optimizer(config)
    zero = jnp.zeros((), jnp.int32)
    state = train.TrainState(jnp.asarray(STEP, jnp.int32), params, ema, tx.init(params), zero,
                             zero)
    ckpt = checkpoint.Checkpointer(str(workdir), config)
    ckpt.save(STEP, state, force=True)
    ckpt.wait()
    ckpt.close()
    return params, ema


_APPLY = {}


def eps(config, params, x, t, label):
    """The network's output, one compile per network (a UNet is a hashable dataclass)."""
    model = unet.from_config(config)
    if model not in _APPLY:
        _APPLY[model] = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, label_B=y))
    return np.asarray(_APPLY[model](params, x, t, label))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Work directories by (num_classes, prediction), made when first asked for."""
    made = {}

    def get(num_classes, prediction):
        key = (num_classes, prediction)
        if key not in made:
            config = small_config(num_classes, prediction)
            workdir = tmp_path_factory.mktemp(f"run_{num_classes}_{prediction}")
            made[key] = (workdir, config, *save_run(workdir, config))
        return made[key]

    return get


# Both conditionings and all three predictions in three round trips (a work directory each:
# the prediction changes only the scheduler config, whose every combination the next test maps).
@pytest.mark.parametrize("num_classes,prediction", [(0, "eps"), (3, "x0"), (3, "v")])
def test_export_then_import_gives_the_same_network(runs, tmp_path, num_classes, prediction):
    """Export, then import_weights of the export: the EMA parameters bit for bit, the same
    network config, schedule, prediction and sampler settings, the same outputs on a batch."""
    workdir, config, _, ema = runs(num_classes, prediction)
    out = tmp_path / "export"
    assert export.main(["--workdir", str(workdir), "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["README.md", "model_index.json", "scheduler", "unet"]
    back = tmp_path / "imported"
    assert import_weights.main([str(out), "--workdir", str(back)]) == 0

    ckpt = checkpoint.Checkpointer(str(back), read_only=True)
    saved = ckpt.saved_config(0)
    imported_config = import_weights.make_config(import_weights.read_source(str(out)))
    imported_config.model.attention_impl = "xla"
    assert unet.from_config(imported_config) == unet.from_config(config)
    abstract = unet.abstract_params(unet.from_config(config), (8, 8, 3))
    _, params = ckpt.restore_ema_params(abstract)
    ckpt.close()
    jax.tree.map(np.testing.assert_array_equal, params, ema)
    for key in ("num_timesteps", "beta_schedule", "prediction"):
        assert saved["diffusion"][key] == config.diffusion[key]
    for key in ("variance", "clip_x0"):
        assert saved["sampling"][key] == config.sampling[key]

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 8, 8, 3)), jnp.float32)
    t = jnp.asarray([0, 1, 500, 999])
    label = jnp.asarray([0, 1, 2, 3]) if num_classes else None  # 3: the null class
    ours = eps(config, ema, x, t, label)
    assert np.abs(ours).max() > 0.1  # a network that computes something
    np.testing.assert_array_equal(eps(imported_config, jax.tree.map(jnp.asarray, params), x, t,
                                      label), ours)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_scheduler_settings_round_trip(schedule):
    """Every prediction, variance and clipping setting, exported and read back by the import."""
    for prediction in diffusion.PREDICTIONS:
        for variance in diffusion.VARIANCES:
            for clip in (False, True):
                config = small_config(prediction=prediction, schedule=schedule)
                config.sampling.update(variance=variance, clip_x0=clip)
                _, sched = export.diffusers_configs(config.to_dict())
                d, s, _ = diffusers_layout.scheduler_fields(sched, "export", 8)
                assert d == dict(num_timesteps=1000, beta_schedule=schedule,
                                 prediction=prediction)
                assert s == dict(variance=variance, clip_x0=clip)


def test_raw_params_and_the_model_card(runs, tmp_path):
    """--params=raw exports the raw weights; the card has the steps, the data, the eval's FID
    and IS and the newest sample grid, copied beside it."""
    workdir, config, raw, _ = runs(3, "x0")
    os.makedirs(workdir / "eval", exist_ok=True)
    record = dict(fid=12.345, kid_mean=0.0123, kid_std=0.001, is_mean=8.76, is_std=0.12,
                  num_samples=1000, checkpoint_step=STEP, sampling={"sampler": "ddim"})
    (workdir / "eval" / f"step_{STEP}.json").write_text(json.dumps(record))
    os.makedirs(workdir / "samples" / "step_3", exist_ok=True)
    (workdir / "samples" / "step_3" / "grid.png").write_bytes(b"older")
    (workdir / "samples" / f"train_step_{STEP:08d}.png").write_bytes(b"newest")
    out = tmp_path / "export"
    assert export.main(["--workdir", str(workdir), "--out", str(out), "--params=raw"]) == 0
    imported = import_weights.read_source(str(out))
    jax.tree.map(np.testing.assert_array_equal, imported.params, raw)
    card = (out / "README.md").read_text()
    for expected in ("| steps trained | 7 |", "| weights | raw |", "/data/shapes",
                     "3 classes (red, green, blue)", "| FID | 12.35 |", "8.76 ± 0.12",
                     "![samples drawn during training or sampling](samples.png)",
                     'class_labels=labels'):
        assert expected in card, expected
    assert (out / "samples.png").read_bytes() == b"newest"
    with open(out / "model_index.json") as f:
        assert json.load(f)["unet"] == ["diffusers", "UNet2DModel"]


def diffusers_squaredcos_cap_v2(T: int) -> np.ndarray:
    """diffusers' betas_for_alpha_bar(T) (scheduling_ddpm.py): Python floats, then float32."""
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999)
                     for i in range(T)], np.float32)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("T", [20, 37, 1000, 4000])
def test_scheduler_config_gives_our_betas(schedule, T):
    """The exported scheduler_config.json gives our betas as DDPMScheduler computes them:
    re-done here from its formulas (squaredcos_cap_v2 equal as float32; linear's float64
    linspace equal to ours), and DDPMScheduler's own float32 betas for these configs
    (diffusers_betas.npz, written by benchmarks/export_diffusers_parity.py with diffusers
    0.42.1): cosine bit for bit, linear within torch's float32 linspace rounding (2 ulp)."""
    config = small_config(schedule=schedule)
    config.diffusion.num_timesteps = T
    _, sched = export.diffusers_configs(config.to_dict())
    assert sched["num_train_timesteps"] == T
    ours = diffusion.beta_schedule(schedule, T)
    if schedule == "cosine":
        assert sched["beta_schedule"] == "squaredcos_cap_v2"
        np.testing.assert_array_equal(diffusers_squaredcos_cap_v2(T), ours.astype(np.float32))
    else:
        assert sched["beta_schedule"] == "linear"
        np.testing.assert_allclose(np.linspace(sched["beta_start"], sched["beta_end"], T), ours,
                                   rtol=1e-15, atol=0)
    fixture = np.load(os.path.join(REPO, "tests", "fixtures", "reference", "diffusers_betas.npz"))
    if f"{schedule}_{T}" in fixture:
        theirs = fixture[f"{schedule}_{T}"]
        np.testing.assert_array_max_ulp(theirs, ours.astype(np.float32),
                                        maxulp=0 if schedule == "cosine" else 2)


def test_a_different_cosine_is_refused():
    """The betas check is real: a cosine with another offset (s = 0.009) is not diffusers'."""
    steps = np.arange(1001) / 1000
    f = np.cos((steps + 0.009) / 1.009 * math.pi / 2) ** 2
    other = np.minimum(1 - f[1:] / f[:-1], 0.999)
    with pytest.raises(diffusers_layout.LayoutError, match="diffusion.beta_schedule='cosine'"):
        diffusers_layout.scheduler_config(dict(num_timesteps=1000, beta_schedule="cosine",
                                               prediction="eps"),
                                          dict(variance="fixed_small", clip_x0=True), other)


def assert_one_line_and_nothing_written(capsys, out, needle: str):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err, err
    assert not os.path.exists(out)
    assert not [n for n in os.listdir(os.path.dirname(out)) if n.startswith(".export")]


def test_unexpressible_network_is_refused_before_writing(tmp_path, capsys):
    config = small_config()
    config.model.ch_mult = (2, 2)  # conv_in is ch wide, the first level 2 ch
    save_run(tmp_path / "run", config)
    out = str(tmp_path / "export")
    assert export.main(["--workdir", str(tmp_path / "run"), "--out", out]) == 1
    assert_one_line_and_nothing_written(capsys, out, "model.ch_mult=(2, 2)")


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_missing_or_empty_workdir_is_one_line(tmp_path, capsys, make):
    workdir = tmp_path / "run"
    if make == "empty":
        workdir.mkdir()
    out = str(tmp_path / "export")
    assert export.main(["--workdir", str(workdir), "--out", out]) == 1
    assert_one_line_and_nothing_written(capsys, out, f"--workdir {workdir}")


def test_no_overwrite_and_no_half_written_folder(runs, tmp_path, capsys, monkeypatch):
    workdir = str(runs(0, "eps")[0])
    out = tmp_path / "export"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert export.main(["--workdir", workdir, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err
    assert os.listdir(out) == ["mine.txt"]

    # A failure after the files are written, before the rename, leaves the old folder as it
    # was, and no temporary folder beside it.
    def fail(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(export.os, "chmod", fail)
        with pytest.raises(OSError, match="disk full"):
            export.export(workdir, str(out), overwrite=True)
    assert os.listdir(out) == ["mine.txt"]
    assert sorted(os.listdir(tmp_path)) == ["export"]

    assert export.main(["--workdir", workdir, "--out", str(out), "--overwrite"]) == 0
    assert "mine.txt" not in os.listdir(out) and "model_index.json" in os.listdir(out)
    assert sorted(os.listdir(tmp_path)) == ["export"]


def test_push_to_hub_offline_fails_in_seconds(runs, tmp_path):
    """Offline (HF_HUB_OFFLINE): one line, in seconds, nothing written."""
    workdir = str(runs(0, "eps")[0])
    out = tmp_path / "export"
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "ddpm_jax.export", "--workdir", workdir, "--out", str(out),
         "--push_to_hub", "someone/ddpm"], capture_output=True, text=True, cwd=REPO,
        env=dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf")), timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "--push_to_hub someone/ddpm: offline" in proc.stderr
    assert time.monotonic() - start < 60  # mostly Python importing JAX on a busy CPU
    assert not out.exists()


def test_push_to_hub_unreachable_fails_in_seconds(runs, tmp_path, capsys, monkeypatch):
    """Online as far as huggingface_hub knows, but the Hub does not answer."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    out = str(tmp_path / "export")
    start = time.monotonic()
    assert export.main(["--workdir", str(runs(0, "eps")[0]), "--out", out,
                        "--push_to_hub", "someone/ddpm"]) == 1
    assert time.monotonic() - start < 10
    assert_one_line_and_nothing_written(capsys, out, "cannot reach http://127.0.0.1:9")


def test_diffusers_computes_what_we_compute_on_an_export():
    """A committed export (class-conditional, 8x12, cosine, v) and diffusers 0.42.1's
    UNet2DModel output on it (benchmarks/export_diffusers_parity.py): read back by the import,
    our network gives diffusers' output to float32 rounding (1.8e-6 measured), and today's
    export writes the same config and the same tensors bit for bit."""
    folder = os.path.join(REPO, "tests", "fixtures", "reference", "export_small")
    imported = import_weights.read_source(folder)
    assert imported.model["num_classes"] == 3 and imported.data["image_size"] == [8, 12]
    config = import_weights.make_config(imported)
    config.model.attention_impl = "xla"
    ref = np.load(os.path.join(folder, "outputs.npz"))
    ours = eps(config, imported.params, jnp.asarray(ref["x_NCHW"].transpose(0, 2, 3, 1)),
               jnp.asarray(ref["t"]), jnp.asarray(ref["labels"]))
    np.testing.assert_allclose(ours.transpose(0, 3, 1, 2), ref["out_NCHW"], atol=3e-5, rtol=0)

    with open(os.path.join(folder, "unet", "config.json")) as f:
        committed = json.load(f)
    model = imported.model
    assert diffusers_layout.unet_config(model, (8, 12), 3) == committed
    levels = [i for i, b in enumerate(committed["down_block_types"]) if b.startswith("Attn")]
    tensors = diffusers_layout.to_torch(imported.params,
                                        diffusers_layout.diffusers_plan(model, levels))
    theirs = load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
    assert tensors.keys() == theirs.keys()
    for name, value in theirs.items():
        np.testing.assert_array_equal(tensors[name], value, err_msg=name)


def test_import_then_export_gives_back_diffusers_own_folder(tmp_path):
    """diffusers' save_pretrained of a UNet2DModel in DDPM's layout (the import's fixture),
    imported and exported again: the same config.json and scheduler_config.json, key for key,
    and the same tensors bit for bit."""
    source = os.path.join(REPO, "tests", "fixtures", "reference", "unet_small")
    assert import_weights.main([source, "--workdir", str(tmp_path / "run")]) == 0
    out = tmp_path / "export"
    assert export.main(["--workdir", str(tmp_path / "run"), "--out", str(out)]) == 0
    for theirs, ours in (("config.json", "unet/config.json"),
                         ("scheduler_config.json", "scheduler/scheduler_config.json")):
        with open(os.path.join(source, theirs)) as f, open(out / ours) as g:
            assert json.load(g) == json.load(f)
    original = load_file(os.path.join(source, "diffusion_pytorch_model.safetensors"))
    exported = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert exported.keys() == original.keys()
    for name, value in original.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
