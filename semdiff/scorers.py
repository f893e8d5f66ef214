"""Significance scorers: which tokens the forward process deletes first.

A scorer maps a batch to one real score per token (higher = more significant =
kept longer). Scorers are pure functions of arrays, so they run inside the
jitted training step. `significance` wraps any scorer with the parts they share:

* **units**: at token level every token is a unit; at word level all pieces of
  a word form one unit and share its score (positional scorers then count
  words, not pieces), with a fixed order inside the word (first piece first).
* **tie-breaking**: equal scores are ordered by a jitter drawn from a PRNG key
  folded with a hash of the example's tokens, so every sequence has one
  canonical order whatever batch or device it lands in.
* **ranks**: the result is the rank of each token (0 = least significant), so
  the scores handed to `noising.insertion_depth` are exactly distinct.

The embedding scorers (`embedding_loo`, `embedding_greedy`, `model_embedding`)
measure significance as semantic change: how far deleting a unit moves the
sentence embedding E (IDF-weighted mean of ``stats.embedding``, cosine distance).
Which table ``stats.embedding`` holds is the caller's business
(`ScorerConfig.table_source`): the fixed corpus table, or a snapshot of the
model's input embedding that the training loop refreshes.

Adding a scorer is one function with the `ScoreFn` signature plus one
`@register` line.
"""

import dataclasses
from typing import Callable, Optional, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class ScoringStats:
  """Fixed statistics and tables that scorers read (a pytree of arrays).

  Attributes:
    unigram_logprob: float32 [V], log p(token) from training-split counts.
    word_start: bool [V], true where a piece begins a new word.
    embedding: float32 [V, D], a token-embedding table (embedding scorers).
    idf: float32 [V], per-token weights of the sentence embedding.
  """

  unigram_logprob: Optional[jax.Array] = None
  word_start: Optional[jax.Array] = None
  embedding: Optional[jax.Array] = None
  idf: Optional[jax.Array] = None


@flax.struct.dataclass
class Units:
  """What gets scored: tokens, or whole words.

  Attributes:
    index: int32 [B, L], unit index of each position (0-based within the row).
    offset: int32 [B, L], position within the unit (0 for its first piece).
    count: int32 [B], number of units in the row.
  """

  index: jax.Array
  offset: jax.Array
  count: jax.Array


class ScoreFn(Protocol):

  def __call__(
      self, tokens: jax.Array, mask: jax.Array, units: Units, rng: jax.Array,
      stats: ScoringStats,
  ) -> jax.Array:
    """Returns float32 [B, L]; every position of a unit carries the unit's score."""


_SCORERS: dict[str, ScoreFn] = {}


def register(name: str) -> Callable[[ScoreFn], ScoreFn]:
  def wrap(fn: ScoreFn) -> ScoreFn:
    _SCORERS[name] = fn
    return fn
  return wrap


def names() -> list[str]:
  """All registered scorer names, plus ``mix``."""
  return sorted([*_SCORERS, "mix"])


def get(name: str) -> ScoreFn:
  """The scorer called ``name``; one clear error listing the choices if unknown."""
  if name not in _SCORERS:
    raise ValueError(
        f"Unknown scorer {name!r}; choose one of {', '.join(names())} "
        "(e.g. --config.scorer.name=unigram).")
  return _SCORERS[name]


def _unit_sum(values: jax.Array, units: Units, mask: jax.Array) -> jax.Array:
  """Sum ``values`` [B, L] over each unit and broadcast back to its positions."""
  length = values.shape[1]
  one_hot = (units.index[:, :, None] == jnp.arange(length)[None, None, :]) & mask[:, :, None]
  per_unit = jnp.einsum("blu,bl->bu", one_hot.astype(values.dtype), values)
  return jnp.take_along_axis(per_unit, units.index, axis=1)


@register("unigram")
def unigram(tokens, mask, units, rng, stats):
  """Surprisal -log p(token) (a word's is the sum of its pieces')."""
  del rng
  if stats.unigram_logprob is None:
    raise ValueError("The unigram scorer needs unigram counts: build ScoringStats "
                     "with the tokenizer's unigram_logprob().")
  surprisal = -jnp.take(stats.unigram_logprob, tokens, axis=0)
  return _unit_sum(jnp.where(mask, surprisal, 0.0), units, mask)


@register("random")
def random_order(tokens, mask, units, rng, stats):
  """I.i.d. uniform scores: random-order insertion (fresh on every call)."""
  del stats
  u = jax.random.uniform(rng, tokens.shape)
  # One draw per unit: read the draw at the unit's index.
  return jnp.take_along_axis(u, units.index, axis=1)


@register("left_to_right")
def left_to_right(tokens, mask, units, rng, stats):
  """-position: the autoregressive order (tree height n)."""
  del tokens, mask, rng, stats
  return -units.index.astype(jnp.float32)


def balanced_depth(position: jax.Array, count: jax.Array) -> jax.Array:
  """Depth of ``position`` in the balanced binary search tree over range(count).

  The root of [lo, hi) is (lo + hi) // 2, so the height is ceil(log2(count + 1)).
  Loops over tree levels (log2 L iterations), not over tokens.

  Args:
    position: int [B, L]; count: int [B].
  Returns:
    int32 [B, L].
  """
  lo = jnp.zeros_like(position)
  hi = jnp.broadcast_to(count[:, None], position.shape)
  depth = jnp.zeros_like(position)
  max_levels = int(np.ceil(np.log2(position.shape[1] + 1))) + 1

  def body(_, carry):
    lo, hi, depth = carry
    mid = (lo + hi) // 2
    found = position == mid
    go_left = position < mid
    hi = jnp.where(~found & go_left, mid, hi)
    lo = jnp.where(~found & ~go_left, mid + 1, lo)
    depth = jnp.where(found, depth, depth + 1)
    # Once found, keep lo/hi so that mid stays == position.
    lo = jnp.where(found, position, lo)
    hi = jnp.where(found, position + 1, hi)
    return lo, hi, depth

  _, _, depth = jax.lax.fori_loop(0, max_levels, body, (lo, hi, depth))
  return depth.astype(jnp.int32)


@register("balanced")
def balanced(tokens, mask, units, rng, stats):
  """Minus the depth in a balanced binary tree: the fewest insertion steps."""
  del tokens, mask, rng, stats
  return -balanced_depth(units.index, units.count).astype(jnp.float32)


# --- embedding scorers ------------------------------------------------------------------------
# E(x) = IDF-weighted mean of token embeddings. The cosine distance is scale-free, so the
# scorers work with the weighted *sum* S = sum_i w_i e_i: removing unit u leaves S - c_u, with
# c_u the sum of its pieces' w_i e_i. Zero vectors (an empty sentence, or ids whose rows are 0)
# get distance 0 to each other and 1 to anything else.

EMBEDDING_SCORERS = ("embedding_loo", "embedding_greedy", "model_embedding")


def cosine_distance(dot: jax.Array, sq_a: jax.Array, sq_b: jax.Array) -> jax.Array:
  """1 - cos(a, b) from a.b, |a|^2 and |b|^2 (any matching shapes), float32."""
  tiny = jnp.float32(1e-12)
  zero_a, zero_b = sq_a <= tiny, sq_b <= tiny
  cos = dot / jnp.sqrt(jnp.maximum(sq_a, tiny) * jnp.maximum(sq_b, tiny))
  dist = 1.0 - jnp.clip(cos, -1.0, 1.0)
  return jnp.where(zero_a & zero_b, 0.0, jnp.where(zero_a | zero_b, 1.0, dist))


def token_weights(tokens: jax.Array, mask: jax.Array, idf: Optional[jax.Array]) -> jax.Array:
  """float32 [B, L]: each real token's weight in E (its IDF, or 1 without IDF), 0 on padding."""
  w = jnp.ones(tokens.shape, jnp.float32) if idf is None else jnp.take(idf, tokens, axis=0)
  return jnp.where(mask, w, 0.0)


def unit_contributions(tokens, mask, units: Units, stats: ScoringStats) -> jax.Array:
  """float32 [B, U=L, D]: sum of w_i e_i over the pieces of each unit (0 past the last unit)."""
  if stats.embedding is None:
    raise ValueError("The embedding scorers need a token-embedding table in ScoringStats."
                     "embedding: set --config.scorer.embedding_source=fixed (the corpus "
                     "table) or =model.")
  table = jax.lax.stop_gradient(stats.embedding).astype(jnp.float32)
  weighted = token_weights(tokens, mask, stats.idf)[..., None] * jnp.take(table, tokens, axis=0)
  length = tokens.shape[1]
  one_hot = (units.index[:, :, None] == jnp.arange(length)[None, None, :]) & mask[:, :, None]
  return jnp.einsum("blu,bld->bud", one_hot.astype(jnp.float32), weighted)


def _per_unit_to_positions(per_unit: jax.Array, units: Units) -> jax.Array:
  return jnp.take_along_axis(per_unit, units.index, axis=1)


@register("embedding_loo")
def embedding_loo(tokens, mask, units, rng, stats):
  """1 - cos(E(x), E(x without unit u)): all leave-one-outs in O(n·d)."""
  del rng
  c = unit_contributions(tokens, mask, units, stats)  # [B, U, D]
  s = jnp.sum(c, axis=1)  # [B, D]
  sq_s = jnp.sum(s * s, axis=-1, keepdims=True)  # [B, 1]
  s_dot_c = jnp.einsum("bd,bud->bu", s, c)
  sq_c = jnp.sum(c * c, axis=-1)
  # |S - c|^2 = |S|^2 - 2 S.c + |c|^2 and S.(S - c) = |S|^2 - S.c.
  dist = cosine_distance(sq_s - s_dot_c, sq_s, jnp.maximum(sq_s - 2 * s_dot_c + sq_c, 0.0))
  return _per_unit_to_positions(dist, units)


@register("model_embedding")
def model_embedding(tokens, mask, units, rng, stats):
  """`embedding_loo` on the model's own input embedding (the training loop puts a
  stop-gradient snapshot of it in ``stats.embedding``, refreshed every
  ``scorer.refresh_every`` steps)."""
  return embedding_loo(tokens, mask, units, rng, stats)


@register("embedding_greedy")
def embedding_greedy(tokens, mask, units, rng, stats):
  """Greedy deletion order: repeatedly delete the unit whose removal moves E the least.

  Score = the step at which the unit is deleted (later = more significant); ties go
  to the lowest unit index. One `lax.fori_loop` over L steps, vectorised over the
  batch; each step is O(U) given the units' Gram matrix (computed once, O(U²·d)).
  """
  del rng
  c = unit_contributions(tokens, mask, units, stats)  # [B, U, D]
  batch, length = tokens.shape
  gram = jnp.einsum("bud,bvd->buv", c, c)  # [B, U, U]
  sq_c = jnp.diagonal(gram, axis1=1, axis2=2)
  alive = jnp.arange(length)[None, :] < units.count[:, None]  # [B, U]
  order = jnp.zeros((batch, length), jnp.float32)
  rows = jnp.arange(batch)

  def body(t, carry):
    alive, order = carry
    # S.c_u and |S|^2 of the surviving units, recomputed (not updated) so that rounding
    # does not accumulate over the steps: O(U^2) per step.
    s_dot_c = jnp.einsum("buv,bv->bu", gram, alive.astype(jnp.float32))
    sq_s = jnp.sum(jnp.where(alive, s_dot_c, 0.0), axis=1, keepdims=True)
    dist = cosine_distance(sq_s - s_dot_c, sq_s, jnp.maximum(sq_s - 2 * s_dot_c + sq_c, 0.0))
    pick = jnp.argmin(jnp.where(alive, dist, jnp.inf), axis=1)  # [B]
    live = jnp.any(alive, axis=1)
    order = order.at[rows, pick].set(jnp.where(live, t.astype(jnp.float32), order[rows, pick]))
    return alive.at[rows, pick].set(False), order

  _, order = jax.lax.fori_loop(0, length, body, (alive, order))
  return _per_unit_to_positions(order, units)


def make_units(tokens: jax.Array, mask: jax.Array, word_start: Optional[jax.Array]) -> Units:
  """Token units, or word units when ``word_start`` [V] is given."""
  length = tokens.shape[1]
  if word_start is None:
    index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)
    offset = jnp.zeros_like(index)
  else:
    starts = jnp.take(word_start, tokens, axis=0) & mask
    starts = starts.at[:, 0].set(True)  # a row never starts mid-word
    index = jnp.cumsum(starts, axis=1, dtype=jnp.int32) - 1
    pos = jnp.arange(length, dtype=jnp.int32)[None, :]
    start_pos = jax.lax.cummax(jnp.where(starts, pos, 0), axis=1)
    offset = pos - start_pos
  count = jnp.where(jnp.any(mask, axis=1),
                    jnp.max(jnp.where(mask, index, -1), axis=1) + 1, 0).astype(jnp.int32)
  return Units(index=index, offset=offset, count=count)


def content_keys(tokens: jax.Array, mask: jax.Array, seed: int) -> jax.Array:
  """One PRNG key per row from a hash of its real tokens: [B] keys."""
  length = tokens.shape[1]
  mult = jnp.uint32(2654435761) ** jnp.arange(1, length + 1, dtype=jnp.uint32)
  h = jnp.sum(jnp.where(mask, (tokens.astype(jnp.uint32) + 1) * mult, 0), axis=1,
              dtype=jnp.uint32)
  base = jax.random.key(seed)
  return jax.vmap(lambda x: jax.random.fold_in(base, x))(h)


def to_ranks(primary: jax.Array, secondary: jax.Array, tertiary: jax.Array,
             mask: jax.Array) -> jax.Array:
  """Distinct float32 ranks (0 = least significant), -1 on padding.

  Orders by ``primary``, then ``secondary``, then ``tertiary`` (all [B, L]).
  """
  neg = jnp.finfo(jnp.float32).min
  primary = jnp.where(mask, primary.astype(jnp.float32), neg)
  order = jax.vmap(lambda a, b, c: jnp.lexsort((c, b, a)))(primary, secondary, tertiary)
  ranks = jnp.argsort(order, axis=1)
  n = jnp.sum(mask, axis=1, keepdims=True)
  # Padding sorts first (lowest); shift so real tokens rank 0..n-1.
  ranks = ranks - (primary.shape[1] - n)
  return jnp.where(mask, ranks, -1).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class ScorerConfig:
  """How to score: the static part (hashable, so it can close over jit).

  Attributes:
    name: a registered scorer, or ``mix``.
    word_level: score whole words (all pieces share the word's score).
    mix_base: the scorer that ``mix`` blends with ``balanced``.
    mix_weight: weight of ``balanced`` in ``mix`` (0 = base only, 1 = balanced).
    tiebreak_seed: seed of the per-example tie-breaking jitter.
    embedding_source: the table of ``embedding_loo`` / ``embedding_greedy``:
      "fixed" (PPMI + SVD of corpus co-occurrences, `data.embedding_table`) or
      "model" (the model's input embedding, as ``model_embedding`` always uses).
    refresh_every: steps between refreshes of the model-embedding snapshot.
    embedding_dim: width of the fixed table.
    embedding_window: co-occurrence window (tokens each side) of the fixed table.
  """

  name: str = "unigram"
  word_level: bool = False
  mix_base: str = "unigram"
  mix_weight: float = 0.5
  tiebreak_seed: int = 0
  embedding_source: str = "fixed"
  refresh_every: int = 100
  embedding_dim: int = 64
  embedding_window: int = 4

  @property
  def uses_rng(self) -> bool:
    """Whether scores are drawn at random (else a function of the tokens alone)."""
    return "random" in (self.name, self.mix_base if self.name == "mix" else None)

  @property
  def table_source(self) -> Optional[str]:
    """Which table ``stats.embedding`` must hold: "fixed", "model", or None (no table)."""
    name = self.mix_base if self.name == "mix" else self.name
    if name == "model_embedding":
      return "model"
    return self.embedding_source if name in EMBEDDING_SCORERS else None

  def validate(self) -> "ScorerConfig":
    if self.embedding_source not in ("fixed", "model"):
      raise ValueError(f"scorer.embedding_source must be 'fixed' or 'model', got "
                       f"{self.embedding_source!r}.")
    if self.refresh_every < 1:
      raise ValueError(f"scorer.refresh_every must be >= 1, got {self.refresh_every}.")
    if self.name == "mix":
      get(self.mix_base)
      if not 0.0 <= self.mix_weight <= 1.0:
        raise ValueError(f"scorer.mix_weight must be in [0, 1], got {self.mix_weight}.")
    else:
      get(self.name)
    return self

  @classmethod
  def from_config(cls, config) -> "ScorerConfig":
    """From an ml_collections ConfigDict (fields as above; missing ones default)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(config).items() if k in fields}).validate()


def significance(
    tokens: jax.Array, mask: jax.Array, rng: jax.Array, stats: ScoringStats,
    config: ScorerConfig,
) -> jax.Array:
  """Distinct significance scores for a batch.

  Args:
    tokens: int32 [B, L] token ids.
    mask: bool [B, L], true on real tokens (a prefix of each row).
    rng: PRNG key, used only by random scorers.
    stats: tables the scorers read.
    config: which scorer, at which level.

  Returns:
    float32 [B, L]: ranks 0..n-1 (distinct) on real tokens, -1 on padding.
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  mask = jnp.asarray(mask, bool)
  word_start = stats.word_start if config.word_level else None
  if config.word_level and word_start is None:
    raise ValueError("Word-level scoring needs the tokenizer's word_start table in ScoringStats.")
  units = make_units(tokens, mask, word_start)

  def raw(name):
    return get(name)(tokens, mask, units, rng, stats)

  if config.name == "mix":
    def unit_rank(score):
      # Normalised rank among the row's tokens, in [0, 1].
      r = to_ranks(score, -units.offset, jnp.zeros_like(score), mask)
      return r / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True) - 1, 1)
    score = ((1.0 - config.mix_weight) * unit_rank(raw(config.mix_base))
             + config.mix_weight * unit_rank(raw("balanced")))
  else:
    score = raw(config.name)
  keys = content_keys(tokens, mask, config.tiebreak_seed)
  jitter = jax.vmap(lambda k: jax.random.uniform(k, (tokens.shape[1],)))(keys)
  # Within a unit pieces share the score, and the first piece outranks the rest;
  # the jitter is per unit, so it never reorders pieces inside a word.
  jitter = jnp.take_along_axis(jitter, units.index, axis=1)
  return to_ranks(score, -units.offset, jitter, mask)


def subtree_log_size_sum(depth: jax.Array, mask: jax.Array,
                         unit_start: Optional[jax.Array] = None) -> jax.Array:
  """Sum over tree nodes v of log |subtree(v)|: float32 [B].

  The entropy term log 1/q(tree) of a random Cartesian tree under i.i.d.
  uniform scores (DESIGN section 2): add it to the path log-likelihood of the
  ``random`` scorer to get a valid bound. A node's subtree is the maximal range
  around it of nodes deeper than it.

  Args:
    depth: int [B, L]; mask: bool [B, L].
    unit_start: bool [B, L], for word-level scoring: only the first piece of
      each word is a random node, and subtree sizes count words.
  """
  length = depth.shape[1]
  big = jnp.int32(length + 1)
  d = jnp.where(mask, depth, -1)  # padding acts as a wall (shallower than all)
  idx = jnp.arange(length)
  # For each i, nearest j < i with d[j] < d[i], and nearest j > i with d[j] < d[i].
  shallower = d[:, None, :] < d[:, :, None]  # [B, i, j]
  left_wall = jnp.max(jnp.where(shallower & (idx[None, None, :] < idx[None, :, None]),
                                idx[None, None, :], -1), axis=2)
  right_wall = jnp.min(jnp.where(shallower & (idx[None, None, :] > idx[None, :, None]),
                                 idx[None, None, :], big), axis=2)
  right_wall = jnp.minimum(right_wall, length)
  if unit_start is None:
    unit_start = mask
  unit_start = unit_start & mask
  counts = jnp.concatenate([jnp.zeros((depth.shape[0], 1), jnp.int32),
                            jnp.cumsum(unit_start, axis=1, dtype=jnp.int32)], axis=1)
  size = (jnp.take_along_axis(counts, right_wall, axis=1)
          - jnp.take_along_axis(counts, left_wall + 1, axis=1)).astype(jnp.float32)
  return jnp.sum(jnp.where(unit_start, jnp.log(jnp.maximum(size, 1.0)), 0.0), axis=1)


def path_entropy(tokens: jax.Array, mask: jax.Array, depth: jax.Array, stats: ScoringStats,
                 config: ScorerConfig) -> jax.Array:
  """H(q(path | x)) to add to log p(path) for a valid bound: float32 [B].

  Non-zero only for the ``random`` scorer (fresh i.i.d. scores). ``mix`` with a
  random base gets no term: the bound stays valid, only looser.
  """
  if config.name != "random":
    return jnp.zeros(tokens.shape[:1], jnp.float32)
  unit_start = None
  if config.word_level:
    units = make_units(tokens, mask, stats.word_start)
    unit_start = units.offset == 0
  return subtree_log_size_sum(depth, mask, unit_start)
