"""The forward process against an independent slow reference, plus its properties."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semdiff import losses
from semdiff import noising
from semdiff import scorers

PAD, NONE = 0, 1000


def reference_depth(scores):
  """Depths by building the max-Cartesian tree recursively (root = argmax)."""
  depth = [0] * len(scores)

  def build(lo, hi, d):
    if lo >= hi:
      return
    root = lo + int(np.argmax(scores[lo:hi]))
    depth[root] = d
    build(lo, root, d + 1)
    build(root + 1, hi, d + 1)

  build(0, len(scores), 0)
  return depth


def reference_noise(tokens, depth, keep):
  """Canvas and gap targets by walking the sequence once."""
  canvas = [t for t, k in zip(tokens, keep) if k]
  targets = [None] * (len(canvas) + 1)
  gap = 0
  for t, d, k in zip(tokens, depth, keep):
    if k:
      gap += 1
    elif targets[gap] is None or d < targets[gap][1]:
      targets[gap] = (t, d)
  return canvas, [NONE if x is None else x[0] for x in targets]


def random_batch(rng, batch, length, ties):
  lengths = rng.integers(0, length + 1, size=batch)
  lengths[0], lengths[-1] = 0, length
  mask = np.arange(length)[None, :] < lengths[:, None]
  tokens = rng.integers(2, 50, size=(batch, length))
  if ties:
    raw = rng.integers(0, 4, size=(batch, length)).astype(np.float32)
  else:
    raw = rng.normal(size=(batch, length)).astype(np.float32)
  return tokens, mask, lengths, raw


def level_frontiers(seed, batch, length, fraction, key):
  """A random batch with its depths and a level-frontier state per row."""
  rng = np.random.default_rng(seed)
  tokens, mask, lengths, raw = random_batch(rng, batch, length, False)
  depth = np.asarray(noising.insertion_depth(raw, mask))
  height = np.asarray(noising.tree_height(depth, mask))
  level = rng.integers(0, height + 1).astype(np.int32)
  keep = np.asarray(noising.frontier_keep(depth, level, fraction, key))
  return tokens, mask, lengths, depth, keep


def assert_noise_matches_reference(tokens, depth, keep, lengths):
  """`noising.noise_to_keep` row by row against `reference_noise`."""
  out = noising.noise_to_keep(tokens, depth, keep, pad_id=PAD, none_id=NONE)
  for b, n in enumerate(lengths):
    ref_canvas, ref_targets = reference_noise(tokens[b, :n], depth[b, :n], keep[b, :n])
    assert int(out.length[b]) == len(ref_canvas)
    assert np.asarray(out.canvas)[b, :len(ref_canvas)].tolist() == list(ref_canvas)
    assert np.asarray(out.gap_targets)[b, :len(ref_canvas) + 1].tolist() == ref_targets


@pytest.mark.parametrize("length", [1, 2, 7, 16, 33])
@pytest.mark.parametrize("ties", [False, True])
def test_depth_and_levels_match_reference(length, ties):
  rng = np.random.default_rng(length * 2 + ties)
  tokens, mask, lengths, raw = random_batch(rng, 24, length, ties)
  # Break ties the way the library does: ranks of (raw score, jitter).
  scores = np.asarray(scorers.to_ranks(jnp.asarray(raw), jnp.zeros_like(raw), jnp.asarray(
      rng.uniform(size=raw.shape)), jnp.asarray(mask)))
  for b in range(len(lengths)):
    real = scores[b, :lengths[b]]
    assert len(set(real.tolist())) == lengths[b]  # distinct after tie-breaking
  depth = np.asarray(jax.jit(noising.insertion_depth)(scores, mask))
  assert depth.dtype == np.int32
  for b, n in enumerate(lengths):
    assert depth[b, :n].tolist() == reference_depth(scores[b, :n])
    assert np.all(depth[b, n:] >= length)

  heights = np.asarray(noising.tree_height(depth, mask))
  for level_fn in (lambda h: np.zeros_like(h), lambda h: h, lambda h: h + 1,
                   lambda h: rng.integers(0, h + 2)):
    level = level_fn(heights).astype(np.int32)
    canvas, targets = jax.jit(noising.noise_to_level, static_argnames=("pad_id", "none_id"))(
        tokens, depth, level, pad_id=PAD, none_id=NONE)
    canvas, targets = np.asarray(canvas), np.asarray(targets)
    assert canvas.shape == (len(lengths), length)
    assert targets.shape == (len(lengths), length + 1)
    for b, n in enumerate(lengths):
      keep = [depth[b, i] < level[b] for i in range(n)]
      ref_canvas, ref_targets = reference_noise(tokens[b, :n], depth[b, :n], keep)
      k = len(ref_canvas)
      assert canvas[b, :k].tolist() == list(ref_canvas)
      assert np.all(canvas[b, k:] == PAD)
      assert targets[b, :k + 1].tolist() == ref_targets
      assert np.all(targets[b, k + 1:] == -1)
      # Every target is a depth == level token: one step goes level h -> h+1.
      inserted = [t for t in ref_targets if t != NONE]
      assert sorted(inserted) == sorted(tokens[b, :n][depth[b, :n] == level[b]].tolist())


def test_level_zero_empty_and_level_height_full():
  rng = np.random.default_rng(0)
  tokens, mask, lengths, raw = random_batch(rng, 16, 20, False)
  depth = noising.insertion_depth(raw, mask)
  height = noising.tree_height(depth, mask)
  canvas0, targets0 = noising.noise_to_level(tokens, depth, jnp.zeros_like(height),
                                             pad_id=PAD, none_id=NONE)
  assert np.all(np.asarray(canvas0) == PAD)
  for b, n in enumerate(lengths):
    expected = NONE if n == 0 else tokens[b, int(np.argmax(raw[b, :n]))]
    assert int(targets0[b, 0]) == expected  # the root goes in first
  canvas_h, targets_h = noising.noise_to_level(tokens, depth, height, pad_id=PAD, none_id=NONE)
  for b, n in enumerate(lengths):
    assert np.asarray(canvas_h)[b, :n].tolist() == tokens[b, :n].tolist()
    # Level H is the whole sequence; the step H -> H+1 says none everywhere.
    assert np.all(np.asarray(targets_h)[b, :n + 1] == NONE)


def _heights(config, lengths, max_len=40):
  tokens = np.arange(1, max_len + 1)[None, :].repeat(len(lengths), 0) % 37 + 2
  mask = np.arange(max_len)[None, :] < np.asarray(lengths)[:, None]
  stats = scorers.ScoringStats(unigram_logprob=jnp.linspace(-1, -9, 64))
  scores = scorers.significance(tokens, mask, jax.random.key(0), stats, config)
  depth = noising.insertion_depth(scores, mask)
  return np.asarray(noising.tree_height(depth, mask))


def test_left_to_right_height_is_n():
  lengths = list(range(0, 41))
  heights = _heights(scorers.ScorerConfig(name="left_to_right"), lengths)
  assert heights.tolist() == lengths


def test_balanced_height_is_minimal():
  lengths = list(range(0, 41))
  heights = _heights(scorers.ScorerConfig(name="balanced"), lengths)
  assert heights.tolist() == [math.ceil(math.log2(n + 1)) for n in lengths]


def test_frontier_state_targets_match_reference():
  tokens, _, lengths, depth, keep = level_frontiers(3, 32, 24, 0.5, jax.random.key(1))
  assert_noise_matches_reference(tokens, depth, keep, lengths)


def test_drafts_grow_coarse_to_fine():
  scores = np.array([0.1, 0.5, 0.4, 0.9, 0.8, 0.3, 0.0, 0.2, 0.7])
  words = "a quick brown fox jumps over the lazy dog".split()
  depth = np.asarray(noising.insertion_depth(scores[None], np.ones((1, 9), bool)))[0]
  steps = noising.drafts(np.arange(9), depth)
  assert steps[0] == [] and steps[-1] == list(range(9))
  assert [words[i] for i in steps[1]] == ["fox"]
  for a, b in zip(steps, steps[1:]):
    assert set(a) < set(b) and len(b) <= 2 * len(a) + 1  # at most one per gap


def test_random_tree_entropy_term():
  # A chain (left_to_right) has subtree sizes n, n-1, ..., 1.
  n = 6
  depth = jnp.arange(n)[None]
  mask = jnp.ones((1, n), bool)
  got = float(scorers.subtree_log_size_sum(depth, mask)[0])
  assert got == pytest.approx(sum(math.log(k) for k in range(1, n + 1)), rel=1e-6)


def test_random_tree_entropy_term_at_word_level():
  # Two words of two pieces each: only the two word roots are random nodes; the
  # root word's subtree holds 2 words, the other 1: log 2 + log 1.
  scores = jnp.asarray([[3.0, 2.0, 1.0, 0.0]])  # word A = (0, 1), word B = (2, 3)
  mask = jnp.ones((1, 4), bool)
  depth = noising.insertion_depth(scores, mask)
  unit_start = jnp.asarray([[True, False, True, False]])
  got = float(scorers.subtree_log_size_sum(depth, mask, unit_start)[0])
  assert got == pytest.approx(math.log(2), rel=1e-6)


def test_ancestors_match_the_definition():
  rng = np.random.default_rng(5)
  tokens, mask, lengths, raw = random_batch(rng, 16, 20, False)
  depth = noising.insertion_depth(raw, mask)
  anc = np.asarray(noising.ancestors(raw, mask))
  for b, n in enumerate(lengths):
    s = np.asarray(raw)[b]
    for i in range(20):
      for j in range(20):
        lo, hi = min(i, j), max(i, j)
        want = i < n and j < n and i != j and s[j] == s[lo:hi + 1].max()
        assert anc[b, i, j] == want, (b, i, j)
  # Depth is the number of ancestors.
  np.testing.assert_array_equal(anc.sum(axis=2)[np.asarray(mask)],
                                np.asarray(depth)[np.asarray(mask)])


def test_tree_frontier_states_are_parent_closed_with_reference_targets():
  rng = np.random.default_rng(7)
  tokens, mask, lengths, raw = random_batch(rng, 64, 24, False)
  depth = noising.insertion_depth(raw, mask)
  anc = np.asarray(noising.ancestors(raw, mask))
  keep = np.asarray(noising.tree_frontier_keep(jnp.asarray(anc), mask, jax.random.key(2)))
  assert not keep[~np.asarray(mask)].any()
  # Closed under parent: a kept token's ancestors are all kept.
  assert not np.any(keep[:, :, None] & anc & ~keep[:, None, :])
  # Not just levels: some states keep a deeper token while a shallower one is out.
  d = np.asarray(depth)
  mixed = [((keep[b] & (d[b] > d[b][~keep[b] & np.asarray(mask)[b]].min(initial=99))).any())
           for b in range(64)]
  assert any(mixed)
  assert_noise_matches_reference(tokens, d, keep, lengths)


def test_keyword_states_targets_match_reference():
  # Keyword states keep random tokens of any depth (not parent-closed); each gap's target
  # is still its least-deep token, and it is unique (two tokens of one depth always have a
  # shallower one between them).
  tokens, mask, lengths, depth, keep = level_frontiers(4, 48, 24, 0.3, jax.random.key(2))
  words = np.asarray(losses.keyword_keep(jnp.asarray(mask), jax.random.key(3),
                                         losses.NoiseConfig(keyword_prob=1.0, keyword_max=3)))
  assert np.all((words.sum(1) >= 1) == (lengths >= 1))
  assert np.all(words.sum(1) <= 3) and not np.any(words & ~mask)
  keep = keep | words
  assert_noise_matches_reference(tokens, depth, keep, lengths)
  for b, n in enumerate(lengths):
    gap = np.cumsum(keep[b, :n]) - keep[b, :n]
    for g in range(int(keep[b, :n].sum()) + 1):
      d = depth[b, :n][(gap == g) & ~keep[b, :n]]
      assert len(d) == 0 or np.sum(d == d.min()) == 1


def test_keyword_states_leave_the_other_draws_unchanged():
  rng = np.random.default_rng(5)
  tokens, mask, _, _ = random_batch(rng, 32, 16, False)
  stats = scorers.ScoringStats(unigram_logprob=jnp.linspace(-1.0, -5.0, 50))
  cfg = scorers.ScorerConfig("unigram")
  base = losses.NoiseConfig(frontier_prob=0.5)
  key = jax.random.key(6)
  draw = lambda noise: losses.draw_states(jnp.asarray(tokens), jnp.asarray(mask), key, stats,
                                          cfg, noise, NONE)
  plain, _, exact_a, *_ = draw(base)
  with_kw, _, exact_b, *_ = draw(losses.NoiseConfig(frontier_prob=0.5, keyword_prob=0.5))
  changed = np.any(np.asarray(plain.canvas) != np.asarray(with_kw.canvas), axis=1) | (
      np.asarray(plain.length) != np.asarray(with_kw.length))
  assert changed.any() and not changed.all()
  np.testing.assert_array_equal(np.asarray(plain.gap_targets)[~changed],
                                np.asarray(with_kw.gap_targets)[~changed])
  assert not np.any(np.asarray(exact_b) & ~np.asarray(exact_a))


@pytest.mark.parametrize("name", ["unigram", "random"])
def test_repeated_states_equal_those_of_the_tiled_batch(name):
  """``repeats=k`` draws what the batch tiled k times draws (deterministic scorers score
  each example once; the random scorer still draws an order per state)."""
  rng = np.random.default_rng(8)
  tokens, mask, _, _ = random_batch(rng, 16, 12, False)
  stats = scorers.ScoringStats(unigram_logprob=jnp.linspace(-1.0, -5.0, 50))
  cfg = scorers.ScorerConfig(name)
  noise = losses.NoiseConfig(frontier_prob=0.5, keyword_prob=0.2)
  key = jax.random.key(9)
  tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
  got = losses.draw_states(tokens, mask, key, stats, cfg, noise, NONE, repeats=3)
  want = losses.draw_states(jnp.tile(tokens, (3, 1)), jnp.tile(mask, (3, 1)), key, stats, cfg,
                            noise, NONE)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(want))
  copies = np.asarray(got[0].canvas).reshape(3, 16, -1)
  assert np.any(copies[0] != copies[1])  # the copies are independent draws


def test_levels_drawn_in_proportion_to_their_tokens():
  """``level_draw="tokens"``: level h of an example comes up in proportion to m_h + 1, and
  ``level_scale`` is 1 / its chance (uniform: H + 1), so scaled counts average 1."""
  tokens = jnp.asarray([[5, 6, 7, 8, 9, 10, 11, 0]], jnp.int32)
  mask = tokens > 0
  stats = scorers.ScoringStats(unigram_logprob=-jnp.arange(50, dtype=jnp.float32) / 7.0)
  cfg = scorers.ScorerConfig("unigram")
  depth = np.asarray(noising.insertion_depth(
      scorers.significance(tokens, mask, jax.random.key(0), stats, cfg), mask))[0, :7]
  height = int(depth.max()) + 1
  want = np.array([np.sum(depth == h) + 1 for h in range(height + 1)], np.float64)
  want /= want.sum()
  n = 20000
  for draw, p in (("tokens", want), ("uniform", np.full(height + 1, 1.0 / (height + 1)))):
    noise = losses.NoiseConfig(level_draw=draw)
    noised, _, _, _, _, scale = losses.draw_states(tokens, mask, jax.random.key(1), stats, cfg,
                                                   noise, NONE, repeats=n)
    level = np.asarray(noised.length)  # an exact level h keeps its depth < h tokens
    kept = np.array([np.sum(depth < h) for h in range(height + 1)])
    h = np.searchsorted(kept, level)
    freq = np.bincount(h, minlength=height + 1) / n
    np.testing.assert_allclose(freq, p, atol=0.015)
    np.testing.assert_allclose(np.asarray(scale), 1.0 / p[h], rtol=1e-5)
  with pytest.raises(ValueError, match="level_draw"):
    losses.NoiseConfig.from_config({"level_draw": "wide"})
  with pytest.raises(ValueError, match="uniform levels"):
    losses.NoiseConfig.from_config({"level_draw": "tokens", "state_weight": "height"})
