"""Sharded training equals one-device training (STYLE habit 15), and the memory options.

A few steps of the tiny config on meshes (data, fsdp) = (8, 1), (4, 2), (1, 8) of
the 8 fake devices of conftest give the losses of the same steps on one device.
Also: the shape errors (mesh vs devices, batch vs mesh and micro-batches) and
parameters that really are split over ``fsdp``; gradient accumulation gives the
full-batch update; bfloat16 compute trains with float32 parameters and optimizer state.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semdiff import config_files
from semdiff import losses
from semdiff import noising
from semdiff import scorers
from semdiff import sharding
from semdiff import train
from semdiff.data import pipeline
from semdiff.data import tokenizer as tokenizer_lib
from semdiff.data.tokenizer import PAD_ID

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


def run_steps(config, tok, tmp_path, devices=None, num_steps=NUM_STEPS, same_batch=False):
  """(per-step metrics as floats, the experiment, the final state) of ``num_steps`` steps.

  Each step takes the next batch of the data, or the first one again if ``same_batch``.
  """
  exp = train.build_experiment(config, str(tmp_path), tokenizer=tok, devices=devices)
  # train.init_state, compiled with FAST_COMPILE.
  init = jax.jit(functools.partial(train._init_state, exp.config, exp.model_cfg,  # pylint: disable=protected-access
                                   exp.optimizer), out_shardings=exp.state_sharding)
  state = init.lower().compile(compiler_options=FAST_COMPILE)()
  batches = pipeline.train_iterator(config, tok)
  batch = sharding.global_batch(next(batches), exp.mesh)
  step_fn = train.make_train_step(exp).lower(state, batch).compile(compiler_options=FAST_COMPILE)
  out = []
  for _ in range(num_steps):
    state, metrics = step_fn(state, batch)
    if not same_batch:
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


def test_batch_that_does_not_split_into_micro_batches(tokenizer, tmp_path):
  config = tiny_config(data=8, fsdp=1, **{"train.batch_size": 16, "train.grad_accum_steps": 4})
  with pytest.raises(ValueError, match=r"batch_size=16 does not split into "
                     r"train.grad_accum_steps=4 micro-batches over the 8 devices.*multiple of 32"):
    train.build_experiment(config, str(tmp_path), tokenizer=tokenizer)


def draws_from_content(tokens, mask, rng, stats, scorer_cfg, noise_cfg, none_id, repeats=1):
  """`losses.draw_states` with each example's level and frontier drawn from its tokens.

  The real draws come from one key for the whole batch, so the states of an example
  depend on its row in the batch, and micro-batches draw other states than the full
  batch. Keyed by content, every example gets the same state wherever it sits, which
  makes the accumulated update comparable with the full-batch one exactly.
  """
  del rng
  tokens, mask = jnp.tile(tokens, (repeats, 1)), jnp.tile(mask, (repeats, 1))
  scores = scorers.significance(tokens, mask, None, stats, scorer_cfg)  # unigram: no rng
  depth = noising.insertion_depth(scores, mask)
  height = noising.tree_height(depth, mask)

  def one(key, depth, height):
    k_level, k_front, k_frac, k_keep = jax.random.split(key, 4)
    level = jax.random.randint(k_level, (), 0, height + 1)
    exact = jax.random.uniform(k_front) >= noise_cfg.frontier_prob
    fraction = jnp.where(exact, 0.0, jax.random.uniform(k_frac))
    return noising.frontier_keep(depth[None], level[None], fraction, k_keep)[0], exact

  keep, exact = jax.vmap(one)(scorers.content_keys(tokens, mask, 1), depth, height)
  noised = noising.noise_to_keep(tokens, depth, keep, pad_id=PAD_ID, none_id=none_id)
  weight = losses.state_weights(depth, jnp.zeros_like(height), keep, height, ~exact, noise_cfg)
  return (noised, height, exact, scorers.path_entropy(tokens, mask, depth, stats, scorer_cfg),
          weight, (height + 1).astype(jnp.float32))  # uniform levels: 1 / chance = H + 1


@pytest.mark.parametrize("kind", [pytest.param("causal", marks=pytest.mark.slow), "insertion"])
def test_grad_accumulation_gives_the_full_batch_update(tokenizer, tmp_path, monkeypatch, kind):
  """Two micro-batches of 8 give the losses, metrics and parameters of one batch of 16.

  The insertion model's training states are drawn per example from its content here
  (`draws_from_content`): with the real per-batch draws, micro-batches see other (equally
  distributed) states. As many pack rows as canvases (causal: sequences), so that none is
  dropped.
  """
  overrides = {"model_kind": kind, "noise.pack_rows": 32, "noise.causal_pack_rows": 16,
               "noise.embed_loss_weight": 0.5}
  if kind == "insertion":
    monkeypatch.setattr(losses, "draw_states", draws_from_content)
  full, _, full_state = run_steps(tiny_config(**overrides), tokenizer, tmp_path / "full")
  accum, _, accum_state = run_steps(
      tiny_config(**overrides, **{"train.grad_accum_steps": 2}), tokenizer, tmp_path / "accum")
  for step, (got, want) in enumerate(zip(accum, full)):
    assert got.keys() == want.keys()
    assert want["dropped_states"] == 0
    for key in want:
      assert got[key] == pytest.approx(want[key], rel=2e-5, abs=1e-6), (step, key)
  if kind == "insertion":
    assert full[0]["embed_distance"] > 0 and full[0]["nll_bound_sentences"] > 0
  assert full[-1]["loss"] != full[0]["loss"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6),
               jax.device_get(accum_state["params"]), jax.device_get(full_state["params"]))


def test_bfloat16_compute_trains_with_float32_state(reference, tokenizer, tmp_path):
  """bf16 activations: finite, falling loss; parameters and optimizer moments stay float32."""
  bf16, _, state = run_steps(tiny_config(**{"model.dtype": "bfloat16"}), tokenizer, tmp_path,
                             num_steps=8, same_batch=True)
  losses_ = [m["loss"] for m in bf16]
  assert np.isfinite(losses_).all() and np.isfinite(bf16[-1]["grad_norm"]), losses_
  assert losses_[-1] < losses_[1] - 0.5, losses_  # the learning rate warms up from 0
  for part in ("params", "opt_state"):
    floats = [x for x in jax.tree.leaves(state[part]) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats), part
  # Same weights, same first batch: the float32 loss up to bf16 rounding.
  assert bf16[0]["loss"] == pytest.approx(reference[0]["loss"], rel=0.02)
  assert bf16[0]["loss"] != reference[0]["loss"]  # and it did compute in bf16
