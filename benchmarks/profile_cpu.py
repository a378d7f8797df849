"""Where a CPU training step and a sampling step spend their time, op by op.

    python benchmarks/profile_cpu.py --batch 16                # ours: XLA:CPU's thunks
    /tmp/peer-venv/bin/python benchmarks/profile_cpu.py --peer --batch 16   # diffusers, torch

Ours: the benchmark's jitted training step (and one network evaluation at `--batch` images, what
a sampler pays per step) run under jax.profiler with XLA's per-thunk TraceMe events on; each
thunk is put in a category read from the optimized HLO (a convolution's pass from its metadata
and output shape). The peer: diffusers' UNet2DModel step (../shared/bench/peer_diffusers.py's)
under torch.profiler, by aten op. Prints ms per step per category, and one JSON line.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def conv_pass(text: str) -> str:
    """fwd / input-grad / weight-grad of one HLO convolution, from its metadata and shapes."""
    backward = "transpose(" in text
    if not backward:
        return "conv fwd"
    out = re.search(r"= f32\[([\d,]+)\]", text)
    dims = [int(d) for d in out.group(1).split(",")] if out else []
    # A weight gradient's output is the kernel: two spatial dims of 3 (or 1).
    return "conv weight-grad" if sorted(dims)[:2] in ([3, 3], [1, 1]) else "conv input-grad"


def categorise(hlo: str) -> dict[str, str]:
    """Thunk (instruction) name -> category, from optimized HLO text."""
    comps: dict[str, list[str]] = {}
    cur = None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if m and not line.startswith(" "):
            cur = m.group(1)
            comps[cur] = []
        elif cur is not None and line.strip() and line.strip() != "}":
            comps[cur].append(line.strip())

    def kind(lines: list[str], depth=0) -> str:
        body = "\n".join(lines)
        for ln in lines:
            if " convolution(" in ln:
                return conv_pass(ln)
        for ln in lines:
            if " dot(" in ln:
                return "attention/dense (dot)"
        for ln in lines:
            m = re.search(r"calls=%?([\w.\-]+)", ln)
            if m and m.group(1) in comps and depth < 3:
                k = kind(comps[m.group(1)], depth + 1)
                if k != "other":
                    return k
        if "rng-bit-generator" in body or "threefry" in body:
            return "random bits (dropout, noise)"
        if "exponential(" in body and "reduce(" in body:
            return "softmax"
        if "rsqrt(" in body and "reduce(" not in body:
            return "groupnorm/adam apply"
        if "reduce(" in body:
            return "reductions (groupnorm stats, grad sums)"
        if "logistic(" in body or "exponential(" in body:
            return "silu and elementwise"
        if re.search(r" (transpose|copy)\(", body) and not re.search(
                r" (add|multiply|subtract)\(", body):
            return "transpose/copy"
        return "elementwise/other"

    cats = {}
    for lines in comps.values():
        for ln in lines:
            m = re.match(r"%?([\w.\-]+) = .*", ln)
            if not m:
                continue
            inst = m.group(1)
            if " fusion(" in ln:
                callee = re.search(r"calls=%?([\w.\-]+)", ln)
                cats[inst] = kind(comps.get(callee.group(1), []) if callee else [])
            elif " convolution(" in ln:
                cats[inst] = conv_pass(ln)
            elif " dot(" in ln:
                cats[inst] = "attention/dense (dot)"
            elif re.search(r" (transpose|copy)\(", ln):
                cats[inst] = "transpose/copy"
            elif " custom-call(" in ln:
                cats[inst] = "custom-call"
    return cats


def thunk_ms(run, repeats: int) -> tuple[dict[str, float], float]:
    """(total ms per call of each thunk name, wall ms per call) over `repeats` profiled calls."""
    import jax

    d = tempfile.mkdtemp()
    t0 = time.perf_counter()
    with jax.profiler.trace(d, create_perfetto_trace=True):
        for _ in range(repeats):
            run()
    wall = (time.perf_counter() - t0) / repeats * 1e3
    path = glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)[0]
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    total: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            total[e["name"]] += e["dur"] / 1e3 / repeats
    return total, wall


def profile_ours(batch: int, repeats: int, flags: list[str]) -> dict:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_enable_xprof_traceme=true").strip()
    import functools

    import jax
    import jax.numpy as jnp
    from absl import flags as absl_flags

    from ddpm_jax import benchmark, data, sharding, train, unet  # defines --config

    absl_flags.FLAGS(["prog", "--config=configs/cifar10.py", *flags])
    config = absl_flags.FLAGS.config
    config.training.batch_size = batch
    mesh = sharding.make_mesh()
    model = unet.from_config(config)
    tx = train.make_optimizer(config)
    shape = data.image_shape(config.data)
    init_fn = functools.partial(train.init_state, model=model, tx=tx, image_shape=shape)
    state_sharding = sharding.replicated(mesh, jax.eval_shape(init_fn, jax.random.key(0)))
    state = jax.jit(init_fn, out_shardings=state_sharding)(jax.random.key(0))
    batches = benchmark.fake_batches(mesh, 1, batch, shape)
    step, _, _ = benchmark.make_train_step(config, model, tx, mesh, state_sharding)
    compiled = step.lower(state, batches, jax.random.key(1)).compile()
    holder = {"s": state}

    def train_once():
        holder["s"], m = compiled(holder["s"], batches, jax.random.key(1))
        jax.block_until_ready((holder["s"], m))

    apply = jax.jit(functools.partial(model.apply, train=False))
    x = jnp.zeros((batch, *shape))
    t = jnp.full((batch,), 500, jnp.int32)
    fwd = apply.lower({"params": state.params}, x, t).compile()

    def sample_once():
        jax.block_until_ready(fwd({"params": holder["s"].params}, x, t))

    out = {}
    for name, run, comp in (("train", train_once, compiled), ("sample", sample_once, fwd)):
        run()
        run()  # warm
        cats = categorise(comp.as_text())
        ms, wall = thunk_ms(run, repeats)
        by_cat: dict[str, float] = collections.defaultdict(float)
        for thunk, v in ms.items():
            base = thunk.removeprefix("end: ")
            if thunk.startswith("end: "):
                continue
            if base in cats:
                by_cat[cats[base]] += v
            elif re.match(r"^[\w.\-]+$", base) and (
                    base.endswith("fusion") or re.search(r"fusion\.\d+$", base)
                    or re.match(r"^(copy|transpose|convolution|dot|add|multiply)", base)):
                by_cat["unmatched thunks"] += v
        top = sorted(((v, k, cats.get(k, "?")) for k, v in ms.items() if k in cats),
                     reverse=True)[:25]
        out[name] = {"wall_ms": wall, "by_category_ms": dict(by_cat),
                     "top_thunks": [(k, c, round(v, 2)) for v, k, c in top]}
    return out


def profile_peer(batch: int, repeats: int) -> dict:
    import torch
    from diffusers import DDPMScheduler, UNet2DModel
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
        attention_head_dim=None, norm_num_groups=32, dropout=0.1)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    x = torch.rand(batch, 3, 32, 32) * 2 - 1
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)

    def train_once():
        model.train()
        noise = torch.randn_like(x)
        t = torch.randint(0, 1000, (batch,))
        pred = model(sched.add_noise(x, noise, t), t).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def sample_once():
        model.eval()
        model(x, torch.full((batch,), 500)).sample.mean().item()

    def category(name: str) -> str:
        n = name.lower()
        if "convolution_backward" in n:
            return "conv backward (input+weight grad)"
        if "conv" in n:
            return "conv fwd"
        if "group_norm" in n:
            return "groupnorm fwd" if "backward" not in n else "groupnorm backward"
        if "silu" in n:
            return "silu fwd/bwd"
        if any(k in n for k in ("mm", "bmm", "baddbmm", "addmm", "linear", "softmax",
                                "attention")):
            return "attention/dense"
        if "adam" in n or "foreach" in n or "norm" in n and "clip" in n:
            return "optimizer/clip"
        if "copy" in n or "clone" in n or "contiguous" in n or "permute" in n:
            return "copy/layout"
        return "other"

    out = {}
    for name, run in (("train", train_once), ("sample", sample_once)):
        run()
        run()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                run()
        wall = (time.perf_counter() - t0) / repeats * 1e3
        by_cat: dict[str, float] = collections.defaultdict(float)
        # Self time of each op, so nested ops are not counted twice.
        for ev in prof.key_averages():
            by_cat[category(ev.key)] += ev.self_cpu_time_total / 1e3 / repeats
        top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:20]
        out[name] = {"wall_ms": wall, "by_category_ms": dict(by_cat),
                     "top_ops": [(e.key, round(e.self_cpu_time_total / 1e3 / repeats, 2))
                                 for e in top]}
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peer", action="store_true")
    p.add_argument("flags", nargs="*", help="ours: --config.x=y overrides")
    a = p.parse_args()
    out = profile_peer(a.batch, a.repeats) if a.peer else profile_ours(a.batch, a.repeats,
                                                                         a.flags)
    for name, r in out.items():
        print(f"== {name}: {r['wall_ms']:.1f} ms per call (wall, profiled)")
        for k, v in sorted(r["by_category_ms"].items(), key=lambda kv: -kv[1]):
            print(f"  {k:<42}{v:>9.1f} ms")
        for row in r.get("top_thunks", r.get("top_ops", [])):
            print("    ", row)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
