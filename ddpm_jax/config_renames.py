"""Config keys that were renamed, in one table, so that old names keep loading.

An old key is read as its new name wherever a config comes from: a `--config.OLD=V` override
(`rename_overrides`, before absl parses the command line), a config file that sets it, and the
config saved with an older checkpoint (`rename_keys`). Each old key gets one deprecation line on
stderr naming both keys. To rename a key: change it in configs/default.py and the code, and add
a line here.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import MutableMapping, Sequence

# old dotted key -> new dotted key
RENAMED = {
    # FID during training; `eval.every_steps` read as "evaluate every N steps" next to
    # training.eval_every_steps, which is the validation loss.
    "eval.every_steps": "eval.training_fid_every_steps",
    "eval.in_loop_num_samples": "eval.training_fid_num_samples",
}

_noted: set[str] = set()


def deprecation_note(old: str) -> str:
    return f"config key {old} is deprecated: it is now {RENAMED[old]} (the old name still works)"


def _note(old: str) -> None:
    if old not in _noted:  # once per process: a saved config is read several times
        _noted.add(old)
        # stderr, not logging: overrides are renamed before absl has set logging up.
        print(f"warning: {deprecation_note(old)}", file=sys.stderr)


def rename_overrides(argv: Sequence[str]) -> list[str]:
    """`argv` with every `--config.OLD[=V]` written as `--config.NEW[=V]`. Entry points assign it
    to sys.argv: config_flags reads the overrides from there, not from the argv it parses."""
    out = []
    for arg in argv:
        key, sep, value = arg.removeprefix("--config.").partition("=")
        if arg.startswith("--config.") and key in RENAMED:
            _note(key)
            arg = f"--config.{RENAMED[key]}{sep}{value}"
        out.append(arg)
    return out


def rename_keys(config: MutableMapping) -> MutableMapping:
    """`config` (a dict or ConfigDict, changed in place) with each old key's value moved to its
    new name. An old key wins over the new one: a config file that sets it meant it."""
    for old, new in RENAMED.items():
        *old_groups, old_leaf = old.split(".")
        *new_groups, new_leaf = new.split(".")
        parent = _group(config, old_groups)
        if parent is None or old_leaf not in parent:
            continue
        _note(old)
        target = _group(config, new_groups)
        unlocked = getattr(parent, "unlocked", contextlib.nullcontext)
        with unlocked():
            value = parent[old_leaf]
            del parent[old_leaf]
            if target is not None:
                target[new_leaf] = value
    return config


def _group(config: MutableMapping, path: list[str]) -> MutableMapping | None:
    for name in path:
        if not hasattr(config, "keys") or name not in config:
            return None
        config = config[name]
    return config
