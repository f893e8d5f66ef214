"""The evaluation job on tiny trained workdirs: results files, judge, one-line errors.

The workdirs are trained for a few steps by hand (build_experiment, train step, checkpoint),
which skips the training job's own evaluation and samples: the job under test does those.
Everything runs on a one-device mesh: on the 8 fake devices of conftest, replicated
parameters make every device compute the whole sampler, 8 times the work on 2 cores.
"""

import json
import math
import os

import jax
import numpy as np
import pytest
from absl import flags
from jax.experimental.compilation_cache import compilation_cache

from semdiff import checkpointing
from semdiff import config_files
from semdiff import evaluate
from semdiff import sharding
from semdiff import train
from semdiff.data import pipeline

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
TOKENIZER = os.path.join(ROOT, "tests", "testdata", "tiny_spm.model")  # vocab 384


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
  """Programs compiled by several tests (and test files) of this session compile once."""
  compilation_cache.set_cache_dir(str(tmp_path_factory.getbasetemp() / "jax_cache"))
  compilation_cache.reset_cache()


@pytest.fixture(scope="module", autouse=True)
def _one_device():
  make_mesh = sharding.make_mesh
  with pytest.MonkeyPatch.context() as monkeypatch:
    monkeypatch.setattr(sharding, "make_mesh", lambda cfg, devices=None: make_mesh(
        cfg, devices=jax.devices()[:1]))
    yield


def trained_workdir(workdir, kind, steps=2):
  """A workdir of the tiny config (committed tokenizer) trained ``steps`` steps."""
  config = config_files.load(variant="tiny", overrides={
      "model_kind": kind, "data.tokenizer_path": TOKENIZER, "data.eval_examples": 16,
      "train.num_steps": steps})
  exp = train.build_experiment(config, workdir)
  checkpointing.write_run_config(workdir, json.loads(config.to_json_best_effort()))
  state, step = train.init_state(exp), train.make_train_step(exp)
  batches = pipeline.train_iterator(config, exp.tokenizer)
  for _ in range(steps):
    state, _ = step(state, sharding.global_batch(next(batches), exp.mesh))
  mgr = checkpointing.manager(workdir, keep=1)
  checkpointing.save(mgr, steps, state, batches.get_state())
  mgr.close()
  return workdir


@pytest.fixture(scope="module")
def insertion_dir(tmp_path_factory):
  return trained_workdir(str(tmp_path_factory.mktemp("insertion")), "insertion")


@pytest.fixture(scope="module")
def causal_dir(tmp_path_factory):
  return trained_workdir(str(tmp_path_factory.mktemp("causal")), "causal")


def _check_common(r, num):
  assert r["num_samples"] == num and r["data"] == "grammar"
  assert np.isfinite(r["nll_per_sentence"]) and r["nll_per_sentence"] > 0
  # Barely trained: far above the true entropy of the same sentences.
  assert r["nll_per_sentence"] > r["true_nll_per_sentence"] > 0
  for k in ("distinct_1", "distinct_2", "distinct_3", "self_bleu", "length_tv", "grammatical",
            "grammatical_at_data_lengths"):
    assert 0.0 <= r[k] <= 1.0, k
  assert r["calls_per_sample"] >= 1 and r["tokens_per_s"] > 0


def test_evaluate_insertion_writes_json_and_markdown(insertion_dir):
  r = evaluate.evaluate_workdir(insertion_dir, num_samples=12, batch_size=8,
                                sampler_overrides={"max_steps": 6})
  _check_common(r, 12)
  assert r["model_kind"] == "insertion" and r["sampling_batch"] == 8
  assert r["calls_per_sample"] <= 6  # the override reached the sampler
  with open(os.path.join(insertion_dir, "eval", "results.json")) as f:
    assert json.load(f)["nll_per_sentence"] == r["nll_per_sentence"]
  with open(os.path.join(insertion_dir, "eval", "results.md")) as f:
    table = f.read()
  assert "| NLL bound per sentence (nats) |" in table and "| self-BLEU-4 |" in table
  with open(os.path.join(insertion_dir, "eval", "samples.jsonl")) as f:
    assert len(f.readlines()) == 12


def test_evaluate_causal_with_a_judge(causal_dir):
  r = evaluate.evaluate_workdir(causal_dir, num_samples=8, batch_size=8, judge_workdir=causal_dir,
                                write=False)
  _check_common(r, 8)
  # One call per token plus the end token (or the cap).
  assert r["calls_per_sample"] <= r["sample_length"] + 1
  assert r["judge_scored"] > 0 and math.isfinite(r["judge_nll_per_sentence"])


def test_a_judge_must_be_causal(insertion_dir):
  with pytest.raises(ValueError, match="the judge must be a causal one"):
    evaluate.judge_nll(insertion_dir, ["a b"])


def test_missing_or_empty_workdir_is_one_line(tmp_path, capsys):
  empty = tmp_path / "empty"
  empty.mkdir()
  for workdir, words in ((tmp_path / "nope", "does not exist"), (empty, "is empty")):
    flags.FLAGS(["evaluate", f"--workdir={workdir}"])
    try:
      with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["evaluate"])
    finally:
      flags.FLAGS.unparse_flags()
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and lines[0].startswith("semdiff.evaluate: error")

