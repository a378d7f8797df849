"""The training step: device-count independence, one compile, NaN guard, EMA."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from ddpm_jax import diffusion, sharding, train, unet, validate


def build(config, devices):
    """A jitted multi-step train function and a fresh state on a mesh of `devices`."""
    mesh = sharding.make_mesh(devices)
    model, tx = unet.from_config(config), train.make_optimizer(config)
    sched = diffusion.make_schedule("linear", config.diffusion.num_timesteps)
    size = config.data.image_size
    init = functools.partial(train.init_state, model=model, tx=tx, image_shape=(size, size, 3))
    state_sharding = sharding.replicated(mesh, jax.eval_shape(init, jax.random.key(0)))
    state = jax.jit(init, out_shardings=state_sharding)(jax.random.key(0))
    step = jax.jit(
        functools.partial(train.train_steps, model=model, tx=tx, sched=sched, config=config),
        in_shardings=(state_sharding, sharding.batch(mesh, 1), sharding.rep(mesh)),
        out_shardings=(state_sharding, sharding.rep(mesh)),
        donate_argnums=0,
    )
    return mesh, step, state


def batches(config, n, k=1):
    """n pre-scaled float batches [k, B, H, W, 3] in [-1, 1]."""
    size, b = config.data.image_size, config.training.batch_size
    rng = np.random.default_rng(0)
    return [rng.uniform(-1, 1, (k, b, size, size, 3)).astype(np.float32) for _ in range(n)]


def run(config, devices, data, built=None):
    mesh, step, state = built or build(config, devices)
    state = jax.tree.map(jnp.copy, state)  # keep a shared fixture's state: the step donates it
    for batch in data:
        state, metrics = step(state, jax.device_put(batch, sharding.batch(mesh, 1)),
                              jax.random.key(7))
    return step, jax.device_get(state), jax.device_get(metrics)


def adam_config():
    # Adam maps float-summation noise in a near-zero gradient to a +-lr update (g / |g|); a larger
    # eps keeps the 1-vs-8-device comparison about the step's math, not that amplification.
    config = tiny_config()
    config.optim.eps = 1e-3
    return config


@pytest.fixture(scope="module")
def eight_devices():
    """One compiled 8-device step shared by the tests below (compiles dominate on 2 cores)."""
    config = adam_config()
    return config, build(config, jax.devices())


def test_one_and_eight_devices_train_the_same_model(eight_devices):
    config, built = eight_devices
    assert jax.device_count() == 8
    data = batches(config, 3)
    step1, s1, m1 = run(config, jax.devices()[:1], data)
    step8, s8, m8 = run(config, jax.devices(), data, built)
    # Dropout, t and noise are drawn at the global shape: only summation order differs.
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
    for tree1, tree8 in ((s1.params, s8.params), (s1.ema_params, s8.ema_params)):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     tree1, tree8)
    assert int(s8.step) == 3
    # The parameters moved, and each step function compiled once for its three calls.
    init = jax.device_get(built[2].params)
    assert max(float(np.max(np.abs(a - b))) for a, b in
               zip(jax.tree.leaves(init), jax.tree.leaves(s8.params), strict=True)) > 1e-3
    assert step1._cache_size() == 1 and step8._cache_size() == 1


def test_nonfinite_batch_leaves_state_unchanged_and_is_counted(eight_devices):
    config, (mesh, step, state) = eight_devices
    state = jax.tree.map(jnp.copy, state)  # the fixture's state is donated by each call
    good = jnp.asarray(batches(config, 1)[0])
    state, _ = step(state, good, jax.random.key(0))
    before = jax.device_get(state)
    bad = good.at[0, 3, 2, 2, 1].set(jnp.nan)
    state, metrics = step(state, bad, jax.random.key(0))
    state, metrics = step(state, bad, jax.random.key(0))
    after = jax.device_get(state)
    for name in ("params", "ema_params", "opt_state"):
        jax.tree.map(np.testing.assert_array_equal, getattr(before, name), getattr(after, name))
    assert int(after.step) == int(before.step) + 2
    assert int(after.nonfinite_streak) == 2 and int(after.nonfinite_total) == 2
    assert not np.isfinite(metrics["loss"]).all()
    state, _ = step(state, good, jax.random.key(0))
    assert int(state.nonfinite_streak) == 0 and int(state.nonfinite_total) == 2


def test_fused_steps_equal_single_steps(eight_devices):
    config, built = eight_devices
    data = batches(config, 2)
    _, single, _ = run(config, jax.devices(), data, built)
    config = adam_config()
    config.training.steps_per_call = 2
    _, fused, _ = run(config, jax.devices(), [np.concatenate(data)])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 single.params, fused.params)


def accum_config(accum):
    config = adam_config()
    config.model.dropout = 0.3  # masks are drawn per example: a micro-batch sees the whole batch's
    config.training.batch_size = 32
    config.training.grad_accum_steps = accum
    return config


def test_gradient_accumulation_gives_the_same_update(eight_devices):
    # Micro-batches of 8 spread over the 8 devices, against one batch of 32 on them.
    data = batches(accum_config(1), 2)
    _, whole, m1 = run(accum_config(1), jax.devices(), data)
    step4, accum, m4 = run(accum_config(4), jax.devices(), data)
    # Same t, noise, flips and dropout masks per example; only the order of the sums differs.
    for key in ("loss", "grad_norm", *(f"loss_t_q{q}_sum" for q in range(4))):
        np.testing.assert_allclose(m1[key], m4[key], rtol=2e-6, err_msg=key)
    for key in (f"loss_t_q{q}_count" for q in range(4)):
        np.testing.assert_array_equal(m1[key], m4[key])
    for a, b in ((whole.params, accum.params), (whole.ema_params, accum.ema_params),
                 (whole.opt_state, accum.opt_state)):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-6, atol=1e-8), a, b)
    assert step4._cache_size() == 1


def test_gradient_accumulation_on_cpu_gets_a_warning(config):
    config.training.grad_accum_steps = 2
    assert validate.slow_on_platform(config, "cpu").startswith(
        "training.grad_accum_steps=2 on CPU")
    assert validate.slow_on_platform(config, "gpu") is None


def test_gradient_accumulation_micro_batches_must_split_over_devices():
    config = accum_config(4)
    config.training.batch_size = 16
    with pytest.raises(validate.ConfigError, match=r"^training\.grad_accum_steps=4: "
                       r"training\.batch_size=16 does not split into 4 micro-batches divisible "
                       r"by the 8 devices$"):
        validate.check_config(config, num_devices=8)
    validate.check_config(config, num_devices=4)


@pytest.mark.parametrize("platform, k, warns", [
    ("cpu", 2, True), ("cpu", 1, False), ("gpu", 10, False), ("tpu", 10, False)])
def test_fused_steps_on_cpu_get_a_warning(config, platform, k, warns):
    config.training.steps_per_call = k
    warning = validate.slow_on_platform(config, platform)
    assert (warning is not None) == warns
    assert not warns or warning.startswith(f"training.steps_per_call={k} on CPU")


def test_ema_decay_warmup(config):
    config.training.ema_decay = 0.9999
    steps = jnp.array([0, 10, 100_000])
    np.testing.assert_allclose(train.ema_decay(steps, config), [0.1, 11 / 20, 0.9999], rtol=1e-6)
    config.training.ema_warmup = False
    np.testing.assert_allclose(train.ema_decay(steps, config), 0.9999, rtol=1e-7)


def test_learning_rate_warms_up_linearly(config):
    config.optim.warmup_steps, config.optim.learning_rate = 10, 1e-3
    lr = train.learning_rate_schedule(config)
    np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(1000)], [0, 5e-4, 1e-3, 1e-3], rtol=1e-6)


def test_summarize_reduces_a_logging_window():
    w = [{"loss": np.array([1.0, 3.0]), "grad_norm": np.array([2.0, 2.0]),
          "learning_rate": np.array([0.1, 0.2]), "nonfinite_streak": np.array([0, 1]),
          "nonfinite_total": np.array([0, 1]),
          **{f"loss_t_q{q}_sum": np.array([q, q]) for q in range(4)},
          **{f"loss_t_q{q}_count": np.array([1.0, 1.0]) for q in range(4)}}]
    s = train.summarize(w)
    assert s["loss"] == 2.0 and s["learning_rate"] == 0.2 and s["_max_nonfinite_streak"] == 1
    assert s["loss_t_q3"] == 3.0


def test_count_traces_records_each_trace_and_names_what_changed():
    def step(state, batches, rng):
        return state["w"] * jnp.mean(batches)

    traced, traces = train.count_traces(step)
    jitted = jax.jit(traced)
    state = {"w": jnp.ones(3)}
    jitted(state, jnp.zeros((1, 2, 4), jnp.uint8), jax.random.key(0))
    jitted(state, jnp.ones((1, 2, 4), jnp.uint8), jax.random.key(1))  # same avals: no trace
    assert len(traces) == 1
    assert traces[0]["batches"] == "uint8[1,2,4]" and traces[0]["state['w']"] == "float32[3]"
    jitted(state, jnp.zeros((1, 2, 4), jnp.float32), jax.random.key(0))
    assert len(traces) == 2
    assert train.describe_retrace(traces[0], traces[1]) == "batches: uint8[1,2,4] -> float32[1,2,4]"
