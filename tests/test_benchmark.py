"""The benchmark end to end on the tiny config: the JSON line's fields, FLOPs, one compile."""

import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from conftest import tiny_config

from ddpm_jax import benchmark, sampling, unet

SAMPLING_TIMESTEPS = 10


def feature_side(module: str, size: int, levels: int) -> int:
    """Side of the feature map a top-level U-Net module writes, read from its name."""
    m = re.fullmatch(r"(?:down|up)(\d+)_(res|attn|downsample|upsample)\d*", module)
    if m is None:  # conv_in, conv_out (full size), mid_* (lowest level), temb* (not spatial)
        return size >> (levels - 1) if module.startswith("mid") else size
    level, kind = int(m.group(1)), m.group(2)
    return size >> {"downsample": level + 1, "upsample": level - 1}.get(kind, level)


def analytic_train_flops(params, size: int, levels: int) -> float:
    """Multiply-adds of every conv, dense and attention product, x2 FLOPs, x3 for fwd + bwd.

    Dense layers on the timestep embedding run once per image; the others once per pixel.
    Normalisations, activations and the optimizer are left out (a lower bound, roughly).
    """
    macs = 0
    for path, kernel in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [p.key for p in path]
        if names[-1] != "kernel":
            continue
        pixels = feature_side(names[0], size, levels) ** 2
        per_image = names[0].startswith("temb") or names[-2] == "Dense_0"  # Dense_0: temb proj.
        macs += math.prod(kernel.shape) * (1 if per_image else pixels)
        if names[-2] == "q":  # q k^T and the weighted sum of v: 2 N^2 C
            macs += 2 * pixels**2 * kernel.shape[-1]
    return 2 * 3 * macs  # the backward pass costs about twice the forward


@pytest.fixture(scope="module")
def config():
    c = tiny_config()
    c.training.batch_size = 8
    return c


@pytest.fixture(scope="module")
def record(config):
    """One benchmark run, reported as on the command line; returns (result, parsed JSON line)."""
    opts = benchmark.Options(repeats=2, steps=2, peak_tflops=1.0, sample_images=8,
                             sampling_timesteps=SAMPLING_TIMESTEPS)
    result = benchmark.run(config, opts)
    return result, opts


def test_json_line_has_every_field_and_is_the_last_line(record, capsys):
    result, _ = record
    benchmark.report(result)
    lines = capsys.readouterr().out.strip().splitlines()
    parsed = json.loads(lines[-1])
    assert parsed == json.loads(benchmark.to_json_line(result))
    assert not any(line.startswith("{") for line in lines[:-1])  # ONE JSON line
    assert "compile_count" in "\n".join(lines[:-1])  # the table shows the compile check

    positive = ["train_images_per_s", "train_step_s", "flops_per_image",
                "forward_flops_per_image", "forward_matmul_flops_per_image", "achieved_tflops",
                "mfu", "lower_s", "compile_s",
                "params"]
    positive += [f"{sampler}_sample_images_per_s{suffix}" for sampler in sampling.SAMPLERS
                 for suffix in ("", "_at_config_steps")]
    for key in positive:
        assert isinstance(parsed[key], (int, float)) and math.isfinite(parsed[key]), key
        assert parsed[key] > 0, key
    assert parsed["peak_memory_bytes"] is None  # CPU devices have no memory_stats
    assert parsed["device_count"] == jax.device_count() == 8
    assert (parsed["batch_size"], parsed["image_size"]) == (8, 8)
    assert parsed["jax_version"] == jax.__version__
    for sampler in ("ddpm", "ddim", "dpm_solver++"):
        assert parsed[f"{sampler}_sample_steps"] == SAMPLING_TIMESTEPS
        assert parsed[f"{sampler}_sample_config_steps"] == 5  # the tiny config's num_steps
    assert parsed["heun_sample_steps"] == SAMPLING_TIMESTEPS - 1  # 2 per step, 1 for the last
    assert len(parsed["train_repeat_s"]) == parsed["repeats"] == 2


def test_flops_match_an_analytic_count_and_exceed_the_forward_pass(record, config):
    result, _ = record
    model = unet.from_config(config)
    size, levels = config.data.image_size, len(config.model.ch_mult)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                               jnp.zeros((1,), jnp.int32)))["params"]
    assert result["params"] == sum(x.size for x in jax.tree.leaves(params))
    analytic = analytic_train_flops(params, size, levels)
    assert analytic / 2 < result["flops_per_image"] < 2 * analytic, (result, analytic)
    assert result["flops_per_image"] > 2 * result["forward_flops_per_image"]


def test_mfu_is_achieved_over_peak_of_all_devices(record):
    result, opts = record
    achieved = result["flops_per_image"] * result["train_images_per_s"] / 1e12
    assert result["achieved_tflops"] == pytest.approx(achieved)
    assert result["mfu"] == pytest.approx(achieved / (opts.peak_tflops * 8))


def test_the_step_compiled_and_traced_once(record):
    result, _ = record
    assert result["compile_count"] == 1 and result["trace_count"] == 1
    benchmark.check_compiled_once(result)
    with pytest.raises(benchmark.RecompileError):
        benchmark.check_compiled_once({**result, "compile_count": 2})


def test_default_peak_by_device_kind():
    assert benchmark.default_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert benchmark.default_peak_tflops("NVIDIA A100-SXM4-40GB") == 312.0
    assert benchmark.default_peak_tflops("TPU v5 lite") == 197.0
    assert benchmark.default_peak_tflops("TPU v4") == 275.0
    assert benchmark.default_peak_tflops("cpu") is None


def test_cost_flops_reads_dicts_and_lists():
    class Compiled:
        def __init__(self, analysis):
            self.analysis = analysis

        def cost_analysis(self):
            return self.analysis

    assert benchmark.cost_flops(Compiled({"flops": 6.0})) == 6.0
    assert benchmark.cost_flops(Compiled([{"flops": 6.0}])) == 6.0  # jax < 0.4.30
    assert benchmark.cost_flops(Compiled(None)) is None
    assert benchmark.to_json_line({"x": float("nan")}) == '{"x": null}'


def test_matmul_flops_count_convolutions_and_dots_in_closed_form():
    def f(x, w, a, b, q, k):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        z = jax.lax.conv_general_dilated(x, w, (2, 2), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        d = jax.jit(jnp.matmul)(a, b)  # nested in a pjit
        s = jax.lax.scan(lambda c, _: (c, jnp.einsum("bij,bjk->bik", q, k)), 0.0, None,
                         length=3)[1]
        return y.sum() + z.sum() + d.sum() + s.sum()

    shapes = [(2, 8, 8, 4), (3, 3, 4, 6), (2, 5), (5, 7), (3, 4, 5), (3, 5, 6)]
    jaxpr = jax.make_jaxpr(f)(*(jnp.zeros(s) for s in shapes)).jaxpr
    convs = 2 * (2 * 8 * 8 * 6) * 4 * 9 + 2 * (2 * 4 * 4 * 6) * 4 * 9  # SAME: the full window
    dots = 2 * 2 * 7 * 5 + 3 * (2 * 3 * 4 * 6 * 5)  # the scan's body counts `length` times
    assert benchmark.matmul_flops(jaxpr) == convs + dots


def test_forward_matmul_flops_equal_the_analytic_count_of_the_unet(config):
    model = unet.from_config(config)
    size, levels = config.data.image_size, len(config.model.ch_mult)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                               jnp.zeros((1,), jnp.int32)))["params"]
    counted = benchmark.forward_matmul_flops_per_image(model, params, (size, size, 3))
    assert counted == analytic_train_flops(params, size, levels) / 3


def test_compile_only_reports_compiled_memory_and_runs_nothing(config):
    result = benchmark.run(config, benchmark.Options(compile_only=True))
    for key in ("compiled_temp_bytes", "compiled_argument_bytes", "compiled_output_bytes",
                "flops_per_image", "compile_s"):
        assert result[key] > 0, key
    # The state's params, EMA and Adam moments are arguments: 4 float32 copies at least.
    assert result["compiled_argument_bytes"] >= 4 * 4 * result["params"]
    assert "train_images_per_s" not in result and "ddpm_sample_images_per_s" not in result
    benchmark.check_compiled_once(result)


def test_skip_training_times_only_the_samplers_asked_for(config):
    opts = benchmark.Options(repeats=1, sample_images=8, sampling_timesteps=3,
                             skip_training=True, samplers=("ddim",))
    result = benchmark.run(config, opts)
    assert "train_images_per_s" not in result and "ddpm_sample_images_per_s" not in result
    assert result["ddim_sample_steps"] == 3 and result["ddim_sample_images_per_s"] > 0
    assert result["params"] == sum(
        x.size for x in jax.tree.leaves(unet.abstract_params(unet.from_config(config),
                                                             (8, 8, 3))))


GPU_SUITE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "benchmarks", "gpu_suite.sh")


def test_gpu_suite_stops_before_any_part_when_ours_cannot_import(tmp_path):
    fake_python = tmp_path / "python"  # a Python that can import nothing
    fake_python.write_text("#!/bin/sh\nexit 1\n")
    fake_python.chmod(0o755)
    (tmp_path / "kit").mkdir()
    env = {**os.environ, "PY": str(fake_python), "KIT": str(tmp_path / "kit"),
           "RESULTS": str(tmp_path / "results"), "OUT": str(tmp_path / "out")}
    run = subprocess.run(["bash", GPU_SUITE, "run"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 1
    assert "error: ours cannot import" in run.stdout
    assert not list((tmp_path / "results").glob("*.out"))  # no part started


def test_gpu_suite_summary_extrapolates_samplers_and_judges_targets(tmp_path):
    (tmp_path / "ours_b128.json").write_text(json.dumps({
        "train_images_per_s": 9000.0, "mfu": 0.3, "batch_size": 128, "compile_s": 30.0,
        "achieved_tflops": 300.0, "peak_memory_bytes": 2**30, "attention_impl": "auto",
        "device_kind": "H200"}))
    # 256 images x 100 ancestral steps in 2 s: 12,800 image-steps/s, so 1,000 steps take 20 s.
    (tmp_path / "samplers.json").write_text(json.dumps({
        "sample_images": 256, "ddpm_sample_images_per_s": 128.0, "ddpm_sample_steps": 100,
        "ddpm_sample_first_call_s": 9.0}))
    (tmp_path / "diffusers_bf16.json").write_text(json.dumps({
        "img_per_s": 3000.0, "batch": 128, "device": "cuda", "params": 35746307}))
    env = {**os.environ, "PY": sys.executable, "RESULTS": str(tmp_path)}
    out = subprocess.run(["bash", GPU_SUITE, "summarize"], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    rows = {line[:62].strip(): line[62:].split() for line in out.splitlines() if "goal" in line}
    assert rows["train images/s (bf16, batch 128)"] == ["9000", "goal", ">=", "8000", "met"]
    assert rows["MFU (bf16, batch 128)"][-1] == "MISSED"
    assert rows["ancestral 256 samples x 1,000 steps: seconds (extrapolated)"][:1] == ["20"]
    assert rows["ours bf16 / diffusers_bf16: train images/s, batch 128"][0] == "3"
    assert rows["ours bf16 / diffusers_compile: train images/s, batch 128"][0] == "n/a"
    assert "ours_b512: no result" in out
