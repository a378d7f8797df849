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
    from ddpm_jax import hugepages, quiet

    hugepages.reexec_with_hugepages()  # first: glibc reads it at start-up (see hugepages.py)
    quiet.silence_tensorflow()  # before anything imports TensorFlow (see quiet.py)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from ddpm_jax import (  # noqa: E402
    checkpoint,
    config_renames,
    data,
    distributed,
    fid,
    train,
    validate,
)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file; --mode=sample, eval and the "
                                "editing modes default to the config saved in --workdir.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, samples and TensorBoard logs go here "
                    "(default: runs/<config file name without .py>).")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval", *validate.EDIT_MODES],
                  "What to do (inpaint, interpolate, img2img: docs/editing.md).")
# What --mode=sample and --mode=eval read without --config: the checkpoint's own config.
WORKDIR_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "from_workdir.py")
distributed.define_flags()

# Errors whose message says all a user needs: printed as one line, without a traceback.
USER_ERRORS = (
    validate.ConfigError,
    data.InputError,
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
    config = config_renames.rename_keys(FLAGS.config)  # a config file's old key names
    try:
        if FLAGS.mode == "train":
            train.train_and_evaluate(config, workdir)
        elif FLAGS.mode == "sample":
            from ddpm_jax import sampling

            sampling.sample_and_write(config, workdir)
        elif FLAGS.mode in validate.EDIT_MODES:
            from ddpm_jax import sampling

            sampling.edit_and_write(config, workdir, FLAGS.mode)
        else:
            from ddpm_jax import evaluate

            evaluate.evaluate(config, workdir)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def default_workdir(config_file: str) -> str:
    """runs/<config file stem>, relative to the current directory (configs/faces.py: runs/faces)."""
    return os.path.join("runs", os.path.splitext(os.path.basename(config_file))[0])


def with_workdir_config(argv: list[str]) -> list[str]:
    """`argv`, with `--config=configs/from_workdir.py:DIR` first when it has no --config: the
    config saved in DIR's newest checkpoint, for --mode=sample and --mode=eval."""
    if _flag_value(argv, "config") is not None or any(a in ("--help", "-h", "--helpfull")
                                                       for a in argv):
        return argv
    mode, workdir = _flag_value(argv, "mode") or "train", _flag_value(argv, "workdir")
    if mode not in ("sample", "eval", *validate.EDIT_MODES):
        raise flags.Error(f"--config is required for --mode={mode} (--mode=sample, eval and "
                          "the editing modes read the config saved in --workdir)")
    if not workdir:
        raise flags.Error(f"--mode={mode} needs --workdir (whose checkpoint's config it reads) "
                          "or --config")
    checkpoint.newest_saved_config(workdir)  # no checkpoint: say so in one line, here
    return [argv[0], f"--config={WORKDIR_CONFIG}:{workdir}", *argv[1:]]


def _flag_value(argv: list[str], name: str) -> str | None:
    """The last value given to --name (as --name=V or --name V) in argv, else None."""
    value = None
    for i, arg in enumerate(argv[1:], 1):
        match = re.fullmatch(rf"--?{name}(=(.*))?", arg)
        if match:
            value = match.group(2) if match.group(1) else (argv[i + 1] if i + 1 < len(argv)
                                                           else "")
    return value


def parse_flags(argv):
    """absl's parser, with config-override mistakes reported in one line instead of a traceback."""
    try:
        # Old config key names, renamed where config_flags reads its overrides: sys.argv.
        sys.argv = argv = config_renames.rename_overrides(argv)
        argv = with_workdir_config(argv)
        return FLAGS(argv)
    except (flags.Error, checkpoint.CheckpointError) as e:
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
