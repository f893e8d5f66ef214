"""The training job end to end on the `tiny` config: loss, checkpoints, resumption, errors.

One uninterrupted run of the tiny config (20 steps, on the 8 fake devices of conftest) is
shared by the module; the other runs are compared with it. Identical programs compile once
per session (persistent compilation cache in the session's temporary folder), so the runs
after the first one cost seconds.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

from semdiff import config_files
from semdiff import checkpointing
from semdiff import metrics as metrics_lib
from semdiff import sharding
from semdiff import train
from semdiff.data import pipeline

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
CONFIG_FILE = os.path.join(ROOT, "configs", "default.py")
OTHER_TOKENIZER = os.path.join(ROOT, "tests", "testdata", "tiny_spm.model")  # vocab 384
# The tiny config as the tests run it: the final samples are as many as the ones drawn at
# step 10, so that one sampler program serves both.
TINY = {"train.num_samples": 32}
# Metrics that measure the machine, not the model.
TIMING = ("train/tokens_per_s", "train/positions_per_s", "train/step_time_s")


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
  """Programs compiled by several tests (and test files) of this session compile once."""
  cache = str(tmp_path_factory.getbasetemp() / "jax_cache")
  compilation_cache.set_cache_dir(cache)
  compilation_cache.reset_cache()
  return cache


def tiny_config(**overrides):
  """The tiny variant of configs/default.py; overrides as ``**{"train.num_steps": 3}``."""
  return config_files.load(CONFIG_FILE, "tiny", overrides)


def read_rows(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f]


def last_row(rows, step, prefix):
  """The last row written at ``step`` with ``prefix`` keys, without the timing ones."""
  found = [r for r in rows if r["step"] == step and any(k.startswith(prefix) for k in r)]
  assert found, f"no {prefix} row at step {step}"
  return {k: v for k, v in found[-1].items() if k not in TIMING}


def assert_same_rows(rows, reference, keys):
  for step, prefix in keys:
    got, want = last_row(rows, step, prefix), last_row(reference, step, prefix)
    assert got.keys() == want.keys(), (step, prefix)
    for k in want:
      if np.isnan(want[k]):
        assert np.isnan(got[k]), (step, k)
      else:
        assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-9), (step, k, got[k], want[k])


def new_workdir(tmp_path, reference):
  """A fresh workdir holding the reference run's tokenizer (so no run retrains it)."""
  shutil.copytree(os.path.join(reference, "tokenizer"), os.path.join(tmp_path, "tokenizer"))
  return str(tmp_path)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """(workdir, final metrics) of an uninterrupted 20-step tiny run."""
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  final = train.train_and_evaluate(tiny_config(**TINY), workdir)
  return workdir, final


def test_tiny_run_learns_and_writes_its_outputs(tiny_run):
  workdir, final = tiny_run
  rows = read_rows(workdir)
  losses = [last_row(rows, s, "train/")["train/loss"] for s in (5, 10, 15, 20)]
  assert np.isfinite(losses).all()
  assert losses[-1] < losses[0] - 1.0 and min(losses[1:]) < losses[0], losses
  nll = [last_row(rows, s, "eval/")["eval/nll_per_sentence"] for s in (10, 20)]
  assert np.isfinite(nll).all() and nll[1] < nll[0], nll
  assert final["step"] == 20 and final["eval/nll_per_sentence"] == nll[1]
  assert np.isfinite(final["true_nll_per_sentence"])
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20"]
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert saved["model"]["vocab_size"] == 512 and saved["variant"] == "tiny"
  with open(os.path.join(workdir, "samples", "step_00000020.jsonl")) as f:
    samples = [json.loads(line) for line in f]
  assert len(samples) == 32
  for s in samples:
    assert s["drafts"][-1] == s["text"] and s["calls"] >= 1
  assert os.listdir(os.path.join(workdir, "tb"))


def test_checkpoint_round_trip_and_fallback(tiny_run, tmp_path):
  config = tiny_config()
  workdir = new_workdir(tmp_path, tiny_run[0])
  exp = train.build_experiment(config, workdir)
  state = train.init_state(exp)
  step_fn = train.make_train_step(exp)
  batches = pipeline.train_iterator(config, exp.tokenizer)
  mgr = checkpointing.manager(workdir, keep=3)
  saved = {}
  for step in (1, 2):
    state, _ = step_fn(state, sharding.global_batch(next(batches), exp.mesh))
    checkpointing.save(mgr, step, state, batches.get_state())
    mgr.wait_until_finished()
    saved[step] = jax.device_get(state), next(batches)  # the batch after the checkpoint
    # The iterator state survives JSON (as orbax stores it) and resets a live iterator.
    batches.set_state(json.loads(json.dumps(batches.get_state())))
  mgr.close()

  def restore():
    mgr = checkpointing.manager(workdir, keep=3)
    try:
      return checkpointing.restore_latest(mgr, exp.abstract_state)
    finally:
      mgr.close()

  def check(restored, step):
    got_step, got_state, data_state = restored
    assert got_step == step
    want_state, want_batch = saved[step]
    assert jax.tree.structure(got_state) == jax.tree.structure(want_state)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), got_state,
                 want_state)
    for leaf, target in zip(jax.tree.leaves(got_state), jax.tree.leaves(exp.abstract_state)):
      assert leaf.dtype == target.dtype and leaf.sharding == target.sharding
    assert int(got_state["step"]) == step
    resumed = pipeline.train_iterator(config, exp.tokenizer)
    resumed.set_state(data_state)
    got_batch = next(resumed)
    for k in want_batch:
      np.testing.assert_array_equal(got_batch[k], want_batch[k])

  check(restore(), 2)
  # A half-written save (orbax's temporary folder) is not a checkpoint.
  os.makedirs(os.path.join(workdir, "checkpoints", "3.orbax-checkpoint-tmp-1234", "state"))
  check(restore(), 2)
  # A damaged newest checkpoint: the next older one is used.
  state_dir = os.path.join(workdir, "checkpoints", "2", "state")
  for root, _, files in os.walk(state_dir):
    for name in files:
      with open(os.path.join(root, name), "wb"):
        pass
  check(restore(), 1)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "1", "state"))
  with pytest.raises(RuntimeError, match="No readable checkpoint.*steps \\[2, 1\\]"):
    restore()


def test_preempted_run_resumes_with_the_same_metrics(tiny_run, tmp_path, monkeypatch):
  """SIGTERM saves and returns; reruns end where the uninterrupted run ended.

  Preempted at step 7 (off the checkpoint schedule), then again at step 9, so that the last
  resumed run's first step (10) is a log, checkpoint and eval step.
  """
  reference, reference_final = tiny_run
  workdir = new_workdir(tmp_path, reference)
  tick = metrics_lib.Progress.tick
  handler = signal.getsignal(signal.SIGTERM)
  for stop in (7, 9):

    def tick_then_preempt(self, step, stop=stop):
      tick(self, step)
      if step == stop:
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(metrics_lib.Progress, "tick", tick_then_preempt)
    preempted = train.train_and_evaluate(tiny_config(**TINY), workdir)
    assert preempted == {"step": stop, "preempted": True}
    monkeypatch.undo()
    assert str(stop) in os.listdir(os.path.join(workdir, "checkpoints"))
    assert signal.getsignal(signal.SIGTERM) is handler  # the handler is given back
  assert max(r["step"] for r in read_rows(workdir)) < 10

  final = train.train_and_evaluate(tiny_config(**TINY), workdir)
  # Train windows 11-15 and 16-20, evaluations and samples at 10 and 20: all after the resume.
  keys = [(15, "train/"), (20, "train/"), (10, "eval/"), (20, "eval/"), (10, "samples/"),
          (20, "samples/")]
  assert_same_rows(read_rows(workdir), read_rows(reference), keys)
  assert final == pytest.approx(reference_final, rel=1e-6, nan_ok=True)


@pytest.mark.parametrize("override, message", [
    ({"data.tokenizer_path": OTHER_TOKENIZER},
     r"model\.vocab_size=512, but this run has model\.vocab_size=384; use a new --workdir"),
    # Another parameter structure: without the check, every checkpoint "fails to read".
    ({"model.tie_embeddings": False},
     r"model\.tie_embeddings=True, but this run has model\.tie_embeddings=False"),
], ids=["vocabulary", "tie_embeddings"])
def test_resuming_an_incompatible_model_is_refused(tiny_run, override, message):
  workdir, _ = tiny_run
  before = sorted(os.listdir(workdir)), os.path.getmtime(os.path.join(workdir, "config.json"))
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(tiny_config(**TINY, **override), workdir)
  assert (sorted(os.listdir(workdir)),
          os.path.getmtime(os.path.join(workdir, "config.json"))) == before


def run_main(workdir, *flags, timeout=300, env=None):
  """``python -m semdiff.main --workdir=WORKDIR FLAGS`` from the repository root."""
  return subprocess.run(
      [sys.executable, "-m", "semdiff.main", f"--workdir={workdir}", *flags],
      cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env or _child_env())


def _child_env():
  env = dict(os.environ)  # keeps conftest's 8 fake devices; shares the compilation cache
  env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
  return env


BAD_INPUT = {
    "scorer": (["--config=configs/default.py:tiny", "--config.scorer.name=nope"], 1,
               "Unknown scorer 'nope'; choose one of"),
    # Flag errors exit with absl's usage status, 2.
    "variant": (["--config=configs/default.py:bogus"], 2,
                "Unknown config variant 'bogus'; choose one of tiny, small, base"),
    "field": (["--config=configs/default.py:tiny", "--config.model.nosuch=3"], 2, "nosuch"),
    "near_miss": (["--config=configs/default.py:tiny", "--config.noise.hole_prop=0.1"], 2,
                  "--config.noise.hole_prop: the config has no field 'hole_prop' (did you mean "
                  "\"hole_prob\" instead of \"hole_prop\"?); see the config file"),
    "config_file": (["--config=configs/nosuch.py"], 2, "configs/nosuch.py"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line_on_stderr(tmp_path, case):
  flags, status, message = BAD_INPUT[case]
  proc = run_main(tmp_path, *flags, timeout=120)
  assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith("semdiff: error: ") and message in lines[0], proc.stderr
  assert proc.returncode == status, proc.stderr


def one_step(mesh, start, batch, tokenizer, workdir):
  """(experiment, params after one step, metrics) of the tiny config on a ``mesh``.

  ``mesh`` is (data, fsdp, number of devices): the mesh is built over the first devices.
  """
  data, fsdp, devices = mesh
  exp = train.build_experiment(tiny_config(**{"mesh.data": data, "mesh.fsdp": fsdp}),
                               workdir, tokenizer=tokenizer, devices=jax.devices()[:devices])
  assert exp.mesh.devices.size == devices
  state = jax.device_put(start, exp.state_sharding)
  new_state, metrics = train.make_train_step(exp)(state, sharding.global_batch(batch, exp.mesh))
  for leaf, want in zip(jax.tree.leaves(new_state), jax.tree.leaves(exp.state_sharding)):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
  return exp, jax.device_get(new_state["params"]), jax.device_get(metrics)


@pytest.fixture(scope="module")
def first_step(tiny_run, tmp_path_factory):
  """(initial state on the host, first batch, tokenizer, workdir, one step on 8 devices)."""
  config = tiny_config()
  workdir = new_workdir(tmp_path_factory.mktemp("mesh"), tiny_run[0])
  exp = train.build_experiment(config, workdir)
  start = jax.device_get(train.init_state(exp))
  batch = next(pipeline.train_iterator(config, exp.tokenizer))
  eight = one_step((-1, 1, 8), start, batch, exp.tokenizer, workdir)
  assert eight[0].mesh.shape == {"data": 8, "fsdp": 1}
  assert np.isfinite(eight[2]["loss"])
  return start, batch, exp.tokenizer, workdir, eight


def assert_same_step(result, reference, name):
  _, params, metrics = result
  _, want_params, want_metrics = reference
  for k in want_metrics:
    np.testing.assert_allclose(metrics[k], want_metrics[k], rtol=2e-5, atol=1e-6,
                               err_msg=f"{name}: {k}")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), params, want_params)


def test_one_step_is_the_same_on_1_and_8_devices(first_step):
  start, batch, tokenizer, workdir, eight = first_step
  one = one_step((1, 1, 1), start, batch, tokenizer, workdir)
  assert_same_step(one, eight, "1 device")


def test_fsdp_splits_parameters_and_optimizer_moments(first_step):
  _, _, tokenizer, workdir, _ = first_step
  exp = train.build_experiment(tiny_config(**{"mesh.data": 2, "mesh.fsdp": 4}), workdir,
                               tokenizer=tokenizer)
  assert exp.mesh.shape == {"data": 2, "fsdp": 4}
  for part in ("params", "opt_state"):
    specs = [s.spec for s in jax.tree.leaves(exp.state_sharding[part])]
    assert sum("fsdp" in spec for spec in specs) >= len(specs) // 2, (part, specs)
  for leaf in jax.tree.leaves(exp.abstract_state["params"]):
    if leaf.ndim == 2 and leaf.shape[0] == tokenizer.vocab_size:  # the embedding [V, D]
      assert leaf.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")


@pytest.mark.slow
def test_one_step_is_the_same_with_fsdp(first_step):
  start, batch, tokenizer, workdir, eight = first_step
  fsdp = one_step((2, 4, 8), start, batch, tokenizer, workdir)
  assert_same_step(fsdp, eight, "2x4 data x fsdp")


@pytest.mark.slow
def test_killed_run_resumes_with_the_same_metrics(tiny_run, tmp_path):
  """``kill -9`` after the first checkpoint; the rerun ends like the uninterrupted run."""
  reference, _ = tiny_run
  workdir = new_workdir(tmp_path, reference)
  flags = ["--config=configs/default.py:tiny", "--config.train.checkpoint_every=4",
           "--config.train.num_samples=32"]
  proc = subprocess.Popen(
      [sys.executable, "-m", "semdiff.main", f"--workdir={workdir}", *flags], cwd=ROOT,
      env=_child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  checkpoints = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 300
  try:
    while proc.poll() is None and time.time() < deadline:
      if os.path.isdir(checkpoints) and any(d.isdigit() for d in os.listdir(checkpoints)):
        break
      time.sleep(0.01)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
  assert max((r["step"] for r in read_rows(workdir)), default=0) < 20

  done = run_main(workdir, *flags)
  assert done.returncode == 0, done.stderr
  assert "Resuming from the checkpoint at step" in done.stdout
  keys = [(20, "train/"), (20, "eval/"), (20, "samples/")]
  assert_same_rows(read_rows(workdir), read_rows(reference), keys)


@pytest.mark.parametrize("scorer", ["unigram", "model_embedding"])
def test_step_budget_is_measured_for_every_scorer(tiny_run, tmp_path, scorer):
  # model_embedding's step takes the table snapshot as one more argument.
  config = tiny_config(**{"scorer.name": scorer})
  workdir = new_workdir(tmp_path, tiny_run[0])
  per_step = train.step_seconds(config, workdir, steps=2, clock="cpu")
  assert per_step > 0
  if scorer == "unigram":
    assert train.step_seconds(config, workdir, steps=2, clock="wall") > 0
    with pytest.raises(ValueError, match="clock must be 'cpu' or 'wall'"):
      train.step_seconds(config, workdir, clock="gpu")


def test_has_checkpoint_counts_finished_steps_only(tmp_path):
  workdir = str(tmp_path / "run")
  assert not checkpointing.has_checkpoint(workdir)
  os.makedirs(os.path.join(checkpointing.directory(workdir), "3.orbax-checkpoint-tmp-1234"))
  assert not checkpointing.has_checkpoint(workdir)  # half-written
  os.makedirs(os.path.join(checkpointing.directory(workdir), "2"))
  assert checkpointing.has_checkpoint(workdir)
