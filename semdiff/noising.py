"""The forward (noising) process: significance scores -> Cartesian tree -> levels.

Glossary (see also the README):

* **score** ``s_i``: a token's significance; higher is kept longer. Scores of the
  real tokens of one sequence are distinct (ties are broken by the scorer).
* **depth** ``d_i``: number of ancestors of token ``i`` in the max-Cartesian tree
  of the scores (root = most significant token, in-order = the sentence).
  Token ``j`` is an ancestor of ``i`` iff ``s_j`` is the maximum of ``s`` over the
  closed range between ``i`` and ``j``.
* **level h**: the subsequence of tokens with depth < h. Level 0 is empty; level
  ``H`` (H = tree height = 1 + max depth) is the whole sequence.
* **canvas**: a level's tokens, left-aligned, padded.
* **gap** ``g``: the slot before kept token ``g`` (``g = 0..n``, gap ``n`` is after
  the last kept token). Each gap of level h holds at most one depth-h token.
* **gap target**: the token to insert into a gap, or ``none_id``.
* **frontier state**: any kept set closed under "parent in the tree" (a level
  plus some of the next level's tokens). Each of its gaps holds one subtree; the
  gap target is that subtree's root, the most significant token in the gap.

Everything here is a pure function of arrays: jit-able, batched over the leading
axis and free of Python loops over tokens. Shapes: ``B`` batch, ``L`` sequence.
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np


class Noised(NamedTuple):
  """A noised batch.

  Attributes:
    canvas: int32 [B, L], kept tokens in order, left-aligned, ``pad_id`` after.
    gap_targets: int32 [B, L+1], per gap the token to insert or ``none_id``;
      -1 for gaps past the end (g > number of kept tokens).
    length: int32 [B], number of kept tokens n.
    closed: optional bool [B, L+1], gaps the model is told are empty (their
      target is ``none_id``; training states with known closed gaps), or None.
    span_gap: optional int32 [B, L]: for each token of x the canvas lacks, the gap it
      belongs to; -1 on kept tokens and padding.
  """

  canvas: jax.Array
  gap_targets: jax.Array
  length: jax.Array
  closed: Optional[jax.Array] = None
  span_gap: Optional[jax.Array] = None


def ancestors(scores: jax.Array, mask: jax.Array) -> jax.Array:
  """The ancestor relation of the max-Cartesian tree of each sequence's scores.

  O(L^2) compare-and-scan: token j < i is an ancestor of i iff s_j is a strict
  running maximum when scanning leftwards from i (starting from s_i), and
  likewise to the right; i.e. s_j is the maximum of s over the closed range
  between i and j.

  Args:
    scores: float [B, L] significance scores; real tokens' scores are distinct.
    mask: bool [B, L], true on real tokens, which form a prefix.

  Returns:
    bool [B, L, L]: ``[b, i, j]`` true when real token j is an ancestor of real
    token i (not i itself).
  """
  scores = jnp.asarray(scores)
  mask = jnp.asarray(mask, bool)
  length = scores.shape[1]
  neg = jnp.asarray(-jnp.inf, scores.dtype)
  s = jnp.where(mask, scores, neg)
  idx = jnp.arange(length)
  # range_max[b, i, j] = max(s[b, min(i,j) .. max(i,j)]), built as two cummaxes.
  left = jnp.where(idx[None, None, :] <= idx[None, :, None], s[:, None, :], neg)
  # (associative_scan: log L passes; XLA's cummax on CPU was 3x slower at L = 48.)
  left = jax.lax.associative_scan(jnp.maximum, left, axis=2, reverse=True)  # j <= i: s[j..i]
  right = jnp.where(idx[None, None, :] >= idx[None, :, None], s[:, None, :], neg)
  right = jax.lax.associative_scan(jnp.maximum, right, axis=2)  # j >= i: max s[i..j]
  range_max = jnp.where(idx[None, None, :] <= idx[None, :, None], left, right)
  return ((s[:, None, :] == range_max)
          & (idx[None, :, None] != idx[None, None, :])
          & mask[:, None, :] & mask[:, :, None])


def depth_from_ancestors(ancestor: jax.Array, mask: jax.Array) -> jax.Array:
  """int32 [B, L]: the number of ancestors of each real token; ``L`` on padding."""
  depth = jnp.sum(ancestor, axis=2, dtype=jnp.int32)
  return jnp.where(mask, depth, jnp.int32(mask.shape[1]))


def insertion_depth(scores: jax.Array, mask: jax.Array) -> jax.Array:
  """Depth of every token in the max-Cartesian tree of its sequence's scores.

  Args:
    scores: float [B, L] significance scores; real tokens' scores are distinct.
    mask: bool [B, L], true on real tokens, which form a prefix.

  Returns:
    int32 [B, L]: depth of each real token (root 0); ``L`` on padding.
  """
  mask = jnp.asarray(mask, bool)
  return depth_from_ancestors(ancestors(scores, mask), mask)


def tree_height(depth: jax.Array, mask: jax.Array) -> jax.Array:
  """int32 [B]: 1 + max depth over real tokens (0 for an empty sequence)."""
  return jnp.max(jnp.where(mask, depth + 1, 0), axis=-1).astype(jnp.int32)


def noise_to_keep(
    tokens: jax.Array, depth: jax.Array, keep: jax.Array, *, pad_id: int, none_id: int
) -> Noised:
  """Canvas and gap targets for any frontier state (kept set closed under parent).

  Args:
    tokens: int [B, L] token ids (padding arbitrary).
    depth: int [B, L] from `insertion_depth` (>= L on padding).
    keep: bool [B, L], the kept tokens, False on padding. Closed under "parent"
      for a frontier state; any other set (kept keywords) works too: each gap's
      least-deep token is unique, since two tokens of one depth always have a
      shallower one between them.
    pad_id: id written after the kept tokens in the canvas.
    none_id: id of "nothing to insert here".

  Returns:
    `Noised`; each gap's target is the least-deep non-kept real token in it.
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  depth = jnp.asarray(depth, jnp.int32)
  keep = jnp.asarray(keep, bool)
  batch, length = tokens.shape
  kept_before = jnp.cumsum(keep, axis=1, dtype=jnp.int32) - keep  # exclusive
  n = jnp.sum(keep, axis=1, dtype=jnp.int32)
  rows = jnp.arange(batch)[:, None]

  dest = jnp.where(keep, kept_before, length)  # length = out of bounds: dropped
  canvas = jnp.full((batch, length), pad_id, jnp.int32)
  canvas = canvas.at[rows, dest].set(tokens, mode="drop")

  # Candidates are the non-kept real tokens; each belongs to gap kept_before.
  candidate = (~keep) & (depth < length)
  gap = jnp.where(candidate, kept_before, length + 1)
  big = jnp.int32(np.iinfo(np.int32).max)
  gap_min = jnp.full((batch, length + 1), big, jnp.int32)
  gap_min = gap_min.at[rows, gap].min(jnp.where(candidate, depth, big), mode="drop")
  is_root = candidate & (depth == jnp.take_along_axis(gap_min, jnp.minimum(gap, length), axis=1))
  gaps = jnp.arange(length + 1)[None, :]
  targets = jnp.where(gaps <= n[:, None], jnp.int32(none_id), jnp.int32(-1))
  targets = targets.at[rows, jnp.where(is_root, gap, length + 1)].set(tokens, mode="drop")
  return Noised(canvas=canvas, gap_targets=targets, length=n,
                span_gap=jnp.where(candidate, kept_before, -1))


def gap_boundary_depth(depth: jax.Array, keep: jax.Array) -> jax.Array:
  """The deeper of each gap's two neighbours in a kept set's canvas: int32 [B, L+1].

  Gap g of n kept tokens lies between kept tokens g-1 and g; BOS and EOS count as
  depth -1, so the one gap of the empty canvas gets -1. A gap whose value is d was
  opened when its deeper neighbour was inserted, at step d + 1 of the level process:
  at level h a gap with value < h - 1 is empty for good (every non-empty gap of level h
  holds a depth-h token, whose parent, of depth h - 1, is one of its neighbours).
  Gaps past the end (g > n) get -1.

  Args:
    depth: int [B, L] from `insertion_depth`; keep: bool [B, L], the kept tokens.
  """
  depth = jnp.asarray(depth, jnp.int32)
  keep = jnp.asarray(keep, bool)
  batch, length = depth.shape
  rows = jnp.arange(batch)[:, None]
  dest = jnp.where(keep, jnp.cumsum(keep, axis=1, dtype=jnp.int32) - keep, length + 1)
  kept_depth = jnp.full((batch, length + 1), -1, jnp.int32).at[rows, dest].set(
      depth, mode="drop")  # [B, L+1]: canvas index -> depth, -1 from index n on
  left = jnp.pad(kept_depth[:, :length], ((0, 0), (1, 0)), constant_values=-1)
  return jnp.maximum(left, kept_depth)


def noise_to_level(
    tokens: jax.Array, depth: jax.Array, level: jax.Array, *, pad_id: int, none_id: int
) -> tuple[jax.Array, jax.Array]:
  """The state at ``level`` and the tokens that take it to ``level + 1``.

  Args:
    tokens: int [B, L] token ids.
    depth: int [B, L] from `insertion_depth` (>= L on padding).
    level: int [B], the level h of each example.
    pad_id: id written after the kept tokens.
    none_id: id of "no insertion in this gap".

  Returns:
    (canvas int32 [B, L], gap_targets int32 [B, L+1]) as in DESIGN section 7:
    canvas holds the tokens with depth < level in order, left-aligned; gap g of
    n kept tokens holds the depth == level token in it, or none_id; -1 for g > n.
  """
  depth = jnp.asarray(depth, jnp.int32)
  level = jnp.asarray(level, jnp.int32)
  keep = depth < level[:, None]
  noised = noise_to_keep(tokens, depth, keep, pad_id=pad_id, none_id=none_id)
  return noised.canvas, noised.gap_targets


def frontier_keep(
    depth: jax.Array, level: jax.Array, fraction: jax.Array, rng: jax.Array
) -> jax.Array:
  """A random frontier state: level h plus a random subset of depth-h tokens.

  Args:
    depth: int [B, L] from `insertion_depth`.
    level: int [B], the level h.
    fraction: float [B] or scalar in [0, 1], chance that a depth-h token is kept.
    rng: PRNG key.

  Returns:
    bool [B, L] keep mask, closed under parent (depth-h tokens' parents have
    depth h-1 < h, so any subset of them keeps closure).
  """
  depth = jnp.asarray(depth, jnp.int32)
  level = jnp.asarray(level, jnp.int32)[:, None]
  fraction = jnp.broadcast_to(jnp.asarray(fraction, jnp.float32), level.shape[:1])[:, None]
  coin = jax.random.uniform(rng, depth.shape) < fraction
  return (depth < level) | ((depth == level) & coin)


def tree_frontier_keep(ancestor: jax.Array, mask: jax.Array, rng: jax.Array) -> jax.Array:
  """A random frontier state of any shape: a parent-closed subset of the tree.

  Every token gets a random time ``t_i = sum of u_j`` over itself and its
  ancestors (``u`` i.i.d. uniform in (0, 1]), so a child's time is always
  later than its parent's; the state keeps the tokens with ``t < T`` for one
  ``T`` uniform over ``[0, max t]``. Unlike `frontier_keep`, one part of the
  tree may be several levels deeper than another, which is what a sampler
  that fills its most confident gaps first runs into.

  Args:
    ancestor: bool [B, L, L] from `ancestors` (the tree the depths came from).
    mask: bool [B, L].
    rng: PRNG key.

  Returns:
    bool [B, L] keep mask, closed under parent, False on padding.
  """
  k_u, k_t = jax.random.split(rng)
  mask = jnp.asarray(mask, bool)
  u = 1.0 - jax.random.uniform(k_u, mask.shape)  # (0, 1]
  times = u + jnp.einsum("bij,bj->bi", ancestor.astype(jnp.float32), u)
  last = jnp.max(jnp.where(mask, times, 0.0), axis=1, keepdims=True)
  cut = jax.random.uniform(k_t, (mask.shape[0], 1)) * last
  return mask & (times < cut)


def children(ancestor: jax.Array, depth: jax.Array, mask: jax.Array) -> jax.Array:
  """Each token's left and right child in the Cartesian tree, and the root.

  Token j is a child of i when i is its ancestor one level up. At level
  ``depth[i] + 1`` the gaps on either side of i hold exactly i's two subtrees,
  so i's children are the gap targets of those two gaps (DESIGN section 1).

  Args:
    ancestor: bool [B, L, L] from `ancestors`; depth: int [B, L]; mask: bool [B, L].

  Returns:
    (child int32 [B, L, 2]: index of the left ([..., 0]) and right ([..., 1])
    child, -1 for none (and on padding); root int32 [B], -1 for an empty sequence).
  """
  depth = jnp.asarray(depth, jnp.int32)
  mask = jnp.asarray(mask, bool)
  length = depth.shape[1]
  idx = jnp.arange(length)
  # is_child[b, i, j]: j is a child of i.
  is_child = jnp.swapaxes(ancestor, 1, 2) & (depth[:, None, :] == depth[:, :, None] + 1)
  left = jnp.max(jnp.where(is_child & (idx[None, None, :] < idx[None, :, None]), idx, -1), 2)
  right = jnp.max(jnp.where(is_child & (idx[None, None, :] > idx[None, :, None]), idx, -1), 2)
  child = jnp.where(mask[..., None], jnp.stack([left, right], -1), -1).astype(jnp.int32)
  root = jnp.max(jnp.where(mask & (depth == 0), idx, -1), axis=1).astype(jnp.int32)
  return child, root


def drafts(tokens: np.ndarray, depth: np.ndarray) -> list[list[int]]:
  """The whole draft sequence of one example, for display.

  Args:
    tokens: int [n] the real tokens of one sequence (no padding).
    depth: int [n] their depths.

  Returns:
    H + 1 lists of token ids: level 0 (empty) .. level H (the whole sequence).
  """
  tokens = np.asarray(tokens)
  depth = np.asarray(depth)
  height = int(depth.max()) + 1 if depth.size else 0
  return [tokens[depth < h].tolist() for h in range(height + 1)]
