"""Packing canvases several to a row changes nothing but the speed."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semdiff import losses
from semdiff import model as model_lib
from semdiff import scorers

from fakes import V
from fakes import random_batch as _batch


@pytest.mark.parametrize("scorer,k", [("unigram", 2),
                                     pytest.param("random", 1, marks=pytest.mark.slow)])
def test_packed_and_unpacked_losses_agree(scorer, k):
  tokens, mask = _batch()
  model = model_lib.build("insertion", model_lib.ModelConfig(
      vocab_size=V, d_model=32, num_layers=2, num_heads=2, mlp_dim=64))
  stats = scorers.ScoringStats(unigram_logprob=jnp.linspace(-1.0, -5.0, V))
  cfg = scorers.ScorerConfig(scorer)
  plain = losses.NoiseConfig(frontier_prob=0.3, frontier_kind="both", states_per_example=k)
  packed = dataclasses.replace(plain, pack_rows=12 * k)
  rng = jax.random.key(3)
  loss_a, m_a = losses.insertion_loss(model, tokens, mask, rng, stats, cfg, plain)
  loss_b, m_b = losses.insertion_loss(model, tokens, mask, rng, stats, cfg, packed)
  assert float(m_b["dropped_states"]) == 0
  np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-5)
  for key in ("gap_count", "gap_correct", "nll_bound_sentences", "nll_bound_tokens"):
    assert float(m_a[key]) == float(m_b[key]), key
  np.testing.assert_allclose(float(m_a["nll_bound_sum"]), float(m_b["nll_bound_sum"]), rtol=1e-5)
  assert float(m_b["computed_positions"]) <= float(m_a["computed_positions"])


def test_pack_layout_and_overflow():
  # Three canvases of lengths 3, 4, 5 into rows of width 6: one per row, the last dropped.
  seg = jnp.asarray([[1] * 3 + [0] * 3, [1] * 4 + [0] * 2, [1] * 5 + [0]], jnp.int32)
  tokens = jnp.asarray(np.arange(18).reshape(3, 6), jnp.int32) * seg
  positions = jnp.broadcast_to(jnp.arange(6), (3, 6)).astype(jnp.int32)
  targets = jnp.where(jnp.arange(5)[None] < jnp.asarray([[2], [3], [4]]), 7, -1)
  out = losses.pack(tokens, seg, positions, targets, rows=2)
  assert int(out.dropped) == 1
  np.testing.assert_array_equal(np.asarray(out.segment_ids),
                                [[1, 1, 1, 0, 0, 0], [2, 2, 2, 2, 0, 0]])
  np.testing.assert_array_equal(np.asarray(out.gap_source),
                                [[0, 0, -1, -1, -1], [1, 1, 1, -1, -1]])
  # First fit: lengths 3, 4, 2 -> the third goes back to the first row's room.
  seg3 = jnp.asarray([[1] * 3 + [0] * 3, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4], jnp.int32)
  out3 = losses.pack(seg3, seg3, positions, jnp.full((3, 5), -1), rows=2)
  assert int(out3.dropped) == 0
  np.testing.assert_array_equal(np.asarray(out3.segment_ids),
                                [[1, 1, 1, 3, 3, 0], [2, 2, 2, 2, 0, 0]])
  np.testing.assert_array_equal(np.asarray(out3.canvas_row), [0, 1, 0])
  np.testing.assert_array_equal(np.asarray(out3.canvas_offset), [0, 0, 3])
  # Two short canvases share a row; positions restart inside each.
  seg2 = jnp.asarray([[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]], jnp.int32)
  out2 = losses.pack(seg2 * 5, seg2, positions[:2], jnp.where(seg2[:, :5] > 0, 1, -1)[:, :5] *
                     jnp.asarray([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]) - (1 - jnp.asarray(
                         [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])), rows=1)
  np.testing.assert_array_equal(np.asarray(out2.segment_ids), [[1, 1, 2, 2, 2, 0]])
  np.testing.assert_array_equal(np.asarray(out2.positions), [[0, 1, 0, 1, 2, 0]])
  np.testing.assert_array_equal(np.asarray(out2.gap_source), [[0, -1, 1, 1, -1]])


def test_packed_and_unpacked_causal_losses_agree():
  tokens, mask = _batch(seed=1)
  model = model_lib.build("causal", model_lib.ModelConfig(
      vocab_size=V, d_model=32, num_layers=2, num_heads=2, mlp_dim=64))
  plain = losses.NoiseConfig()
  packed = dataclasses.replace(plain, causal_pack_rows=10)
  loss_a, m_a = losses.ar_loss(model, tokens, mask, noise_cfg=plain)
  loss_b, m_b = losses.ar_loss(model, tokens, mask, noise_cfg=packed)
  assert float(m_b["dropped_states"]) == 0
  np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-5)
  for key in ("gap_count", "gap_correct", "nll_bound_sentences", "nll_bound_tokens"):
    assert float(m_a[key]) == float(m_b[key]), key
  np.testing.assert_allclose(float(m_a["nll_bound_sum"]), float(m_b["nll_bound_sum"]), rtol=1e-5)
  assert float(m_b["computed_positions"]) < float(m_a["computed_positions"])


def test_state_weights():
  # One example of height 2, depths 0 1 1 2 2 2 (then padding), a level-2 frontier: the
  # tokens of depth <= 1 plus k = 1 of the m = 3 depth-2 tokens, drawn with chance
  # k! (m - k)! / (m + 1)! given the level.
  depth = jnp.asarray([[0, 1, 1, 2, 2, 2, 99]], jnp.int32)
  keep = jnp.asarray([[1, 1, 1, 1, 0, 0, 0]], bool)  # k = 1
  height, level = jnp.asarray([2]), jnp.asarray([2])
  frontier = jnp.asarray([True])

  def weight(kind, cap=100.0, is_frontier=frontier):
    cfg = losses.NoiseConfig(state_weight=kind, frontier_weight_cap=cap)
    return float(losses.state_weights(depth, level, keep, height, is_frontier, cfg)[0])

  assert weight("uniform") == 1.0
  assert weight("height") == 3.0
  np.testing.assert_allclose(weight("importance"), 3.0 * 4 * 3, rtol=1e-5)  # (m+1) C(m,k)
  np.testing.assert_allclose(weight("importance", cap=5.0), 15.0, rtol=1e-5)
  assert weight("importance", is_frontier=jnp.asarray([False])) == 3.0


def test_uniform_state_weight_is_the_plain_mean():
  tokens, mask = _batch(seed=1)
  model = model_lib.build("insertion", model_lib.ModelConfig(
      vocab_size=V, d_model=32, num_layers=2, num_heads=2, mlp_dim=64))
  stats = scorers.ScoringStats(unigram_logprob=jnp.linspace(-1.0, -5.0, V))
  cfg = scorers.ScorerConfig("unigram")
  rng = jax.random.key(5)
  for kind in ("uniform", "height", "importance"):
    noise = losses.NoiseConfig(frontier_prob=0.5, frontier_kind="level", state_weight=kind,
                               embed_loss_weight=0.1)
    loss, m = losses.insertion_loss(model, tokens, mask, rng, stats, cfg, noise)
    assert np.isfinite(float(loss))
    if kind == "uniform":
      assert float(m["loss_weight"]) == float(m["gap_count"])
      np.testing.assert_allclose(
          float(loss), float(m["gap_nll_sum"] / m["gap_count"] + 0.1 * m["embed_distance"]),
          rtol=1e-5)
    else:
      assert float(m["loss_weight"]) > float(m["gap_count"])


def test_span_loss_packed_unpacked_and_slow_reference_agree():
  """The span loss: packed = unpacked = a loop over every missing token of every state."""
  tokens, mask = _batch()
  model = model_lib.build("insertion", model_lib.ModelConfig(
      vocab_size=V, d_model=32, num_layers=2, num_heads=2, mlp_dim=64, gap_state=True,
      span_head=True))
  stats = scorers.ScoringStats(unigram_logprob=jnp.linspace(-1.0, -5.0, V))
  cfg = scorers.ScorerConfig("unigram")
  plain = losses.NoiseConfig(frontier_prob=0.5, frontier_kind="both", closed_prob=0.5,
                             hole_prob=0.2, span_loss_weight=1.0)
  rng = jax.random.key(4)
  _, m_a = losses.insertion_loss(model, tokens, mask, rng, stats, cfg, plain)
  _, m_b = losses.insertion_loss(model, tokens, mask, rng, stats, cfg,
                                 dataclasses.replace(plain, pack_rows=12))
  assert float(m_b["dropped_states"]) == 0
  span = lambda m: float(m["span_nll_sum"]) / float(m["span_count"])
  assert float(m_a["span_count"]) == float(m_b["span_count"]) > 0
  np.testing.assert_allclose(span(m_a), span(m_b), rtol=1e-5)

  noised, *_ = losses.draw_states(tokens, mask, rng, stats, cfg, plain, model.none_id)
  inputs = losses.canvas_inputs(noised.canvas, noised.length)
  features = model.gap_features(*inputs, closed=noised.closed)
  total, count = 0.0, 0
  span_gap, toks = np.asarray(noised.span_gap), np.asarray(tokens)
  for b in range(toks.shape[0]):
    kept = 0
    for i in range(toks.shape[1]):
      if not mask[b, i]:
        continue
      if span_gap[b, i] < 0:  # kept: the tokens after it lie in later gaps
        kept += 1
        continue
      assert span_gap[b, i] == kept
      logq = jax.nn.log_softmax(model.span_logits(features[b, kept]))
      total -= float(logq[toks[b, i]])
      count += 1
  assert count > 0
  assert float(m_a["span_count"]) == count
  np.testing.assert_allclose(span(m_a), total / count, rtol=1e-5)
