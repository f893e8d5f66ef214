"""Training objectives and likelihood bounds.

Insertion model (DESIGN section 2): sample a level h per example (uniform over
0..H, where H is the tree height and level H's step says ``none`` everywhere),
noise to it, and take the cross-entropy of every gap's target; plus an
embedding-distance loss. For a fixed scorer every sequence has one canonical
path, and ``sum_h CE(level h)`` is -log p(path) >= -log p(x): an upper bound on
the NLL. The sampled-level loss estimates it as ``(H + 1) * CE(level h)``.

Per-token figures divide by ``n + 1`` (n tokens plus the stop decision), the
same count an autoregressive model with an end-of-sequence token uses.

Shapes: ``B`` batch, ``L`` max tokens, ``T = L + 2`` canvas positions,
``G = L + 1`` gaps, ``V`` vocabulary, ``V + 1`` outputs (``none`` last).
"""

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from semdiff import noising
from semdiff import scorers
from semdiff.data.tokenizer import BOS_ID, EOS_ID, PAD_ID


@dataclasses.dataclass(frozen=True)
class NoiseConfig:
  """How training states are drawn (fields mirror ``config.noise``).

  Attributes:
    frontier_prob: chance that an example is a frontier state instead of an
      exact level.
    frontier_kind: which frontier states: "level" (level h plus a random
      fraction of the depth-h tokens), "tree" (any parent-closed subset, see
      `noising.tree_frontier_keep`) or "both" (half each).
    embed_loss_weight: lambda of the embedding-distance loss.
    span_loss_weight: weight of the span loss (``model.span_head`` models): -log q(token)
      for every token a state's canvas lacks, q the span head's distribution at the
      token's gap, each token weighted like one gap of the gap loss. Each gap then learns
      the whole of what it still lacks, not only its next token: more signal from the
      same forward pass. 0 = off.
    states_per_example: training states (levels) drawn per example per step.
    pack_rows: pack the canvases into this many rows of width L + 2 (several
      canvases per row, attention kept inside each); 0 = one canvas per row.
    causal_pack_rows: the causal baseline's packing: its B sequences
      ``[BOS] x`` go into this many rows of width L + 1; 0 = one per row.
    state_weight: how much each training state counts in the loss. "uniform": every
      gap the same. "height": an example's states by its number of levels H + 1, the
      inverse of the chance of drawing one of them, so the loss is the gradient of the
      NLL bound itself (uniform levels favour short, low sentences: each of their
      levels is drawn more often). "importance": also a level frontier (level h plus k
      of the m depth-h tokens) by the inverse of its chance given h, (m + 1)·C(m, k),
      at most ``frontier_weight_cap``, so that the frontier conditionals do not favour
      sentences with few unfilled gaps. Measured (benchmarks/README.md): neither
      lengthens confident-first samples, and both lower their quality at equal steps.
    frontier_weight_cap: largest frontier factor of "importance" (bounds the variance).
    level_draw: how a state's level h is drawn from 0..H: "uniform", or "tokens": in
      proportion to m_h + 1, the number of depth-h tokens (the tokens its gaps insert)
      plus one (so the last level, where every gap stops, still comes up), so wide levels
      come up more often: a default step has 253 token targets instead of 221 (needs
      ``state_weight="uniform"``).
    level_draw_power: "tokens" draws in proportion to (m_h + 1) ** this.
    keyword_prob: chance that a state also keeps 1 to ``keyword_max`` random tokens of
      the sentence, of any depth (not closed under parent): the canvases a keyword-
      conditioned sampler starts from. Without them a keyword canvas reads as the
      sentence's top level, i.e. "the keyword is x's most significant token" rather
      than "x contains the keyword" (benchmarks/README.md). Each gap's target stays the
      least-deep token in it.
    keyword_max: most keywords such a state keeps.
    closed_prob: share of states that also tell the model which of their empty gaps are
      closed (``model.gap_state``; `closed_gaps`): every gap that was empty one level
      earlier, and each empty gap of the current level with a per-state chance (0 for
      half of these states, else uniform). A sampler whose ``none`` closes a gap for good
      (``sampler.select="certainty"``) feeds its closed gaps back the same way, so the
      decisions still open are conditioned on the gaps already known to be empty.
    hole_prob: share of states that are the whole sentence with a few holes: random
      non-adjacent tokens left out, every other gap closed (``model.gap_state`` models
      only; `hole_keep`). Each hole's target is its one missing token, so the model learns
      p(x_i | the rest of x): the question the sampler's correction rounds ask of every
      token of a finished sample (``sampler.refine_steps``).
    hole_rate: most of a hole state's tokens that are candidates for a hole (each state
      draws its rate uniformly below this; of a run of adjacent candidates only the first
      becomes a hole).
    hole_open: most of a hole state's empty gaps that stay open, target ``none`` (each
      state draws its chance uniformly below this). Above 0 a hole state may also have no
      hole at all, so the model learns whether anything is missing: the question
      ``sampler.refine_edits="all"`` asks to delete and insert tokens. 0: every empty gap
      is closed and every hole state has a hole.
    hole_runs: a run of adjacent candidates is left out whole (the gap's target is its
      most significant token, as in every state) instead of only its first token. The
      sampler's late drafts often lack several adjacent tokens where the sentence is
      otherwise whole ("our big sandwiches ." lacks "can fall"); runs show the model such
      canvases. False: each hole is its gap's one missing token (what the correction
      rounds ask).
    slot_order: the slot model's non-random training order, which its bound reads:
      "level" (a level's gaps decide together, as the parallel sampler does) or
      "sequential" (one at a time, left to right; see `slot_schedule`).
  """

  frontier_prob: float = 0.0
  frontier_kind: str = "level"
  embed_loss_weight: float = 0.0
  span_loss_weight: float = 0.0
  states_per_example: int = 1
  pack_rows: int = 0
  causal_pack_rows: int = 0
  slot_order: str = "level"
  state_weight: str = "uniform"
  frontier_weight_cap: float = 100.0
  level_draw: str = "uniform"
  level_draw_power: float = 1.0
  keyword_prob: float = 0.0
  keyword_max: int = 3
  closed_prob: float = 0.0
  hole_prob: float = 0.0
  hole_rate: float = 0.5
  hole_open: float = 0.0
  hole_runs: bool = False

  @classmethod
  def from_config(cls, config) -> "NoiseConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    cfg = cls(**{k: v for k, v in dict(config).items() if k in fields})
    if cfg.frontier_kind not in FRONTIER_KINDS:
      raise ValueError(f"Unknown noise.frontier_kind {cfg.frontier_kind!r}; choose one of "
                       f"{', '.join(FRONTIER_KINDS)}.")
    if cfg.state_weight not in STATE_WEIGHTS:
      raise ValueError(f"Unknown noise.state_weight {cfg.state_weight!r}; choose one of "
                       f"{', '.join(STATE_WEIGHTS)}.")
    if cfg.level_draw not in LEVEL_DRAWS:
      raise ValueError(f"Unknown noise.level_draw {cfg.level_draw!r}; choose one of "
                       f"{', '.join(LEVEL_DRAWS)}.")
    if cfg.level_draw != "uniform" and cfg.state_weight != "uniform":
      raise ValueError(f"noise.state_weight={cfg.state_weight!r} assumes uniform levels: "
                       f"use it with noise.level_draw='uniform', or set state_weight='uniform'.")
    if not 0.0 <= cfg.keyword_prob <= 1.0 or cfg.keyword_max < 1:
      raise ValueError(f"noise.keyword_prob={cfg.keyword_prob} must be in [0, 1] and "
                       f"noise.keyword_max={cfg.keyword_max} at least 1.")
    if not 0.0 <= cfg.closed_prob <= 1.0:
      raise ValueError(f"noise.closed_prob={cfg.closed_prob} must be in [0, 1].")
    if (not 0.0 <= cfg.hole_prob <= 1.0 or not 0.0 < cfg.hole_rate <= 1.0
        or not 0.0 <= cfg.hole_open <= 1.0):
      raise ValueError(f"noise.hole_prob={cfg.hole_prob} and noise.hole_open={cfg.hole_open} "
                       f"must be in [0, 1], noise.hole_rate={cfg.hole_rate} in (0, 1].")
    if cfg.slot_order not in SLOT_ORDERS:
      raise ValueError(f"Unknown noise.slot_order {cfg.slot_order!r}; choose one of "
                       f"{', '.join(SLOT_ORDERS)}.")
    return cfg


FRONTIER_KINDS = ("level", "tree", "both")
SLOT_ORDERS = ("level", "sequential")
STATE_WEIGHTS = ("uniform", "height", "importance")
LEVEL_DRAWS = ("uniform", "tokens")


def canvas_inputs(canvas: jax.Array, length: jax.Array):
  """Model inputs ``[BOS] canvas[:n] [EOS] [PAD]...`` for unpacked canvases.

  Args:
    canvas: int [B, L], left-aligned tokens, padding after ``length``.
    length: int [B], number of tokens n.

  Returns:
    (tokens int32 [B, L+2], segment_ids int32 [B, L+2], positions int32 [B, L+2]).
  """
  batch, max_len = canvas.shape
  pos = jnp.arange(max_len + 2, dtype=jnp.int32)[None, :]
  body = jnp.concatenate([jnp.full((batch, 1), BOS_ID, jnp.int32),
                          canvas.astype(jnp.int32),
                          jnp.full((batch, 1), PAD_ID, jnp.int32)], axis=1)
  n = length[:, None]
  tokens = jnp.where(pos == n + 1, EOS_ID, jnp.where(pos <= n, body, PAD_ID))
  segment_ids = (pos <= n + 1).astype(jnp.int32)
  positions = jnp.broadcast_to(pos, tokens.shape)
  return tokens.astype(jnp.int32), segment_ids, positions


class Packed(NamedTuple):
  """Canvases packed several to a row.

  Attributes:
    tokens, segment_ids, positions: int32 [R, W] model inputs; segment ids are
      1 + the canvas index, 0 on padding.
    gap_targets: int32 [R, W-1], target of the gap between packed positions
      g and g+1, or -1 (padding, or a boundary between two canvases).
    gap_source: int32 [R, W-1], index of the canvas the gap belongs to, or -1.
    dropped: int32 [], canvases that did not fit (their gaps are left out).
    extra: more target arrays packed like ``gap_targets`` (-1 = none there).
    canvas_row, canvas_offset: int32 [N], where each canvas starts (row ``rows``: dropped).
  """

  tokens: jax.Array
  segment_ids: jax.Array
  positions: jax.Array
  gap_targets: jax.Array
  gap_source: jax.Array
  dropped: jax.Array
  extra: tuple = ()
  canvas_row: Optional[jax.Array] = None
  canvas_offset: Optional[jax.Array] = None


def pack(tokens, segment_ids, positions, gap_targets, *, rows: int, extra=()) -> Packed:
  """Packs N unpacked canvases ([N, T] inputs, [N, T-1] gap targets) into [rows, T].

  ``extra``: further per-position targets ([N, <= T], -1 where there is none) packed
  the same way as ``gap_targets``.

  First-fit in the given order (a scan over canvases, not tokens): a canvas goes to
  the first row with room for it; canvases that fit nowhere are dropped and counted.
  With the default config's canvases it needs about a tenth fewer rows than next-fit
  (the causal baseline's sentences, a sixth): benchmarks/README.md, train_throughput.py.
  """
  num, width = tokens.shape
  lengths = jnp.sum(segment_ids > 0, axis=1, dtype=jnp.int32)

  def place(used, length):
    room = used + length <= width
    row = jnp.where(jnp.any(room), jnp.argmax(room), rows).astype(jnp.int32)
    offset = jnp.where(row < rows, used[jnp.minimum(row, rows - 1)], 0)
    return used.at[row].add(length, mode="drop"), (row, offset)

  _, (row, offset) = jax.lax.scan(place, jnp.zeros((rows,), jnp.int32), lengths)
  fits = row < rows
  pos = jnp.arange(width, dtype=jnp.int32)[None, :]
  real = (pos < lengths[:, None]) & fits[:, None]
  source = jnp.arange(num, dtype=jnp.int32)[:, None]

  def scatter(values, fill, valid):
    cols = valid.shape[1]
    dest_row = jnp.where(valid, row[:, None], rows)  # out of range: dropped
    dest_col = offset[:, None] + pos[:, :cols]
    out = jnp.full((rows, cols), fill, jnp.int32)
    return out.at[dest_row, dest_col].set(
        jnp.broadcast_to(values, valid.shape).astype(jnp.int32), mode="drop")

  gap_valid = (gap_targets >= 0) & fits[:, None]
  return Packed(
      tokens=scatter(tokens, PAD_ID, real),
      segment_ids=scatter(source + 1, 0, real),
      positions=scatter(positions, 0, real),
      gap_targets=scatter(gap_targets, -1, gap_valid),
      gap_source=scatter(source, -1, gap_valid),
      dropped=jnp.sum(~fits & (lengths > 0)).astype(jnp.int32),
      extra=tuple(scatter(e, -1, (e >= 0) & fits[:, None]) for e in extra),
      canvas_row=jnp.minimum(row, rows), canvas_offset=offset)


def gap_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-gap cross-entropy, float32 [B, G]; 0 where ``targets`` < 0."""
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
  return jnp.where(targets >= 0, logz - picked, 0.0)


def top1_correct(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """bool [...]: whether the target's logit is the largest (``targets`` >= 0 only).

  The same as ``argmax(logits) == targets`` but for exact ties, and about twice as fast
  on CPU: a max reduction, which can share the logsumexp's, instead of an index-carrying
  one over the whole [..., V+1] logits.
  """
  picked = jnp.take_along_axis(logits, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
  return (picked >= jnp.max(logits, axis=-1)) & (targets >= 0)


def embedding_distance(logits: jax.Array, targets: jax.Array, table: jax.Array) -> jax.Array:
  """Squared distance between the expected and the true inserted embedding.

  Args:
    logits: [B, G, V+1]; targets: int [B, G] (< 0 ignored);
    table: [V+1, D] output embeddings (``none`` last), the target side is
      held fixed (stop-gradient).

  Returns:
    float32 [B, G], mean over D of (E_p[e] - e_target)^2; 0 on ignored gaps.
  """
  probs = jax.nn.softmax(logits, axis=-1)
  expected = jnp.einsum("bgv,vd->bgd", probs, table)
  true = jax.lax.stop_gradient(jnp.take(table, jnp.maximum(targets, 0), axis=0))
  dist = jnp.mean(jnp.square(expected - true), axis=-1)
  return jnp.where(targets >= 0, dist, 0.0)


class States(NamedTuple):
  """``N`` training states drawn by `draw_states` (a tuple: unpacks in this order)."""
  noised: noising.Noised     # the canvases and their gap targets
  height: jax.Array          # int32 [N]: the tree's height H
  exact: jax.Array           # bool [N]: an exact level, not a frontier state
  path_entropy: jax.Array    # float32 [N]: the random scorer's tree-entropy term, else 0
  weight: jax.Array          # float32 [N]: the state's loss weight (NoiseConfig.state_weight)
  # float32 [N]: 1 / the chance of the drawn level (H + 1 for uniform levels); scales one
  # level's NLL to an unbiased estimate of the path's.
  level_scale: jax.Array


def draw_states(tokens, mask, rng, stats, scorer_cfg: scorers.ScorerConfig,
                noise_cfg: NoiseConfig, none_id: int, repeats: int = 1) -> States:
  """Score, build trees and draw ``repeats`` independent training states per example.

  Args:
    tokens: int32 [B, L]; mask: bool [B, L]; rng: PRNG key.
    repeats: states per example; the results are those of the batch tiled ``repeats``
      times (row ``r * B + b`` is example b), but a scorer that draws nothing random
      scores and builds each example's tree once.

  Returns:
    `States` of N = repeats * B states.
  """
  k_score, k_level, k_front, k_frac, k_tree = jax.random.split(rng, 5)
  tile = lambda x: jnp.tile(x, (repeats,) + (1,) * (x.ndim - 1)) if repeats > 1 else x
  if scorer_cfg.uses_rng:  # every state gets its own random order
    tokens, mask = tile(tokens), tile(mask)
  scores = scorers.significance(tokens, mask, k_score, stats, scorer_cfg)
  ancestor = noising.ancestors(scores, mask)  # built once: depths and tree frontiers
  depth = noising.depth_from_ancestors(ancestor, mask)
  path_entropy = scorers.path_entropy(tokens, mask, depth, stats, scorer_cfg)
  if not scorer_cfg.uses_rng:
    tokens, mask, ancestor, depth, path_entropy = map(
        tile, (tokens, mask, ancestor, depth, path_entropy))
  height = noising.tree_height(depth, mask)
  if noise_cfg.level_draw == "tokens":  # in proportion to (m_h + 1) ** level_draw_power
    span = jnp.arange(depth.shape[1] + 1)
    per_level = jnp.sum((depth[..., None] == span) & mask[..., None], axis=1) + 1  # [N, L+1]
    per_level = per_level.astype(jnp.float32) ** noise_cfg.level_draw_power
    per_level = jnp.where(span <= height[:, None], per_level, 0.0)
    level = jax.random.categorical(k_level, jnp.log(per_level))
    level = level.astype(jnp.int32)
    level_scale = (jnp.sum(per_level, axis=1) /
                   jnp.take_along_axis(per_level, level[:, None], axis=1)[:, 0])
  else:
    level = jax.random.randint(k_level, height.shape, 0, height + 1)
    level_scale = height + 1
  level_scale = level_scale.astype(jnp.float32)
  draw = jax.random.uniform(k_front, height.shape)
  exact = draw >= noise_cfg.frontier_prob
  fraction = jnp.where(exact, 0.0, jax.random.uniform(k_frac, height.shape))
  keep = noising.frontier_keep(depth, level, fraction, jax.random.fold_in(k_frac, 1))
  if noise_cfg.frontier_kind != "level" and noise_cfg.frontier_prob > 0:
    # "both": the lower half of the frontier draws are tree-shaped.
    share = 1.0 if noise_cfg.frontier_kind == "tree" else 0.5
    tree = ~exact & (draw < noise_cfg.frontier_prob * share)
    keep = jnp.where(tree[:, None], noising.tree_frontier_keep(ancestor, mask, k_tree), keep)
  else:
    tree = jnp.zeros_like(exact)
  level_frontier = ~exact & ~tree
  if noise_cfg.keyword_prob > 0:  # (its own key: the other draws stay those of prob 0)
    chosen = keyword_keep(mask, jax.random.fold_in(rng, 7), noise_cfg)
    keep = keep | chosen
    with_keywords = jnp.any(chosen, axis=1)
    exact &= ~with_keywords  # not an exact level: left out of the bound estimate
    level_frontier &= ~with_keywords
  holed = None
  if noise_cfg.hole_prob > 0:  # (its own key: the other draws stay those of prob 0)
    holed, holes = hole_keep(mask, jax.random.fold_in(rng, 13), noise_cfg)
    keep = jnp.where(holed[:, None], mask & ~holes, keep)
    exact &= ~holed
    level_frontier &= ~holed
  noised = noising.noise_to_keep(tokens, depth, keep, pad_id=PAD_ID, none_id=none_id)
  if noise_cfg.closed_prob > 0:  # (its own key: the other draws stay those of prob 0)
    k_on, k_rate, k_gap = jax.random.split(jax.random.fold_in(rng, 11), 3)
    on = jax.random.uniform(k_on, height.shape) < noise_cfg.closed_prob
    if noise_cfg.keyword_prob > 0:
      on &= ~with_keywords
    rate = jnp.maximum(0.0, 2.0 * jax.random.uniform(k_rate, height.shape) - 1.0)
    closed = closed_gaps(noised, depth, keep, level, tree, rate, k_gap, none_id) & on[:, None]
    noised = noised._replace(closed=closed)
    exact &= ~on  # the plain bound's estimate reads states without closed gaps
  if holed is not None:  # a hole state's other gaps are closed (but a hole_open share)
    closed = holed[:, None] & (noised.gap_targets == none_id)
    if noise_cfg.hole_open > 0:
      k_rate, k_gap = jax.random.split(jax.random.fold_in(rng, 17))
      chance = noise_cfg.hole_open * jax.random.uniform(k_rate, (closed.shape[0], 1))
      closed &= jax.random.uniform(k_gap, closed.shape) >= chance
    if noised.closed is not None:
      closed |= ~holed[:, None] & noised.closed
    noised = noised._replace(closed=closed)
  weight = state_weights(depth, level, keep, height, level_frontier, noise_cfg)
  return States(noised, height, exact, path_entropy, weight, level_scale)


def closed_gaps(noised, depth, keep, level, tree, rate, rng, none_id: int):
  """Which empty gaps a training state says are closed: bool [B, L+1].

  Level states (exact or level frontiers, level h): every empty gap opened before step h
  (`noising.gap_boundary_depth` < h - 1: empty since an earlier level), and each empty gap
  of the current level (value h - 1) with chance ``rate``; gaps opened by kept depth-h
  tokens stay open. Tree frontiers (no single level): each empty gap with chance ``rate``.

  Args:
    noised: the states (`noising.noise_to_keep` of ``keep``); depth, keep: [B, L];
    level: int [B]; tree: bool [B], tree frontiers; rate: float [B]; rng: PRNG key.
  """
  coin = jax.random.uniform(rng, noised.gap_targets.shape) < rate[:, None]
  by_level = closed_by_level(noised, depth, keep, level, none_id, current=coin)
  return jnp.where(tree[:, None], coin & (noised.gap_targets == none_id), by_level)


def closed_by_level(noised, depth, keep, level, none_id: int, current=False):
  """The empty gaps of a level state (level h) opened before step h, bool [B, L+1]: empty
  since an earlier level (`noising.gap_boundary_depth` < h - 1). ``current`` (bool
  [B, L+1]) also closes those empty gaps of the current level (value h - 1) where it holds.
  """
  boundary = noising.gap_boundary_depth(depth, keep)
  before = level[:, None] - 1
  return (noised.gap_targets == none_id) & (
      (boundary < before) | ((boundary == before) & current))


def keyword_keep(mask, rng, noise_cfg: NoiseConfig):
  """Random keywords: bool [B, L], for a ``keyword_prob`` share of the rows 1 to
  ``keyword_max`` (uniform, at most the length) distinct real tokens, else none."""
  k_on, k_num, k_pick = jax.random.split(rng, 3)
  batch = mask.shape[0]
  on = jax.random.uniform(k_on, (batch,)) < noise_cfg.keyword_prob
  n = jnp.sum(mask, axis=1)
  count = jnp.minimum(jax.random.randint(k_num, (batch,), 1, noise_cfg.keyword_max + 1), n)
  # The `count` real tokens with the smallest uniform keys: a uniform subset of that size.
  keys = jnp.where(mask, jax.random.uniform(k_pick, mask.shape), 2.0)
  rank = jnp.argsort(jnp.argsort(keys, axis=1), axis=1)
  return mask & (rank < count[:, None]) & on[:, None]


def hole_keep(mask, rng, noise_cfg: NoiseConfig):
  """Hole states: (holed bool [B], holes bool [B, L]).

  A ``hole_prob`` share of the rows is holed. Each of their real tokens is a candidate with
  the row's rate (uniform in [0, ``hole_rate``)), one random token always is (unless
  ``hole_open`` > 0: then a row may have no hole), and the first candidate of every run of
  adjacent candidates becomes a hole: no two adjacent, so each hole is the only missing
  token of its gap (with ``hole_runs`` every candidate is a hole).
  """
  k_on, k_rate, k_cand, k_one = jax.random.split(rng, 4)
  batch, length = mask.shape
  holed = (jax.random.uniform(k_on, (batch,)) < noise_cfg.hole_prob) & jnp.any(mask, axis=1)
  rate = noise_cfg.hole_rate * jax.random.uniform(k_rate, (batch, 1))
  n = jnp.sum(mask, axis=1)
  one = jax.random.randint(k_one, (batch,), 0, jnp.maximum(n, 1))
  forced = jnp.arange(length)[None, :] == one[:, None]
  if noise_cfg.hole_open > 0:
    forced = jnp.zeros_like(forced)
  cand = mask & ((jax.random.uniform(k_cand, mask.shape) < rate) | forced)
  holes = cand if noise_cfg.hole_runs else cand & ~jnp.pad(cand[:, :-1], ((0, 0), (1, 0)))
  return holed, holes & holed[:, None]


def state_weights(depth, level, keep, height, level_frontier, noise_cfg: NoiseConfig):
  """Each training state's loss weight, float32 [B] (``NoiseConfig.state_weight``).

  Args:
    depth: int [B, L] (>= L on padding); level: int [B]; keep: bool [B, L] the state;
    height: int [B]; level_frontier: bool [B], the states drawn by `noising.frontier_keep`
      with a uniform fraction (level h plus k of its m depth-h tokens, chance
      k! (m - k)! / (m + 1)! given h).
  """
  if noise_cfg.state_weight == "uniform":
    return jnp.ones(height.shape, jnp.float32)
  weight = (height + 1).astype(jnp.float32)
  if noise_cfg.state_weight == "importance":
    at_level = depth == level[:, None]
    m = jnp.sum(at_level, axis=1).astype(jnp.float32)
    k = jnp.sum(at_level & keep, axis=1).astype(jnp.float32)
    log_factor = (jnp.log1p(m) + jax.scipy.special.gammaln(m + 1)
                  - jax.scipy.special.gammaln(k + 1) - jax.scipy.special.gammaln(m - k + 1))
    factor = jnp.minimum(jnp.exp(log_factor), noise_cfg.frontier_weight_cap)
    weight = weight * jnp.where(level_frontier, factor, 1.0)
  return weight


def insertion_loss(model, tokens, mask, rng, stats, scorer_cfg, noise_cfg):
  """The training loss of the insertion model on one batch.

  Args:
    model: an `InsertionTransformer`.
    tokens: int32 [B, L]; mask: bool [B, L] (real tokens form a prefix).
    rng: PRNG key; stats: `scorers.ScoringStats`.
    scorer_cfg, noise_cfg: static configs.

  Returns:
    (loss scalar, metrics dict of scalars; sums are summed over the batch so
    that data-parallel shards add up, with matching ``*_count`` entries).
  """
  none_id = model.none_id
  k = noise_cfg.states_per_example
  # Several states of the same examples, drawn independently.
  noised, height, exact, path_entropy, weight, level_scale = draw_states(
      tokens, mask, rng, stats, scorer_cfg, noise_cfg, none_id, repeats=k)
  if k > 1:
    tokens, mask = jnp.tile(tokens, (k, 1)), jnp.tile(mask, (k, 1))
  inputs = canvas_inputs(noised.canvas, noised.length)
  targets = noised.gap_targets
  closed = noised.closed
  if closed is not None:  # known to be empty: no decision left there, no loss
    targets = jnp.where(closed, -1, targets)
  num = tokens.shape[0]
  if noise_cfg.pack_rows:
    extra = () if closed is None else (jnp.where(closed, 1, -1),)
    packed = pack(*inputs, targets, rows=noise_cfg.pack_rows, extra=extra)
    inputs = (packed.tokens, packed.segment_ids, packed.positions)
    targets, source, dropped = packed.gap_targets, packed.gap_source, packed.dropped
    if closed is not None:
      closed = packed.extra[0] == 1
  else:
    source = jnp.where(targets >= 0, jnp.arange(num, dtype=jnp.int32)[:, None], -1)
    dropped = jnp.int32(0)
  features = model.gap_features(*inputs, closed=closed)  # [rows, T-1, D]
  logits = model.gap_head(features)  # [rows, T-1, V+1]
  valid = targets >= 0
  nll = gap_nll(logits, targets)
  num_gaps = jnp.sum(valid)
  # Each gap counts with its state's weight (1 unless noise.state_weight says otherwise);
  # the total weight does not depend on the parameters (the accumulation normaliser).
  gap_weight = jnp.where(valid, weight[jnp.maximum(source, 0)], 0.0)
  weight_sum = jnp.sum(gap_weight)
  per_gap = nll
  embed = jnp.float32(0.0)
  if noise_cfg.embed_loss_weight:
    distance = embedding_distance(logits, targets, model.output_table())
    embed = jnp.sum(distance) / jnp.maximum(num_gaps, 1)
    per_gap = per_gap + noise_cfg.embed_loss_weight * distance
  loss = jnp.sum(gap_weight * per_gap) / jnp.maximum(weight_sum, 1e-9)
  span_sum = span_count = jnp.float32(0.0)
  if noise_cfg.span_loss_weight:
    # Normalised like the gap loss (by the gaps' weight), so that micro-batches add up.
    span_sum, span_count = span_nll(model, features, tokens, noised.span_gap,
                                    packed if noise_cfg.pack_rows else None)
    loss = loss + noise_cfg.span_loss_weight * span_sum / jnp.maximum(weight_sum, 1e-9)
  correct = top1_correct(logits, targets) & valid
  # Per-state sums (dropped states have none), for the NLL-bound estimate.
  state_nll = jax.ops.segment_sum(nll.ravel(), jnp.where(valid, source, num).ravel(),
                                  num_segments=num + 1)[:num]
  kept = jax.ops.segment_sum(valid.ravel().astype(jnp.int32),
                             jnp.where(valid, source, num).ravel(), num_segments=num + 1)[:num] > 0
  counted = exact & kept & jnp.any(mask, axis=1)
  n_tokens = jnp.sum(mask, axis=1)
  # Unbiased estimate of -log p(path) from one sampled level (exact levels only).
  path_nll = level_scale * state_nll - path_entropy
  metrics = {
      "loss": loss,
      "gap_nll_sum": jnp.sum(nll),
      "gap_count": num_gaps.astype(jnp.float32),
      "loss_weight": weight_sum,
      "gap_correct": jnp.sum(correct).astype(jnp.float32),
      "embed_distance": embed,
      "span_nll_sum": span_sum,
      "span_count": span_count,
      "nll_bound_sum": jnp.sum(jnp.where(counted, path_nll, 0.0)),
      "nll_bound_tokens": jnp.sum(jnp.where(counted, n_tokens + 1, 0)).astype(jnp.float32),
      "nll_bound_sentences": jnp.sum(counted).astype(jnp.float32),
      "tokens": jnp.sum(mask).astype(jnp.float32) / k,
      "canvas_positions": jnp.sum(inputs[1] > 0).astype(jnp.float32),
      "computed_positions": jnp.float32(inputs[1].size),
      "dropped_states": dropped.astype(jnp.float32),
      "mean_height": jnp.mean(height.astype(jnp.float32)),
  }
  return loss, metrics


def span_nll(model, features, tokens, span_gap, packed: Optional[Packed]):
  """(sum, count) of -log q(token) over every token the canvases lack, q the span head's
  distribution at the token's gap.

  Args:
    model: a ``model.span_head`` `InsertionTransformer`.
    features: [R, T-1, D] gap features of the (packed or unpacked) rows.
    tokens: int32 [N, L], the examples of the N canvases.
    span_gap: int32 [N, L], `noising.Noised.span_gap` (-1 = not missing).
    packed: the layout of the rows, or None (one canvas per row).
  """
  num = tokens.shape[0]
  if packed is None:
    row, offset = jnp.arange(num, dtype=jnp.int32), jnp.zeros((num,), jnp.int32)
    fits = jnp.ones((num,), bool)
  else:
    row, offset = packed.canvas_row, packed.canvas_offset
    fits = row < features.shape[0]
  missing = (span_gap >= 0) & fits[:, None]
  logq = jax.nn.log_softmax(model.span_logits(features), axis=-1)  # [R, T-1, V]
  r = jnp.broadcast_to(jnp.minimum(row, features.shape[0] - 1)[:, None], span_gap.shape)
  c = jnp.clip(offset[:, None] + span_gap, 0, features.shape[1] - 1)
  nll = -logq[r, c, tokens]
  return jnp.sum(jnp.where(missing, nll, 0.0)), jnp.sum(missing).astype(jnp.float32)


def tree_inputs(tokens, mask, depth, child, root, none_id: int):
  """The tree model's one-pass canvas and child targets of whole sentences.

  Args:
    tokens: int [B, L]; mask: bool [B, L]; depth: int [B, L];
    child, root: from `noising.children`.
    none_id: the model's ``none`` id.

  Returns:
    ((tokens, segment_ids, times) int32 [B, L+2] each: ``[BOS] x [EOS]`` with each token's
    depth as its insertion step, -1 for BOS and EOS; targets int32 [B, L+2, 2]: the left and
    right child of every token (``none_id`` where it has none), the root at BOS's right, -1
    where nothing is predicted).
  """
  batch, max_len = tokens.shape
  n = jnp.sum(mask, axis=1)[:, None]
  pos = jnp.arange(max_len + 2)[None, :]
  tokens = tokens.astype(jnp.int32)
  canvas, segment_ids, _ = canvas_inputs(tokens, n[:, 0])
  body = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), depth.astype(jnp.int32),
                          jnp.zeros((batch, 1), jnp.int32)], axis=1)
  times = jnp.where((pos == 0) | (pos == n + 1), -1, jnp.where(pos <= n, body, 0))
  kid = jnp.where(child >= 0, jnp.take_along_axis(
      tokens[:, :, None], jnp.maximum(child, 0), axis=1), none_id)
  kid = jnp.where(mask[..., None], kid, -1)
  first = jnp.where(root >= 0, jnp.take_along_axis(tokens, jnp.maximum(root, 0)[:, None], 1)[:, 0],
                    none_id)
  bos = jnp.stack([jnp.full((batch,), -1, jnp.int32), first.astype(jnp.int32)], axis=-1)
  end = jnp.full((batch, 1, 2), -1, jnp.int32)
  targets = jnp.concatenate([bos[:, None], kid.astype(jnp.int32), end], axis=1)
  return (canvas, segment_ids, times.astype(jnp.int32)), targets


def _whole_path_metrics(logits, targets, source, tokens, mask, depth, height, stats,
                        scorer_cfg, segment_ids, dropped, embed, counted=None):
  """Loss and metrics of a one-pass model (tree, slot): every decision of a path at once.

  Args:
    logits: [R, ..., V+1]; targets: int [R, ...] (-1 = no decision); source: int [R, T],
      the sentence of each packed position (broadcast over targets' trailing axes);
    tokens, mask, depth, height: the unpacked sentences' [B, L] / [B] arrays;
    segment_ids: [R, T] packed inputs; dropped: sentences that did not fit;
    embed: the embedding-distance term (0 when off); counted: bool [B], which sentences'
      path NLLs are the reported bound (default all).

  Returns:
    (loss, metrics) with the insertion loss's keys.
  """
  num = tokens.shape[0]
  valid = targets >= 0
  nll = gap_nll(logits, targets)
  count = jnp.sum(valid)
  loss = jnp.sum(nll) / jnp.maximum(count, 1)
  correct = top1_correct(logits, targets) & valid
  source = source.reshape(source.shape + (1,) * (targets.ndim - source.ndim))
  where = jnp.where(valid, source, num).ravel()
  sentence_nll = jax.ops.segment_sum(nll.ravel(), where, num_segments=num + 1)[:num]
  kept = jax.ops.segment_sum(valid.ravel().astype(jnp.int32), where,
                             num_segments=num + 1)[:num] > 0
  counted = kept & jnp.any(mask, axis=1) & (True if counted is None else counted)
  path_nll = sentence_nll - scorers.path_entropy(tokens, mask, depth, stats, scorer_cfg)
  n_tokens = jnp.sum(mask, axis=1)
  return loss, {
      "loss": loss,
      "gap_nll_sum": jnp.sum(nll),
      "gap_count": count.astype(jnp.float32),
      "gap_correct": jnp.sum(correct).astype(jnp.float32),
      "embed_distance": embed,
      "nll_bound_sum": jnp.sum(jnp.where(counted, path_nll, 0.0)),
      "nll_bound_tokens": jnp.sum(jnp.where(counted, n_tokens + 1, 0)).astype(jnp.float32),
      "nll_bound_sentences": jnp.sum(counted).astype(jnp.float32),
      "tokens": jnp.sum(mask).astype(jnp.float32),
      "canvas_positions": jnp.sum(segment_ids > 0).astype(jnp.float32),
      "computed_positions": jnp.float32(segment_ids.size),
      "dropped_states": jnp.asarray(dropped, jnp.float32),
      "mean_height": jnp.mean(height.astype(jnp.float32)),
  }


def tree_loss(model, tokens, mask, rng, stats, scorer_cfg, noise_cfg):
  """Training loss of the tree model: every level of every sentence, teacher-forced at once.

  The 2n + 1 child predictions of a sentence sum to -log p(path) exactly (the bound of
  DESIGN section 2 without sampling a level). Sentences are packed several to a row with
  ``noise_cfg.causal_pack_rows`` (like the causal baseline's), else one per row. Metric keys
  are the insertion loss's.
  """
  none_id = model.none_id
  scores = scorers.significance(tokens, mask, rng, stats, scorer_cfg)
  ancestor = noising.ancestors(scores, mask)
  depth = noising.depth_from_ancestors(ancestor, mask)
  height = noising.tree_height(depth, mask)
  child, root = noising.children(ancestor, depth, mask)
  inputs, targets = tree_inputs(tokens, mask, depth, child, root, none_id)
  left, right = targets[..., 0], targets[..., 1]
  num = tokens.shape[0]
  dropped = jnp.int32(0)
  if noise_cfg is not None and noise_cfg.causal_pack_rows:
    packed = pack(*inputs, left, rows=noise_cfg.causal_pack_rows, extra=(right,))
    inputs = (packed.tokens, packed.segment_ids, packed.positions)
    left, (right,), dropped = packed.gap_targets, packed.extra, packed.dropped
    source = packed.segment_ids - 1  # the sentence of each packed position, -1 on padding
  else:
    source = jnp.where(inputs[1] > 0, jnp.arange(num, dtype=jnp.int32)[:, None], -1)
  targets = jnp.stack([left, right], axis=-1)
  logits = model(*inputs)  # [rows, T, 2, V+1]
  embed = jnp.float32(0.0)
  if noise_cfg is not None and noise_cfg.embed_loss_weight:
    flat = logits.reshape(logits.shape[0], -1, logits.shape[-1])
    embed = jnp.sum(embedding_distance(flat, targets.reshape(flat.shape[:2]),
                                       model.output_table())) / jnp.maximum(
                                           jnp.sum(targets >= 0), 1)
  loss, metrics = _whole_path_metrics(logits, targets, source, tokens, mask, depth, height,
                                      stats, scorer_cfg, inputs[1], dropped, embed)
  if noise_cfg is not None and noise_cfg.embed_loss_weight:
    loss = loss + noise_cfg.embed_loss_weight * embed
    metrics["loss"] = loss
  return loss, metrics


# Slot-model times are integers in units of 1/TIME_SCALE step, so that random
# (continuous) schedules and whole-step ones share one comparison.
TIME_SCALE = 1_000_000


def slot_schedule(ancestor, depth, mask, child, rng, random_order, sequential: bool = False):
  """Insertion times of tokens and decision times of their slots, one schedule per row.

  Level order (``random_order`` False): a token's time is its depth; each slot decides one
  step after its owner (its child, if any, is inserted then). With ``sequential`` the
  level-order rows instead decide a level's gaps one at a time, left to right: the gap g of
  the level-d canvas decides at time d + 1 + g / (L + 1), seeing the tokens already put into
  the gaps left of it, so the path's -log p is a chain rule with no independence between a
  level's gaps (the order depends only on the canvas so far, so it is a proper model).
  Random order: every token waits a uniform (0, 1] after its parent (times are sums over its
  ancestors), a slot with a child decides when the child is inserted, and an empty slot a
  uniform (0, 1] after its owner. Either way a slot sees exactly the tokens inserted before
  it decides.

  Args:
    ancestor: bool [B, L, L]; depth: int [B, L]; mask: bool [B, L];
    child: int [B, L, 2] from `noising.children`; rng: PRNG key;
    random_order: bool [B], which rows take the random schedule;
    sequential: (static) the other rows take the sequential level order.

  Returns:
    (times int32 [B, L] of the tokens, slot_times int32 [B, L, 2] of their left and right
    slots, root_time int32 [B] of BOS's slot), in units of 1/TIME_SCALE step.
  """
  max_len = mask.shape[1]
  k_u, k_none = jax.random.split(rng)
  u = 1.0 - jax.random.uniform(k_u, mask.shape)
  walk = u + jnp.einsum("bij,bj->bi", ancestor.astype(jnp.float32), u)
  level = depth.astype(jnp.float32) + 1.0  # depth-d tokens at time d + 1: BOS, EOS at 0
  # A slot's gap in its owner's canvas (the level-d canvas): its owner's rank there + side.
  older = mask[:, None, :] & (depth[:, None, :] <= depth[:, :, None])
  left_of = jnp.tril(jnp.ones((max_len, max_len), bool), -1)[None]  # j < i
  rank = jnp.sum(older & left_of, axis=2).astype(jnp.float32)  # [B, L]
  slot_level = level[..., None] + 1.0
  if sequential:
    # A token sits in gap (its older left neighbours) of the canvas it is inserted into.
    gap_in = jnp.sum(older & left_of & (depth[:, None, :] < depth[:, :, None]), axis=2)
    level = level + gap_in.astype(jnp.float32) / (max_len + 1)
    slot_level = slot_level + (rank[..., None] + jnp.arange(2.0)) / (max_len + 1)
  t = jnp.where(random_order[:, None], walk, level)
  t = jnp.where(mask, jnp.ceil(t * TIME_SCALE), 0).astype(jnp.int32)
  wait = 1.0 - jax.random.uniform(k_none, child.shape)
  empty = jnp.where(random_order[:, None, None],
                    t[..., None] + jnp.ceil(wait * TIME_SCALE).astype(jnp.int32),
                    jnp.ceil(slot_level * TIME_SCALE).astype(jnp.int32))
  child_time = jnp.take_along_axis(t[:, :, None], jnp.maximum(child, 0).reshape(
      child.shape[0], -1, 1), axis=1).reshape(child.shape)
  slot_times = jnp.where(child >= 0, child_time, empty)
  root = jnp.max(jnp.where(mask & (depth == 0), t, -1), axis=1)
  root_time = jnp.where(root >= 0, root, TIME_SCALE)
  return t, slot_times, root_time


def slot_inputs(tokens, mask, depth, child, root, times, slot_times, root_time, slot_id: int,
                none_id: int):
  """The slot model's one-pass sequence: ``[BOS] S ( S x S )... [EOS]`` and its targets.

  Token k sits at 3 + 3k between its left slot (2 + 3k) and right slot (4 + 3k); BOS's slot
  (position 1) decides the root; EOS follows the last token's right slot.

  Returns:
    ((tokens, segment_ids, times) int32 [B, 3L+3]; targets int32 [B, 3L+3]: every slot's
    decision (a token or ``none_id``), -1 elsewhere).
  """
  batch, max_len = tokens.shape
  n = jnp.sum(mask, axis=1)
  tokens = tokens.astype(jnp.int32)
  kid = jnp.where(child >= 0, jnp.take_along_axis(
      tokens[:, :, None], jnp.maximum(child, 0), axis=1), none_id)
  first = jnp.where(root >= 0, jnp.take_along_axis(tokens, jnp.maximum(root, 0)[:, None], 1)[:, 0],
                    none_id)
  slot = jnp.full((batch, max_len), slot_id, jnp.int32)
  body_tok = jnp.stack([slot, tokens, slot], axis=-1).reshape(batch, -1)
  body_time = jnp.stack([slot_times[..., 0], times, slot_times[..., 1]], -1).reshape(batch, -1)
  body_tgt = jnp.stack([kid[..., 0], jnp.full_like(tokens, -1), kid[..., 1]],
                       -1).reshape(batch, -1)
  body_real = jnp.repeat(mask, 3, axis=1)
  width = 3 * max_len + 3
  pos = jnp.arange(width)[None, :]
  eos_at = (2 + 3 * n)[:, None]
  col = lambda a, b, c: jnp.concatenate([a, b, c], axis=1)
  one = lambda v: jnp.full((batch, 1), v, jnp.int32)
  ids = col(jnp.concatenate([one(BOS_ID), slot[:, :1]], 1), body_tok, one(PAD_ID))
  tms = col(jnp.concatenate([one(0), root_time[:, None]], 1), body_time, one(0))
  tgt = col(jnp.concatenate([one(-1), first[:, None].astype(jnp.int32)], 1), body_tgt, one(-1))
  real = col(jnp.ones((batch, 2), bool), body_real, jnp.zeros((batch, 1), bool))
  ids = jnp.where(pos == eos_at, EOS_ID, jnp.where(real, ids, PAD_ID))
  tms = jnp.where(pos == eos_at, 0, jnp.where(real, tms, 0))
  tgt = jnp.where(real & (pos != eos_at), tgt, -1)
  segment_ids = (real | (pos == eos_at)).astype(jnp.int32)
  return (ids, segment_ids, tms.astype(jnp.int32)), tgt


def slot_loss(model, tokens, mask, rng, stats, scorer_cfg, noise_cfg):
  """Training loss of the slot model: a whole path per sentence in one pass.

  A share ``noise_cfg.frontier_prob`` of the sentences take a random insertion order (so the
  model learns to decide a gap later, with more context: confident-first sampling), the
  rest the level order of the parallel sampler (whose -log p(path) is the reported bound),
  or with ``noise_cfg.slot_order="sequential"`` the level order with a level's gaps decided
  one at a time, left to right (`slot_schedule`).
  Packed like the causal baseline (``noise_cfg.causal_pack_rows``, rows of width 3L + 3).
  """
  none_id = model.none_id
  k_score, k_order, k_times = jax.random.split(rng, 3)
  scores = scorers.significance(tokens, mask, k_score, stats, scorer_cfg)
  ancestor = noising.ancestors(scores, mask)
  depth = noising.depth_from_ancestors(ancestor, mask)
  height = noising.tree_height(depth, mask)
  child, root = noising.children(ancestor, depth, mask)
  share = noise_cfg.frontier_prob if noise_cfg is not None else 0.0
  random_order = jax.random.uniform(k_order, height.shape) < share
  sequential = noise_cfg is not None and noise_cfg.slot_order == "sequential"
  times, slot_times, root_time = slot_schedule(ancestor, depth, mask, child, k_times,
                                               random_order, sequential)
  inputs, targets = slot_inputs(tokens, mask, depth, child, root, times, slot_times, root_time,
                                model.slot_id, none_id)
  num = tokens.shape[0]
  dropped = jnp.int32(0)
  if noise_cfg is not None and noise_cfg.causal_pack_rows:
    packed = pack(*inputs, targets, rows=noise_cfg.causal_pack_rows)
    inputs = (packed.tokens, packed.segment_ids, packed.positions)
    targets, dropped = packed.gap_targets, packed.dropped
    source = packed.segment_ids - 1
  else:
    source = jnp.where(inputs[1] > 0, jnp.arange(num, dtype=jnp.int32)[:, None], -1)
  logits = model(*inputs)
  # The reported bound is the level order's (the parallel sampler's path).
  return _whole_path_metrics(logits, targets, source, tokens, mask, depth, height, stats,
                             scorer_cfg, inputs[1], dropped, jnp.float32(0.0),
                             counted=~random_order)


def ar_inputs(tokens, mask):
  """Inputs ``[BOS] x`` and targets ``x [EOS]`` of the causal model: [B, L+1] each."""
  batch, max_len = tokens.shape
  n = jnp.sum(mask, axis=1)[:, None]
  pos = jnp.arange(max_len + 1)[None, :]
  x = jnp.concatenate([jnp.full((batch, 1), BOS_ID, jnp.int32), tokens.astype(jnp.int32)], 1)
  x = jnp.where(pos <= n, x, PAD_ID)
  y = jnp.concatenate([tokens.astype(jnp.int32), jnp.zeros((batch, 1), jnp.int32)], 1)
  y = jnp.where(pos < n, y, jnp.where(pos == n, EOS_ID, -1))
  segment_ids = (pos <= n).astype(jnp.int32)
  positions = jnp.broadcast_to(pos, x.shape).astype(jnp.int32)
  return (x, segment_ids, positions), y


def ar_loss(model, tokens, mask, rng=None, stats=None, scorer_cfg=None, noise_cfg=None):
  """Next-token cross-entropy of the causal baseline (same metrics keys).

  With ``noise_cfg.causal_pack_rows`` the sequences are packed several to a
  row (segment ids keep attention inside each), as the insertion model's
  canvases are, so that neither model spends its compute on padding.
  """
  del rng, stats, scorer_cfg
  inputs, targets = ar_inputs(tokens, mask)
  dropped = jnp.float32(0.0)
  if noise_cfg is not None and noise_cfg.causal_pack_rows:
    packed = pack(*inputs, targets, rows=noise_cfg.causal_pack_rows)
    inputs = (packed.tokens, packed.segment_ids, packed.positions)
    targets, dropped = packed.gap_targets, packed.dropped.astype(jnp.float32)
  logits = model(*inputs)
  nll = gap_nll(logits, targets)
  valid = targets >= 0
  count = jnp.sum(valid)
  loss = jnp.sum(nll) / jnp.maximum(count, 1)
  correct = top1_correct(logits, targets) & valid
  return loss, {
      "loss": loss,
      "gap_nll_sum": jnp.sum(nll),
      "gap_count": count.astype(jnp.float32),
      "gap_correct": jnp.sum(correct).astype(jnp.float32),
      "embed_distance": jnp.float32(0.0),
      "nll_bound_sum": jnp.sum(nll),
      "nll_bound_tokens": count.astype(jnp.float32),
      "nll_bound_sentences": jnp.float32(tokens.shape[0]) - dropped,
      "tokens": jnp.sum(mask).astype(jnp.float32),
      "canvas_positions": jnp.sum(inputs[1] > 0).astype(jnp.float32),
      "computed_positions": jnp.float32(inputs[1].size),
      "dropped_states": dropped,
      "mean_height": jnp.mean(jnp.sum(mask, axis=1).astype(jnp.float32) + 1),
  }


def level_nll(model, tokens, mask, depth, level, path_entropy: Optional[jax.Array] = None,
              closures: bool = False):
  """Teacher-forced NLL of one level step for every example: float32 [B].

  Summing over level = 0..H (levels past an example's height contribute 0)
  gives the exact path NLL, the bound of DESIGN section 2.

  With ``closures`` (``model.gap_state`` models), the gaps that were already empty one
  level earlier are given to the model as closed and decide nothing: every gap decides
  once, right after the token that opened it (2n + 1 decisions in all), which is the
  same path read by a process that remembers its ``none``s; its sum is a bound too.
  """
  del path_entropy
  height = noising.tree_height(depth, mask)
  inputs, targets, closed = _level_state(tokens, depth, level, model.none_id, closures)
  logits = model(*inputs, closed=closed)
  nll = jnp.sum(gap_nll(logits, targets), axis=1)
  return jnp.where(level <= height, nll, 0.0)


def _level_state(tokens, depth, level, none_id: int, closures: bool):
  """Level ``level`` (int [B]) of each example as model inputs: (canvas_inputs, gap
  targets [B, L+1] (-1 on closed gaps), closed bool [B, L+1] or None)."""
  keep = depth < level[:, None]
  noised = noising.noise_to_keep(tokens, depth, keep, pad_id=PAD_ID, none_id=none_id)
  targets, closed = noised.gap_targets, None
  if closures:
    closed = closed_by_level(noised, depth, keep, level, none_id)
    targets = jnp.where(closed, -1, targets)
  return canvas_inputs(noised.canvas, noised.length), targets, closed


def all_levels_nll(model, tokens, mask, depth, *, rows: int, closures: bool = False):
  """`level_nll` summed over every level, in one packed call: (float32 [B], dropped int32 []).

  Builds the B x (L + 1) level canvases (level h of example b at index b (L + 1) + h;
  levels past an example's height are empty) and packs them first-fit into ``rows`` rows
  of width L + 2, so that the model computes about as many positions as the levels hold
  (`evaluation.level_positions`) instead of B x (L + 2) for each of the batch's H + 1
  levels. Equal to the sum of `level_nll` over h = 0..H when ``dropped`` is 0; a caller
  that gets canvases dropped must call again with more rows.
  """
  batch, length = tokens.shape
  per = length + 1  # levels 0..L
  level = jnp.tile(jnp.arange(per, dtype=jnp.int32), batch)
  live = level <= jnp.repeat(noising.tree_height(depth, mask), per)
  (canvas, segment_ids, positions), targets, closed = _level_state(
      jnp.repeat(tokens, per, axis=0), jnp.repeat(depth, per, axis=0), level, model.none_id,
      closures)
  segment_ids = jnp.where(live[:, None], segment_ids, 0)
  targets = jnp.where(live[:, None], targets, -1)
  extra = () if closed is None else (jnp.where(closed & live[:, None], 1, -1),)
  packed = pack(canvas, segment_ids, positions, targets, rows=rows, extra=extra)
  closed = packed.extra[0] == 1 if closures else None
  logits = model(packed.tokens, packed.segment_ids, packed.positions, closed=closed)
  nll = gap_nll(logits, packed.gap_targets)
  example = jnp.where(packed.gap_source >= 0, packed.gap_source // per, batch)
  per_example = jax.ops.segment_sum(nll.ravel(), example.ravel(), num_segments=batch + 1)
  return per_example[:batch], packed.dropped


def level_sweep_nll(model, tokens, mask, depth, level, done):
  """Teacher-forced NLL of one state of the level *sweep*: float32 [B].

  The sweep is a sequential reading of the same path: at level h the gaps are
  decided left to right, and each decision sees the depth-h tokens already
  inserted to its left. State ``(h, j)`` is level h plus the first ``j``
  depth-h tokens; it decides the gaps from the one after the j-th inserted
  token's right neighbour up to the gap holding the (j+1)-th depth-h token
  (or the last gap). Summed over h = 0..H and j = 0..m_h (the depth-h count)
  it is -log p of the path under one-gap-at-a-time decoding: the same gap
  targets as `level_nll`'s, with no independence between the gaps of a level.
  The difference of the two sums is what parallel decoding of a level costs.

  Args:
    model: an `InsertionTransformer`; tokens, mask, depth: [B, L];
    level: int [B], the level h; done: int [B], the j of the state.

  Returns:
    float32 [B]; 0 where ``level`` > height or ``done`` > m_h.
  """
  none_id = model.none_id
  height = noising.tree_height(depth, mask)
  at_level = (depth == level[:, None]) & mask
  rank = jnp.cumsum(at_level, axis=1, dtype=jnp.int32) - at_level  # depth-h tokens before
  keep = (depth < level[:, None]) | (at_level & (rank < done[:, None]))
  noised = noising.noise_to_keep(tokens, depth, keep, pad_id=PAD_ID, none_id=none_id)
  logits = model(*canvas_inputs(noised.canvas, noised.length))
  nll = gap_nll(logits, noised.gap_targets)  # [B, L+1]
  # A kept token's canvas index, or the canvas gap a dropped token falls in.
  slot = jnp.cumsum(keep, axis=1, dtype=jnp.int32) - keep
  last = at_level & (rank == done[:, None] - 1)
  start = jnp.where(done > 0, jnp.sum(jnp.where(last, slot + 2, 0), axis=1), 0)
  following = at_level & (rank == done[:, None])
  end = jnp.where(jnp.any(following, axis=1), jnp.sum(jnp.where(following, slot, 0), axis=1),
                  noised.length)
  gap = jnp.arange(nll.shape[1])[None, :]
  owned = (gap >= start[:, None]) & (gap <= end[:, None])
  count = jnp.sum(at_level, axis=1)
  valid = (level <= height) & (done <= count)
  return jnp.where(valid, jnp.sum(jnp.where(owned, nll, 0.0), axis=1), 0.0)


# ---------------------------------------------------------------------------------------------
# The masked-diffusion baseline (absorbing state, continuous time, linear schedule).
#
# A clean canvas x0 = ``x [EOS] [PAD]...`` of width L + 1 is noised at time t in (0, 1] by
# masking every position independently with probability t (alpha_t = 1 - t). The
# continuous-time ELBO (MDLM, Sahoo et al. 2024; MD4, Shi et al. 2024) with this schedule is
#   -log p(x0) <= E_{t ~ U(0,1)} [ (1 / t) * sum_{masked i} -log p_theta(x0_i | z_t) ].
# Since x0 determines the sentence and back (PAD after EOS is deterministic), this bounds the
# sentence NLL and compares directly with the insertion bound and the AR NLL.

MASKED_T_MIN = 1e-3  # t is drawn from [MASKED_T_MIN, 1]: the 1/t weight stays finite


def masked_canvas(tokens, mask):
  """Clean canvases ``x [EOS] [PAD]...``: int32 [B, L+1] (every position is a target)."""
  batch, max_len = tokens.shape
  n = jnp.sum(mask, axis=1)[:, None]
  pos = jnp.arange(max_len + 1)[None, :]
  x = jnp.concatenate([tokens.astype(jnp.int32), jnp.zeros((batch, 1), jnp.int32)], axis=1)
  return jnp.where(pos < n, x, jnp.where(pos == n, EOS_ID, PAD_ID)).astype(jnp.int32)


def masked_inputs(canvas):
  """(segment_ids, positions) int32 [B, W] of a full-width masked-diffusion canvas."""
  positions = jnp.broadcast_to(jnp.arange(canvas.shape[1], dtype=jnp.int32), canvas.shape)
  return jnp.ones(canvas.shape, jnp.int32), positions


def masked_elbo(model, tokens, mask, t, rng):
  """One-draw ELBO estimate of every sequence's NLL at noise levels ``t``.

  Args:
    model: a `MaskedDiffusionTransformer`.
    tokens: int [B, L]; mask: bool [B, L] (real tokens form a prefix).
    t: float32 [B] in (0, 1], the masking probability of each row.
    rng: PRNG key of the masks.

  Returns:
    (nll float32 [B]: (1/t) * masked cross-entropy, an unbiased estimate of the bound when
    t ~ U(0, 1); logits [B, L+1, V]; targets int32 [B, L+1], the clean token where masked,
    -1 elsewhere).
  """
  x0 = masked_canvas(tokens, mask)
  masked = jax.random.uniform(rng, x0.shape) < t[:, None]
  z = jnp.where(masked, model.mask_id, x0)
  logits = model(z, *masked_inputs(z))
  targets = jnp.where(masked, x0, -1)
  nll = jnp.sum(gap_nll(logits, targets), axis=1) / t
  return nll, logits, targets


def masked_loss(model, tokens, mask, rng, stats=None, scorer_cfg=None, noise_cfg=None):
  """Training loss of the masked-diffusion baseline (the insertion loss's metric keys).

  t is stratified over the batch (t_b = (u + b / B) mod 1, one uniform u), which lowers the
  variance of the 1/t-weighted loss without biasing it. The loss is the ELBO per canvas
  position (divided by L + 1); the metrics' ``nll_bound_*`` give it per sentence and token.
  """
  del stats, scorer_cfg, noise_cfg
  batch, max_len = tokens.shape
  k_t, k_mask = jax.random.split(rng)
  u = jax.random.uniform(k_t, ())
  t = jnp.mod(u + jnp.arange(batch, dtype=jnp.float32) / batch, 1.0)
  t = MASKED_T_MIN + (1.0 - MASKED_T_MIN) * t
  nll, logits, targets = masked_elbo(model, tokens, mask, t, k_mask)
  real = jnp.any(mask, axis=1)
  nll = jnp.where(real, nll, 0.0)
  loss = jnp.sum(nll) / jnp.maximum(jnp.sum(real), 1) / (max_len + 1)
  valid = targets >= 0
  n_tokens = jnp.sum(mask, axis=1)
  return loss, {
      "loss": loss,
      "gap_nll_sum": jnp.sum(gap_nll(logits, targets)),
      "gap_count": jnp.sum(valid).astype(jnp.float32),
      "gap_correct": jnp.sum(top1_correct(logits, targets) & valid).astype(
          jnp.float32),
      "embed_distance": jnp.float32(0.0),
      "nll_bound_sum": jnp.sum(nll),
      "nll_bound_tokens": jnp.sum(jnp.where(real, n_tokens + 1, 0)).astype(jnp.float32),
      "nll_bound_sentences": jnp.sum(real).astype(jnp.float32),
      "tokens": jnp.sum(mask).astype(jnp.float32),
      # Content (tokens and EOS) against every computed position: the share spent on PAD.
      "canvas_positions": jnp.sum(jnp.where(real, n_tokens + 1, 0)).astype(jnp.float32),
      "computed_positions": jnp.float32(batch * (max_len + 1)),
      "dropped_states": jnp.float32(0.0),
      "mean_height": jnp.float32(0.0),  # no tree: the sampler's steps are sampler.max_steps
  }
