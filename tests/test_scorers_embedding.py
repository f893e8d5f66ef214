"""Embedding scorers against slow references, and the fixed corpus table."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semdiff import noising
from semdiff import scorers
from semdiff.data import embedding_table
from semdiff.data import tokenizer as tokenizer_lib

V, D = 40, 6
TESTDATA = "tests/testdata/tiny_spm.model"


def _random_case(seed, batch=12, length=9, zero_rows=()):
  rng = np.random.default_rng(seed)
  table = rng.normal(size=(V, D)).astype(np.float32)
  table[list(zero_rows)] = 0.0
  idf = rng.uniform(0.5, 3.0, V).astype(np.float32)
  idf[:4] = 0.0
  word_start = rng.random(V) < 0.6
  lengths = rng.integers(0, length + 1, batch)
  lengths[0] = length
  tokens = np.where(np.arange(length)[None] < lengths[:, None],
                    rng.integers(4, V, (batch, length)), 0).astype(np.int32)
  mask = np.arange(length)[None] < lengths[:, None]
  stats = scorers.ScoringStats(embedding=jnp.asarray(table), idf=jnp.asarray(idf),
                               word_start=jnp.asarray(word_start))
  return tokens, mask, table, idf, word_start, stats


def _units(row, word_start):
  """Lists of positions, one per unit (word units when word_start is given)."""
  units = []
  for i, t in enumerate(row):
    if word_start is None or not units or word_start[t]:
      units.append([i])
    else:
      units[-1].append(i)
  return units


def _distance(a, b):
  na, nb = np.linalg.norm(a), np.linalg.norm(b)
  if na < 1e-6 and nb < 1e-6:
    return 0.0
  if na < 1e-6 or nb < 1e-6:
    return 1.0
  return 1.0 - float(a @ b) / (na * nb)


def _embed(row, positions, table, idf):
  """E = IDF-weighted mean (zero vector for nothing)."""
  w = np.array([idf[row[i]] for i in positions], np.float64)
  if not len(positions) or w.sum() == 0:
    return np.zeros(table.shape[1])
  return (w[:, None] * table[[row[i] for i in positions]]).sum(0) / w.sum()


def reference_loo(row, table, idf, word_start):
  units = _units(row, word_start)
  full = _embed(row, range(len(row)), table, idf)
  out = np.zeros(len(row))
  for u, pos in enumerate(units):
    rest = [i for v, p in enumerate(units) if v != u for i in p]
    out[pos] = _distance(full, _embed(row, rest, table, idf))
  return out


def reference_greedy(row, table, idf, word_start):
  units = _units(row, word_start)
  alive = list(range(len(units)))
  out = np.zeros(len(row))
  for step in range(len(units)):
    current = _embed(row, [i for u in alive for i in units[u]], table, idf)
    moves = [_distance(current, _embed(row, [i for v in alive if v != u for i in units[v]],
                                       table, idf)) for u in alive]
    u = alive[int(np.argmin(moves))]
    out[units[u]] = step
    alive.remove(u)
  return out


@pytest.mark.parametrize("word_level", [False, True])
@pytest.mark.parametrize("name, reference", [("embedding_loo", reference_loo),
                                             ("embedding_greedy", reference_greedy),
                                             ("model_embedding", reference_loo)])
def test_embedding_scorers_match_slow_references(name, reference, word_level):
  for seed in range(3):
    tokens, mask, table, idf, word_start, stats = _random_case(seed, zero_rows=(7,))
    ws = word_start if word_level else None
    units = scorers.make_units(jnp.asarray(tokens), jnp.asarray(mask),
                               stats.word_start if word_level else None)
    fn = jax.jit(scorers.get(name))
    got = np.asarray(fn(jnp.asarray(tokens), jnp.asarray(mask), units, jax.random.key(0), stats))
    for b in range(len(tokens)):
      n = int(mask[b].sum())
      want = reference(tokens[b, :n].tolist(), table, idf, ws)
      np.testing.assert_allclose(got[b, :n], want, atol=2e-5, err_msg=f"seed {seed} row {b}")


def test_greedy_deletes_a_repeated_word_first_and_the_outlier_last():
  # e(5) = x, e(9) = y: in "x x x y" removing an x moves E less than removing y, and so on
  # until {x, y}, where both moves are equal and the tie goes to the lower position.
  table = np.zeros((12, 2), np.float32)
  table[5] = [1.0, 0.0]
  table[9] = [0.0, 1.0]
  stats = scorers.ScoringStats(embedding=jnp.asarray(table), idf=None)
  tokens = jnp.asarray([[5, 5, 5, 9]], jnp.int32)
  mask = jnp.ones((1, 4), bool)
  units = scorers.make_units(tokens, mask, None)
  order = np.asarray(scorers.embedding_greedy(tokens, mask, units, None, stats))[0]
  np.testing.assert_array_equal(order, [0, 1, 2, 3])


def test_significance_and_trees_with_embedding_scorers_jit():
  tokens, mask, *_, stats = _random_case(4)
  for name in scorers.EMBEDDING_SCORERS:
    for word_level in (False, True):
      cfg = scorers.ScorerConfig(name, word_level=word_level)
      s = jax.jit(scorers.significance, static_argnames="config")(
          tokens, mask, jax.random.key(0), stats, config=cfg)
      s = np.asarray(s)
      for b in range(len(tokens)):
        n = int(mask[b].sum())
        assert sorted(s[b, :n].tolist()) == list(range(n))
      depth = noising.insertion_depth(jnp.asarray(s), jnp.asarray(mask))
      assert np.asarray(noising.tree_height(depth, jnp.asarray(mask))).max() <= tokens.shape[1]


def test_missing_table_and_bad_source_are_one_line_errors():
  tokens, mask, *_ = _random_case(0)
  units = scorers.make_units(jnp.asarray(tokens), jnp.asarray(mask), None)
  with pytest.raises(ValueError, match="embedding_source"):
    scorers.embedding_loo(tokens, mask, units, None, scorers.ScoringStats())
  with pytest.raises(ValueError, match="scorer.embedding_source must be"):
    scorers.ScorerConfig("embedding_loo", embedding_source="glove").validate()
  assert scorers.ScorerConfig("model_embedding").table_source == "model"
  assert scorers.ScorerConfig("embedding_greedy").table_source == "fixed"
  assert scorers.ScorerConfig("mix", mix_base="embedding_loo",
                              embedding_source="model").table_source == "model"
  assert scorers.ScorerConfig("unigram").table_source is None


def test_fixed_table_from_a_corpus_is_cached_and_deterministic(tmp_path):
  tok = tokenizer_lib.Tokenizer.load(TESTDATA)
  texts = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog"] * 20
  model_path = str(tmp_path / "spm.model")
  table, idf = embedding_table.get(model_path, tok, lambda: iter(texts), dim=8, window=2)
  assert table.shape == (tok.vocab_size, 8) and idf.shape == (tok.vocab_size,)
  assert (idf[:tokenizer_lib.NUM_SPECIALS] == 0).all()
  ids = tok.encode_batch(texts)
  df = np.bincount(np.concatenate([np.unique(x) for x in ids]), minlength=tok.vocab_size)
  seen = df > 0
  seen[:tokenizer_lib.NUM_SPECIALS] = False
  np.testing.assert_allclose(idf[seen], np.log(61 / (1 + df[seen])) + 1, rtol=1e-6)
  assert (np.abs(table[seen]).sum(1) > 0.1).all() and np.abs(table[~seen]).max() < 1e-5
  again, _ = embedding_table.get(model_path, tok, lambda: iter(()), dim=8, window=2)
  np.testing.assert_array_equal(table, again)  # read from the cache, not recomputed
  other, _ = embedding_table.get(model_path, tok, lambda: iter(texts), dim=4, window=2)
  assert other.shape == (tok.vocab_size, 4)  # other settings recompute


def test_model_embedding_trains_a_step_on_the_snapshot_of_the_models_table(tmp_path):
  from semdiff import config_files, sharding, train  # pylint: disable=g-import-not-at-top
  from semdiff.data import pipeline  # pylint: disable=g-import-not-at-top

  # A copy of the test tokenizer: the IDF weights get cached beside it.
  for suffix in (".model", ".counts.npy"):
    shutil.copy(TESTDATA.replace(".model", suffix), tmp_path / f"spm{suffix}")
  config = config_files.load(variant="tiny", overrides={
      "scorer.name": "model_embedding", "data.tokenizer_path": str(tmp_path / "spm.model"),
      "data.tokenizer_sentences": 200})
  exp = train.build_experiment(config, str(tmp_path))  # the default 8-device mesh
  assert exp.stats.embedding is None and exp.stats.idf is not None
  state = train.init_state(exp)
  stats = train.model_stats(exp, state["params"])
  np.testing.assert_array_equal(
      np.asarray(stats.embedding), np.asarray(state["params"]["backbone"]["embed"][...]))
  batch = sharding.global_batch(next(pipeline.train_iterator(config, exp.tokenizer)), exp.mesh)
  state, metrics = train.make_train_step(exp)(state, batch, stats)
  assert np.isfinite(float(metrics["loss"]))
  assert np.isfinite(np.asarray(stats.embedding)).all()  # the snapshot outlives the donation
