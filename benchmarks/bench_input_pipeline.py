"""Host input-pipeline throughput on a folder of JPEGs: uncached, cache fill, cached.

    PYTHONPATH=. python benchmarks/bench_input_pipeline.py [--num-small 512 --num-large 64]

Writes random-content JPEGs (64x64, plus some 250x250 like LFW) to a temporary folder, then
times images/s through ImageDataset.local_batch (decode + resize + gather, the host work of
every step) and through iterate() (adds prefetching and the device transfer). Prints one JSON
line, then a table.
"""

import argparse
import json
import os
import tempfile
import time

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from ddpm_jax.data import create_datasets


def write_jpegs(root: str, count: int, size: int, seed: int) -> None:
    """Photo-like random images: smooth colour blobs plus grain, JPEG quality 90."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for i in range(count):
        blobs = Image.fromarray(rng.integers(0, 256, (6, 6, 3), np.uint8)).resize(
            (size, size), Image.Resampling.BICUBIC
        )
        grain = rng.normal(0, 12, (size, size, 3))
        pixels = np.clip(np.asarray(blobs, np.float32) + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, f"{i:05d}.jpg"), quality=90)


def data_config(path: str, image_size: int, cache: bool, workers: int):
    return ml_collections.ConfigDict(
        {
            "source": "folder",
            "name": "",
            "path": path,
            "split": "train",
            "eval_split": "",
            "data_dir": "",
            "image_size": image_size,
            "resize": "center_crop",
            "random_flip": True,
            "cache": cache,
            "cache_max_gb": 4.0,
            "num_eval_examples": 0,
            "prefetch": 2,
            "num_workers": workers,
        }
    )


def rate(ds, steps: range) -> float:
    """Images/s for local_batch over `steps`."""
    start = time.perf_counter()
    for step in steps:
        ds.local_batch(step)
    return len(steps) * ds.global_batch_size / (time.perf_counter() - start)


def iterate_rate(ds, steps: int) -> float:
    """Images/s for iterate() onto one device, prefetching on."""
    sharding = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("data",)), P(None, "data"))
    with ds.iterate(0, sharding) as batches:
        next(batches).block_until_ready()  # thread start-up
        start = time.perf_counter()
        for _ in range(steps):
            next(batches).block_until_ready()
        return steps * ds.global_batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-small", type=int, default=512, help="64x64 JPEGs")
    parser.add_argument("--num-large", type=int, default=64, help="250x250 JPEGs")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=8, help="data.num_workers")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per measurement")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        write_jpegs(os.path.join(tmp, "all", "small"), args.num_small, 64, seed=0)
        write_jpegs(os.path.join(tmp, "all", "large"), args.num_large, 250, seed=1)
        folder = os.path.join(tmp, "all")

        def create(path, cache):
            start = time.perf_counter()
            ds, _ = create_datasets(
                data_config(path, args.image_size, cache, args.workers),
                seed=0,
                global_batch_size=args.batch,
            )
            return ds, time.perf_counter() - start

        uncached, create_s = create(folder, cache=False)
        per_epoch = uncached.num_examples // args.batch
        steps = range(args.epochs * per_epoch)
        results = {"uncached (decode per batch)": rate(uncached, steps)}
        if args.num_large >= args.batch:
            large, _ = create(os.path.join(folder, "large"), cache=False)
            large_steps = range(args.epochs * (args.num_large // args.batch))
            results["uncached, 250x250 files only"] = rate(large, large_steps)
        cached, _ = create(folder, cache=True)
        results["cache fill (first epoch)"] = rate(cached, range(per_epoch))
        results["cached epochs"] = rate(cached, range(per_epoch, per_epoch + len(steps)))
        results["cached, iterate + prefetch"] = iterate_rate(cached, len(steps))

    record = {
        "benchmark": "input_pipeline",
        "images": args.num_small + args.num_large,
        "image_size": args.image_size,
        "global_batch": args.batch,
        "num_workers": args.workers,
        "cpus": os.cpu_count(),
        "images_per_s": {k: round(v, 1) for k, v in results.items()},
        "create_s": round(create_s, 3),
    }
    print(json.dumps(record))
    print(f"\n{'mode':<32}{'images/s':>10}")
    for mode, value in record["images_per_s"].items():
        print(f"{mode:<32}{value:>10,.0f}")
    print(f"{'create_datasets (probe), s':<32}{record['create_s']:>10.3f}")


if __name__ == "__main__":
    main()
