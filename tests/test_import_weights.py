"""Published DDPM models: import, parity with the reference implementations, sampling from the
imported work directory.

The fixtures in tests/fixtures/reference/ come from diffusers and pesser/pytorch_diffusion
(tests/fixtures/make_reference_fixtures.py, run once where torch is installed); these tests need
neither. Regenerate them when the reference implementations change what they compute.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from safetensors.numpy import load_file, save_file

from ddpm_jax import checkpoint, diffusion, import_weights, solvers, unet

FIXTURES = os.path.join(REPO, "tests", "fixtures", "reference")
DIFFUSERS = os.path.join(FIXTURES, "unet_small")
PESSER = os.path.join(FIXTURES, "pesser_small", "model-1000.ckpt")
ATOL = 3e-5  # float32 on outputs of magnitude ~2: measured 7e-6 (diffusers), 6e-6 (pesser)


def run_unet(imported, x_NCHW, t):
    config = import_weights.make_config(imported)
    config.model.attention_impl = "xla"
    model = unet.from_config(config)
    out = jax.jit(model.apply)({"params": imported.params},
                               jnp.asarray(x_NCHW.transpose(0, 2, 3, 1)), jnp.asarray(t))
    return np.asarray(out).transpose(0, 3, 1, 2)


def test_diffusers_unet2dmodel_matches_ours():
    """diffusers' UNet2DModel in DDPM's layout (random weights, attention at 8x8) computes what
    our U-Net computes with the imported weights."""
    imported = import_weights.read_source(DIFFUSERS)
    assert imported.model == dict(ch=16, ch_mult=[1, 2, 2], num_res_blocks=2,
                                  attn_resolutions=[8], dropout=0.0, norm_groups=4)
    assert imported.diffusion == dict(num_timesteps=1000, beta_schedule="linear",
                                      prediction="eps")
    assert imported.sampling == dict(variance="fixed_large", clip_x0=True)
    ref = np.load(os.path.join(DIFFUSERS, "outputs.npz"))
    np.testing.assert_allclose(run_unet(imported, ref["x_NCHW"], ref["t"]), ref["out_NCHW"],
                               atol=ATOL, rtol=0)


def test_old_diffusers_attention_names(tmp_path):
    """google/ddpm-* were uploaded with diffusers' old attention names (query, key, value,
    proj_attn): the same weights under them import to the same parameters."""
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    tensors = load_file(os.path.join(DIFFUSERS, "diffusion_pytorch_model.safetensors"))
    renamed = {re.sub(r"\.(to_q|to_k|to_v|to_out\.0)\.", lambda m: f".{old[m.group(1)]}.", k): v
               for k, v in tensors.items()}
    assert renamed.keys() != tensors.keys()
    save_file(renamed, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    shutil.copy(os.path.join(DIFFUSERS, "config.json"), tmp_path)
    new_params = import_weights.read_source(DIFFUSERS).params
    jax.tree.map(np.testing.assert_array_equal, import_weights.read_source(str(tmp_path)).params,
                 new_params)


def test_pesser_checkpoint_matches_theirs():
    """pesser/pytorch_diffusion's Model (the port of the DDPM paper's TF U-Net), torch.save'd as
    its ema_cifar10 files are, read without torch: the same outputs."""
    imported = import_weights.read_source(PESSER, image_size=16)
    assert imported.model["norm_groups"] == 32 and imported.model["num_res_blocks"] == 1
    ref = np.load(os.path.join(os.path.dirname(PESSER), "outputs.npz"))
    np.testing.assert_allclose(run_unet(imported, ref["x_NCHW"], ref["t"]), ref["out_NCHW"],
                               atol=ATOL, rtol=0)


def tf_name(torch_name: str) -> str:
    """pesser's state_dict key -> the DDPM release's TF variable (pesser's scripts/convert.py)."""
    module, leaf = torch_name.rsplit(".", 1)
    module = re.sub(r"^(down|up)\.(\d+)\.", r"\1_\2/", module)
    module = re.sub(r"(block|attn)\.(\d+)\.", r"\1_\2/", module)
    module = re.sub(r"^temb\.dense\.(\d)", r"temb/dense\1", module).replace(".", "/")
    if module.split("/")[-1].startswith("norm"):
        return f"model/{module}/" + {"weight": "gamma", "bias": "beta"}[leaf]
    return f"model/{module}/" + {"weight": "W", "bias": "b"}[leaf]


def tf_value(torch_name: str, w: np.ndarray) -> np.ndarray:
    if w.ndim == 4 and w.shape[2:] == (1, 1):  # nin: [in, out]
        return w[:, :, 0, 0].T
    if w.ndim == 4:  # conv: [kh, kw, in, out]
        return w.transpose(2, 3, 1, 0)
    return w.T if w.ndim == 2 else w  # dense: [in, out]


def test_tf_checkpoint_takes_the_ema_variables(tmp_path):
    """The DDPM release's TF checkpoint layout (model/down_0/block_0/conv1/W, ...), with raw
    variables, Adam slots and EMA shadows: the import reads the EMA copy, and computes what
    pesser's conversion of the same weights does."""
    import tensorflow as tf

    state = import_weights._read_torch_tensors(PESSER)
    names, values = [], []
    for key, w in state.items():
        name, value = tf_name(key), tf_value(key, w)
        names += [name, f"{name}/ExponentialMovingAverage", f"{name}/Adam"]
        values += [-value - 1.0, value, value * 0 + 3.0]  # only the EMA copy is right
    names.append("global_step")
    values.append(np.array(790000, np.int64))
    prefix = str(tmp_path / "model.ckpt-790000")
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(v) for v in values])
    imported = import_weights.read_source(prefix, image_size=16)
    assert any("EMA" in note for note in imported.notes)
    jax.tree.map(np.testing.assert_array_equal, imported.params,
                 import_weights.read_source(PESSER, image_size=16).params)


def test_full_cifar10_layout_maps_onto_ours():
    """google/ddpm-cifar10-32's config and every tensor name and shape (not its 143 MB of
    weights) land exactly on our CIFAR-10 network: 35,746,307 parameters, none left over."""
    with open(os.path.join(FIXTURES, "cifar10_layout.json")) as f:
        layout = json.load(f)
    tensors = {k: np.broadcast_to(np.float32(0), v) for k, v in layout["shapes"].items()}
    model, data, params = import_weights.from_diffusers(layout["config"], tensors, "cifar10")
    assert model == dict(ch=128, ch_mult=[1, 2, 2, 2], num_res_blocks=2, attn_resolutions=[16],
                         dropout=0.0, norm_groups=32)
    abstract = unet.abstract_params(unet.UNet(norm_groups=32), (32, 32, 3))
    checkpoint.check_compatible(params, abstract, "params", "cifar10")
    count = sum(x.size for x in jax.tree.leaves(abstract))
    assert count == layout["num_params"] == 35_746_307


@pytest.mark.parametrize("field,value", [
    ("attention_head_dim", 8),  # 4 heads at 32 channels
    ("resnet_time_scale_shift", "scale_shift"),
    ("downsample_padding", 1),
    ("flip_sin_to_cos", True),
    ("freq_shift", 0),
    ("norm_eps", 1e-5),
    ("class_embed_type", "timestep"),
    ("up_block_types", ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D"]),
])
def test_unrepresentable_layouts_are_refused_in_one_line(tmp_path, capsys, field, value):
    shutil.copy(os.path.join(DIFFUSERS, "diffusion_pytorch_model.safetensors"), tmp_path)
    with open(os.path.join(DIFFUSERS, "config.json")) as f:
        cfg = json.load(f)
    cfg[field] = value
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    assert import_weights.main([str(tmp_path), "--workdir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{field}=" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("field,value", [
    ("variance_type", "learned_range"),
    ("beta_schedule", "scaled_linear"),
    ("beta_end", 0.012),
    ("thresholding", True),
    ("prediction_type", "flow"),
])
def test_unsupported_schedulers_are_refused(tmp_path, field, value):
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copy(os.path.join(DIFFUSERS, name), tmp_path)
    with open(os.path.join(DIFFUSERS, "scheduler_config.json")) as f:
        sched = json.load(f)
    sched[field] = value
    with open(tmp_path / "scheduler_config.json", "w") as f:
        json.dump(sched, f)
    with pytest.raises(import_weights.WeightsImportError, match=f"scheduler_config.json: {field}="):
        import_weights.read_source(str(tmp_path))


def test_hub_id_offline_names_the_files_to_fetch(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, "-m", "ddpm_jax.import_weights",
                           "google/ddpm-cifar10-32", "--workdir", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert ("https://huggingface.co/google/ddpm-cifar10-32/resolve/main/"
            "diffusion_pytorch_model.safetensors") in proc.stderr


def ddpm_step_float64(x, eps, noise, t, variance, clip):
    """DDPM's ancestral step (eqs. 6, 7 and 11) in float64 NumPy, from the betas."""
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1.0 - betas)
    abar_prev = abar[t - 1] if t > 0 else 1.0
    x0 = (x - np.sqrt(1.0 - abar[t]) * eps) / np.sqrt(abar[t])
    x0 = np.clip(x0, -1.0, 1.0) if clip else x0
    mean = (np.sqrt(abar_prev) * betas[t] * x0
            + np.sqrt(1.0 - betas[t]) * (1.0 - abar_prev) * x) / (1.0 - abar[t])
    var = betas[t] if variance == "fixed_large" else (1.0 - abar_prev) / (1.0 - abar[t]) * betas[t]
    return mean + (np.sqrt(var) * noise if t > 0 else 0.0)


def test_ancestral_step_matches_diffusers_ddpm_scheduler():
    """diffusers' DDPMScheduler.step (fixed_small / fixed_large, with and without clipping) on
    fixed model outputs and noise, against our x0 prediction and ancestral step.

    They agree to 5e-6 except at t = 1, where diffusers' float32 beta_t = 1 - abar_t / abar_{t-1}
    (1.2e-4 from a ratio near 1) is off by ~5e-4 relative and its step by 2e-4 from the float64
    step; ours (betas and coefficients computed in float64, then cast) is within 1.3e-6 there.
    So: ours within 5e-6 of the float64 step, and of diffusers up to diffusers' own error.
    """
    ref = np.load(os.path.join(FIXTURES, "scheduler.npz"))
    sched = diffusion.make_schedule("linear", 1000)

    class FixedOutput:  # the network, returning the fixture's model output
        def apply(self, variables, x, t_B):
            return variables["params"]

    for variance in ("fixed_small", "fixed_large"):
        for clip in (False, True):
            expected = ref[f"prev_{variance}_clip{int(clip)}"]
            for i, t in enumerate(ref["timesteps"]):
                x, eps, noise = ref["x_t"][i], ref["model_output"][i], ref["noise"][i]
                x0, _ = solvers.predict(FixedOutput(), jnp.asarray(eps), sched, "eps", clip,
                                        jnp.asarray(x), int(t))
                got = np.asarray(solvers.ancestral_step(sched, jnp.asarray(x), x0, int(t),
                                                        jnp.asarray(noise), variance))
                exact = ddpm_step_float64(*(a.astype(np.float64) for a in (x, eps, noise)),
                                          int(t), variance, clip)
                where = f"{variance} clip={clip} t={t}"
                np.testing.assert_allclose(got, exact, atol=5e-6, rtol=0, err_msg=where)
                theirs = np.abs(expected[i] - exact).max()
                assert theirs < (3e-4 if t == 1 else 5e-6), where
                np.testing.assert_allclose(got, expected[i], atol=5e-6 + theirs, rtol=0,
                                           err_msg=where)


def write_diffusers_folder(folder, params, cfg: dict) -> None:
    """Our `params` saved as diffusers would save a UNet2DModel of config `cfg`."""
    widths = [cfg["block_out_channels"][0] * m for m in (1, 2)]
    params = jax.tree.map(np.asarray, params)
    plan = import_weights._layer_plan(2, cfg["layers_per_block"], [1],
                                      lambda kind, i, j: j == 0 and i == 1)
    tensors = {}
    for ours, _, hf, kind in plan:
        layer = params
        for part in ours.split("/"):
            layer = layer[part]
        if kind == "norm":
            tensors.update({f"{hf}.weight": layer["scale"], f"{hf}.bias": layer["bias"]})
            continue
        w = np.asarray(layer["kernel"])
        if w.ndim == 4:
            w = w.transpose(3, 2, 0, 1)
        elif hf.endswith("conv_shortcut"):
            w = w.T[:, :, None, None]
        else:
            w = w.T
        tensors.update({f"{hf}.weight": np.ascontiguousarray(w),
                        f"{hf}.bias": np.asarray(layer["bias"])})
    os.makedirs(folder)
    save_file(tensors, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    assert widths == cfg["block_out_channels"]


def test_sample_from_imported_workdir_without_config(tmp_path):
    """import_weights writes an ordinary work directory: --mode=sample reads its config from
    the checkpoint, and --config overrides still apply. (A diffusers folder of a tiny network,
    written here: the fixture's network takes twice as long to compile.)"""
    with open(os.path.join(DIFFUSERS, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(sample_size=8, block_out_channels=[16, 32], layers_per_block=1,
               down_block_types=["DownBlock2D", "AttnDownBlock2D"],
               up_block_types=["AttnUpBlock2D", "UpBlock2D"])
    model = unet.UNet(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                      norm_groups=4)
    rng = np.random.default_rng(0)  # random weights without compiling the model's init
    params = jax.tree.map(lambda a: rng.standard_normal(a.shape, np.float32) * 0.1,
                          unet.abstract_params(model, (8, 8, 3)))
    folder = str(tmp_path / "tiny")
    write_diffusers_folder(folder, params, cfg)
    shutil.copy(os.path.join(DIFFUSERS, "scheduler_config.json"), folder)
    workdir = tmp_path / "run"
    assert import_weights.main([folder, "--workdir", str(workdir)]) == 0
    restored = checkpoint.Checkpointer(str(workdir), read_only=True).restore_ema_params(
        unet.abstract_params(model, (8, 8, 3)))[1]
    jax.tree.map(np.testing.assert_array_equal, restored, params)

    proc = subprocess.run(
        [sys.executable, "-m", "ddpm_jax.main", "--workdir", str(workdir), "--mode=sample",
         "--config.sampling.num_samples=4", "--config.sampling.num_steps=3"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
        env=dict(os.environ, PYTHONPATH=REPO,  # one device: half the compile time of eight
                 XLA_FLAGS="--xla_force_host_platform_device_count=1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    images = np.load(workdir / "samples" / "step_0" / "samples.npz")["images"]
    assert images.shape == (4, 8, 8, 3)  # the imported 8x8 model, 4 samples


def test_config_is_required_without_a_checkpoint(tmp_path):
    # In a subprocess: ddpm_jax.main defines absl's --config flag, as ddpm_jax.benchmark (which
    # other tests import) does, and one process cannot hold both.
    script = f"""
import pytest
from absl import flags
from ddpm_jax import checkpoint, main
with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
    main.with_workdir_config(["main", "--workdir", {str(tmp_path)!r}, "--mode=sample"])
with pytest.raises(flags.Error, match="--config is required for --mode=train"):
    main.with_workdir_config(["main", "--workdir", {str(tmp_path)!r}])
argv = ["main", "--config", "c.py", "--mode=sample"]
assert main.with_workdir_config(argv) == argv
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
