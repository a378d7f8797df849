"""launch/colab_tpu.ipynb runs: its cells executed on the CPU, shrunk to seconds; its facts hold.

The cell tagged `install` (pip, git clone) becomes a `%cd` into this checkout, and the parameters
cell's TPU flags (bfloat16) are replaced by a tiny model and a two-step run in a temporary work
directory. Every other cell runs as a user runs it, except those tagged `optional` (TensorBoard
starts a server).
"""

import os
import re
import shlex

import jax
import nbclient
import nbformat
from conftest import REPO

from configs import quickstart
from ddpm_jax import data, unet

NOTEBOOK = os.path.join(REPO, "launch", "colab_tpu.ipynb")
TINY = [
    "--config.data.image_size=8", "--config.data.num_eval_examples=8",
    "--config.model.ch_mult=(1,2)", "--config.model.attn_resolutions=(4,)",
    "--config.diffusion.num_timesteps=20", "--config.training.batch_size=8",
    "--config.training.num_train_steps=2", "--config.training.log_every_steps=1",
    "--config.training.eval_every_steps=2", "--config.training.checkpoint_every_steps=2",
    "--config.training.sample_every_steps=2", "--config.training.num_grid_samples=4",
    "--config.sampling.num_steps=5", "--config.sampling.num_samples=4",
]


def tagged(nb, tag):
    return [c for c in nb.cells if tag in c.metadata.get("tags", [])]


def test_notebook_facts_match_the_quickstart_config():
    """The parameter and step counts the notebook and docs/configs.md quote are the config's."""
    config = quickstart.get_config()
    params = unet.abstract_params(unet.from_config(config),
                                  data.image_shape(config.data))
    millions = f"{sum(x.size for x in jax.tree.leaves(params)) / 1e6:.1f}M"
    text = "\n".join(c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells
                     if c.cell_type == "markdown")
    assert f"{millions} parameters" in text
    assert f"{config.training.num_train_steps:,} steps at batch {config.training.batch_size}" \
        in text
    assert f"({config.sampling.num_samples} in the quickstart config)" in text
    assert re.search(rf"`configs/quickstart.py` \| {millions}-parameter",
                     open(os.path.join(REPO, "docs", "configs.md")).read())


def test_notebook_runs_on_the_cpu(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (install,), (parameters,) = tagged(nb, "install"), tagged(nb, "parameters")
    install.source = f"%cd {REPO}"
    workdir = tmp_path / "runs" / "quickstart"
    override = nbformat.v4.new_code_cell(
        f"WORKDIR = {str(workdir)!r}\n"
        f"FLAGS = f'--config {{CONFIG}} --workdir {{WORKDIR}} ' + {shlex.join(TINY)!r}")
    cells = [c for c in nb.cells if "optional" not in c.metadata.get("tags", [])]
    at = cells.index(parameters) + 1
    nb.cells = cells[:at] + [override] + cells[at:]

    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError when a cell raises

    # `!python ...` does not raise when the command fails: read what the commands printed.
    for cell in nb.cells:
        if cell.cell_type == "code" and "!python" in cell.source:
            text = "".join(o.get("text", "") for o in cell.outputs)
            assert "Traceback" not in text and "error:" not in text, text[-3000:]
    shown = [c for c in nb.cells if c.cell_type == "code"][-1]
    images = [o for o in shown.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # grid.png and progress.png, shown
    assert os.path.exists(workdir / "samples" / "step_2" / "progress.png")
