"""Command line: `python -m ddpm_jax.main --config CONFIG.py [--workdir DIR] [--mode=...]`.

Flags, device logging and dispatch only; everything else is importable from ddpm_jax.
"""

import logging
import os
import re
import sys

# Config files import their base as `from configs import default`: make the repo's configs/ package
# importable wherever the command is run from (the package sits next to it in a source checkout).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    from ddpm_jax import hugepages

    hugepages.reexec_with_hugepages()  # first: glibc reads it at start-up (see hugepages.py)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from ddpm_jax import checkpoint, distributed, fid, input_pipeline, train, validate  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, samples and TensorBoard logs go here "
                    "(default: runs/<config file name without .py>).")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval"], "What to do.")
flags.mark_flags_as_required(["config"])
distributed.define_flags()

# Errors whose message says all a user needs: printed as one line, without a traceback.
USER_ERRORS = (
    validate.ConfigError,
    input_pipeline.InputError,
    checkpoint.CheckpointError,
    train.NonFiniteError,
    fid.WeightsUnavailableError,
)


class _QuietOrbax(logging.Filter):
    """Orbax logs several INFO lines per save through absl; keep its warnings and errors only."""

    def filter(self, record):
        return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietOrbax())
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    workdir = FLAGS.workdir or default_workdir(config_flags.get_config_filename(FLAGS["config"]))
    print(f"Work directory: {workdir}", flush=True)
    distributed.initialize_from_flags()  # before anything touches devices
    config = FLAGS.config
    try:
        if FLAGS.mode == "train":
            train.train_and_evaluate(config, workdir)
        elif FLAGS.mode == "sample":
            from ddpm_jax import sampling

            sampling.sample_and_write(config, workdir)
        else:
            from ddpm_jax import evaluate

            evaluate.evaluate(config, workdir)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def default_workdir(config_file: str) -> str:
    """runs/<config file stem>, relative to the current directory (configs/faces.py: runs/faces)."""
    return os.path.join("runs", os.path.splitext(os.path.basename(config_file))[0])


def parse_flags(argv):
    """absl's parser, with config-override mistakes reported in one line instead of a traceback."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        message = str(e)
    except (AttributeError, KeyError) as e:
        # ml_collections' unknown-key error: the key in quotes, maybe a "Did you mean" hint.
        text = " ".join(str(e.args[0] if e.args else e).replace("\\n", "\n").split())
        key = re.findall(r"[A-Za-z0-9_]+", text)[0] if re.findall(r"[A-Za-z0-9_]+", text) else ""
        culprit = next((a for a in argv if a.startswith("--config.") and key in a), "--config")
        hint = re.search(r"Did you mean .*\?", text)
        message = f"{culprit.split('=')[0]}: no such config key {key!r}" + (
            f" ({hint.group(0)})" if hint else ""
        )
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
