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
from typing import Optional

import jax
import jax.numpy as jnp

from semdiff import noising
from semdiff import scorers
from semdiff.data.tokenizer import BOS_ID, EOS_ID, PAD_ID


@dataclasses.dataclass(frozen=True)
class NoiseConfig:
  """How training states are drawn (fields mirror ``config.noise``).

  Attributes:
    frontier_prob: chance that an example is a frontier state (level h plus a
      random fraction of the depth-h tokens) instead of an exact level.
    embed_loss_weight: lambda of the embedding-distance loss.
  """

  frontier_prob: float = 0.0
  embed_loss_weight: float = 0.0

  @classmethod
  def from_config(cls, config) -> "NoiseConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(config).items() if k in fields})


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


def gap_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-gap cross-entropy, float32 [B, G]; 0 where ``targets`` < 0."""
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
  return jnp.where(targets >= 0, logz - picked, 0.0)


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


def draw_states(tokens, mask, rng, stats, scorer_cfg: scorers.ScorerConfig,
                noise_cfg: NoiseConfig, none_id: int):
  """Score, build trees and draw one training state per example.

  Returns:
    (noised: noising.Noised, height int32 [B], exact bool [B] (exact level,
    not a frontier state), path_entropy float32 [B] (the random scorer's
    tree-entropy term, else 0)).
  """
  k_score, k_level, k_front, k_frac = jax.random.split(rng, 4)
  scores = scorers.significance(tokens, mask, k_score, stats, scorer_cfg)
  depth = noising.insertion_depth(scores, mask)
  height = noising.tree_height(depth, mask)
  level = jax.random.randint(k_level, height.shape, 0, height + 1)
  exact = jax.random.uniform(k_front, height.shape) >= noise_cfg.frontier_prob
  fraction = jnp.where(exact, 0.0, jax.random.uniform(k_frac, height.shape))
  keep = noising.frontier_keep(depth, level, fraction, jax.random.fold_in(k_frac, 1))
  noised = noising.noise_to_keep(tokens, depth, keep, pad_id=PAD_ID, none_id=none_id)
  if scorer_cfg.name == "random" or (scorer_cfg.name == "mix" and scorer_cfg.mix_base == "random"):
    path_entropy = scorers.subtree_log_size_sum(depth, mask)
  else:
    path_entropy = jnp.zeros(height.shape, jnp.float32)
  return noised, height, exact, path_entropy


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
  noised, height, exact, path_entropy = draw_states(
      tokens, mask, rng, stats, scorer_cfg, noise_cfg, none_id)
  inputs = canvas_inputs(noised.canvas, noised.length)
  logits = model(*inputs)  # [B, L+1, V+1]
  targets = noised.gap_targets
  valid = targets >= 0
  nll = gap_nll(logits, targets)
  num_gaps = jnp.sum(valid)
  loss = jnp.sum(nll) / jnp.maximum(num_gaps, 1)
  embed = jnp.float32(0.0)
  if noise_cfg.embed_loss_weight:
    embed = jnp.sum(embedding_distance(logits, targets, model.output_table())) / jnp.maximum(
        num_gaps, 1)
    loss = loss + noise_cfg.embed_loss_weight * embed
  correct = (jnp.argmax(logits, axis=-1) == targets) & valid
  n_tokens = jnp.sum(mask, axis=1)
  # Unbiased estimate of -log p(path) from one sampled level (exact levels only).
  path_nll = (height + 1) * jnp.sum(nll, axis=1) - path_entropy
  metrics = {
      "loss": loss,
      "gap_nll_sum": jnp.sum(nll),
      "gap_count": num_gaps.astype(jnp.float32),
      "gap_correct": jnp.sum(correct).astype(jnp.float32),
      "embed_distance": embed,
      "nll_bound_sum": jnp.sum(jnp.where(exact, path_nll, 0.0)),
      "nll_bound_tokens": jnp.sum(jnp.where(exact, n_tokens + 1, 0)).astype(jnp.float32),
      "nll_bound_sentences": jnp.sum(exact).astype(jnp.float32),
      "tokens": jnp.sum(mask).astype(jnp.float32),
      "canvas_positions": jnp.sum(inputs[1] > 0).astype(jnp.float32),
      "mean_height": jnp.mean(height.astype(jnp.float32)),
  }
  return loss, metrics


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
  """Next-token cross-entropy of the causal baseline (same metrics keys)."""
  del rng, stats, scorer_cfg, noise_cfg
  inputs, targets = ar_inputs(tokens, mask)
  logits = model(*inputs)
  nll = gap_nll(logits, targets)
  valid = targets >= 0
  count = jnp.sum(valid)
  loss = jnp.sum(nll) / jnp.maximum(count, 1)
  correct = (jnp.argmax(logits, axis=-1) == targets) & valid
  return loss, {
      "loss": loss,
      "gap_nll_sum": jnp.sum(nll),
      "gap_count": count.astype(jnp.float32),
      "gap_correct": jnp.sum(correct).astype(jnp.float32),
      "embed_distance": jnp.float32(0.0),
      "nll_bound_sum": jnp.sum(nll),
      "nll_bound_tokens": count.astype(jnp.float32),
      "nll_bound_sentences": jnp.float32(tokens.shape[0]),
      "tokens": jnp.sum(mask).astype(jnp.float32),
      "canvas_positions": jnp.sum(inputs[1] > 0).astype(jnp.float32),
      "mean_height": jnp.mean(jnp.sum(mask, axis=1).astype(jnp.float32) + 1),
  }


def level_nll(model, tokens, mask, depth, level, path_entropy: Optional[jax.Array] = None):
  """Teacher-forced NLL of one level step for every example: float32 [B].

  Summing over level = 0..H (levels past an example's height contribute 0)
  gives the exact path NLL, the bound of DESIGN section 2.
  """
  del path_entropy
  none_id = model.none_id
  height = noising.tree_height(depth, mask)
  canvas, targets = noising.noise_to_level(tokens, depth, level, pad_id=PAD_ID, none_id=none_id)
  length = jnp.sum(depth < level[:, None], axis=1, dtype=jnp.int32)
  logits = model(*canvas_inputs(canvas, length))
  nll = jnp.sum(gap_nll(logits, targets), axis=1)
  return jnp.where(level <= height, nll, 0.0)
