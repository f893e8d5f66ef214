"""The notebooks in colabs/: stored without outputs, and run top to bottom headless.

Running them is slow (a kernel each, and generate.ipynb trains the tiny config for about a
minute), so those tests are marked ``slow`` and ``colab``: ``python -m pytest -m colab tests``.
generate.ipynb trains into a workdir that training_curves.ipynb then reads, so the two run in
one test and the training happens once.
"""

import glob
import os
import time

import nbclient
import nbformat
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
COLABS = os.path.join(ROOT, "colabs")
NOTEBOOKS = ("forward_process", "generate", "training_curves")
# The PNG files each notebook writes into $SEMDIFF_COLAB_OUT.
FIGURES = {
    "forward_process": ("scores.png", "cartesian_tree.png", "height_vs_length.png"),
    "generate": ("semantic_distance.png",),
    "training_curves": ("training_curves.png",),
}
CELL_TIMEOUT_S = 600  # a hung cell fails the test instead of stalling CI


def read(name):
  return nbformat.read(os.path.join(COLABS, name + ".ipynb"), as_version=nbformat.NO_CONVERT)


def test_notebooks_are_valid_v4_and_stored_without_outputs():
  assert sorted(os.path.basename(p)[:-len(".ipynb")]
                for p in glob.glob(os.path.join(COLABS, "*.ipynb"))) == sorted(NOTEBOOKS)
  for name in NOTEBOOKS:
    nb = read(name)
    nbformat.validate(nb)
    assert nb.nbformat == 4, name
    code = [c for c in nb.cells if c.cell_type == "code"]
    for cell in code:
      assert cell.outputs == [] and cell.execution_count is None, (
          f"{name}.ipynb has stored outputs: clear them (Edit > Clear all outputs) before "
          "committing.")
    # The first cell installs semdiff in Colab and finds the checkout elsewhere.
    assert nb.cells[0].cell_type == "code" and "google.colab" in nb.cells[0].source, name
    assert "SEMDIFF_COLAB_OUT" in nb.cells[0].source, name


def kernel_env(out_dir, workdir=None):
  """The kernel's environment: one CPU device (not the 8 fake ones of conftest)."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)
  env["JAX_PLATFORMS"] = "cpu"
  env["SEMDIFF_COLAB_OUT"] = str(out_dir)
  if workdir is not None:
    env["SEMDIFF_WORKDIR"] = str(workdir)
  return env


def execute(name, env):
  """Runs notebook ``name`` top to bottom in a fresh kernel from colabs/; returns seconds."""
  nb = read(name)
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": COLABS}})
  start = time.time()
  client.execute(env=env)
  seconds = time.time() - start
  print(f"{name}.ipynb ran in {seconds:.0f} s")
  return seconds


def assert_figures(name, out_dir):
  for figure in FIGURES[name]:
    path = os.path.join(out_dir, figure)
    assert os.path.isfile(path), f"{name}.ipynb did not write {figure}"
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", f"{figure} is not a PNG file"
    assert os.path.getsize(path) > 1000, f"{figure} is (nearly) empty"


@pytest.mark.slow
@pytest.mark.colab
def test_forward_process_notebook_runs(tmp_path):
  execute("forward_process", kernel_env(tmp_path))
  assert_figures("forward_process", tmp_path)


@pytest.mark.slow
@pytest.mark.colab
def test_generate_then_training_curves_notebooks_run(tmp_path):
  workdir = tmp_path / "workdir"  # generate.ipynb trains the tiny config here
  out = tmp_path / "figures"
  execute("generate", kernel_env(out, workdir))
  assert os.path.isfile(workdir / "metrics.jsonl")
  assert_figures("generate", out)
  execute("training_curves", kernel_env(out, workdir))
  assert_figures("training_curves", out)
