"""Hole states (``noise.hole_prob``) and the sampler's correction rounds (``refine_steps``)."""

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
from fakes import random_batch
from fakes import small_insertion_model as _model

NONE = V


def _batch(seed=0, batch=16, length=12):
  return random_batch(seed, batch, length)


def test_hole_states_leave_out_single_tokens_and_close_every_other_gap():
  tokens, mask = _batch()
  stats = scorers.ScoringStats(unigram_logprob=jnp.linspace(-1.0, -5.0, V))
  noise = losses.NoiseConfig(frontier_prob=0.5, frontier_kind="both", closed_prob=0.5,
                             hole_prob=1.0)
  noised, _, exact, *_ = losses.draw_states(tokens, mask, jax.random.key(0), stats,
                                              scorers.ScorerConfig("unigram"), noise, NONE)
  holed, holes = losses.hole_keep(mask, jax.random.fold_in(jax.random.key(0), 13), noise)
  tokens, mask, holes = map(np.asarray, (tokens, mask, holes))
  targets, closed = np.asarray(noised.gap_targets), np.asarray(noised.closed)
  # Never read as an exact level by the bound (an empty sentence has no holes).
  assert not np.any(np.asarray(exact) & mask.any(axis=1))
  for b in range(tokens.shape[0]):
    n = mask[b].sum()
    if n == 0:
      assert not holed[b]
      continue
    assert holed[b] and holes[b].any() and not np.any(holes[b] & ~mask[b])
    assert not np.any(holes[b][1:] & holes[b][:-1])  # no two adjacent
    kept = tokens[b][mask[b] & ~holes[b]]
    np.testing.assert_array_equal(np.asarray(noised.canvas)[b, :len(kept)], kept)
    # Gap g of the canvas holds the hole after kept token g - 1, or nothing (closed).
    want = np.full(len(kept) + 1, NONE)
    for i in np.flatnonzero(holes[b]):
      want[np.sum(mask[b][:i] & ~holes[b][:i])] = tokens[b, i]
    np.testing.assert_array_equal(targets[b, :len(kept) + 1], want)
    np.testing.assert_array_equal(closed[b, :len(kept) + 1], want == NONE)



def test_hole_runs_leave_out_adjacent_tokens_and_target_the_most_significant():
  tokens, mask = _batch(seed=2, batch=32)
  stats = scorers.ScoringStats(unigram_logprob=jnp.linspace(-1.0, -5.0, V))
  noise = losses.NoiseConfig(closed_prob=0.5, hole_prob=1.0, hole_rate=1.0, hole_runs=True)
  rng = jax.random.key(0)
  noised, *_ = losses.draw_states(tokens, mask, rng, stats, scorers.ScorerConfig("unigram"),
                                  noise, NONE)
  _, holes = losses.hole_keep(mask, jax.random.fold_in(rng, 13), noise)
  scores = scorers.significance(tokens, mask, jax.random.split(rng, 5)[0], stats,
                                scorers.ScorerConfig("unigram"))
  depth = np.asarray(noising.depth_from_ancestors(noising.ancestors(scores, mask), mask))
  tokens, mask, holes = map(np.asarray, (tokens, mask, holes))
  targets = np.asarray(noised.gap_targets)
  assert np.any(holes[:, 1:] & holes[:, :-1])  # runs do occur
  for b in range(tokens.shape[0]):
    kept = mask[b] & ~holes[b]
    want = np.full(kept.sum() + 1, NONE)
    gap_of = np.cumsum(kept) - kept  # the gap each left-out token falls in
    for g in range(kept.sum() + 1):
      run = np.flatnonzero(holes[b] & (gap_of == g))
      if len(run):  # the run's least deep (most significant) token
        want[g] = tokens[b, run[np.argmin(depth[b, run])]]
    np.testing.assert_array_equal(targets[b, :kept.sum() + 1], want)

def test_hole_prob_zero_leaves_the_other_draws_unchanged():
  tokens, mask = _batch(seed=1)
  stats = scorers.ScoringStats(unigram_logprob=jnp.linspace(-1.0, -5.0, V))
  draw = lambda noise: losses.draw_states(tokens, mask, jax.random.key(3), stats,
                                          scorers.ScorerConfig("unigram"), noise, NONE)
  a = draw(losses.NoiseConfig(frontier_prob=0.5, closed_prob=0.5))
  b = draw(losses.NoiseConfig(frontier_prob=0.5, closed_prob=0.5, hole_prob=0.3))
  holed, _ = losses.hole_keep(mask, jax.random.fold_in(jax.random.key(3), 13),
                              losses.NoiseConfig(hole_prob=0.3))
  keep = ~np.asarray(holed)
  assert keep.any() and (~keep).any()
  np.testing.assert_array_equal(np.asarray(a[0].canvas)[keep], np.asarray(b[0].canvas)[keep])
  np.testing.assert_array_equal(np.asarray(a[0].gap_targets)[keep],
                                np.asarray(b[0].gap_targets)[keep])
  np.testing.assert_array_equal(np.asarray(a[0].closed)[keep], np.asarray(b[0].closed)[keep])


def test_leave_one_out_matches_one_model_call_per_left_out_token():
  model = _model()
  cfg = sampling.SamplerConfig(max_len=16, grow_canvas=True)
  tokens, mask = _batch(seed=2, batch=3, length=16)
  length = jnp.sum(mask, axis=1).astype(jnp.int32)
  got = np.asarray(sampling.leave_one_out(model, tokens, length, cfg))
  for b in range(3):
    n = int(length[b])
    for i in range(n):
      row = np.delete(np.asarray(tokens[b, :n]), i)
      canvas = jnp.asarray(np.pad(row, (0, 16 - len(row)))[None], jnp.int32)
      closed = jnp.asarray((np.arange(17) != i)[None])
      logits = model(*losses.canvas_inputs(canvas, jnp.asarray([n - 1], jnp.int32)),
                     closed=closed)[0, i]
      logits = logits.at[jnp.array([0, 1, 2, 3, NONE])].set(-jnp.inf)
      np.testing.assert_allclose(got[b, i], jax.nn.log_softmax(logits), atol=2e-5)


def _slow_refine(logp, gap_logp, tokens, length, fixed, threshold, parallel):
  """The correction round written out per sample (a reference for `sampling.refine`)."""
  out = []
  for b in range(tokens.shape[0]):
    n = int(length[b])
    row = list(tokens[b, :n])
    slots = []  # (margin or None, kind, index): gap 0, token 0, gap 1, ..., gap n
    for g in range(n + 1):
      if gap_logp is not None:  # (without gap edits tokens are each other's neighbours)
        m = gap_logp[b, g, :NONE].max() - gap_logp[b, g, NONE]
        ok = m > -np.log(threshold) and not (g > 0 and fixed[b, g - 1]) and not (
            g < n and fixed[b, g])
        slots.append((m if ok else None, "gap", g))
      if g < n:
        m = logp[b, g].max() - logp[b, g, row[g]]
        ok = not fixed[b, g] and m > -np.log(threshold)
        slots.append((m if ok else None, "token", g))
    bad = [-np.inf if m is None else m for m, _, _ in slots]
    if parallel:
      picks = [k for k in range(len(slots)) if slots[k][0] is not None
               and (k == 0 or bad[k] >= bad[k - 1]) and (k == len(slots) - 1 or bad[k] > bad[k + 1])]
    else:
      picks = [int(np.argmax(bad))] if bad and max(bad) > -np.inf else []
    chosen = {(slots[k][1], slots[k][2]) for k in picks}
    new = []
    for g in range(n + 1):
      if ("gap", g) in chosen:
        new.append(int(np.argmax(gap_logp[b, g, :NONE])))
      if g < n:
        if ("token", g) in chosen:
          best = int(np.argmax(logp[b, g]))
          if best != NONE:
            new.append(best)
        else:
          new.append(int(row[g]))
    out.append(new)
  return out


def test_refine_changes_only_doubtful_tokens_into_the_likeliest():
  model = _model()
  tokens, mask = _batch(seed=3, batch=8, length=8)
  length = jnp.sum(mask, axis=1).astype(jnp.int32)
  cfg = sampling.SamplerConfig(max_len=8, refine_threshold=0.9)
  logp = np.asarray(sampling.leave_one_out(model, tokens, length, cfg))
  current = np.take_along_axis(logp, np.asarray(tokens)[..., None], axis=-1)[..., 0]
  doubtful = np.asarray(mask) & (current < np.log(0.9) + logp.max(axis=-1))
  assert doubtful.any()
  no = np.zeros(tokens.shape, bool)
  for parallel in (False, True):
    new, new_length, _ = sampling.refine(model, tokens, length,
                                         dataclasses.replace(cfg, refine_parallel=parallel))
    np.testing.assert_array_equal(new_length, length)  # replacements only
    diff = np.asarray(new) != np.asarray(tokens)
    assert not np.any(diff & ~doubtful)
    for b, i in zip(*np.nonzero(diff)):
      assert new[b, i] == np.argmax(logp[b, i])
    if parallel:
      assert not np.any(diff[:, 1:] & diff[:, :-1])  # no two adjacent
    else:
      assert np.all(diff.sum(axis=1) <= 1)
    want = _slow_refine(logp, None, np.asarray(tokens), length, no, 0.9, parallel)
    for b in range(8):
      assert list(np.asarray(new[b, :int(length[b])])) == want[b]
  # Nothing is doubtful at a threshold of ~0, and fixed tokens stay whatever the threshold.
  tiny = dataclasses.replace(cfg, refine_threshold=1e-30)
  np.testing.assert_array_equal(sampling.refine(model, tokens, length, tiny)[0], tokens)
  np.testing.assert_array_equal(sampling.refine(model, tokens, length, cfg, mask)[0], tokens)


def test_hole_open_states_leave_some_empty_gaps_open():
  tokens, mask = _batch(seed=4, batch=64)
  stats = scorers.ScoringStats(unigram_logprob=jnp.linspace(-1.0, -5.0, V))
  noise = losses.NoiseConfig(closed_prob=0.5, hole_prob=1.0, hole_open=1.0)
  noised, *_ = losses.draw_states(tokens, mask, jax.random.key(0), stats,
                                  scorers.ScorerConfig("unigram"), noise, NONE)
  targets, closed = np.asarray(noised.gap_targets), np.asarray(noised.closed)
  assert not np.any(closed & (targets != NONE))  # a hole (a missing token) is never closed
  open_empty = ~closed & (targets == NONE)
  assert open_empty.any() and (closed & (targets == NONE)).any()
  # Some states have no hole at all (nothing missing), but their gaps still ask.
  holes = np.sum((targets >= 0) & (targets != NONE), axis=1)
  assert np.any((holes == 0) & open_empty.any(axis=1) & np.asarray(mask).any(axis=1))


def test_leave_one_out_with_gaps_reads_the_whole_canvas_with_every_gap_open():
  model = _model()
  cfg = sampling.SamplerConfig(max_len=16, grow_canvas=True)
  tokens, mask = _batch(seed=5, batch=3, length=16)
  length = jnp.sum(mask, axis=1).astype(jnp.int32)
  plain = np.asarray(sampling.leave_one_out(model, tokens, length, cfg))
  token_logp, gap_logp = map(np.asarray, sampling.leave_one_out(model, tokens, length, cfg,
                                                                gaps=True))
  for b in range(3):
    n = int(length[b])
    # Token rows are the same distributions, except that none is allowed.
    np.testing.assert_allclose(
        token_logp[b, :n, :NONE] - np.logaddexp.reduce(token_logp[b, :n, :NONE], axis=-1,
                                                       keepdims=True),
        plain[b, :n, :NONE], atol=2e-5)
    logits = model(*losses.canvas_inputs(tokens[b:b + 1], length[b:b + 1]),
                   closed=jnp.zeros((1, 17), bool))[0, :n + 1]
    logits = logits.at[:, jnp.array([0, 1, 2, 3])].set(-jnp.inf)
    np.testing.assert_allclose(gap_logp[b, :n + 1], jax.nn.log_softmax(logits), atol=2e-5)


def test_refine_edits_delete_and_insert_like_the_slow_reference():
  model = _model()
  model.none_embed[...] = 4.0 * model.none_embed[...]  # some places are likelier empty
  tokens, mask = _batch(seed=6, batch=8, length=6)
  tokens = jnp.pad(tokens, ((0, 0), (0, 10)))  # room for every insertion
  mask = np.pad(np.asarray(mask), ((0, 0), (0, 10)))
  length = jnp.asarray(mask.sum(axis=1), jnp.int32)
  fixed = np.zeros((8, 16), bool)
  fixed[0, 1] = fixed[5, 0] = True
  fixed &= mask
  cfg = sampling.SamplerConfig(max_len=16, refine_threshold=0.5, refine_edits="all")
  logp, gap_logp = map(np.asarray, sampling.leave_one_out(model, tokens, length, cfg,
                                                          gaps=True))
  seen = set()
  for parallel in (False, True):
    new, new_length, new_fixed = sampling.refine(
        model, tokens, length, dataclasses.replace(cfg, refine_parallel=parallel),
        jnp.asarray(fixed))
    want = _slow_refine(logp, gap_logp, np.asarray(tokens), length, fixed, 0.5, parallel)
    for b in range(8):
      got = list(np.asarray(new[b, :int(new_length[b])]))
      assert got == want[b], (b, parallel)
      assert np.all(np.asarray(new[b, int(new_length[b]):]) == 0)
      # The fixed tokens are still there, in order, and still fixed.
      kept = list(np.asarray(tokens[b])[fixed[b]])
      assert list(np.asarray(new[b])[np.asarray(new_fixed[b])]) == kept
      seen.add(np.sign(int(new_length[b]) - int(length[b])))
  assert seen >= {-1, 1}, seen  # both deletions and insertions happened


def test_sampler_refine_rounds_add_one_call_each_and_keep_keywords():
  model = _model()
  base = sampling.SamplerConfig(max_len=16, max_steps=6, temperature=1.0, top_p=0.9,
                                grow_canvas=True)
  rng = jax.random.key(0)
  plain = sampling.sample(model, rng, base, batch_size=4)
  refined = sampling.sample(model, rng, dataclasses.replace(base, refine_steps=2,
                                                            refine_threshold=0.9), batch_size=4)
  np.testing.assert_array_equal(refined.calls, np.asarray(plain.calls) + 2)
  np.testing.assert_array_equal(refined.length, plain.length)
  np.testing.assert_array_equal(refined.drafts[-1], refined.tokens)
  assert np.any(np.asarray(refined.tokens) != np.asarray(plain.tokens))
  # Keywords are the start's own tokens: they stay where the insertions moved them.
  start = jnp.asarray(np.pad([[7, 9]] * 4, ((0, 0), (0, 14))), jnp.int32)
  cfg = dataclasses.replace(base, refine_steps=3, refine_threshold=0.9, refine_parallel=True)
  out = sampling.sample(model, rng, cfg, batch_size=4, start=start,
                        start_length=jnp.full((4,), 2, jnp.int32))
  for b in range(4):
    row = list(np.asarray(out.tokens[b, :int(out.length[b])]))
    assert 7 in row and 9 in row[row.index(7) + 1:]


def test_refine_needs_a_gap_state_model():
  model = model_lib.build("insertion", model_lib.ModelConfig(
      vocab_size=V, d_model=32, num_layers=1, num_heads=2, mlp_dim=64))
  cfg = sampling.SamplerConfig(max_len=8, max_steps=2, refine_steps=1)
  with pytest.raises(ValueError, match="gap_state"):
    sampling.sample(model, jax.random.key(0), cfg, batch_size=2)
  with pytest.raises(ValueError, match="refine_threshold"):
    sampling.SamplerConfig.from_config({"refine_threshold": 0.0})


@pytest.mark.slow
def test_records_of_rounds_past_max_steps():
  """Correction rounds after a sample that used every step: more calls than draft rows."""
  from semdiff import generation  # pylint: disable=g-import-not-at-top

  class Tokenizer:
    decode = staticmethod(lambda ids: " ".join(map(str, ids)))
    pieces = staticmethod(lambda ids: [str(i) for i in ids])

  cfg = sampling.SamplerConfig(max_len=16, max_steps=2, refine_steps=2, refine_threshold=0.9)
  out = sampling.sample(_model(), jax.random.key(0), cfg, batch_size=3)
  assert int(np.max(out.calls)) > out.drafts.shape[0] - 1
  texts = [Tokenizer.decode(list(np.asarray(out.tokens[i, :int(out.length[i])])))
           for i in range(3)]
  recs = generation.records(out, texts, Tokenizer)
  assert [r["calls"] for r in recs] == list(np.asarray(out.calls))
