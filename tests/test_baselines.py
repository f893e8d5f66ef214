"""The baselines: the causal model's KV-cache decoding and the masked-diffusion model.

Models here have random, well-scaled parameters (the real initialisers compile slowly on
CPU and the training tests run them anyway).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from semdiff import evaluation
from semdiff import losses
from semdiff import model as model_lib
from semdiff import sampling
from semdiff.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID

V = 40
CFG = model_lib.ModelConfig(vocab_size=V, d_model=32, num_layers=2, num_heads=2, mlp_dim=64)


def _build(kind, cfg=CFG, seed=0, scale=0.2):
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model_lib.build(kind, cfg)))
  rng = np.random.default_rng(seed)

  def draw(path, x):
    if "scale" in jax.tree_util.keystr(path):  # RMSNorm
      return jnp.ones(x.shape, x.dtype)
    return jnp.asarray(rng.normal(0, scale, x.shape), x.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, abstract))


@pytest.fixture(scope="module")
def causal():
  return _build("causal", scale=0.5)


def test_cached_logits_equal_the_full_forward_pass(causal):
  graphdef, params = nnx.split(causal)
  batch, width = 3, 12
  rng = np.random.default_rng(0)
  tokens = np.concatenate([np.full((batch, 1), BOS_ID), rng.integers(4, V, (batch, width - 1))],
                          axis=1).astype(np.int32)
  seg = np.ones((batch, width), np.int32)
  pos = np.broadcast_to(np.arange(width, dtype=np.int32), (batch, width))
  full = jax.jit(lambda p, *x: nnx.merge(graphdef, p)(*x))(params, tokens, seg, pos)

  @jax.jit
  def cached(p, tokens):
    model = nnx.merge(graphdef, p)

    def step(cache, t):
      logits, cache = model.decode_step(tokens[:, t], t, cache)
      return cache, logits

    _, logits = jax.lax.scan(step, model.init_cache(batch, width), jnp.arange(width))
    return jnp.swapaxes(logits, 0, 1)

  np.testing.assert_allclose(np.asarray(cached(params, tokens)), np.asarray(full), atol=1e-4,
                             rtol=1e-4)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_and_uncached_sampling_give_the_same_tokens(causal, temperature):
  graphdef, params = nnx.split(causal)
  cfg = sampling.SamplerConfig(temperature=temperature, top_p=1.0, max_len=20)
  out = {}
  for name, fn in (("plain", sampling.sample_causal), ("cached", sampling.sample_causal_cached)):
    run = jax.jit(lambda p, key, fn=fn: fn(nnx.merge(graphdef, p), key, cfg, batch_size=8))
    out[name] = jax.tree.map(np.asarray, run(params, jax.random.key(3)))
  for field in ("tokens", "length", "calls"):
    np.testing.assert_array_equal(getattr(out["cached"], field), getattr(out["plain"], field))
  np.testing.assert_allclose(out["cached"].inserted_logprob, out["plain"].inserted_logprob,
                             atol=1e-4)
  if temperature:
    # Rows stop at their own EOS: some before the cap, the loop ran on for the others.
    assert (out["cached"].length < 20).any() and (out["cached"].length == 20).any()
  for row, n in zip(out["cached"].tokens, out["cached"].length):
    assert (row[n:] == PAD_ID).all() and not np.isin(row[:n], [PAD_ID, BOS_ID, EOS_ID]).any()


def _batch(batch=8, max_len=10, seed=0):
  rng = np.random.default_rng(seed)
  n = rng.integers(1, max_len + 1, batch)
  mask = np.arange(max_len)[None, :] < n[:, None]
  tokens = np.where(mask, rng.integers(4, 12, (batch, max_len)), PAD_ID).astype(np.int32)
  return jnp.asarray(tokens), jnp.asarray(mask)


def test_masked_canvas_predicts_eos_and_padding():
  tokens, mask = jnp.asarray([[5, 6, 0], [7, 0, 0]]), jnp.asarray([[1, 1, 0], [1, 0, 0]], bool)
  np.testing.assert_array_equal(losses.masked_canvas(tokens, mask),
                                [[5, 6, EOS_ID, PAD_ID], [7, EOS_ID, PAD_ID, PAD_ID]])


def test_masked_loss_is_finite_and_decreases():
  model = _build("masked", scale=0.2)
  graphdef, params = nnx.split(model)
  tokens, mask = _batch()
  optimizer = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state, k):
    def loss_fn(p):
      return losses.masked_loss(nnx.merge(graphdef, p), tokens, mask, jax.random.key(k))
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, metrics

  opt_state = optimizer.init(params)
  history = []
  for k in range(12):
    params, opt_state, loss, metrics = step(params, opt_state, k % 3)
    history.append(float(loss))
  assert np.isfinite(history).all()
  assert np.mean(history[-3:]) < np.mean(history[:3]) - 0.1, history
  assert metrics["nll_bound_sentences"] == 8 and metrics["gap_count"] > 0


def test_masked_elbo_of_a_uniform_model_is_length_times_log_v():
  """All-zero parameters give uniform logits: the ELBO is (L + 1) log V in expectation."""
  model = _build("masked", scale=0.0)
  graphdef, params = nnx.split(model)
  params = jax.tree.map(jnp.zeros_like, params)
  tokens, mask = _batch(batch=32, max_len=10)
  evaluator = evaluation.NllEvaluator(graphdef, "masked", None, None)
  nll, calls = evaluator.per_sentence(params, {"tokens": tokens, "mask": mask})
  assert (calls == evaluation.MASKED_T_DRAWS).all()
  assert nll.mean() == pytest.approx(11 * np.log(V), rel=0.05)


def test_masked_sampler_reveals_everything_in_t_steps():
  model = _build("masked", scale=0.5)
  graphdef, params = nnx.split(model)
  cfg = sampling.SamplerConfig(temperature=1.0, top_p=1.0, max_steps=5, max_len=12)
  out = jax.tree.map(np.asarray, sampling.make_masked_sampler(graphdef, cfg, 6)(
      params, jax.random.key(0)))
  assert out.tokens.shape == (6, 12) and (out.calls == 5).all()
  assert not np.isin(out.tokens, [model.mask_id, BOS_ID, UNK_ID, EOS_ID]).any()
  for row, n in zip(out.tokens, out.length):
    assert (row[n:] == PAD_ID).all() and (row[:n] != PAD_ID).all()
  masked = (out.drafts[:-1] == model.mask_id).sum(axis=(1, 2))
  assert masked[0] == 6 * 12 and (np.diff(masked) <= 0).all() and masked[-1] < masked[0]
  np.testing.assert_array_equal(out.drafts[-1], out.tokens)
