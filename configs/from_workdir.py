"""The config saved with the newest checkpoint of a work directory.

    python -m ddpm_jax.main --workdir DIR --mode=sample [--config.KEY=VALUE ...]

`--mode=sample` and `--mode=eval` without `--config` use this file (main.py passes
`--config=configs/from_workdir.py:DIR`); overrides apply on top of the saved config.
"""

import ml_collections

from ddpm_jax import checkpoint


def get_config(workdir: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(checkpoint.newest_saved_config(workdir))
