"""Closed gaps (``model.gap_state``): the model hears which gaps are known to be empty."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semdiff import losses
from semdiff import model as model_lib
from semdiff import noising
from semdiff import sampling
from semdiff import scorers

from fakes import V
from fakes import random_batch as _batch
from fakes import small_insertion_model as _model

NONE = V


def _depths(tokens, mask, seed=0):
  stats = scorers.ScoringStats(unigram_logprob=jnp.linspace(-1.0, -5.0, V))
  scores = scorers.significance(tokens, mask, jax.random.key(seed), stats,
                                scorers.ScorerConfig("random"))
  return noising.insertion_depth(scores, mask)


def test_gap_boundary_depth_matches_a_slow_reference():
  tokens, mask = _batch()
  depth = np.asarray(_depths(tokens, mask))
  rng = np.random.default_rng(1)
  keep = np.asarray(mask) & (rng.random(depth.shape) < 0.6)
  got = np.asarray(noising.gap_boundary_depth(depth, keep))
  for b in range(depth.shape[0]):
    kept = [-1] + list(depth[b][keep[b]]) + [-1]  # BOS, kept tokens, EOS
    for g in range(len(kept) - 1):
      assert got[b, g] == max(kept[g], kept[g + 1]), (b, g)


def test_closed_gaps_are_empty_and_exact_levels_close_the_old_ones():
  tokens, mask = _batch(seed=2, batch=32)
  depth = _depths(tokens, mask, seed=3)
  height = noising.tree_height(depth, mask)
  level = jax.random.randint(jax.random.key(4), height.shape, 0, height + 1)
  keep = depth < level[:, None]
  noised = noising.noise_to_keep(tokens, depth, keep, pad_id=0, none_id=NONE)
  boundary = np.asarray(noising.gap_boundary_depth(depth, keep))
  targets = np.asarray(noised.gap_targets)
  no_tree = jnp.zeros(height.shape, bool)
  for rate in (0.0, 0.5, 1.0):
    closed = np.asarray(losses.closed_gaps(noised, depth, keep, level, no_tree,
                                           jnp.full(height.shape, rate), jax.random.key(5),
                                           NONE))
    assert np.all(targets[closed] == NONE)  # only empty gaps close
    old = (targets == NONE) & (boundary < np.asarray(level)[:, None] - 1)
    current = (targets == NONE) & (boundary == np.asarray(level)[:, None] - 1)
    assert np.all(closed[old])  # empty since an earlier level: always closed
    if rate == 0.0:
      np.testing.assert_array_equal(closed, old)
    if rate == 1.0:
      np.testing.assert_array_equal(closed, old | current)
  # At an exact level every non-empty gap was opened by the previous level's tokens.
  filled = (targets >= 0) & (targets != NONE)
  assert np.all(boundary[filled] == np.asarray(level)[:, None].repeat(targets.shape[1], 1)[
      filled] - 1)


def test_closure_bound_decides_every_gap_once():
  """With closures, the levels' open gaps are the 2n + 1 child slots of the tree."""
  tokens, mask = _batch(seed=6, batch=16)
  depth = _depths(tokens, mask, seed=7)
  height = np.asarray(noising.tree_height(depth, mask))
  decisions = np.zeros(tokens.shape[0], np.int64)
  for h in range(int(height.max()) + 1):
    level = jnp.full(height.shape, h, jnp.int32)
    keep = depth < level[:, None]
    noised = noising.noise_to_keep(tokens, depth, keep, pad_id=0, none_id=NONE)
    closed = ((noised.gap_targets == NONE)
              & (noising.gap_boundary_depth(depth, keep) < level[:, None] - 1))
    open_targets = np.asarray((noised.gap_targets >= 0) & ~closed)
    decisions += np.where(h <= height, open_targets.sum(axis=1), 0)
  np.testing.assert_array_equal(decisions, 2 * np.asarray(mask).sum(axis=1) + 1)


def test_model_reads_closed_gaps_only_when_built_for_them():
  tokens, mask = _batch(seed=8, batch=4)
  inputs = losses.canvas_inputs(tokens, jnp.sum(mask, axis=1))
  gaps = inputs[0].shape[1] - 1
  model = _model()
  none_closed = jnp.zeros((4, gaps), bool)
  np.testing.assert_allclose(np.asarray(model(*inputs)),
                             np.asarray(model(*inputs, closed=none_closed)), rtol=1e-6)
  some = none_closed.at[:, 0].set(True)
  assert not np.allclose(np.asarray(model(*inputs)), np.asarray(model(*inputs, closed=some)))
  with pytest.raises(ValueError, match="gap_state"):
    _model(gap_state=False)(*inputs, closed=some)


@pytest.mark.slow
def test_training_with_closed_gaps_packs_like_unpacked():
  tokens, mask = _batch(seed=9)
  model = _model()
  stats = scorers.ScoringStats(unigram_logprob=jnp.linspace(-1.0, -5.0, V))
  cfg = scorers.ScorerConfig("unigram")
  plain = losses.NoiseConfig(frontier_prob=0.3, frontier_kind="both", states_per_example=2,
                             closed_prob=0.7)
  rng = jax.random.key(10)
  loss_a, m_a = losses.insertion_loss(model, tokens, mask, rng, stats, cfg, plain)
  loss_b, m_b = losses.insertion_loss(model, tokens, mask, rng, stats, cfg,
                                      dataclasses.replace(plain, pack_rows=24))
  assert float(m_b["dropped_states"]) == 0
  np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-5)
  assert float(m_a["gap_count"]) == float(m_b["gap_count"])
  # Closed gaps decide nothing: fewer gaps are scored than without closures.
  _, m_c = losses.insertion_loss(model, tokens, mask, rng, stats, cfg,
                                 dataclasses.replace(plain, closed_prob=0.0))
  assert float(m_a["gap_count"]) < float(m_c["gap_count"])


def test_the_certainty_sampler_feeds_its_nones_back():
  """A model that says none in an open gap only while no gap is closed: with closures fed
  back, the second step sees the first step's nones and inserts; without, it stops."""

  class Stub:
    none_id = NONE
    cfg = model_lib.ModelConfig(vocab_size=V, gap_state=True)

    def __call__(self, tokens, segment_ids, positions, closed=None):
      batch, width = tokens.shape
      any_closed = (jnp.zeros((batch,), bool) if closed is None
                    else jnp.any(closed, axis=1))
      logits = jnp.full((batch, width - 1, V + 1), -30.0)
      logits = logits.at[..., NONE].set(jnp.where(any_closed, -30.0, 30.0)[:, None])
      return logits.at[..., 7].set(jnp.where(any_closed, 30.0, 0.0)[:, None])

  cfg = sampling.SamplerConfig(temperature=0.0, select="certainty", confidence=0.0,
                               insert_per_step=1, max_len=8, max_steps=4, grow_canvas=False)
  # The empty canvas's one gap chooses none; the sampler stops (nothing left open).
  out = sampling.sample(Stub(), jax.random.key(0), cfg, batch_size=2)
  assert np.all(np.asarray(out.length) == 0)
  # A prompt whose first gap is shut: every open gap now hears of a closed one and inserts.
  start = jnp.full((2, 8), 0, jnp.int32).at[:, 0].set(9)
  open_gaps = jnp.ones((2, 9), bool).at[:, 0].set(False)
  out = sampling.sample(Stub(), jax.random.key(0), cfg, batch_size=2, start=start,
                        start_length=jnp.ones((2,), jnp.int32), open_gaps=open_gaps)
  assert np.all(np.asarray(out.length) > 1)
  assert np.all(np.asarray(out.tokens)[:, 1] == 7)


def test_closing_with_every_gap_acting_is_the_all_gaps_certainty_sampler():
  model = _model()
  base = dict(temperature=1.0, top_p=0.9, confidence=0.0, max_len=16, max_steps=12,
              grow_canvas=True)
  a = sampling.sample(model, jax.random.key(1), sampling.SamplerConfig(select="closing",
                                                                       **base), batch_size=6)
  b = sampling.sample(model, jax.random.key(1), sampling.SamplerConfig(select="certainty",
                                                                       **base), batch_size=6)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  np.testing.assert_array_equal(np.asarray(a.calls), np.asarray(b.calls))
  assert np.asarray(a.length).max() > 0
