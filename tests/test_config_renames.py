"""Renamed config keys: the old names still load, with one deprecation line, from every source."""

import json
import os
import sys

import pytest
from absl import flags
from conftest import REPO
from ml_collections import config_flags

from configs import default
from ddpm_jax import checkpoint, config_renames

OLD, NEW = "eval.every_steps", "eval.training_fid_every_steps"


@pytest.fixture(autouse=True)
def fresh_notes():
    config_renames._noted.clear()  # each note is logged once per process
    yield
    config_renames._noted.clear()


@pytest.fixture
def parse(monkeypatch):
    """Parses `argv` as main.py does: config_flags with lock_config, old names renamed in
    sys.argv (where config_flags reads the overrides from)."""

    def parse_argv(argv):
        values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True)
        monkeypatch.setattr(sys, "argv", config_renames.rename_overrides(["prog", *argv]))
        values(sys.argv)
        return config_renames.rename_keys(values.config)

    return parse_argv


def test_every_new_name_exists_and_no_old_one_does():
    keys = default.get_config()
    for old, new in config_renames.RENAMED.items():
        group, leaf = new.rsplit(".", 1)
        assert leaf in keys[group], new
        old_group, old_leaf = old.rsplit(".", 1)
        assert old_leaf not in keys[old_group], old


def test_old_key_on_the_command_line_sets_the_new_one_with_a_note(parse, capsys):
    config = parse([f"--config={REPO}/configs/default.py", f"--config.{OLD}=7"])
    assert config.eval.training_fid_every_steps == 7
    assert "every_steps" not in config.eval
    assert capsys.readouterr().err == (
        "warning: config key eval.every_steps is deprecated: it is now "
        "eval.training_fid_every_steps (the old name still works)\n")
    with pytest.raises((AttributeError, KeyError)):  # a misspelt key is still an error
        parse([f"--config={REPO}/configs/default.py", "--config.eval.every_step=7"])


def test_old_key_in_a_config_file_is_moved_to_the_new_one(parse, tmp_path, capsys):
    path = tmp_path / "mine.py"
    path.write_text("from configs import default\n\n\ndef get_config():\n"
                    "    config = default.get_config()\n"
                    "    config.eval.every_steps = 500\n"
                    "    config.eval.in_loop_num_samples = 64\n"
                    "    return config\n")
    config = parse([f"--config={path}"])
    assert (config.eval.training_fid_every_steps, config.eval.training_fid_num_samples) == (500, 64)
    assert "every_steps" not in config.eval and "in_loop_num_samples" not in config.eval
    assert capsys.readouterr().err.count("deprecated") == 2


def test_old_key_in_a_checkpoints_saved_config_loads(parse, tmp_path, capsys):
    saved = default.get_config().to_dict()
    saved["eval"]["every_steps"] = saved["eval"].pop("training_fid_every_steps") + 4
    saved["data"]["image_size"] = 32
    metadata = tmp_path / "checkpoints" / "10" / "config" / "metadata"
    os.makedirs(metadata.parent)
    metadata.write_text(json.dumps(saved))
    loaded = checkpoint.newest_saved_config(str(tmp_path))
    # As --mode=sample reads it, with an override of the new name on top.
    config = parse([f"--config={REPO}/configs/from_workdir.py:{tmp_path}",
                    "--config.eval.training_fid_num_samples=9"])
    assert loaded["eval"]["training_fid_every_steps"] == 4 and "every_steps" not in loaded["eval"]
    assert (config.eval.training_fid_every_steps, config.eval.training_fid_num_samples) == (4, 9)
    assert capsys.readouterr().err.count("deprecated") == 1  # noted once, though read twice
