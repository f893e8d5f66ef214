"""Scorer registry, tie-breaking and word-level grouping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semdiff import noising
from semdiff import scorers

# A toy vocabulary: id -> (piece, word start?, log p).
PIECES = ["<pad>", "<s>", "</s>", "<unk>", "▁the", "▁a", "▁fox", "▁jump", "s", "▁dog", "▁lazy",
          "▁over"]
WORD_START = jnp.array([False, True, True, True, True, True, True, True, False, True, True,
                        True])
LOGP = jnp.log(jnp.array([1, 1, 1, 1, 40, 30, 2, 3, 10, 2, 1, 8], jnp.float32) / 100)
STATS = scorers.ScoringStats(unigram_logprob=LOGP, word_start=WORD_START)


def encode(words):
  return [PIECES.index(w) for w in words]


def pad(rows, length=12):
  tokens = np.zeros((len(rows), length), np.int32)
  mask = np.zeros((len(rows), length), bool)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
    mask[i, :len(r)] = True
  return tokens, mask


def test_unknown_scorer_lists_choices():
  with pytest.raises(ValueError, match="Unknown scorer 'bogus'.*unigram"):
    scorers.ScorerConfig(name="bogus").validate()
  with pytest.raises(ValueError, match="Unknown scorer"):
    scorers.ScorerConfig(name="mix", mix_base="nope").validate()


def test_unigram_deletes_function_words_first():
  tokens, mask = pad([encode(["▁a", "▁fox", "▁jump", "s", "▁over", "▁the", "▁lazy", "▁dog"])])
  s = scorers.significance(tokens, mask, jax.random.key(0), STATS,
                           scorers.ScorerConfig("unigram"))
  s = np.asarray(s)[0, :8]
  assert sorted(s.tolist()) == list(range(8))  # distinct ranks
  assert s[5] < s[6] and s[0] < s[1]  # "the" < "lazy", "a" < "fox"
  assert np.all(np.asarray(scorers.significance(tokens, mask, jax.random.key(0), STATS,
                                                scorers.ScorerConfig("unigram")))[0, 8:] == -1)


def test_ties_broken_per_example_not_per_batch_slot():
  row = encode(["▁the", "▁dog", "▁the", "▁dog", "▁the"])
  other = encode(["▁a", "▁fox"])
  cfg = scorers.ScorerConfig("unigram")
  t1, m1 = pad([row, other])
  t2, m2 = pad([other, other, row])
  s1 = np.asarray(scorers.significance(t1, m1, jax.random.key(0), STATS, cfg))[0]
  s2 = np.asarray(scorers.significance(t2, m2, jax.random.key(7), STATS, cfg))[2]
  np.testing.assert_array_equal(s1, s2)


def test_word_level_pieces_share_word_and_first_piece_leads():
  words = ["▁fox", "▁jump", "s", "▁over", "▁the", "▁dog"]
  tokens, mask = pad([encode(words)])
  cfg = scorers.ScorerConfig("unigram", word_level=True)
  s = np.asarray(scorers.significance(tokens, mask, jax.random.key(0), STATS, cfg))[0, :6]
  # "jump"+"s" is one word: adjacent ranks, first piece higher.
  assert s[1] == s[2] + 1
  depth = np.asarray(noising.insertion_depth(s[None], mask[:, :6]))[0]
  assert depth[2] > depth[1]  # "s" comes in after "jump"
  # Word surprisal is the sum of the pieces': "jumps" is rarer than "over".
  assert s[1] > s[3]


def test_word_level_positional_scorers_count_words():
  # left_to_right at word level: height = number of pieces (each piece its own step),
  # balanced at word level: words form a balanced tree.
  words = ["▁fox", "▁jump", "s", "▁over", "▁the", "▁lazy", "▁dog"]
  tokens, mask = pad([encode(words)])
  cfg = scorers.ScorerConfig("balanced", word_level=True)
  s = scorers.significance(tokens, mask, jax.random.key(0), STATS, cfg)
  depth = np.asarray(noising.insertion_depth(s, mask))[0, :7]
  # 6 words: "the" (word 3) is the root, "jumps" and "dog" (words 1, 5) its children;
  # "s" hangs one below "jump".
  assert depth[4] == 0 and depth[1] == 1 and depth[6] == 1
  assert depth[2] == depth[1] + 1


def test_random_scorer_uses_rng_and_mix_interpolates():
  tokens, mask = pad([encode(["▁a", "▁fox", "▁jump", "▁over", "▁the", "▁lazy", "▁dog"])] * 2)
  cfg = scorers.ScorerConfig("random")
  a = scorers.significance(tokens, mask, jax.random.key(0), STATS, cfg)
  b = scorers.significance(tokens, mask, jax.random.key(1), STATS, cfg)
  assert not np.array_equal(np.asarray(a), np.asarray(b))
  uni = scorers.significance(tokens, mask, jax.random.key(0), STATS, scorers.ScorerConfig(
      "unigram"))
  bal = scorers.significance(tokens, mask, jax.random.key(0), STATS, scorers.ScorerConfig(
      "balanced"))
  mix0 = scorers.significance(tokens, mask, jax.random.key(0), STATS, scorers.ScorerConfig(
      "mix", mix_base="unigram", mix_weight=0.0))
  mix1 = scorers.significance(tokens, mask, jax.random.key(0), STATS, scorers.ScorerConfig(
      "mix", mix_base="unigram", mix_weight=1.0))
  np.testing.assert_array_equal(np.asarray(mix0), np.asarray(uni))
  d_mix = noising.insertion_depth(mix1, mask)
  d_bal = noising.insertion_depth(bal, mask)
  np.testing.assert_array_equal(np.asarray(d_mix), np.asarray(d_bal))


def test_significance_jits():
  tokens, mask = pad([encode(["▁a", "▁fox"])])
  cfg = scorers.ScorerConfig("unigram", word_level=True)
  f = jax.jit(scorers.significance, static_argnames="config")
  np.testing.assert_array_equal(
      np.asarray(f(tokens, mask, jax.random.key(0), STATS, config=cfg)),
      np.asarray(scorers.significance(tokens, mask, jax.random.key(0), STATS, cfg)))
