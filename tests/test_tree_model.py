"""The tree model: all levels in one pass, exactly the level-by-level process."""

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
from semdiff.data.tokenizer import BOS_ID, EOS_ID, PAD_ID

V = 40
NONE = V


def _batch(seed=0, batch=6, length=10):
  rng = np.random.default_rng(seed)
  lengths = np.concatenate([[0, 1, length], rng.integers(0, length + 1, batch - 3)])
  mask = np.arange(length)[None] < lengths[:, None]
  tokens = np.where(mask, rng.integers(4, V, (batch, length)), 0).astype(np.int32)
  scores = rng.normal(size=(batch, length))
  return tokens, mask, scores


def _tree(tokens, mask, scores):
  ancestor = noising.ancestors(jnp.asarray(scores), jnp.asarray(mask))
  depth = noising.depth_from_ancestors(ancestor, jnp.asarray(mask))
  child, root = noising.children(ancestor, depth, jnp.asarray(mask))
  inputs, targets = losses.tree_inputs(jnp.asarray(tokens), jnp.asarray(mask), depth, child,
                                       root, NONE)
  return np.asarray(depth), inputs, np.asarray(targets)


def _model(seed=0):
  model = model_lib.build("tree", model_lib.ModelConfig(
      vocab_size=V, d_model=32, num_layers=2, num_heads=4, mlp_dim=64), seed=seed)
  # Non-zero distance biases, so that a wrong distance would show.
  model.rel_bias[...] = jax.random.normal(jax.random.key(seed + 1), model.rel_bias.shape)
  return model


def _level_canvas(tokens_b, depth_b, h):
  """The level-h canvas of one example: ([1, L+2] model inputs, canvas positions)."""
  length = tokens_b.shape[0]
  keep = np.flatnonzero(depth_b < h)
  n = len(keep)
  canvas = np.full((1, length), PAD_ID, np.int32)
  canvas[0, :n] = tokens_b[keep]
  tok, seg, _ = losses.canvas_inputs(jnp.asarray(canvas), jnp.asarray([n]))
  times = np.zeros((1, length + 2), np.int32)
  times[0, 0], times[0, n + 1] = -1, -1
  times[0, 1:n + 1] = depth_b[keep]
  return (tok, seg, jnp.asarray(times)), keep


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_children_are_the_level_gap_targets(seed):
  tokens, mask, scores = _batch(seed)
  depth, (_, _, times), targets = _tree(tokens, mask, scores)
  times = np.asarray(times)
  height = np.asarray(noising.tree_height(jnp.asarray(depth), jnp.asarray(mask)))
  for b in range(tokens.shape[0]):
    n = int(mask[b].sum())
    for h in range(height[b] + 1):
      _, gap_targets = noising.noise_to_level(tokens[b:b + 1], depth[b:b + 1],
                                              jnp.asarray([h]), pad_id=PAD_ID, none_id=NONE)
      keep = np.flatnonzero(depth[b] < h)
      canvas_pos = [0] + [k + 1 for k in keep] + [n + 1]  # BOS, kept tokens, EOS
      for g in range(len(canvas_pos) - 1):
        a, c = canvas_pos[g], canvas_pos[g + 1]
        owner, side = (c, 0) if times[b, c] > times[b, a] else (a, 1)
        expected = int(gap_targets[0, g])
        if times[b, owner] == h - 1:  # an open gap: its owner was inserted last step
          assert targets[b, owner, side] == expected, (b, h, g)
        else:  # a gap closed earlier holds nothing
          assert expected == NONE, (b, h, g)
    # 2n + 1 predictions: n tokens and n + 1 nones.
    valid = targets[b] >= 0
    assert valid.sum() == 2 * n + 1
    assert (targets[b][valid] == NONE).sum() == n + 1


def test_one_pass_equals_every_level_canvas():
  tokens, mask, scores = _batch(3)
  depth, inputs, _ = _tree(tokens, mask, scores)
  model = _model()
  full = np.asarray(model(*inputs))
  height = np.asarray(noising.tree_height(jnp.asarray(depth), jnp.asarray(mask)))
  for b in range(tokens.shape[0]):
    for h in range(height[b] + 1):
      level_inputs, keep = _level_canvas(tokens[b], depth[b], h)
      part = np.asarray(model(*level_inputs))
      for j, k in enumerate(keep):  # every token of the draft: the same hidden state
        np.testing.assert_allclose(part[0, j + 1], full[b, k + 1], rtol=1e-4, atol=1e-4)
      np.testing.assert_allclose(part[0, 0], full[b, 0], rtol=1e-4, atol=1e-4)  # BOS


@pytest.mark.slow
def test_packed_and_unpacked_tree_losses_agree():
  tokens, mask, _ = _batch(4, batch=12, length=12)
  model = _model()
  stats = scorers.ScoringStats(unigram_logprob=jnp.linspace(-1.0, -5.0, V))
  cfg = scorers.ScorerConfig("unigram")
  plain = losses.NoiseConfig()
  packed = dataclasses.replace(plain, causal_pack_rows=10)
  rng = jax.random.key(0)
  loss_a, m_a = losses.tree_loss(model, jnp.asarray(tokens), jnp.asarray(mask), rng, stats, cfg,
                                 plain)
  loss_b, m_b = losses.tree_loss(model, jnp.asarray(tokens), jnp.asarray(mask), rng, stats, cfg,
                                 packed)
  assert float(m_b["dropped_states"]) == 0
  np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-5)
  np.testing.assert_allclose(float(m_a["nll_bound_sum"]), float(m_b["nll_bound_sum"]), rtol=1e-5)
  for key in ("gap_count", "nll_bound_sentences", "nll_bound_tokens"):
    assert float(m_a[key]) == float(m_b[key]), key
  assert float(m_b["computed_positions"]) < float(m_a["computed_positions"])


def _times_of(samples, b):
  """Each final token's insertion step, replayed from the recorded insertions."""
  times = []
  for step in range(1, samples.inserted.shape[0]):
    row = np.asarray(samples.inserted[step, b])
    if (row < 0).all():
      continue
    new = []
    for g in range(len(times) + 1):
      if row[g] >= 0:
        new.append(step - 1)
      if g < len(times):
        new.append(times[g])
    times = new
  return np.asarray(times, np.int32)


class _Stopping:
  """A tree model whose ``none`` has probability 0.6 in every gap: a subcritical branching
  process, so random samples end before the cap."""

  def __init__(self, model):
    self.model, self.none_id = model, model.none_id

  def _stop(self, logits):
    rest = jax.nn.logsumexp(logits[..., :self.none_id], axis=-1)
    return logits.at[..., self.none_id].set(rest + jnp.log(1.5))

  def __call__(self, *inputs):
    return self._stop(self.model(*inputs))

  def gap_logits(self, tokens, segment_ids, times):
    return self._stop(self.model.gap_logits(tokens, segment_ids, times))


@pytest.mark.slow
def test_sampler_log_prob_is_the_teacher_forced_path():
  model = _Stopping(_model(5))
  cfg = sampling.SamplerConfig(max_steps=24, max_len=24)
  samples = jax.device_get(sampling.sample_tree(model, jax.random.key(0), cfg, batch_size=8))
  checked = 0
  for b in range(8):
    n = int(samples.length[b])
    times = _times_of(samples, b)
    assert len(times) == n
    if n == cfg.max_len:
      continue
    # One call per step until no gap is open: the height, plus the all-none step.
    assert int(samples.calls[b]) == (times.max() + 2 if n else 1)
    checked += n > 1
    tok = np.concatenate([[BOS_ID], samples.tokens[b, :n], [EOS_ID]])[None]
    t = np.concatenate([[-1], times, [-1]])[None]
    logits = model(jnp.asarray(tok), jnp.ones_like(jnp.asarray(tok)), jnp.asarray(t))
    logp = np.asarray(jax.nn.log_softmax(
        jnp.where(jnp.zeros((V + 1,), bool).at[jnp.array([0, 1, 2, 3])].set(True), -jnp.inf,
                  logits), axis=-1))
    # Rebuild the targets of that path: each token's children are the tokens it owns.
    total = 0.0
    for i in range(n + 1):  # BOS's right child and every token's two children
      for side in ((1,) if i == 0 else (0, 1)):
        total += logp[0, i, side, _child(tok[0], t[0], i, side)]
    np.testing.assert_allclose(float(samples.inserted_logprob[b]), total, rtol=1e-4, atol=1e-4)
  assert checked >= 3


def _child(tok, times, i, side):
  """The token the sampler put into ``i``'s gap on ``side`` (NONE if it stayed empty)."""
  step = -1 if i == 0 else times[i]
  direction = -1 if side == 0 else 1
  j = i + direction
  # The child is the first token on that side inserted right after i, before any
  # token of i's time or earlier closes the gap.
  while 0 < j < len(tok) - 1 and times[j] > step:
    if times[j] == step + 1:
      return int(tok[j])
    j += direction
  return NONE


def test_growing_canvas_windows_give_the_same_tree_samples():
  model = _model(7)
  full, grown = (jax.device_get(sampling.sample_tree(
      model, jax.random.key(2), sampling.SamplerConfig(max_steps=12, max_len=20,
                                                      grow_canvas=grow), batch_size=6))
      for grow in (False, True))
  assert full.length.max() > 16  # windows 8, 16, 20: all used
  for field in ("tokens", "length", "calls", "drafts"):
    np.testing.assert_array_equal(getattr(grown, field), getattr(full, field), err_msg=field)
  np.testing.assert_allclose(grown.inserted_logprob, full.inserted_logprob, rtol=1e-5,
                             atol=1e-4)


def test_sampler_is_per_example_and_rejects_unsupported_controls():
  model = _model(6)
  cfg = sampling.SamplerConfig(max_steps=10, max_len=10)
  keys = jax.vmap(lambda b: jax.random.fold_in(jax.random.key(9), b))(jnp.arange(4))
  batched = sampling.sample_tree(model, keys, cfg, batch_size=4)
  for b in range(4):
    one = sampling.sample_tree(model, keys[b:b + 1], cfg, batch_size=1)
    np.testing.assert_array_equal(np.asarray(one.tokens[0]), np.asarray(batched.tokens[b]))
  with pytest.raises(ValueError, match="sampler.confidence=0.5 is not available"):
    sampling.sample_tree(model, jax.random.key(0), sampling.SamplerConfig(confidence=0.5),
                         batch_size=1)


def test_separate_stop_filter_keeps_the_none_probability():
  # One gap with p(none) = 0.5 and a flat tail of tokens: joint top-p 0.5 keeps none alone
  # and always stops; separate stops with the model's 0.5.
  logits = jnp.log(jnp.concatenate([jnp.full((1, 1, V), 0.5 / V), jnp.full((1, 1, 1), 0.5)],
                                   axis=-1))
  logits = jnp.broadcast_to(logits, (2000, 1, V + 1))
  keys = jax.vmap(lambda b: jax.random.fold_in(jax.random.key(0), b))(jnp.arange(2000))
  joint = sampling.SamplerConfig(top_p=0.5)
  separate = dataclasses.replace(joint, stop_filter="separate")
  stop_joint = float(jnp.mean(sampling._choose(logits, keys, joint) == V))
  stop_separate = float(jnp.mean(sampling._choose(logits, keys, separate) == V))
  assert stop_joint == 1.0  # none alone fills the nucleus
  assert abs(stop_separate - 0.5) < 0.05


# ---- the slot model -------------------------------------------------------------------------


def _slot_model(seed=0):
  model = model_lib.build("slot", model_lib.ModelConfig(
      vocab_size=V, d_model=32, num_layers=2, num_heads=4, mlp_dim=64), seed=seed)
  model.rel_bias[...] = jax.random.normal(jax.random.key(seed + 1), model.rel_bias.shape)
  return model


@pytest.mark.parametrize("order", ["level", "random", "sequential"])
def test_slot_one_pass_equals_every_draft_the_sampler_sees(order):
  """Each slot's logits in the training pass are those the sampler computes for its gap
  in the draft the slot decides in (the tokens inserted before its decision time)."""
  tokens, mask, scores = _batch(7, batch=4, length=8)
  jmask = jnp.asarray(mask)
  ancestor = noising.ancestors(jnp.asarray(scores), jmask)
  depth = noising.depth_from_ancestors(ancestor, jmask)
  child, root = noising.children(ancestor, depth, jmask)
  times, slot_times, root_time = losses.slot_schedule(
      ancestor, depth, jmask, child, jax.random.key(2), jnp.full((4,), order == "random"),
      sequential=order == "sequential")
  model = _slot_model()
  inputs, targets = losses.slot_inputs(jnp.asarray(tokens), jmask, depth, child, root, times,
                                       slot_times, root_time, model.slot_id, NONE)
  full = np.asarray(model(*inputs))
  targets = np.asarray(targets)
  times, slot_times = np.asarray(times), np.asarray(slot_times)
  checked = 0
  for b in range(4):
    n = int(mask[b].sum())
    # (training position, decision time, owner index, side) of every slot of the sentence.
    slots = [(1, int(root_time[b]), -1, 1)]
    for k in range(n):
      slots += [(2 + 3 * k, int(slot_times[b, k, 0]), k, 0),
                (4 + 3 * k, int(slot_times[b, k, 1]), k, 1)]
    for position, now, owner, side in slots:
      present = np.flatnonzero((times[b] < now) & mask[b])
      cap = 8
      canvas = np.full((1, cap), PAD_ID, np.int32)
      canvas[0, :len(present)] = tokens[b, present]
      ctimes = np.zeros((1, cap), np.int32)
      ctimes[0, :len(present)] = times[b, present]
      inp = sampling.slot_canvas_inputs(jnp.asarray(canvas), jnp.asarray(ctimes),
                                        jnp.asarray([len(present)]), now, model.slot_id)
      part = np.asarray(model(*inp))
      # The gap of this slot in the draft: after the present tokens left of the owner's side.
      if owner < 0:
        g = 0
      else:
        g = int(np.sum(present < owner)) + side
      np.testing.assert_allclose(part[0, 1 + 2 * g], full[b, position], rtol=2e-4, atol=2e-4)
      assert targets[b, position] >= 0
      checked += 1
    if order == "sequential":
      _check_sequential_schedule(slots, times[b, :n], np.asarray(depth)[b, :n])
  assert checked > 10


def _check_sequential_schedule(slots, times, depth):
  """Slot of a depth-d owner, in gap g of the level-d canvas: one decision at a time, seeing
  the level-d canvas and the depth-(d + 1) tokens of the gaps left of g."""
  assert len({s[1] for s in slots}) == len(slots)
  n = len(depth)
  gap_of = lambda k, d: sum(depth[j] <= d for j in range(k))  # k's gap in the level-d canvas
  for position, now, owner, side in slots:
    d = -1 if owner < 0 else depth[owner]
    g = 0 if owner < 0 else gap_of(owner, d) + side
    expected = {k for k in range(n) if depth[k] <= d or (depth[k] == d + 1 and gap_of(k, d) < g)}
    assert set(np.flatnonzero(times < now)) == expected, (position, owner, side)
