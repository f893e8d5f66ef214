"""Sharded training equals one-device training (STYLE habit 15).

A few steps of the tiny config on meshes (data, fsdp) = (8, 1), (4, 2), (1, 8) of
the 8 fake devices of conftest give the losses of the same steps on one device.
Also: the two shape errors (mesh vs devices, batch vs mesh) and parameters that
really are split over ``fsdp``.
"""

import functools
import os

import jax
import numpy as np
import pytest

from semdiff import config_files
from semdiff import sharding
from semdiff import train
from semdiff.data import pipeline
from semdiff.data import tokenizer as tokenizer_lib

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
CONFIG_FILE = os.path.join(ROOT, "configs", "default.py")
TOKENIZER = os.path.join(ROOT, "tests", "testdata", "tiny_spm.model")  # vocab 384
NUM_STEPS = 3
# Compilation dominates this file (4 meshes x init + step): skip XLA's costly CPU
# optimisations, which leaves the numbers alone and halves the file's time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def tiny_config(data=-1, fsdp=1, **overrides):
  config = config_files.load(CONFIG_FILE, "tiny")
  config.data.tokenizer_path = TOKENIZER
  config.mesh.data, config.mesh.fsdp = data, fsdp
  config.model.num_layers = 1  # compile time dominates; one block shards like two
  return config_files.apply_overrides(config, overrides)


@pytest.fixture(scope="module")
def tokenizer():
  return tokenizer_lib.Tokenizer.load(TOKENIZER)


def run_steps(config, tok, tmp_path, devices=None):
  """(per-step metrics as floats, the experiment, the final state) of NUM_STEPS steps."""
  make_mesh = sharding.make_mesh
  with pytest.MonkeyPatch.context() as mp:
    if devices is not None:
      mp.setattr(sharding, "make_mesh", lambda c, devices_=None: make_mesh(c, devices))
    exp = train.build_experiment(config, str(tmp_path), tokenizer=tok)
  # train.init_state, compiled with FAST_COMPILE.
  init = jax.jit(functools.partial(train._init_state, exp.config, exp.model_cfg,  # pylint: disable=protected-access
                                   exp.optimizer), out_shardings=exp.state_sharding)
  state = init.lower().compile(compiler_options=FAST_COMPILE)()
  batches = pipeline.train_iterator(config, tok)
  batch = sharding.global_batch(next(batches), exp.mesh)
  step_fn = train.make_train_step(exp).lower(state, batch).compile(compiler_options=FAST_COMPILE)
  out = []
  for _ in range(NUM_STEPS):
    state, metrics = step_fn(state, batch)
    batch = sharding.global_batch(next(batches), exp.mesh)
    out.append({k: float(v) for k, v in jax.device_get(metrics).items()})
  return out, exp, state


@pytest.fixture(scope="module")
def reference(tokenizer, tmp_path_factory):
  """NUM_STEPS steps on a single device."""
  config = tiny_config(data=1, fsdp=1)
  metrics, exp, _ = run_steps(config, tokenizer, tmp_path_factory.mktemp("ref"),
                              devices=jax.devices()[:1])
  assert exp.mesh.devices.size == 1
  return metrics


@pytest.mark.parametrize("data,fsdp", [(8, 1), (4, 2), (1, 8)])
def test_sharded_steps_match_one_device(reference, tokenizer, tmp_path, data, fsdp):
  assert len(jax.devices()) == 8
  metrics, exp, state = run_steps(tiny_config(data=data, fsdp=fsdp), tokenizer, tmp_path)
  assert dict(exp.mesh.shape) == {"data": data, "fsdp": fsdp}
  for step, (got, want) in enumerate(zip(metrics, reference)):
    for key in ("loss", "gap_nll_sum", "grad_norm", "gap_count", "nll_bound_sum"):
      assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (step, key)
  # The loss moved, so equal losses at later steps mean equal updates.
  assert metrics[-1]["loss"] != metrics[0]["loss"]
  embed = state["params"]["backbone"]["embed"]
  embed = embed[...] if hasattr(embed, "get_value") else embed
  if fsdp > 1:
    assert embed.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    shard = embed.addressable_shards[0].data
    assert shard.shape == (embed.shape[0], embed.shape[1] // fsdp)
  else:
    assert embed.sharding.is_fully_replicated


def test_mesh_that_does_not_fit_the_devices():
  with pytest.raises(ValueError, match=r"needs 12 devices but 8 are available") as e:
    sharding.make_mesh(tiny_config(data=4, fsdp=3))
  assert "data" in str(e.value) and "fsdp" in str(e.value)
  with pytest.raises(ValueError, match=r"8 is not divisible by 3"):
    sharding.make_mesh(tiny_config(data=-1, fsdp=3))


def test_batch_not_divisible_by_the_mesh(tokenizer, tmp_path):
  config = tiny_config(data=8, fsdp=1, **{"train.batch_size": 12})
  with pytest.raises(ValueError, match=r"batch_size=12 is not divisible by the 8 devices"):
    train.build_experiment(config, str(tmp_path), tokenizer=tokenizer)
