"""benchmarks/reproduce_ddpm_cifar10.sh fails in one line per missing piece, before long work.

The script itself needs a GPU, the DDPM weights and CIFAR-10, none of which a test machine has;
each of its pieces is tested elsewhere (IS/NLL: test_fid, test_likelihood, test_evaluate).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                      "reproduce_ddpm_cifar10.sh")


def run(args, tmp_path, **env):
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("DDPM_JAX_CACHE", "TFDS_DATA_DIR", "INCEPTION_WEIGHTS")}
    full_env.update(HOME=str(tmp_path / "home"), PYTHON=sys.executable, JAX_PLATFORMS="cpu",
                    **env)
    result = subprocess.run(["bash", SCRIPT, *args], env=full_env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reproduce_ddpm_cifar10: "), result.stderr
    return lines[0]


@pytest.mark.skipif(not os.path.exists("/bin/bash"), reason="needs bash")
def test_each_missing_piece_fails_in_one_line(tmp_path):
    assert "usage" in run([], tmp_path)
    ckpt = tmp_path / "model-790000.ckpt"
    assert f"no EMA checkpoint at {ckpt}" in run([str(ckpt)], tmp_path)

    ckpt.write_bytes(b"")  # present (the importer reads it; not this script)
    data = tmp_path / "tfds"
    assert f"CIFAR-10 is not prepared in {data}" in run([str(ckpt)], tmp_path,
                                                        TFDS_DATA_DIR=str(data))
    (data / "cifar10" / "3.0.2").mkdir(parents=True)
    (data / "cifar10" / "3.0.2" / "dataset_info.json").write_text("{}")
    cache = tmp_path / "cache"
    message = run([str(ckpt)], tmp_path, TFDS_DATA_DIR=str(data), DDPM_JAX_CACHE=str(cache))
    assert f"no FID Inception weights at {cache}/pt_inception-2015-12-05.npz" in message

    weights = tmp_path / "inception.npz"
    weights.write_bytes(b"")
    message = run([str(ckpt)], tmp_path, TFDS_DATA_DIR=str(data), INCEPTION_WEIGHTS=str(weights))
    assert "no GPU: JAX's backend is 'cpu'" in message
