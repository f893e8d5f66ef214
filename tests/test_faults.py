"""Faults: a killed run restarts from its last complete checkpoint and ends like an unkilled one.

Each case runs the real entry point (``python -m semdiff.main``) in a subprocess, kills it
with SIGKILL, reruns the same command, and compares the metrics the rerun writes with those
of one uninterrupted run of the same command (shared by the module). Where the kill lands
comes from a seeded RNG:

* ``step``: the process is killed once it has reported step k (k drawn), wherever it is then
  (between steps, inside one, or inside an asynchronous checkpoint save);
* ``save``: the process kills itself inside its n-th checkpoint save (n drawn), in orbax's
  background thread after the files are written and before the step folder is committed
  (the test hook `checkpointing.KILL_IN_SAVE_ENV`), so a half-written checkpoint is left.

Also: a checkpoint whose arrays do not match the run's config is reported as a config
mismatch, not as a broken checkpoint.
"""

import os
import re
import signal
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semdiff import checkpointing
from semdiff import train
from semdiff.data import tokenizer as tokenizer_lib
import test_sharding  # tests/ is on sys.path under pytest
import test_train
# The session's persistent compilation cache, also handed to the subprocesses (autouse).
from test_train import _compilation_cache  # pylint: disable=unused-import

NUM_STEPS = 9
CHECKPOINT_EVERY = 3  # saves at steps 3, 6 and 9
FLAGS = [
    "--config=configs/default.py:tiny",
    f"--config.data.tokenizer_path={test_sharding.TOKENIZER}",
    "--config.model.num_layers=1",
    f"--config.train.num_steps={NUM_STEPS}",
    f"--config.train.checkpoint_every={CHECKPOINT_EVERY}",
    "--config.train.log_every=1",  # a train row per step: every resumed step is compared
    "--config.train.eval_every=1000",  # evaluate and sample at the end only
    "--config.train.sample_every=1000",
    "--config.train.num_samples=8",
    "--config.data.eval_examples=16",
]




def child_env(**extra):
  """The subprocesses' environment: the shared compilation cache, and compilation without
  XLA's costly CPU optimisations (as in test_sharding: same numbers, half the compile time)."""
  env = test_train._child_env()  # pylint: disable=protected-access
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                      " --xla_llvm_disable_expensive_passes=true").strip()
  env.update(extra)
  return env


def run_main(workdir):
  return test_train.run_main(workdir, *FLAGS, env=child_env())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The metrics rows of one uninterrupted run of FLAGS."""
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  done = run_main(workdir)
  assert done.returncode == 0, done.stderr[-3000:]
  return test_train.read_rows(workdir)


def kill_after_step(workdir, step, log):
  """Runs FLAGS and SIGKILLs the process as soon as it prints step ``step``."""
  proc = subprocess.Popen(
      [sys.executable, "-m", "semdiff.main", f"--workdir={workdir}", *FLAGS],
      cwd=test_train.ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=log, text=True)
  watchdog = threading.Timer(300, proc.kill)
  watchdog.start()
  try:
    for line in proc.stdout:
      if line.startswith(f"step {step}/"):
        proc.send_signal(signal.SIGKILL)
        break
  finally:
    watchdog.cancel()
    proc.kill()
    proc.wait()
    proc.stdout.close()
  return proc.returncode


def kill_in_save(workdir, nth, log):
  """Runs FLAGS with the test hook that SIGKILLs the process inside its ``nth`` save."""
  return subprocess.run(
      [sys.executable, "-m", "semdiff.main", f"--workdir={workdir}", *FLAGS],
      cwd=test_train.ROOT, env=child_env(**{checkpointing.KILL_IN_SAVE_ENV: str(nth)}),
      stdout=subprocess.DEVNULL, stderr=log, timeout=300).returncode


# Seeds whose draws spread over the run: save 2 (step 6) and the final save (step 9); steps
# 2 (before the first checkpoint), 4, 5 and 6 (a checkpoint step).
@pytest.mark.slow
@pytest.mark.parametrize("where, seed", [
    ("save", 1), ("save", 0), ("step", 11), ("step", 9), ("step", 1), ("step", 5)])
def test_killed_run_resumes_with_the_same_metrics(reference, tmp_path, where, seed):
  rng = np.random.default_rng(seed)
  workdir = str(tmp_path / "run")
  checkpoints = os.path.join(workdir, "checkpoints")
  with open(tmp_path / "killed.log", "w") as log:
    if where == "save":
      nth = int(rng.integers(1, NUM_STEPS // CHECKPOINT_EVERY + 1))
      status = kill_in_save(workdir, nth, log)
    else:
      status = kill_after_step(workdir, int(rng.integers(2, NUM_STEPS)), log)
  assert status == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
  if where == "save":
    # The n-th save is left half-written (orbax's temporary folder), the ones before complete.
    saved = nth * CHECKPOINT_EVERY
    folders = os.listdir(checkpoints)
    assert str(saved) not in folders and any(
        f.startswith(f"{saved}.orbax-checkpoint-tmp") for f in folders), folders
    assert nth == 1 or str(saved - CHECKPOINT_EVERY) in folders, folders
  else:
    assert max((r["step"] for r in test_train.read_rows(workdir)), default=0) < NUM_STEPS

  done = run_main(workdir)
  assert done.returncode == 0, done.stderr[-3000:]
  resumed = re.search(r"Resuming from the checkpoint at step (\d+)\.", done.stdout)
  start = int(resumed.group(1)) if resumed else 0
  if where == "save":
    assert start == saved - CHECKPOINT_EVERY, done.stdout[-2000:]
  assert start % CHECKPOINT_EVERY == 0 and start < NUM_STEPS
  # The rerun's first step is left out of its train rows (compilation), so rows start at +2.
  keys = [(step, "train/") for step in range(start + 2, NUM_STEPS + 1)]
  keys += [(NUM_STEPS, "eval/"), (NUM_STEPS, "samples/")]
  test_train.assert_same_rows(test_train.read_rows(workdir), reference, keys)


# Orbax's reads, cancelled by the expected mismatch, may die with the closed event loop
# (reported as unraisable, here or at exit: see pytest.ini): noise, not a failure.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_checkpoint_of_another_model_is_a_config_mismatch(tmp_path):
  """Arrays of other shapes or names: "config mismatch", not "delete the broken checkpoints"."""
  tok = tokenizer_lib.Tokenizer.load(test_sharding.TOKENIZER)
  exp = train.build_experiment(test_sharding.tiny_config(), str(tmp_path), tokenizer=tok)
  mgr = checkpointing.manager(str(tmp_path), keep=2)
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), exp.abstract_state)
  checkpointing.save(mgr, 5, zeros, {"position": 0})
  mgr.wait_until_finished()
  try:
    assert checkpointing.restore_latest(mgr, exp.abstract_state)[0] == 5
    for overrides, detail in [
        ({"model.mlp_dim": 96}, r"down has shape \(128, 64\) in the checkpoint but \(96, 64\)"),
        ({"model.num_layers": 2}, r"arrays only in this run, e.g. opt_state/.*blocks/1/"),
    ]:
      other = train.build_experiment(test_sharding.tiny_config(**overrides), str(tmp_path),
                                     tokenizer=tok)
      with pytest.raises(ValueError, match=r"^config mismatch: the checkpoint at step 5 .*"
                         + detail + r".*resume with the config the run was trained with"):
        checkpointing.restore_latest(mgr, other.abstract_state)
  finally:
    mgr.close()
