"""The baselines: the causal model's KV-cache decoding and the masked-diffusion model.

Models here have random, well-scaled parameters (the real initialisers compile slowly on
CPU and the training tests run them anyway).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from semdiff import model as model_lib
from semdiff import sampling
from semdiff.data.tokenizer import BOS_ID, EOS_ID, PAD_ID

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
