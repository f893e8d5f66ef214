"""Held-out likelihood bounds and sample quality, shared by training and eval jobs.

The insertion model's bound is computed exactly by teacher-forcing every level
(one model call per level), not estimated from one sampled level.
"""

import dataclasses
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from semdiff import losses
from semdiff import noising
from semdiff import scorers


def level_positions(depth: np.ndarray, mask: np.ndarray) -> int:
  """Canvas positions of every level 0..H of every example (host numpy [B, L] inputs):
  what `all_levels_nll` packs. Level h of an example has its depth < h tokens, BOS, EOS."""
  depth, mask = np.asarray(depth), np.asarray(mask)
  height = np.where(mask, depth + 1, 0).max(axis=1)  # H; an empty row has level 0 only
  tokens = np.where(mask, height[:, None] - depth, 0).sum()  # depth d: on levels d+1..H
  return int(tokens + 2 * (height + 1).sum())


# The masked-diffusion ELBO estimate: noise levels per sentence, and their seed.
MASKED_T_DRAWS = 16
MASKED_SEED = 4321


@dataclasses.dataclass
class NllEvaluator:
  """Exact NLL (bound) of held-out batches, per sentence and per token.

  Attributes:
    graphdef: the model's graph definition.
    model_kind: "insertion", "tree", "slot", "causal" or "masked".
    stats, scorer_cfg: how the forward process scores tokens (insertion only).
    slot_order: the slot model's path order ("level" or "sequential", as
      ``config.noise.slot_order``).

  The masked-diffusion bound is not exact but a Monte-Carlo estimate of its ELBO:
  ``MASKED_T_DRAWS`` stratified noise levels per sentence (t_k = (k + u) / K, one uniform u
  per sentence, fixed seed), each with its own random mask; its standard error over draws is
  not included in ``nll_per_sentence_se``.
  """

  graphdef: nnx.GraphDef
  model_kind: str
  stats: scorers.ScoringStats
  scorer_cfg: scorers.ScorerConfig
  slot_order: str = "level"
  closures: bool = False  # also the bound with closed gaps (``model.gap_state`` models)

  def __post_init__(self):
    def trees(tokens, mask):
      s = scorers.significance(tokens, mask, jax.random.key(12345), self.stats, self.scorer_cfg)
      depth = noising.insertion_depth(s, mask)
      entropy = scorers.path_entropy(tokens, mask, depth, self.stats, self.scorer_cfg)
      return depth, noising.tree_height(depth, mask), entropy

    def levels(params, tokens, mask, depth, rows, closures=False):
      return losses.all_levels_nll(nnx.merge(self.graphdef, params), tokens, mask, depth,
                                   rows=rows, closures=closures)

    def sweep(params, tokens, mask, depth, lvl, done):
      return losses.level_sweep_nll(nnx.merge(self.graphdef, params), tokens, mask, depth, lvl,
                                    done)

    def tree(params, tokens, mask):
      model = nnx.merge(self.graphdef, params)
      s = scorers.significance(tokens, mask, jax.random.key(12345), self.stats, self.scorer_cfg)
      ancestor = noising.ancestors(s, mask)
      depth = noising.depth_from_ancestors(ancestor, mask)
      inputs, targets = losses.tree_inputs(tokens, mask, depth,
                                           *noising.children(ancestor, depth, mask),
                                           model.none_id)
      nll = jnp.sum(losses.gap_nll(model(*inputs), targets), axis=(1, 2))
      entropy = scorers.path_entropy(tokens, mask, depth, self.stats, self.scorer_cfg)
      return nll - entropy, noising.tree_height(depth, mask)

    def slot(params, tokens, mask):  # the path of the non-random training rows
      model = nnx.merge(self.graphdef, params)
      s = scorers.significance(tokens, mask, jax.random.key(12345), self.stats, self.scorer_cfg)
      ancestor = noising.ancestors(s, mask)
      depth = noising.depth_from_ancestors(ancestor, mask)
      child, root = noising.children(ancestor, depth, mask)
      level_order = jnp.zeros((tokens.shape[0],), bool)
      times = losses.slot_schedule(ancestor, depth, mask, child, jax.random.key(0), level_order,
                                   self.slot_order == "sequential")
      inputs, targets = losses.slot_inputs(tokens, mask, depth, child, root, *times,
                                           model.slot_id, model.none_id)
      nll = jnp.sum(losses.gap_nll(model(*inputs), targets), axis=1)
      entropy = scorers.path_entropy(tokens, mask, depth, self.stats, self.scorer_cfg)
      return nll - entropy, noising.tree_height(depth, mask)

    def causal(params, tokens, mask):
      inputs, targets = losses.ar_inputs(tokens, mask)
      logits = nnx.merge(self.graphdef, params)(*inputs)
      return jnp.sum(losses.gap_nll(logits, targets), axis=1)

    def masked(params, tokens, mask):
      model = nnx.merge(self.graphdef, params)
      keys = jax.random.split(jax.random.key(MASKED_SEED), MASKED_T_DRAWS + 1)
      u = jax.random.uniform(keys[0], (tokens.shape[0],))

      def draw(total, k):
        t = (k + u) / MASKED_T_DRAWS
        t = losses.MASKED_T_MIN + (1.0 - losses.MASKED_T_MIN) * t
        return total + losses.masked_elbo(model, tokens, mask, t, keys[k + 1])[0], None

      total, _ = jax.lax.scan(draw, jnp.zeros((tokens.shape[0],), jnp.float32),
                              jnp.arange(MASKED_T_DRAWS))
      return total / MASKED_T_DRAWS

    self._trees = jax.jit(trees)
    self._masked = jax.jit(masked)
    self._levels = jax.jit(levels, static_argnames=("rows", "closures"))
    self._sweep = jax.jit(sweep)
    self._causal = jax.jit(causal)
    self._tree = jax.jit(tree)
    self._slot = jax.jit(slot)

  def per_sentence(self, params, batch: dict,
                   closures: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(NLL in nats float64 [b], model calls per sentence [b]) for the real rows.

    ``closures``: the insertion model's bound with its closed gaps (see `losses.level_nll`;
    every level is read in one packed call, `losses.all_levels_nll`).
    """
    tokens, mask = jnp.asarray(batch["tokens"]), jnp.asarray(batch["mask"])
    real = np.asarray(batch["mask"]).any(axis=1)
    if self.model_kind == "causal":
      nll = np.asarray(self._causal(params, tokens, mask), np.float64)
      calls = np.asarray(batch["mask"]).sum(axis=1) + 1
      return nll[real], calls[real]
    if self.model_kind in ("tree", "slot"):  # every level in one pass
      nll, height = (self._tree if self.model_kind == "tree" else self._slot)(params, tokens, mask)
      return np.asarray(nll, np.float64)[real], (np.asarray(height) + 1)[real]
    if self.model_kind == "masked":
      nll = np.asarray(self._masked(params, tokens, mask), np.float64)
      return nll[real], np.full(tokens.shape[0], MASKED_T_DRAWS)[real]
    depth, height, entropy = self._trees(tokens, mask)
    # Every level in one packed call; rows in steps of 32 (few compiled shapes), with room
    # to spare for first-fit's leftovers, and doubled in the rare batch that still drops.
    width = tokens.shape[1] + 2
    rows = 32 * -(-(level_positions(depth, batch["mask"]) * 21 // 20 // width + 2) // 32)
    while True:
      total, dropped = self._levels(params, tokens, mask, depth, rows, closures=closures)
      if not int(dropped):
        break
      rows *= 2
    total = np.asarray(total, np.float64) - np.asarray(entropy, np.float64)
    return total[real], (np.asarray(height) + 1)[real]

  def sweep_per_sentence(self, params, batch: dict) -> tuple[np.ndarray, np.ndarray]:
    """(NLL of the level sweep float64 [b], model calls [b]) for the real rows.

    The same path read one gap at a time within each level
    (`losses.level_sweep_nll`): n + H + 1 teacher-forced calls per sentence.
    """
    tokens, mask = jnp.asarray(batch["tokens"]), jnp.asarray(batch["mask"])
    real = np.asarray(batch["mask"]).any(axis=1)
    depth, height, entropy = self._trees(tokens, mask)
    depth_np, mask_np = np.asarray(depth), np.asarray(batch["mask"])
    total = np.zeros(tokens.shape[0], np.float64)
    for h in range(int(jnp.max(height)) + 1):
      lvl = jnp.full((tokens.shape[0],), h, jnp.int32)
      most = int(((depth_np == h) & mask_np).sum(axis=1).max())
      for j in range(most + 1):
        done = jnp.full((tokens.shape[0],), j, jnp.int32)
        total += np.asarray(self._sweep(params, tokens, mask, depth, lvl, done), np.float64)
    total -= np.asarray(entropy, np.float64)
    calls = mask_np.sum(axis=1) + np.asarray(height) + 1
    return total[real], calls[real]

  def __call__(self, params, batches: Sequence[dict], sweep: bool = False) -> dict:
    """The NLL bound over ``batches``; with ``sweep``, also the level-sweep bound."""
    nll, calls, tokens, swept, closed = [], [], [], [], []
    closures = self.closures and self.model_kind == "insertion"
    for batch in batches:
      n, c = self.per_sentence(params, batch)
      nll.append(n)
      calls.append(c)
      tokens.append(np.asarray(batch["mask"]).sum(axis=1)[np.asarray(batch["mask"]).any(1)])
      if sweep and self.model_kind == "insertion":
        swept.append(self.sweep_per_sentence(params, batch)[0])
      if closures:
        closed.append(self.per_sentence(params, batch, closures=True)[0])
    nll, calls, tokens = map(np.concatenate, (nll, calls, tokens))
    extra = {}
    for name, values in (("sweep", swept), ("closure", closed)):
      if values:
        values = np.concatenate(values)
        extra[f"{name}_nll_per_sentence"] = float(values.mean())
        extra[f"{name}_nll_per_token"] = float(values.sum() / (tokens + 1).sum())
    return {
        **extra,
        "nll_per_sentence": float(nll.mean()),
        "nll_per_sentence_se": float(nll.std(ddof=1) / np.sqrt(len(nll))) if len(nll) > 1 else 0.0,
        "nll_per_token": float(nll.sum() / (tokens + 1).sum()),
        "perplexity_bound": float(np.exp(nll.sum() / (tokens + 1).sum())),
        "teacher_forced_calls": float(calls.mean()),
        "num_sentences": int(len(nll)),
    }


def grammar_report(texts: Sequence[str], grammar, reference: Optional[Sequence[str]] = None,
                   nll: Optional[np.ndarray] = None) -> dict:
  """Fraction grammatical and the grammar's NLL of the grammatical ones.

  Args:
    texts: the samples.
    grammar: a `semdiff.data.grammar` grammar.
    reference: optional texts (e.g. held-out data) whose word lengths weight the
      ``grammatical_at_data_lengths`` entry (`grammatical_at_lengths`).
    nll: float64 [N] `grammar_nll` of ``texts`` if the caller already has it (each text
      is parsed once).
  """
  nll = grammar_nll(texts, grammar) if nll is None else np.asarray(nll, np.float64)
  ok = np.isfinite(nll)
  out = {
      "grammatical": float(ok.mean()) if len(texts) else 0.0,
      "sample_nll_grammatical": float(nll[ok].mean()) if ok.any() else float("nan"),
  }
  if reference is not None:
    out["grammatical_at_data_lengths"] = grammatical_at_lengths(
        ok, word_counts(texts), word_counts(reference))
  return out


LENGTH_EDGES = (5, 8, 11, 15)  # words: buckets 1-5, 6-8, 9-11, 12-15, 16+


def word_counts(texts: Sequence[str]) -> np.ndarray:
  """int [N]: words (whitespace-separated units) per text."""
  return np.array([len(t.split()) for t in texts], np.int64)


def length_bucket(lengths: Sequence[int], edges: Sequence[int] = LENGTH_EDGES) -> np.ndarray:
  """int [N]: each length's bucket (0 = at most edges[0], len(edges) = longer than all)."""
  return np.searchsorted(np.asarray(edges), np.asarray(lengths), side="left")


def grammatical_at_lengths(ok: Sequence[bool], lengths: Sequence[int],
                           reference_lengths: Sequence[int],
                           edges: Sequence[int] = LENGTH_EDGES) -> float:
  """Share of samples accepted (``ok`` [N]), length buckets weighted as in the reference.

  A sampler that writes short texts gets a high raw share because short sentences are easy;
  this weights each length bucket's share by how often the reference (e.g. held-out data)
  has that length, so samplers with different lengths compare length for length. Buckets
  with no sample are left out and the weights renormalised; nan without samples.

  Args:
    ok: bool [N], whether each sample is grammatical.
    lengths: int [N], each sample's length.
    reference_lengths: int [M], the reference's lengths, in the same unit (e.g. words).
    edges: bucket edges (`length_bucket`).
  """
  ok = np.asarray(ok, bool)
  if not ok.size:
    return float("nan")
  bucket = length_bucket(lengths, edges)
  weight = np.bincount(length_bucket(reference_lengths, edges), minlength=len(edges) + 1)
  total, mass = 0.0, 0.0
  for b in range(len(edges) + 1):
    if np.any(bucket == b):
      total += weight[b] * ok[bucket == b].mean()
      mass += weight[b]
  return float(total / mass) if mass else float("nan")


def held_out_texts(batches: Sequence[dict], decode) -> list[str]:
  """The texts of every real row of held-out ``batches`` (``decode``: ids -> text)."""
  return [decode(row[m].tolist()) for batch in batches
          for row, m in zip(batch["tokens"], batch["mask"]) if m.any()]


def true_nll(batches: Sequence[dict], decode, grammar) -> np.ndarray:
  """float64 [N]: the grammar's exact NLL of every real row of held-out ``batches``.

  The true entropy of the sentences an `NllEvaluator` bound is computed on (same rows, same
  order); ``decode`` maps a list of ids to text.
  """
  return grammar_nll(held_out_texts(batches, decode), grammar)


def grammar_nll(texts: Sequence[str], grammar) -> np.ndarray:
  """float64 [N]: each text's exact NLL (nats) under ``grammar``; inf if ungrammatical."""
  return np.array([-grammar.logprob(t) for t in texts], np.float64)


# ---------------------------------------------------------------------------------------------
# Text metrics of a set of samples. Each sample is a sequence of hashable units (words, or
# token ids); the callers split decoded texts on whitespace, so the figures are about words.


def _ngrams(units: Sequence, n: int) -> list[tuple]:
  return [tuple(units[i:i + n]) for i in range(len(units) - n + 1)]


def distinct_n(samples: Sequence[Sequence], n: int) -> float:
  """Distinct-n: distinct n-grams over all n-grams, pooled over the samples.

  Args:
    samples: N sequences of units.
    n: the n-gram order (1, 2, 3, ...).

  Returns:
    (number of distinct n-grams in the whole set) / (number of n-gram occurrences), in
    [0, 1]; 0.0 when no sample has n units. 1.0 means no n-gram repeats anywhere.
  """
  grams = [g for s in samples for g in _ngrams(list(s), n)]
  return len(set(grams)) / len(grams) if grams else 0.0


def self_bleu(samples: Sequence[Sequence], max_n: int = 4) -> float:
  """Self-BLEU: how alike the samples are (1 = all identical, 0 = nothing shared).

  Definition: the mean over samples i of sentence-level BLEU-``max_n`` of sample i (the
  hypothesis) against all the *other* samples as its references, with

  * clipped n-gram precision p_k = m_k / l_k for k = 1..max_n, where l_k is the number of
    k-grams of the hypothesis and m_k counts them clipped by the largest count of that k-gram
    in any single reference (standard multi-reference BLEU);
  * smoothing for k >= 2 only: p_k = (m_k + 1) / (l_k + 1) (Lin & Och 2004; "method 2" of
    Chen & Cherry 2014 applied to the higher orders), so that a short sample without a
    shared 4-gram does not score 0 while an unshared vocabulary (m_1 = 0) still scores 0;
  * uniform weights: BLEU = BP * exp(mean_k log p_k);
  * brevity penalty BP = 1 if c > r else exp(1 - r / c), c the hypothesis length and r the
    reference length closest to c (the shorter one on a tie);
  * an empty hypothesis scores 0.

  The pairwise definition costs O(N^2 L); this computes the same numbers in O(N L) by
  keeping, per n-gram, its two largest counts over the samples (the largest count over the
  others is the first unless sample i holds it). Fewer than two samples: 0.0.

  Args:
    samples: N sequences of units.
    max_n: the highest n-gram order (4 for BLEU-4).
  """
  samples = [list(s) for s in samples]
  num = len(samples)
  if num < 2:
    return 0.0
  lengths = np.array([len(s) for s in samples])
  counts = []  # counts[k][i]: Counter-like dict of sample i's (k+1)-grams
  top = []     # top[k][gram] = (largest count, its sample, second largest count)
  for k in range(1, max_n + 1):
    per_sample, best = [], {}
    for i, s in enumerate(samples):
      c = {}
      for g in _ngrams(s, k):
        c[g] = c.get(g, 0) + 1
      per_sample.append(c)
      for g, v in c.items():
        first, who, second = best.get(g, (0, -1, 0))
        if v > first:
          best[g] = (v, i, first)
        elif v > second:
          best[g] = (first, who, v)
    counts.append(per_sample)
    top.append(best)
  order = np.argsort(lengths, kind="stable")
  sorted_len = lengths[order]
  scores = np.zeros(num)
  for i in range(num):
    c = lengths[i]
    if c == 0:
      continue
    log_p = 0.0
    for k in range(max_n):
      total = max(c - k, 0)
      matched = 0
      for g, v in counts[k][i].items():
        first, who, second = top[k][g]
        matched += min(v, second if who == i else first)
      if k == 0:
        if matched == 0:
          log_p = -np.inf
          break
        log_p += np.log(matched / total)
      else:
        log_p += np.log((matched + 1) / (total + 1))
    if not np.isfinite(log_p):
      continue
    # The closest reference length, over the other samples (drop one copy of sample i's).
    others = np.delete(sorted_len, np.searchsorted(sorted_len, c))
    r = others[np.lexsort((others, np.abs(others - c)))[0]]
    bp = 1.0 if c > r else np.exp(1.0 - r / c)
    scores[i] = bp * np.exp(log_p / max_n)
  return float(scores.mean())


def length_tv(lengths_a: Sequence[int], lengths_b: Sequence[int]) -> float:
  """Total-variation distance between two empirical length distributions.

  TV = 1/2 * sum_k |P_a(length = k) - P_b(length = k)|, in [0, 1]: 0 for the same
  histogram (up to scale), 1 for disjoint supports. Either set empty: nan.
  """
  a, b = np.asarray(lengths_a, np.int64), np.asarray(lengths_b, np.int64)
  if a.size == 0 or b.size == 0:
    return float("nan")
  top = int(max(a.max(), b.max())) + 1
  pa = np.bincount(a, minlength=top) / a.size
  pb = np.bincount(b, minlength=top) / b.size
  return float(0.5 * np.abs(pa - pb).sum())


def keyword_coverage(samples: Sequence[Sequence], keywords: Sequence[Sequence]) -> float:
  """Fraction of samples that contain all their keywords, in the given order.

  Sample i is covered when ``keywords[i]`` is a subsequence of ``samples[i]`` (not
  necessarily contiguous: the insertion sampler puts words between the keywords). No
  samples: nan.
  """
  if len(samples) != len(keywords):
    raise ValueError(f"{len(samples)} samples but {len(keywords)} keyword lists: give one "
                     "keyword list per sample.")
  if not samples:
    return float("nan")

  def covered(sample, words):
    it = iter(sample)
    return all(any(w == x for x in it) for w in words)

  return float(np.mean([covered(list(s), list(k)) for s, k in zip(samples, keywords)]))


def text_report(texts: Sequence[str], data_lengths: Optional[Sequence[int]] = None,
                sample_lengths: Optional[Sequence[int]] = None) -> dict:
  """Distinct-1/2/3 and self-BLEU of texts (on words), and the length TV distance.

  ``sample_lengths`` and ``data_lengths`` (in the same unit, e.g. tokens) give the TV
  distance of the samples' lengths to the data's; without both it is left out.
  """
  words = [t.split() for t in texts]
  out = {f"distinct_{n}": distinct_n(words, n) for n in (1, 2, 3)}
  out["self_bleu"] = self_bleu(words)
  if data_lengths is not None and sample_lengths is not None:
    out["length_tv"] = length_tv(sample_lengths, data_lengths)
  return out
