"""Evaluation metrics on tiny hand-made cases whose answers are known.

Self-BLEU is also checked against a direct pairwise implementation of its docstring's
definition on random word sets.
"""

import math

import numpy as np
import pytest

from semdiff import evaluation
from semdiff.data import grammar as grammar_lib


def test_distinct_n_known_values():
  samples = [["a", "b", "a"], ["a", "c"]]
  # unigrams a b a a c: 3 distinct of 5; bigrams ab ba ac: 3 of 3; trigrams aba: 1 of 1.
  assert evaluation.distinct_n(samples, 1) == pytest.approx(3 / 5)
  assert evaluation.distinct_n(samples, 2) == 1.0
  assert evaluation.distinct_n(samples, 3) == 1.0
  assert evaluation.distinct_n([["x", "y"]] * 4, 2) == pytest.approx(1 / 4)
  assert evaluation.distinct_n([["x"]], 2) == 0.0  # no bigram at all
  assert evaluation.distinct_n([], 1) == 0.0


def test_length_tv_known_values():
  assert evaluation.length_tv([3, 4, 4], [4, 3, 4]) == 0.0
  assert evaluation.length_tv([1, 1], [2, 5]) == 1.0
  # {1: 1/3, 2: 2/3} against {2: 1/2, 3: 1/2}: (1/3 + 1/6 + 1/2) / 2.
  assert evaluation.length_tv([1, 2, 2], [2, 3]) == pytest.approx(0.5)
  assert math.isnan(evaluation.length_tv([], [1]))


def test_keyword_coverage_needs_all_keywords_in_order():
  samples = [["the", "dog", "saw", "a", "cat"], ["a", "cat", "saw", "the", "dog"], ["dog"]]
  keywords = [["dog", "cat"], ["dog", "cat"], []]
  # Sample 0 has both in order, sample 1 in the wrong order, sample 2 has no keywords.
  assert evaluation.keyword_coverage(samples, keywords) == pytest.approx(2 / 3)
  assert evaluation.keyword_coverage([["a", "b"]], [["a", "a"]]) == 0.0
  with pytest.raises(ValueError, match="one keyword list per sample"):
    evaluation.keyword_coverage(samples, keywords[:2])


def _bleu_pairwise(samples, max_n=4):
  """Self-BLEU straight from the definition: every sample against all the others."""
  scores = []
  for i, hyp in enumerate(samples):
    refs = [s for j, s in enumerate(samples) if j != i]
    c = len(hyp)
    if c == 0:
      scores.append(0.0)
      continue
    log_p = 0.0
    for k in range(1, max_n + 1):
      grams = [tuple(hyp[t:t + k]) for t in range(c - k + 1)]
      matched = 0
      for g in set(grams):
        ref_max = max(sum(tuple(r[t:t + k]) == g for t in range(len(r) - k + 1)) for r in refs)
        matched += min(grams.count(g), ref_max)
      if k == 1:
        if matched == 0:
          log_p = -math.inf
          break
        log_p += math.log(matched / len(grams))
      else:
        log_p += math.log((matched + 1) / (len(grams) + 1))
    if log_p == -math.inf:
      scores.append(0.0)
      continue
    r = min((abs(len(x) - c), len(x)) for x in refs)[1]
    bp = 1.0 if c > r else math.exp(1 - r / c)
    scores.append(bp * math.exp(log_p / max_n))
  return float(np.mean(scores))


def test_self_bleu_identical_disjoint_and_pairwise_definition():
  same = [["the", "dog", "saw", "a", "cat", "."]] * 5
  assert evaluation.self_bleu(same) == pytest.approx(1.0)
  disjoint = [["a", "b", "c"], ["d", "e"], ["f", "g", "h", "i"]]
  assert evaluation.self_bleu(disjoint) == 0.0
  assert evaluation.self_bleu([["a"]]) == 0.0  # fewer than two samples
  rng = np.random.default_rng(0)
  words = ["a", "b", "c", "d", "e", "f"]
  for _ in range(5):
    samples = [list(rng.choice(words, size=rng.integers(0, 9))) for _ in range(12)]
    assert evaluation.self_bleu(samples) == pytest.approx(_bleu_pairwise(samples), abs=1e-12)


def test_self_bleu_of_256_samples_is_fast_enough():
  rng = np.random.default_rng(1)
  vocab = [f"w{i}" for i in range(300)]
  samples = [list(rng.choice(vocab, size=rng.integers(3, 30))) for _ in range(256)]
  value = evaluation.self_bleu(samples)
  assert 0.0 <= value < 0.5


def test_grammar_nll_and_report_on_the_small_grammar():
  g = grammar_lib.small_grammar()
  # ROOT -> S . (1) ; S -> NP_Sg VP_Sg (0.6) ; NP_Sg -> Det_Sg N_Sg (0.8) ; the (1) ;
  # dog (0.5) ; VP_Sg -> sleeps (0.3).
  want = -math.log(0.6 * 0.8 * 1.0 * 0.5 * 0.3)
  texts = ["the dog sleeps .", "dog the sleeps ."]
  nll = evaluation.grammar_nll(texts, g)
  assert nll[0] == pytest.approx(want) and nll[1] == math.inf
  report = evaluation.grammar_report(texts, g)
  assert report["grammatical"] == 0.5
  assert report["sample_nll_grammatical"] == pytest.approx(want)


def test_text_report_keys():
  rep = evaluation.text_report(["a b c", "a b d"], data_lengths=[3, 3], sample_lengths=[3, 4])
  assert set(rep) == {"distinct_1", "distinct_2", "distinct_3", "self_bleu", "length_tv"}
  assert rep["distinct_1"] == pytest.approx(4 / 6) and rep["length_tv"] == 0.5


def test_grammatical_at_lengths_weights_buckets_by_the_reference():
  assert list(evaluation.length_bucket([1, 5, 6, 16])) == [0, 0, 1, 4]
  lengths = [2] * 9 + [7]  # 10 samples: 9 short and right, 1 long and wrong
  ok = [True] * 9 + [False]
  reference = [2] * 5 + [7] * 5  # half short, half 6-8 words
  # Raw share 90%; at the reference's lengths the two buckets count half each: 50%.
  assert evaluation.grammatical_at_lengths(ok, lengths, lengths) == pytest.approx(0.9)
  assert evaluation.grammatical_at_lengths(ok, lengths, reference) == pytest.approx(0.5)
  # A bucket without samples is left out: only the short bucket is judged.
  assert evaluation.grammatical_at_lengths([True] * 3, [2] * 3, reference) == 1.0
  assert np.isnan(evaluation.grammatical_at_lengths([], [], reference))


def test_grammar_report_at_data_lengths_parses_once():
  g = grammar_lib.small_grammar()
  texts = ["the dog sleeps ."] * 3 + ["dog the sleeps now ."]
  reference = ["the dog sleeps ."] + ["the dog sleeps now ."] * 3  # buckets: 4 and 5 words
  report = evaluation.grammar_report(texts, g, reference=reference)
  assert report["grammatical"] == 0.75
  # Both texts' lengths fall in the first bucket (1-5 words): the weighted share is the raw one.
  assert report["grammatical_at_data_lengths"] == pytest.approx(0.75)
  # A caller's own NLLs are used as given (no second parse).
  fake = np.array([1.0, np.inf, np.inf, np.inf])
  assert evaluation.grammar_report(texts, g, nll=fake)["grammatical"] == 0.25
  assert "grammatical_at_data_lengths" not in evaluation.grammar_report(texts, g)
