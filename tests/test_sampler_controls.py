"""Sampler controls: conditioning, stopping rules, creativity, per-example randomness.

Stub models with known choices and a known embedding table check the rules exactly; a tiny
untrained model (it wants to insert almost everywhere) stresses the constraints.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from semdiff import model as model_lib
from semdiff import sampling
from semdiff.data.tokenizer import UNK_ID

V = 30  # vocabulary of the stubs and the tiny model; none_id = V


class Stub:
  """``choose(canvas [B, C], length [B], gaps [G]) -> (token [B, G], logp [B, G])``.

  The chosen id gets log-probability ``logp``, the others share the rest; ``table`` is the
  token embedding the sampler's sentence embedding reads.
  """

  none_id = V

  def __init__(self, choose, table):
    self.choose, self.table = choose, jnp.asarray(table, jnp.float32)

  def token_embedding(self):
    return self.table

  def __call__(self, tokens, segment_ids, positions):
    del positions
    length = jnp.sum(segment_ids > 0, axis=1) - 2  # [BOS] canvas [EOS]
    token, logp = self.choose(tokens[:, 1:-1], length, jnp.arange(tokens.shape[1] - 1))
    rest = jnp.log1p(-jnp.exp(logp)) - jnp.log(V)
    onehot = jax.nn.one_hot(token, V + 1, dtype=bool)
    return jnp.where(onehot, logp[..., None], rest[..., None])


def _basis_table(dim=4):
  table = np.zeros((V, dim), np.float32)
  for t in range(4, V):
    table[t, t % dim] = 1.0
  return table


def _run(model, cfg, batch=2, rng=None, **kwargs):
  rng = jax.random.key(0) if rng is None else rng
  run = jax.jit(functools.partial(sampling.sample, model, cfg=cfg, batch_size=batch))
  return jax.tree.map(np.asarray, run(rng, **kwargs))


@functools.lru_cache(maxsize=None)
def _tiny_model():
  model = model_lib.build("insertion", model_lib.ModelConfig(
      vocab_size=V, d_model=32, num_layers=1, num_heads=2, mlp_dim=64), seed=1)
  return nnx.split(model, nnx.Param)


@functools.lru_cache(maxsize=None)
def _compiled(cfg, batch):
  """The tiny model's sampler; tests that share (cfg, batch) share one compile."""
  return sampling.make_sampler(_tiny_model()[0], cfg, batch)


def _sample_tiny(cfg, batch, rng, *args):
  return jax.tree.map(np.asarray, _compiled(cfg, batch)(_tiny_model()[1], rng, *args))


# Settings most tiny-model tests share (one compile for all of them).
FREE = sampling.SamplerConfig(temperature=1.0, max_steps=6, max_len=24)
# Every control at once: creativity cap, semantic stop, top-k and top-p.
CONTROLLED = dataclasses.replace(FREE, top_p=0.9, top_k=12, delta=0.3, epsilon=0.01)


def _is_subsequence(small, big):
  it = iter(big)
  return all(any(x == y for y in it) for x in small)


def _replay(samples, b):
  """Rebuilds each draft from the previous one and the recorded insertions."""
  for k in range(1, samples.drafts.shape[0]):
    prev = samples.drafts[k - 1, b, :samples.draft_length[k - 1, b]].tolist()
    ins = samples.inserted[k, b]
    rebuilt = []
    for g in range(len(prev) + 1):
      if ins[g] >= 0:
        rebuilt.append(int(ins[g]))
      if g < len(prev):
        rebuilt.append(prev[g])
    assert (ins[len(prev) + 1:] < 0).all()
    n = samples.draft_length[k, b]
    assert rebuilt == samples.drafts[k, b, :n].tolist(), (k, b)
    probs = samples.inserted_prob[k, b]
    assert ((probs > 0) == (ins >= 0)).all() and (probs <= 1).all()


# Prepends 7 to whatever is there, after a first 8: E turns from e(8) toward e(7) in ever
# smaller steps (1, 0.29, 0.051, 0.010, ...), so each epsilon stops at a known step.
def _prepend(canvas, length, gaps):
  token = jnp.where(length[:, None] == 0, 8, 7)
  token = jnp.where(gaps[None] == 0, token, V)
  return token, jnp.full(token.shape, -0.01)


def test_epsilon_stops_exactly_after_the_first_small_step():
  table = _basis_table()
  model = Stub(_prepend, table)
  free = _run(model, sampling.SamplerConfig(temperature=0.0, max_steps=10, max_len=16))
  moves = free.moved[1:, 0]
  e7, e8 = table[7], table[8]
  for k, m in enumerate(moves, start=1):  # draft k holds one 8 and k - 1 sevens
    prev = (k - 2) * e7 + e8 if k > 1 else None
    now = (k - 1) * e7 + e8
    want = 1.0 if prev is None else 1 - prev @ now / np.linalg.norm(prev) / np.linalg.norm(now)
    np.testing.assert_allclose(m, want, atol=1e-6)
  assert (np.diff(moves) < 0).all()
  assert free.length[0] == 10  # epsilon off: only the step cap stops it
  for epsilon in (0.005, 0.2):
    out = _run(model, sampling.SamplerConfig(temperature=0.0, max_steps=10, max_len=16,
                                             epsilon=epsilon))
    stop = int(np.argmax(moves < epsilon)) + 1  # the first step that moved less than epsilon
    np.testing.assert_array_equal(out.length, [stop, stop])
    np.testing.assert_array_equal(out.calls, [stop, stop])


def test_tau_stops_when_no_gap_passes_and_only_then():
  # Gap 0 has p = 0.6 while the canvas is shorter than 3 tokens, then p = 0.2.
  def choose(canvas, length, gaps):
    p = jnp.where(length[:, None] < 3, 0.6, 0.2)
    p = jnp.where(gaps[None] == 0, p, 0.1)
    return jnp.full(p.shape, 7), jnp.log(p)

  model = Stub(choose, _basis_table())
  # tau 0.5: gap 0 passes until the canvas holds 3 tokens, then no gap does (the 4th call);
  # tau 0.15: gap 0 always passes, so only the step cap stops it. (All-none and the caps:
  # tests/test_sampling.py.)
  for tau, length, calls in ((0.5, 3, 4), (0.15, 12, 12)):
    out = _run(model, sampling.SamplerConfig(temperature=0.0, tau=tau, max_steps=12,
                                             max_len=40))
    np.testing.assert_array_equal(out.length, [length, length])
    np.testing.assert_array_equal(out.calls, [calls, calls])


def test_delta_zero_inserts_nothing_after_the_keywords():
  words = {"fox": [11, 12], "dog": [13]}
  cond = sampling.conditioning(lambda w: words[w], 24, 4, keywords="fox dog")
  out = _sample_tiny(dataclasses.replace(FREE, delta=0.0), 4, jax.random.key(0), *cond)
  np.testing.assert_array_equal(out.length, [3] * 4)
  np.testing.assert_array_equal(out.tokens[:, :3], [[11, 12, 13]] * 4)
  np.testing.assert_array_equal(out.calls, [1] * 4)
  free = _sample_tiny(FREE, 4, jax.random.key(0), *cond)
  assert (free.length > 3).all()


def test_delta_bounds_every_step():
  cond = sampling.conditioning(lambda w: [int(w)], 24, 4, keywords="5 9")
  off = _sample_tiny(FREE, 4, jax.random.key(3), *cond)
  out = _sample_tiny(CONTROLLED, 4, _keys(3, 4), *cond)
  assert (out.moved[1:] <= CONTROLLED.delta + 1e-6).all()
  assert (off.moved[1:] > CONTROLLED.delta).any()  # not vacuous
  for b in range(4):
    _replay(out, b)
  assert (out.length > 2).any()  # ... and it still grows


def test_keywords_always_appear_in_order():
  ids = {"a": [5], "b": [6, 7], "c": [8]}
  for seed, keywords in enumerate(["a b c", "c a", "b b a", "c"]):
    cond = sampling.conditioning(lambda w: ids[w], 24, 4, keywords=keywords)
    out = _sample_tiny(FREE, 4, jax.random.key(seed), *cond)
    want = [i for w in keywords.split() for i in ids[w]]
    assert (out.length > len(want)).all()
    for b in range(4):
      for k in range(out.drafts.shape[0]):
        assert _is_subsequence(want, out.drafts[k, b, :out.draft_length[k, b]].tolist())


def test_prompt_is_never_changed_and_only_followed():
  encode = lambda text: [UNK_ID] * len(text.split())  # the model never inserts unk
  cond = sampling.conditioning(encode, 24, 4, prompt="once upon a", keywords="x")
  np.testing.assert_array_equal(np.asarray(cond.open_gaps[0, :5]), [0, 0, 0, 1, 1])
  out = _sample_tiny(FREE, 4, jax.random.key(0), *cond)
  assert (out.length > 4).all()
  for b in range(4):
    for k in range(out.drafts.shape[0]):
      np.testing.assert_array_equal(out.drafts[k, b, :3], [UNK_ID] * 3)
    assert (out.inserted[:, b, :3] < 0).all()  # gaps 0..2: before and inside the prompt


def test_infilling_inserts_only_at_the_marked_gaps():
  encode = lambda text: [UNK_ID] * len(text.split())  # template words are unk, never sampled
  cond = sampling.conditioning(encode, 24, 4, infill="the ___ old cat ___")
  np.testing.assert_array_equal(np.asarray(cond.start_length), [3] * 4)
  np.testing.assert_array_equal(np.asarray(cond.open_gaps[0, :5]), [0, 1, 0, 1, 0])
  out = _sample_tiny(FREE, 4, jax.random.key(0), *cond)
  for b in range(4):
    row = out.tokens[b, :out.length[b]].tolist()
    fixed = [i for i, t in enumerate(row) if t == UNK_ID]
    assert len(fixed) == 3 and fixed[0] == 0 and fixed[2] == fixed[1] + 1, row
    assert fixed[1] > 1 and fixed[2] < len(row) - 1, row  # both gaps grew
    _replay(out, b)


def test_update_open_gaps_matches_a_python_reference():
  rng = np.random.default_rng(0)
  batch, gaps = 5, 9
  open_gaps = rng.random((batch, gaps)) < 0.5
  do_insert = open_gaps & (rng.random((batch, gaps)) < 0.5)
  do_insert[:, -3:] = False  # the result must fit in the same width
  got = np.asarray(sampling.update_open_gaps(jnp.asarray(open_gaps), jnp.asarray(do_insert)))
  for b in range(batch):
    want = []
    for g in range(gaps):
      want += [open_gaps[b, g], True] if do_insert[b, g] else [open_gaps[b, g]]
    np.testing.assert_array_equal(got[b, :min(len(want), gaps)], want[:gaps])


def _keys(seed, batch):
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(batch))


def test_batch_of_one_and_batched_sampling_agree_for_the_same_keys():
  keys = _keys(42, 4)
  cfg = CONTROLLED
  cond = sampling.conditioning(lambda w: [int(w)], 24, 4, keywords="5 9")
  batched = _sample_tiny(cfg, 4, keys, *cond)
  for b in range(4):
    single = _sample_tiny(cfg, 1, keys[b:b + 1], *(x[b:b + 1] for x in cond))
    np.testing.assert_array_equal(single.tokens[0], batched.tokens[b])
    np.testing.assert_array_equal(single.calls[0], batched.calls[b])
    np.testing.assert_array_equal(single.drafts[:, 0], batched.drafts[:, b])
  assert len({tuple(r) for r in batched.tokens.tolist()}) > 1  # the keys differ
  # One key stands for fold_in(key, b) per example.
  np.testing.assert_array_equal(jax.random.key_data(sampling._example_keys(jax.random.key(42), 4)),
                                jax.random.key_data(keys))


def test_conditioning_errors_are_one_line():
  with pytest.raises(ValueError, match="has no gap: mark each gap with ___"):
    sampling.conditioning(str.split, 10, 1, infill="the cat")
  with pytest.raises(ValueError, match="drop the keywords"):
    sampling.conditioning(str.split, 10, 1, infill="the ___", keywords="x")
  with pytest.raises(ValueError, match="sampler.embedding_source must be"):
    sampling.SamplerConfig.from_config({"embedding_source": "glove"})
  with pytest.raises(ValueError, match="pass embedding="):
    sampling.sample(Stub(_prepend, _basis_table()), jax.random.key(0),
                    sampling.SamplerConfig(epsilon=0.1, embedding_source="fixed"), batch_size=1)


def test_generate_from_an_experiment(tmp_path):
  import semdiff  # pylint: disable=g-import-not-at-top
  from semdiff import config_files, generation, train  # pylint: disable=g-import-not-at-top

  assert semdiff.generate is generation.generate  # exported lazily
  exp = train.build_experiment(config_files.load(variant="tiny"), str(tmp_path))
  params = jax.device_get(train.init_state(exp))["params"]
  out = semdiff.generate(exp, params, keywords="the dog", num=2, seed=5, max_steps=4,
                         delta=0.6, temperature=1.0)
  assert (tmp_path / "tokenizer" / "spm.embedding.npz").exists()  # IDF weights, cached
  want = exp.tokenizer.encode("the") + exp.tokenizer.encode("dog")
  for i, rec in enumerate(out.records):
    assert _is_subsequence(want, out.samples.tokens[i, :rec["length"]].tolist())
    assert rec["text"] == out.texts[i] and rec["drafts"][0] == "the dog"
    assert len(rec["steps"]) == rec["calls"]
    for step in rec["steps"]:
      assert len(step["inserted"]) == len(step["probs"]) and step["moved"] <= 0.6 + 1e-6
  with pytest.raises(ValueError, match="Unknown sampler setting.*bogus"):
    semdiff.generate(exp, params, bogus=1)
