"""Orbax checkpoints in WORKDIR/checkpoints/<step>/: save, resume, and restore EMA params alone.

Each checkpoint holds three items: `state` (step, params, optimizer state, non-finite counters),
`ema_params` (kept apart so sampling reads only what it needs) and `config` (JSON). Data order and
random draws are pure functions of (seed, step), so the step is all the input pipeline needs to
resume exactly.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from ddpm_jax import config_renames, unet, validate


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not fit the config."""


def _key_name(k) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _flat_shapes(tree) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_name(k) for k in path): tuple(x.shape) for path, x in leaves}


def check_compatible(saved_metadata, target, what: str, directory: str) -> None:
    """Raise CheckpointError naming the first parameter whose shape differs from the config's."""
    saved, wanted = _flat_shapes(saved_metadata), _flat_shapes(target)
    for name, shape in wanted.items():
        if name not in saved:
            raise CheckpointError(
                f"{directory}: checkpoint has no {what} entry {name!r} that the config's model "
                f"needs (shape {shape}); was it trained with another model config?"
            )
        if saved[name] != shape:
            raise CheckpointError(
                f"{directory}: {what} {name!r} has shape {saved[name]} in the checkpoint but "
                f"{shape} under this config; use the config the checkpoint was trained with."
            )
    extra = sorted(set(saved) - set(wanted))
    if extra:
        raise CheckpointError(
            f"{directory}: checkpoint has {what} entry {extra[0]!r} that this config's model "
            "lacks; use the config the checkpoint was trained with."
        )


class Checkpointer:
    def __init__(self, workdir: str, config: ml_collections.ConfigDict | None = None,
                 read_only: bool = False):
        validate.require_local(workdir)  # sampling and evaluation come here without check_workdir
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.config = config
        self.read_only = read_only
        keep = config.training.keep_checkpoints if config is not None else None
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=True,
            # Orbax writes each step to a temporary directory and renames it when complete, so a
            # killed save never looks like a checkpoint; clear such leftovers at start.
            cleanup_tmp_directories=not read_only,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "ema_params": ocp.StandardCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
            },
        )

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, force: bool = False) -> None:
        if step in self.manager.all_steps():
            return  # e.g. preempted right after a periodic save
        train_items = {k: v for k, v in vars(state).items() if k != "ema_params"}
        config = self.config.to_dict() if self.config is not None else {}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(train_items),
                ema_params=ocp.args.StandardSave(state.ema_params),
                config=ocp.args.JsonSave(_jsonable(config)),
            ),
            force=force,
        )

    def reached_preemption(self, step: int) -> bool:
        """Orbax's multi-host preemption sync point (always False on a single process)."""
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    def _restore_newest(self, restore_one, steps: list[int]):
        """Restore from the newest of `steps` that reads back; set damaged ones aside."""
        for step in sorted(steps, reverse=True):
            try:
                return step, restore_one(step)
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - any read failure means a damaged checkpoint
                path = os.path.join(self.directory, str(step))
                logging.warning("Checkpoint %s is damaged (%s: %s); trying the one before.",
                                path, type(e).__name__, (str(e).splitlines() or [""])[0][:200])
                if not self.read_only:  # sampling only skips it; training must save past it
                    self._set_aside(step)
        return None, None

    def _set_aside(self, step: int) -> None:
        # Renamed, not deleted: the data stays for inspection, and a new save at this step works.
        path = os.path.join(self.directory, str(step))
        if jax.process_index() == 0 and os.path.exists(path):
            os.rename(path, f"{path}.damaged")
        multihost_utils.sync_global_devices(f"ddpm_jax_set_aside_{step}")
        self.manager.reload()

    def restore_train_state(self, abstract_state):
        """The newest readable training state, or None when there is no checkpoint."""

        def restore_one(step):
            train_target = {k: v for k, v in vars(abstract_state).items() if k != "ema_params"}
            meta = self.manager.item_metadata(step)
            if self.config is not None:  # first: it names the flag a shape mismatch cannot
                self.check_same_classes(step, self.config)
            check_compatible(meta["state"]["params"], train_target["params"], "params",
                             self.directory)
            if self.config is not None:
                self.check_same_function(step, self.config)
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(train_target),
                    ema_params=ocp.args.StandardRestore(abstract_state.ema_params),
                ),
            )
            return abstract_state.replace(ema_params=restored["ema_params"], **restored["state"])

        step, state = self._restore_newest(restore_one, self.all_steps())
        if step is not None:
            logging.info("Resuming from %s/%d.", self.directory, step)
        return state

    def restore_ema_params(self, abstract_ema, step: int = -1,
                           config=None) -> tuple[int, Any]:
        """(step, EMA params) of checkpoint `step` (-1: the newest readable), on any devices;
        with `config`, the checkpoint must compute what that config means (check_same_function)."""
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}: train first, or check "
                                  "--workdir")
        if step >= 0:
            if step not in steps:
                raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; "
                                      f"available: {steps}")
            steps = [step]

        def restore_one(s):
            meta = self.manager.item_metadata(s)
            if config is not None:
                self.check_same_classes(s, config)
            check_compatible(meta["ema_params"], abstract_ema, "params", self.directory)
            if config is not None:
                self.check_same_function(s, config)
            args = ocp.args.Composite(ema_params=ocp.args.StandardRestore(abstract_ema))
            return self.manager.restore(s, args=args)["ema_params"]

        found, ema = self._restore_newest(restore_one, steps)
        if found is None:
            raise CheckpointError(f"no readable checkpoint in {self.directory}")
        return found, ema

    def check_same_function(self, step: int, config) -> None:
        """Raise CheckpointError if checkpoint `step` was trained with settings that change what
        its parameters compute but no parameter's shape, which `check_compatible` cannot see:
        GroupNorm's groups, the prediction target, the noise schedule. Such params would load
        silently and draw noise (e.g. an eps-prediction quickstart under today's v config)."""
        saved = self.saved_config(step)
        saved_model = saved.get("model", {})
        was, now = unet.norm_groups(saved_model), unet.norm_groups(config.model)
        if was != now:
            how = ("model.norm_groups absent: saved before the field existed"
                   if "norm_groups" not in saved_model
                   else f"model.norm_groups={saved_model['norm_groups']}")
            raise CheckpointError(
                f"{self.directory}/{step}: trained with {was} GroupNorm groups ({how}) but this "
                f"config gives {now}; add --config.model.norm_groups={was}")
        for key in ("prediction", "beta_schedule", "num_timesteps"):
            was, now = saved.get("diffusion", {}).get(key), config.diffusion[key]
            if was is not None and was != now:
                raise CheckpointError(
                    f"{self.directory}/{step}: trained with diffusion.{key}={was!r} but this "
                    f"config has {now!r}; add --config.diffusion.{key}={was}")

    def check_same_classes(self, step: int, config) -> None:
        """Raise CheckpointError naming model.num_classes if checkpoint `step` was trained with
        another class count (the label embedding's shape would say less)."""
        was = self.saved_config(step).get("model", {}).get("num_classes", 0)
        now = config.model.get("num_classes", 0)
        if was != now:
            raise CheckpointError(
                f"{self.directory}/{step}: trained with model.num_classes={was} but this config "
                f"has {now}; add --config.model.num_classes={was}")

    def saved_config(self, step: int) -> dict:
        saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return config_renames.rename_keys(saved["config"])  # saved under older key names


def newest_saved_config(workdir: str) -> dict:
    """The config saved with the newest readable checkpoint in `workdir`.

    Read from the file orbax's JsonCheckpointHandler writes, not through orbax: main.py reads it
    while parsing flags, before multi-host initialisation, when nothing may touch the devices.
    """
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    names = os.listdir(directory) if os.path.isdir(directory) else []
    steps = [int(d) for d in names if d.isdigit()]
    for step in sorted(steps, reverse=True):
        try:
            with open(os.path.join(directory, str(step), "config", "metadata")) as f:
                return config_renames.rename_keys(json.load(f))  # saved under older key names
        except (OSError, ValueError):
            continue  # damaged or from another layout: the one before, as restoring does
    raise CheckpointError(f"no checkpoint with a saved config in {directory}: pass --config "
                          "CONFIG.py, or check --workdir")


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
