"""Confident-first insertion: the schedule knob of the sampler."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from semdiff import model as model_lib
from semdiff import sampling

V = 30


def _sampler(cfg, batch=6):
  # An untrained model wants to insert almost everywhere: a good stress case.
  model = model_lib.build("insertion", model_lib.ModelConfig(
      vocab_size=V, d_model=32, num_layers=1, num_heads=2, mlp_dim=64), seed=1)
  graphdef, params = nnx.split(model, nnx.Param)
  return sampling.make_sampler(graphdef, cfg, batch)(params, jax.random.key(0))


def test_all_gaps_schedule_is_the_plain_parallel_sampler():
  base = sampling.SamplerConfig(temperature=1.0, max_len=24, max_steps=6)
  a = _sampler(base)
  b = _sampler(dataclasses.replace(base, insert_fraction=1.0, insert_per_step=0))
  c = _sampler(dataclasses.replace(base, insert_per_step=1000))
  for other in (b, c):
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(other.tokens))
    np.testing.assert_array_equal(np.asarray(a.calls), np.asarray(other.calls))


def test_one_gap_per_step_inserts_one_token_per_step():
  cfg = sampling.SamplerConfig(temperature=1.0, max_len=10, max_steps=40, insert_per_step=1)
  out = _sampler(cfg)
  lengths = np.asarray(out.draft_length)  # [S, B]
  steps = np.diff(lengths, axis=0)
  assert set(np.unique(steps)) <= {0, 1}
  for b in range(lengths.shape[1]):
    grown = steps[:, b]
    # Exactly one token per step until it stops, then nothing.
    stop = int(np.argmin(grown)) if (grown == 0).any() else len(grown)
    assert np.all(grown[:stop] == 1) and np.all(grown[stop:] == 0)
    assert lengths[-1, b] == out.length[b]


def test_fraction_schedule_bounds_insertions():
  cfg = sampling.SamplerConfig(temperature=1.0, max_len=40, max_steps=10, insert_fraction=0.25)
  out = _sampler(cfg)
  lengths = np.asarray(out.draft_length)
  for s in range(lengths.shape[0] - 1):
    n = lengths[s]
    # At most a quarter (rounded up) of the n + 1 gaps insert.
    assert np.all(lengths[s + 1] - n <= np.ceil(0.25 * (n + 1)))


def test_confidence_schedule_inserts_the_sure_gaps_and_at_least_one():
  base = sampling.SamplerConfig(temperature=1.0, max_len=40, max_steps=12)
  # A threshold no gap reaches: one insertion per step, the most confident one.
  one = _sampler(dataclasses.replace(base, confidence=1.0))
  np.testing.assert_array_equal(np.asarray(one.tokens),
                                np.asarray(_sampler(dataclasses.replace(base,
                                                                        insert_per_step=1)).tokens))
  # A threshold every chosen token reaches: the plain parallel sampler.
  every = _sampler(dataclasses.replace(base, confidence=1e-30))
  np.testing.assert_array_equal(np.asarray(every.tokens), np.asarray(_sampler(base).tokens))


class NoneLeaning:
  """Random logits with ``none`` favoured: samples end by themselves."""

  none_id = V

  def __call__(self, tokens, segment_ids, positions):
    del segment_ids
    mix = jnp.sum(tokens * (positions + 1), axis=1)[:, None, None].astype(jnp.float32)
    grid = jnp.arange(tokens.shape[1] - 1)[None, :, None] + jnp.arange(V + 1)[None, None, :]
    logits = jnp.sin(grid * 1.7 + mix * 0.31) * 2.0
    return logits.at[..., V].add(1.5)


def test_certainty_selection_decides_each_gap_once():
  # One gap acts per step: it inserts a token (opening two gaps) or closes for good, so a
  # finished sample of n tokens took exactly n insertions and n + 1 closes.
  cfg = sampling.SamplerConfig(temperature=1.0, max_len=40, max_steps=90, insert_per_step=1,
                               select="certainty")
  out = jax.jit(lambda key: sampling.sample(NoneLeaning(), key, cfg, batch_size=6))(
      jax.random.key(0))
  length, calls = np.asarray(out.length), np.asarray(out.calls)
  assert np.all(np.diff(np.asarray(out.draft_length), axis=0) <= 1)
  finished = length < 40
  assert finished.any()
  np.testing.assert_array_equal(calls[finished], 2 * length[finished] + 1)


class ConstantGaps:
  """Every gap has the same distribution: ``none`` with probability ``p_none``, else a
  uniform token. Growth is then a branching process: from one gap, a sentence has on average
  p / (1 - 2p) tokens, p = 1 - p_none, whatever the order the gaps are filled in."""

  none_id = V

  def __init__(self, p_none):
    allowed = V - 4  # PAD, BOS, EOS and UNK are never sampled
    self.bias = float(np.log(p_none / (1.0 - p_none) * allowed))

  def __call__(self, tokens, segment_ids, positions):
    del segment_ids, positions
    # (Zero times the input, so that XLA does not constant-fold the whole loop.)
    logits = jnp.zeros((tokens.shape[0], tokens.shape[1] - 1, V + 1), jnp.float32)
    logits += 0.0 * tokens[:, :1, None].astype(jnp.float32)
    return logits.at[..., V].set(self.bias)


def _constant_lengths(cfg, batch=512):
  out = jax.jit(lambda key: sampling.sample(ConstantGaps(0.7), key, cfg, batch_size=batch))(
      jax.random.key(3))
  return out


@pytest.mark.parametrize("select", ["reserve", pytest.param("level", marks=pytest.mark.slow)])
def test_reserve_selection_keeps_the_length_of_the_parallel_process(select):
  base = sampling.SamplerConfig(temperature=1.0, max_len=64, max_steps=64, select=select)
  expected = 0.3 / (1.0 - 2 * 0.3)
  for cfg in (base, dataclasses.replace(base, insert_per_step=1),
              dataclasses.replace(base, confidence=1.0)):
    out = _constant_lengths(cfg)
    assert abs(float(np.mean(np.asarray(out.length))) - expected) < 0.25, cfg
  # Asking the waiting gaps again (select="sample") changes the length: here it runs away,
  # since a one-gap-per-step sample only stops when every gap says none at once.
  asked = _constant_lengths(dataclasses.replace(base, select="sample", insert_per_step=1))
  assert abs(float(np.mean(np.asarray(asked.length))) - expected) > 1.0


@pytest.mark.parametrize("select", ["reserve", "level"])
def test_reserve_one_gap_per_step_inserts_until_no_gap_is_open(select):
  # Each step inserts exactly one reserved token, until the last step closes the open gaps.
  cfg = sampling.SamplerConfig(temperature=1.0, max_len=40, max_steps=90, insert_per_step=1,
                               select=select)
  out = jax.jit(lambda key: sampling.sample(NoneLeaning(), key, cfg, batch_size=6))(
      jax.random.key(0))
  length, calls = np.asarray(out.length), np.asarray(out.calls)
  grown = np.diff(np.asarray(out.draft_length), axis=0)
  assert set(np.unique(grown)) <= {0, 1}
  finished = length < 40
  assert finished.any()
  np.testing.assert_array_equal(calls[finished], length[finished] + 1)


@pytest.mark.parametrize("select", ["reserve", "level"])
def test_reserve_samples_do_not_depend_on_the_batch(select):
  cfg = sampling.SamplerConfig(temperature=1.0, max_len=24, max_steps=20, confidence=0.5,
                               select=select)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(5), i))(jnp.arange(4))
  model = NoneLeaning()
  batched = sampling.sample(model, keys, cfg, batch_size=4)
  for i in range(4):
    one = sampling.sample(model, keys[i:i + 1], cfg, batch_size=1)
    np.testing.assert_array_equal(np.asarray(one.tokens[0]), np.asarray(batched.tokens[i]))


class LengthGated:
  """Every gap inserts while the canvas holds fewer than 3 tokens, none from then on."""

  none_id = V

  def __call__(self, tokens, segment_ids, positions):
    del positions
    n = jnp.sum(segment_ids > 0, axis=1) - 2  # the canvas is [BOS] x [EOS] padding
    logits = jnp.zeros((tokens.shape[0], tokens.shape[1] - 1, V + 1), jnp.float32)
    logits += 0.0 * tokens[:, :1, None].astype(jnp.float32)
    return logits.at[..., V].set(jnp.where(n < 3, -1e4, 1e4)[:, None])


def test_level_selection_decides_only_on_complete_levels():
  # The parallel process: 1 token, then both of its gaps (3 tokens), then none. One token
  # per step, "level" lets new gaps decide only on a complete level and keeps that length;
  # "reserve" lets the two gaps of the second token decide on a 2-token canvas (5 tokens).
  def length(**kw):
    cfg = sampling.SamplerConfig(temperature=1.0, max_len=16, max_steps=20, **kw)
    out = jax.jit(lambda key: sampling.sample(LengthGated(), key, cfg, batch_size=2))(
        jax.random.key(0))
    return np.asarray(out.length).tolist()

  assert length() == [3, 3]
  assert length(select="level", insert_per_step=1) == [3, 3]
  assert length(select="reserve", insert_per_step=1) == [5, 5]
  # Filling every reserved gap each step, no gap ever waits: "level" is "reserve".
  assert length(select="level") == length(select="reserve") == [3, 3]


class UnsureNone:
  """Every gap: ``none`` with probability 0.6, else token 7."""

  none_id = V

  def __call__(self, tokens, segment_ids, positions):
    del segment_ids, positions
    logits = jnp.full(tokens.shape[:1] + (tokens.shape[1] - 1, V + 1), -30.0)
    return logits.at[..., V].set(jnp.log(0.6)).at[..., 7].set(jnp.log(0.4))


@pytest.mark.parametrize("stop_confidence,grows", [(0.0, False), (0.5, False), (0.7, True)])
def test_an_all_none_step_stops_only_when_every_gap_is_sure(stop_confidence, grows):
  # Greedy: every gap says none (0.6). It is a stop unless p(none) < stop_confidence, in
  # which case one gap (the least sure) inserts its likeliest token, one per step.
  cfg = sampling.SamplerConfig(temperature=0.0, max_len=8, max_steps=5,
                               stop_confidence=stop_confidence)
  out = sampling.sample(UnsureNone(), jax.random.key(0), cfg, batch_size=2)
  length = np.asarray(out.length)
  if grows:
    np.testing.assert_array_equal(length, [5, 5])
    assert np.all(np.asarray(out.tokens)[:, :5] == 7)
  else:
    np.testing.assert_array_equal(length, [0, 0])
  with pytest.raises(ValueError, match="stop_confidence"):
    sampling.SamplerConfig.from_config({"stop_confidence": 1.5})


def test_stop_rescues_caps_the_forced_insertions_per_sample():
  cfg = sampling.SamplerConfig(temperature=0.0, max_len=8, max_steps=5, stop_confidence=0.7,
                               stop_rescues=2)
  out = sampling.sample(UnsureNone(), jax.random.key(0), cfg, batch_size=2)
  np.testing.assert_array_equal(out.length, [2, 2])  # two rescues, then the all-none stop
  np.testing.assert_array_equal(out.calls, [3, 3])
  with pytest.raises(ValueError, match="stop_rescues"):
    sampling.SamplerConfig.from_config({"stop_rescues": -1})


class MostlyNone:
  """Every gap: ``none`` 0.9, token 7 0.06, token 9 0.04."""

  none_id = V

  def __call__(self, tokens, segment_ids, positions):
    del segment_ids, positions
    logits = jnp.full(tokens.shape[:1] + (tokens.shape[1] - 1, V + 1), -30.0)
    return (logits.at[..., V].set(jnp.log(0.9)).at[..., 7].set(jnp.log(0.06))
            .at[..., 9].set(jnp.log(0.04)))


@pytest.mark.parametrize("rescue_token", ["likeliest", "sample"])
def test_a_rescue_inserts_the_likeliest_token_or_draws_one(rescue_token):
  # Top-p 0.85 keeps only none (0.9), so every step draws none everywhere and only the
  # rescue inserts. "likeliest" always takes token 7; "sample" draws 7 or 9 (0.6 / 0.4).
  cfg = sampling.SamplerConfig(temperature=1.0, top_p=0.85, max_len=8, max_steps=5,
                               stop_confidence=0.95, stop_rescues=1,
                               stop_rescue_token=rescue_token)
  out = sampling.sample(MostlyNone(), jax.random.key(0), cfg, batch_size=64)
  np.testing.assert_array_equal(out.length, np.ones(64))
  first = np.asarray(out.tokens)[:, 0]
  if rescue_token == "likeliest":
    assert np.all(first == 7)
  else:
    assert set(first.tolist()) == {7, 9}
    assert 0.4 < np.mean(first == 7) < 0.8
  with pytest.raises(ValueError, match="stop_rescue_token"):
    sampling.SamplerConfig.from_config({"stop_rescue_token": "best"})
