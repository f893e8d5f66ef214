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


@dataclasses.dataclass
class NllEvaluator:
  """Exact NLL (bound) of held-out batches, per sentence and per token.

  Attributes:
    graphdef: the model's graph definition.
    model_kind: "insertion" or "causal".
    stats, scorer_cfg: how the forward process scores tokens (insertion only).
  """

  graphdef: nnx.GraphDef
  model_kind: str
  stats: scorers.ScoringStats
  scorer_cfg: scorers.ScorerConfig

  def __post_init__(self):
    def trees(tokens, mask):
      s = scorers.significance(tokens, mask, jax.random.key(12345), self.stats, self.scorer_cfg)
      depth = noising.insertion_depth(s, mask)
      entropy = scorers.path_entropy(tokens, mask, depth, self.stats, self.scorer_cfg)
      return depth, noising.tree_height(depth, mask), entropy

    def level(params, tokens, mask, depth, lvl):
      return losses.level_nll(nnx.merge(self.graphdef, params), tokens, mask, depth, lvl)

    def sweep(params, tokens, mask, depth, lvl, done):
      return losses.level_sweep_nll(nnx.merge(self.graphdef, params), tokens, mask, depth, lvl,
                                    done)

    def causal(params, tokens, mask):
      inputs, targets = losses.ar_inputs(tokens, mask)
      logits = nnx.merge(self.graphdef, params)(*inputs)
      return jnp.sum(losses.gap_nll(logits, targets), axis=1)

    self._trees = jax.jit(trees)
    self._level = jax.jit(level)
    self._sweep = jax.jit(sweep)
    self._causal = jax.jit(causal)

  def per_sentence(self, params, batch: dict) -> tuple[np.ndarray, np.ndarray]:
    """(NLL in nats float64 [b], model calls per sentence [b]) for the real rows."""
    tokens, mask = jnp.asarray(batch["tokens"]), jnp.asarray(batch["mask"])
    real = np.asarray(batch["mask"]).any(axis=1)
    if self.model_kind == "causal":
      nll = np.asarray(self._causal(params, tokens, mask), np.float64)
      calls = np.asarray(batch["mask"]).sum(axis=1) + 1
      return nll[real], calls[real]
    depth, height, entropy = self._trees(tokens, mask)
    total = np.zeros(tokens.shape[0], np.float64)
    for h in range(int(jnp.max(height)) + 1):
      lvl = jnp.full((tokens.shape[0],), h, jnp.int32)
      total += np.asarray(self._level(params, tokens, mask, depth, lvl), np.float64)
    total -= np.asarray(entropy, np.float64)
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
    nll, calls, tokens, swept = [], [], [], []
    for batch in batches:
      n, c = self.per_sentence(params, batch)
      nll.append(n)
      calls.append(c)
      tokens.append(np.asarray(batch["mask"]).sum(axis=1)[np.asarray(batch["mask"]).any(1)])
      if sweep and self.model_kind == "insertion":
        swept.append(self.sweep_per_sentence(params, batch)[0])
    nll, calls, tokens = map(np.concatenate, (nll, calls, tokens))
    extra = {}
    if swept:
      swept = np.concatenate(swept)
      extra = {"sweep_nll_per_sentence": float(swept.mean()),
               "sweep_nll_per_token": float(swept.sum() / (tokens + 1).sum())}
    return {
        **extra,
        "nll_per_sentence": float(nll.mean()),
        "nll_per_sentence_se": float(nll.std(ddof=1) / np.sqrt(len(nll))) if len(nll) > 1 else 0.0,
        "nll_per_token": float(nll.sum() / (tokens + 1).sum()),
        "perplexity_bound": float(np.exp(nll.sum() / (tokens + 1).sum())),
        "teacher_forced_calls": float(calls.mean()),
        "num_sentences": int(len(nll)),
    }


def grammar_report(texts: Sequence[str], grammar) -> dict:
  """Fraction grammatical and the grammar's NLL of the grammatical ones."""
  logps = np.array([grammar.logprob(t) for t in texts], np.float64)
  ok = np.isfinite(logps)
  return {
      "grammatical": float(ok.mean()) if len(texts) else 0.0,
      "sample_nll_grammatical": float(-logps[ok].mean()) if ok.any() else float("nan"),
  }
