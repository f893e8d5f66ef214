"""The two readings of a path's likelihood: all gaps of a level at once, and the level sweep."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from semdiff import evaluation
from semdiff import losses
from semdiff import model as model_lib
from semdiff import noising
from semdiff import scorers

V = 30
L = 10


_MODEL = model_lib.build("insertion", model_lib.ModelConfig(
    vocab_size=V, d_model=32, num_layers=1, num_heads=2, mlp_dim=64), seed=3)
GRAPHDEF = nnx.graphdef(_MODEL)


@pytest.fixture(scope="module")
def model():
  return _MODEL


@jax.jit
def _logits(params, canvas, length):
  model = nnx.merge(GRAPHDEF, params)
  return jax.nn.log_softmax(model(*losses.canvas_inputs(canvas, length)))


def _gap_logp(model, canvas):
  """log-softmax of every gap of one canvas (a list of ids): [n+1, V+1]."""
  c = np.zeros((1, L), np.int32)
  c[0, :len(canvas)] = canvas
  params = nnx.state(model, nnx.Param)
  return np.asarray(_logits(params, jnp.asarray(c), jnp.asarray([len(canvas)])))[
      0, :len(canvas) + 1]


def _reference(model, tokens, depth):
  """(parallel, sweep) path NLL of one sequence, decision by decision, in Python."""
  n = len(tokens)
  height = int(depth.max()) + 1 if n else 0
  parallel = sweep = 0.0
  for h in range(height + 1):
    level = [i for i in range(n) if depth[i] < h]
    # Gap k of level h lies before level[k]; its target is its depth-h token, if any.
    bounds = [-1] + level + [n]
    targets = []
    for k in range(len(level) + 1):
      inside = [i for i in range(bounds[k] + 1, bounds[k + 1]) if depth[i] == h]
      targets.append(inside[0] if inside else None)
    logp = _gap_logp(model, [tokens[i] for i in level])
    parallel -= sum(logp[k, V if t is None else tokens[t]] for k, t in enumerate(targets))
    kept = list(level)
    for k, t in enumerate(targets):
      inserted_before = sum(1 for x in kept if depth[x] == h and x < bounds[k + 1])
      logp = _gap_logp(model, [tokens[i] for i in sorted(kept)])
      sweep -= logp[k + inserted_before, V if t is None else tokens[t]]
      if t is not None:
        kept.append(t)
  return parallel, sweep


def test_parallel_and_sweep_bounds_match_a_decision_by_decision_reference(model):
  rng = np.random.default_rng(0)
  batch = 6
  lengths = np.array([0, 1, 3, 6, 9, L])
  mask = np.arange(L)[None] < lengths[:, None]
  tokens = np.where(mask, rng.integers(4, V, (batch, L)), 0).astype(np.int32)
  scores = rng.normal(size=(batch, L)).astype(np.float32)
  depth = np.asarray(noising.insertion_depth(scores, mask))
  height = np.asarray(noising.tree_height(depth, mask))
  t, m, d = jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(depth)
  params = nnx.state(model, nnx.Param)
  level_nll = jax.jit(lambda p, lvl: losses.level_nll(nnx.merge(GRAPHDEF, p), t, m, d, lvl))
  sweep_nll = jax.jit(lambda p, lvl, j: losses.level_sweep_nll(nnx.merge(GRAPHDEF, p), t, m, d,
                                                               lvl, j))
  parallel = np.zeros(batch)
  sweep = np.zeros(batch)
  for h in range(int(height.max()) + 1):
    lvl = jnp.full((batch,), h, jnp.int32)
    parallel += np.asarray(level_nll(params, lvl))
    for j in range(L + 1):
      sweep += np.asarray(sweep_nll(params, lvl, jnp.full((batch,), j, jnp.int32)))
  for b in range(batch):
    ref_parallel, ref_sweep = _reference(model, tokens[b, :lengths[b]].tolist(),
                                         depth[b, :lengths[b]])
    assert parallel[b] == pytest.approx(ref_parallel, rel=1e-4), b
    assert sweep[b] == pytest.approx(ref_sweep, rel=1e-4), b


def test_left_to_right_sweep_is_the_parallel_bound(model):
  # One token per level: nothing to sweep, the two readings are the same.
  graphdef, params = nnx.split(model, nnx.Param)
  stats = scorers.ScoringStats(unigram_logprob=jnp.zeros(V))
  ev = evaluation.NllEvaluator(graphdef, "insertion", stats,
                               scorers.ScorerConfig(name="left_to_right"))
  rng = np.random.default_rng(1)
  mask = np.arange(L)[None] < np.array([[2], [5], [L]])
  batch = {"tokens": np.where(mask, rng.integers(4, V, (3, L)), 0).astype(np.int32),
           "mask": mask}
  out = ev(params, [batch], sweep=True)
  assert out["sweep_nll_per_sentence"] == pytest.approx(out["nll_per_sentence"], rel=1e-5)


@pytest.mark.parametrize("gap_state", [False, True])
def test_packed_levels_equal_the_level_by_level_bound(gap_state):
  """`all_levels_nll` (every level, packed) = the sum of `level_nll` over the levels."""
  model = model_lib.build("insertion", model_lib.ModelConfig(
      vocab_size=V, d_model=32, num_layers=1, num_heads=2, mlp_dim=64, gap_state=gap_state),
      seed=5)
  graphdef, params = nnx.split(model, nnx.Param)
  rng = np.random.default_rng(1)
  lengths = np.array([0, 1, 2, 5, 7, L, 4, 9])
  mask = np.arange(L)[None] < lengths[:, None]
  tokens = np.where(mask, rng.integers(4, V, mask.shape), 0).astype(np.int32)
  depth = np.asarray(noising.insertion_depth(rng.normal(size=mask.shape).astype(np.float32),
                                             mask))
  height = np.asarray(noising.tree_height(depth, mask))
  t, m, d = jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(depth)
  positions = evaluation.level_positions(depth, mask)
  reference = sum(  # rows past an example's height add 0
      np.asarray(losses.level_nll(nnx.merge(graphdef, params), t, m, d,
                                  jnp.full((len(lengths),), h, jnp.int32), closures=gap_state))
      for h in range(int(height.max()) + 1))
  rows = -(-positions // (L + 2)) + 2
  nll, dropped = jax.jit(losses.all_levels_nll, static_argnames=("rows", "closures"))(
      nnx.merge(graphdef, params), t, m, d, rows=rows, closures=gap_state)
  assert int(dropped) == 0
  np.testing.assert_allclose(np.asarray(nll), reference, rtol=1e-5, atol=1e-5)
  # Fewer rows than the levels' positions need: canvases are dropped and counted.
  _, dropped = losses.all_levels_nll(nnx.merge(graphdef, params), t, m, d,
                                     rows=positions // (L + 2) - 1, closures=gap_state)
  assert int(dropped) > 0
