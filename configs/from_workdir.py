"""The config saved with the newest checkpoint of a work directory.

    python -m ddpm_jax.main --workdir DIR --mode=sample [--config.KEY=VALUE ...]

`--mode=sample`, `--mode=eval` and the editing modes without `--config` use this file (main.py
passes `--config=configs/from_workdir.py:DIR`); overrides apply on top of the saved config.
"""

import ml_collections

from configs import default
from ddpm_jax import checkpoint


def get_config(workdir: str) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(checkpoint.newest_saved_config(workdir))
    # What to edit is this command's, not the training run's (and older runs saved none).
    config.edit = default.get_config().edit
    return config
