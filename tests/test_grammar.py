"""Tests for semdiff.data.grammar: exact probabilities, the recogniser and the corpus splits."""

import math
import time
from collections.abc import Callable

import numpy as np
import pytest

from semdiff.data import grammar as grammar_lib
from semdiff.data.grammar import Grammar

# A recursive grammar with coordination and both attachments of prepositional phrases: its
# language is infinite and highly ambiguous ("the dog with the cat and the dog ...").
_RECURSIVE_RULES = [
    ("ROOT", "S .", 1.0),
    ("S", "NP VP", 1.0),
    ("NP", "Det N", 0.6),
    ("NP", "NP PP", 0.25),
    ("NP", "NP and NP", 0.15),
    ("VP", "V NP", 0.5),
    ("VP", "VP PP", 0.3),
    ("VP", "sleeps", 0.2),
    ("PP", "P NP", 1.0),
    ("Det", "the", 1.0),
    ("N", "dog", 0.5),
    ("N", "cat", 0.5),
    ("V", "sees", 1.0),
    ("P", "with", 1.0),
]


def _enumerate(grammar: Grammar, max_len: int) -> dict[tuple[str, ...], tuple[float, int]]:
    """Every derivation whose sentence has at most ``max_len`` words, by leftmost expansion.

    Returns sentence -> (sum of its derivations' probabilities, number of derivations). Every
    symbol yields at least one word (no empty rules), so a sentential form longer than
    ``max_len`` can be pruned, and all derivations of every short sentence are found.
    """
    by_lhs: dict[str, list[tuple[tuple[str, ...], float]]] = {}
    for rule in grammar.rules:
        by_lhs.setdefault(rule.lhs, []).append((rule.rhs, rule.prob))
    language: dict[tuple[str, ...], tuple[float, int]] = {}
    stack: list[tuple[tuple[str, ...], float]] = [((grammar.start,), 1.0)]
    while stack:
        form, prob = stack.pop()
        i = next((k for k, s in enumerate(form) if s in by_lhs), None)
        if i is None:
            total, count = language.get(form, (0.0, 0))
            language[form] = (total + prob, count + 1)
            continue
        for rhs, p in by_lhs[form[i]]:
            new = form[:i] + rhs + form[i + 1:]
            if len(new) <= max_len:
                stack.append((new, prob * p))
    return language


def _words_with_category(grammar: Grammar,
                         predicate: Callable[[frozenset[str]], bool]) -> list[str]:
    return [w for w in grammar.vocabulary if predicate(grammar.lexical_categories(w))]


@pytest.fixture(scope="module")
def grammar() -> Grammar:
    return grammar_lib.default_grammar()


@pytest.fixture(scope="module")
def samples(grammar: Grammar) -> list[tuple[list[str], float]]:
    """300 sampled derivations of the default grammar: (words, derivation log-probability)."""
    rng = np.random.default_rng(1234)
    return [grammar.sample_derivation(rng) for _ in range(300)]


# -------------------------------------------------------------------------------------------
# Exact probabilities.


def test_small_grammar_probabilities_sum_to_one():
    small = grammar_lib.small_grammar()
    language = _enumerate(small, max_len=10**6)  # finite language: every derivation
    assert sum(count for _, count in language.values()) == 220
    assert any(count > 1 for _, count in language.values()), "needs an ambiguous sentence"
    total = 0.0
    for words, (derivations_prob, count) in language.items():
        p = math.exp(small.logprob(words))
        assert p == pytest.approx(derivations_prob, rel=1e-12), words
        assert small.num_derivations(words) == count, words
        total += p
    assert abs(total - 1.0) < 1e-9


def test_small_grammar_ambiguous_sentence_sums_both_attachments():
    small = grammar_lib.small_grammar()
    sentence = "the dog saw the cat with the dog ."
    assert small.num_derivations(sentence) == 2
    # Either VP_Sg -> TV NP_Sg with NP_Sg -> Det_Sg N_Sg PP (the noun takes the PP), or
    # VP_Sg -> TV NPo PP (the verb does).
    the_dog = the_cat = 1.0 * 0.5  # Det_Sg -> the, N_Sg -> dog | cat
    subject = 0.6 * 0.8 * the_dog  # S -> NP_Sg VP_Sg, NP_Sg -> Det_Sg N_Sg
    with_the_dog = 1.0 * 1.0 * 0.7 * the_dog  # PP -> P NPo, P -> with, NPo -> Det_Sg N_Sg
    noun_attachment = 0.2 * 1.0 * (0.2 * the_cat * with_the_dog)
    verb_attachment = 0.2 * 1.0 * (0.7 * the_cat) * with_the_dog
    expected = math.log(subject * (noun_attachment + verb_attachment))
    assert small.logprob(sentence) == pytest.approx(expected, rel=1e-12)


def test_inside_matches_enumeration_on_recursive_ambiguous_grammar():
    toy = Grammar.from_rules(_RECURSIVE_RULES)
    language = _enumerate(toy, max_len=12)
    assert max(count for _, count in language.values()) >= 5
    for words, (derivations_prob, count) in language.items():
        assert math.exp(toy.logprob(words)) == pytest.approx(derivations_prob, rel=1e-12), words
        assert toy.num_derivations(words) == count, words
    # Short strings carry most, but not all, of the mass of an infinite language.
    assert 0.5 < sum(p for p, _ in language.values()) < 1.0


def test_logprob_at_least_derivation_logprob(grammar, samples):
    num_ambiguous = 0
    for words, derivation_logp in samples:
        logp = grammar.logprob(words)
        if grammar.num_derivations(words) == 1:
            assert logp == pytest.approx(derivation_logp, rel=1e-12, abs=1e-9), words
        else:
            num_ambiguous += 1
            assert logp > derivation_logp, words
    assert num_ambiguous > 0  # prepositional-phrase attachment, coordination


def test_sample_with_logprob_is_exact(grammar):
    words, logp = grammar.sample_with_logprob(np.random.default_rng(7))
    assert words == grammar.sample(np.random.default_rng(7))
    assert logp == grammar.logprob(words) == grammar.logprob(" ".join(words))
    for seed in range(20):
        words, logp = grammar.sample_with_logprob(np.random.default_rng(seed))
        assert logp == grammar.logprob(words)


def test_expected_length_matches_samples(grammar):
    lengths = np.array([len(s.split()) for s in grammar_lib.sentences("train", 2000)])
    se = lengths.std(ddof=1) / math.sqrt(len(lengths))
    assert abs(lengths.mean() - grammar.expected_length()) < 5 * se
    assert grammar.spectral_radius() < 1.0


# -------------------------------------------------------------------------------------------
# The recogniser.


def test_accepts_generated_sentences(grammar, samples):
    for words, _ in samples:
        assert words[-1] == "."
        assert all(w == w.lower() for w in words)
        assert grammar.is_grammatical(words), words


def test_rejects_broken_agreement(grammar):
    sg_nouns = _words_with_category(grammar, lambda c: "N_Sg_An" in c and "N_Pl_An" not in c)
    pl_nouns = _words_with_category(grammar, lambda c: "N_Pl_An" in c and "N_Sg_An" not in c)
    pres3 = _words_with_category(grammar, lambda c: "IV_Pres3" in c and "IV_Base" not in c)
    base = _words_with_category(grammar, lambda c: "IV_Base" in c and "IV_Pres3" not in c)
    assert min(len(sg_nouns), len(pl_nouns), len(pres3), len(base)) >= 10
    for noun, verb in zip(sg_nouns, base):
        assert not grammar.is_grammatical(f"the {noun} {verb} .")
        assert not grammar.is_grammatical(f"these {noun} {pres3[0]} .")
        assert grammar.is_grammatical(f"the {noun} {pres3[0]} .")
    for noun, verb in zip(pl_nouns, pres3):
        assert not grammar.is_grammatical(f"the {noun} {verb} .")
        assert not grammar.is_grammatical(f"a {noun} {base[0]} .")
        assert grammar.is_grammatical(f"the {noun} {base[0]} .")
    for sentence in ["he sleep .", "they sleeps .", "the dog are happy .", "the dogs is happy .",
                     "the dog that the cats sees runs .", "the dogs that sleeps run .",
                     "the dog have slept .", "the dogs does not run .", "there is some dogs ."]:
        assert not grammar.is_grammatical(sentence), sentence
    for sentence in ["he sleeps .", "they sleep .", "the dog is happy .", "the dogs are happy .",
                     "the dog that the cats see runs .", "the dogs that sleep run .",
                     "the dog has slept .", "the dogs do not run .", "there are some dogs ."]:
        assert grammar.is_grammatical(sentence), sentence


def test_rejects_broken_sentence_ends(grammar, samples):
    for words, _ in samples[:100]:
        assert not grammar.is_grammatical(words[:-1])  # no final "."
        assert not grammar.is_grammatical(words + ["."])
        assert not grammar.is_grammatical(words + words)  # "." inside a sentence
        assert not grammar.is_grammatical(words + ["the"])


def test_rejects_most_random_corruptions(grammar, samples):
    """Random edits are sometimes grammatical by accident: "the big red dog" -> "the red big
    dog"; dropping a determiner before a plural ("the dogs run" -> "dogs run") or an auxiliary
    ("have offered" -> "offered"). Modifiers (adjectives, adverbs) are optional and repeatable,
    so drops and duplicates leave them alone; the rates are thresholds, with a margin below
    the measured ones (swap 0.98, replace 0.96, duplicate 1.0, drop 0.88)."""
    rng = np.random.default_rng(0)
    modifiers = {"Adj", "Adv", "Deg", "Freq"}
    other_category = {
        w: [v for v in grammar.vocabulary
            if grammar.lexical_categories(v) and not grammar.lexical_categories(v)
            & grammar.lexical_categories(w)]
        for w in grammar.vocabulary}

    def corrupt(kind: str, words: list[str]) -> list[str] | None:
        words, body = list(words), len(words) - 1  # the final "." is left alone
        if kind == "swap":
            positions = [k for k in range(body - 1) if words[k] != words[k + 1]]
        elif kind in ("drop", "duplicate"):
            positions = [k for k in range(body)
                         if not grammar.lexical_categories(words[k]) & modifiers]
        else:
            positions = list(range(body))
        if not positions:
            return None
        i = positions[rng.integers(len(positions))]
        if kind == "swap":
            words[i], words[i + 1] = words[i + 1], words[i]
        elif kind == "drop":
            del words[i]
        elif kind == "duplicate":
            words.insert(i, words[i])
        elif kind == "replace":
            candidates = other_category[words[i]]
            words[i] = candidates[rng.integers(len(candidates))]
        return words

    thresholds = {"swap": 0.93, "replace": 0.93, "duplicate": 0.97, "drop": 0.8}
    for kind, threshold in thresholds.items():
        corrupted = [c for words, _ in samples if (c := corrupt(kind, words)) is not None]
        assert len(corrupted) > 250
        rejected = np.mean([not grammar.is_grammatical(c) for c in corrupted])
        assert rejected > threshold, (kind, rejected)


def test_unknown_and_empty_input(grammar):
    assert grammar.logprob("the dog runs") == -math.inf
    assert grammar.logprob("the zebra runs .") == -math.inf
    assert grammar.logprob("the dog runs.") == -math.inf  # "." is a separate word
    assert grammar.logprob("The dog runs .") == -math.inf  # lower case only
    assert grammar.logprob("") == -math.inf
    assert grammar.logprob("   ") == -math.inf
    assert grammar.logprob([]) == -math.inf
    assert grammar.num_derivations("") == 0
    assert not grammar.is_grammatical("")
    assert grammar.lexical_categories("zebra") == frozenset()


def test_logprob_is_fast_on_long_garbage(grammar):
    random_words = list(np.random.default_rng(0).choice(grammar.vocabulary, size=40))
    # Every adjacent pair is possible, so only the parser can reject it: a sentence joins at
    # most two clauses with "and", and none of these has a clausal complement.
    clauses = ["the dog runs", "the big cat sleeps in the house", "a girl reads a book",
               "the boys saw the dogs with the ball", "my friend has eaten the cake"] * 2
    joined = " and ".join(clauses) + " ."
    assert len(joined.split()) >= 40
    for words in (random_words, joined):
        start = time.perf_counter()
        assert grammar.logprob(words) == -math.inf
        assert time.perf_counter() - start < 0.5


# -------------------------------------------------------------------------------------------
# Splits, lengths, entropy.


def test_splits_are_deterministic_and_distinct():
    train = grammar_lib.sentences("train", 50, seed=0)
    assert train == grammar_lib.sentences("train", 50, seed=0)
    stream = grammar_lib.iter_sentences("train", seed=0)
    assert [next(stream) for _ in range(50)] == train
    assert grammar_lib.sentences("train", 20, seed=0) == train[:20]
    assert grammar_lib.sentences("validation", 50, seed=0) != train
    assert grammar_lib.sentences("test", 50, seed=0) != train
    assert grammar_lib.sentences("train", 50, seed=1) != train
    assert all(isinstance(s, str) and s.endswith(" .") for s in train)


def test_unknown_split_names_the_choices():
    with pytest.raises(ValueError, match="train, validation, test"):
        grammar_lib.sentences("dev", 3)
    with pytest.raises(ValueError, match="train, validation, test"):
        grammar_lib.iter_sentences("training")


def test_lengths_are_spread_and_entropy_has_finite_se(grammar):
    lengths = [len(s.split()) for s in grammar_lib.sentences("train", 2000)]
    assert min(lengths) <= 4
    assert max(lengths) >= 30
    assert 9 <= np.mean(lengths) <= 14
    est = grammar_lib.entropy_estimate("test", num=300)
    assert est["num_sentences"] == 300
    assert est["vocab_size"] == len(grammar.vocabulary) >= 400
    for key in ("nats_per_sentence", "nats_per_sentence_se", "nats_per_token",
                "nats_per_token_se", "mean_length"):
        assert math.isfinite(est[key]) and est[key] > 0, key
    assert est["nats_per_token"] == pytest.approx(
        est["nats_per_sentence"] / est["mean_length"], rel=1e-9)
    # The derivation entropy bounds the sentence entropy from above.
    assert est["nats_per_sentence"] < est["derivation_entropy"] + 5 * est["nats_per_sentence_se"]


# -------------------------------------------------------------------------------------------
# Grammar construction errors.


@pytest.mark.parametrize("rules, message", [
    ([("ROOT", "a", 0.5)], "sum to"),
    ([("ROOT", "X .", 1.0)], "has no rules"),
    ([("ROOT", "ROOT ROOT", 0.6), ("ROOT", "a", 0.4)], "subcritical"),
    ([("ROOT", "A", 1.0), ("A", "ROOT", 0.5), ("A", "a", 0.5)], "cycle of unary"),
    ([("ROOT", (), 1.0)], "empty right-hand side"),
    ([("ROOT", "a", 1.0), ("B", "b", 1.0)], "unreachable"),
    ([("root", "a", 1.0)], "upper-case"),
])
def test_invalid_grammars_are_rejected(rules, message):
    with pytest.raises(ValueError, match=message):
        Grammar.from_rules(rules)


def test_from_rules_normalizes_weights():
    g = Grammar.from_rules([("ROOT", "a", 3.0), ("ROOT", "b", 1.0)], normalize=True)
    assert g.vocabulary == ("a", "b")
    assert g.logprob("a") == pytest.approx(math.log(0.75))
    assert g.logprob(["b"]) == pytest.approx(math.log(0.25))
    assert g.logprob("a b") == -math.inf
