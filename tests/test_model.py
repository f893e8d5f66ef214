"""The Transformers: output shapes, attention masks (segments, padding, causality), options.

Rows are built by `_pack`: each row holds one or more segments (canvases) side by side, then
padding (segment id 0). Positions restart at 0 in every segment.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from semdiff import model as model_lib
from semdiff.data.tokenizer import BOS_ID, EOS_ID

V = 40
CFG = model_lib.ModelConfig(vocab_size=V, d_model=32, num_layers=2, num_heads=2, mlp_dim=64)
KINDS = ("insertion", "causal")
SLOTS = dataclasses.replace(CFG, gap_state=True, gap_slots=True)  # a position per gap
W = 14  # row width of every test input, so that each model compiles once


def _pack(rows, width=W):
  """Rows of segments (lists of ids) -> (tokens, segment_ids, positions), int32 [B, width]."""
  tokens = np.zeros((len(rows), width), np.int32)
  segment_ids = np.zeros((len(rows), width), np.int32)
  positions = np.zeros((len(rows), width), np.int32)
  for b, segments in enumerate(rows):
    start = 0
    for s, seg in enumerate(segments):
      end = start + len(seg)
      tokens[b, start:end] = seg
      segment_ids[b, start:end] = s + 1
      positions[b, start:end] = np.arange(len(seg))
      start = end
    assert start <= width
  return jnp.asarray(tokens), jnp.asarray(segment_ids), jnp.asarray(positions)


def _canvas(*words):
  """[BOS] words [EOS] as ids."""
  return [BOS_ID, *words, EOS_ID]


def _build(kind, cfg=CFG, seed=0):
  """A model of ``kind`` with random parameters.

  The real initialisers compile slowly on CPU (truncated normals), and the training tests
  run them anyway; here any well-scaled parameters do.
  """
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model_lib.build(kind, cfg)))
  rng = np.random.default_rng(seed)

  def draw(path, x):
    if "scale" in jax.tree_util.keystr(path):  # RMSNorm
      return jnp.ones(x.shape, x.dtype)
    return jnp.asarray(rng.normal(0, 0.2, x.shape), x.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, abstract))


@pytest.fixture(scope="module")
def models():
  return {**{kind: _build(kind) for kind in KINDS}, "slots": _build("insertion", SLOTS)}


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, tokens, segment_ids, positions):
  return nnx.merge(graphdef, state)(tokens, segment_ids, positions)


def _run(model, inputs):
  """The model's outputs as NumPy (compiled once per model structure and input shape)."""
  return np.asarray(_apply(*nnx.split(model), *inputs))


def test_output_shapes_and_dtypes(models):
  inputs = _pack([[_canvas(5, 6, 7)], [_canvas(8), _canvas(9, 10)], [[]]])
  gaps = _run(models["insertion"], inputs)
  assert gaps.shape == (3, W - 1, V + 1) and gaps.dtype == np.float32
  assert models["insertion"].none_id == V
  nxt = _run(models["causal"], inputs)
  assert nxt.shape == (3, W, V) and nxt.dtype == np.float32
  # Every row, even one of pure padding, gives finite outputs (padding attends to itself).
  assert np.isfinite(gaps).all() and np.isfinite(nxt).all()


@pytest.mark.parametrize("kind", KINDS + ("slots",))
def test_other_segments_and_padding_do_not_leak(models, kind):
  model = models[kind]
  a, b = _canvas(5, 6, 7, 8), _canvas(9, 10, 11)
  base = _pack([[a, b]])
  out = _run(model, base)
  # Segment b changed (same length): segment a's outputs are untouched, b's are not.
  changed_b = _pack([[a, _canvas(20, 21, 22)]])
  # Padding tokens changed (still segment 0): nothing changes.
  changed_pad = (base[0].at[:, 11:].set(33), base[1], base[2])
  out_b, out_pad = _run(model, changed_b), _run(model, changed_pad)
  if kind != "causal":
    in_a = slice(0, len(a) - 1)  # gaps with both neighbours in a
    in_b = slice(len(a), len(a) + len(b) - 1)
  else:
    in_a, in_b = slice(0, len(a)), slice(len(a), len(a) + len(b))
  np.testing.assert_allclose(out_b[:, in_a], out[:, in_a], atol=1e-6)
  assert not np.allclose(out_b[:, in_b], out[:, in_b], atol=1e-3)
  np.testing.assert_allclose(out_pad[:, in_a], out[:, in_a], atol=1e-6)
  np.testing.assert_allclose(out_pad[:, in_b], out[:, in_b], atol=1e-6)


@pytest.mark.parametrize("kind", KINDS + ("slots",))
def test_packed_segment_equals_the_same_canvas_alone(models, kind):
  """A canvas packed after another gives the outputs it gives alone (positions restart)."""
  model = models[kind]
  a, b = _canvas(5, 6, 7), _canvas(9, 10, 11, 12)
  packed = _run(model, _pack([[a, b]]))
  alone = _run(model, _pack([[b]]))
  n = len(b) - 1 if kind != "causal" else len(b)
  np.testing.assert_allclose(packed[:, len(a):len(a) + n], alone[:, :n], atol=1e-5)


def test_gap_slots_hear_closed_gaps_of_their_own_segment_only(models):
  """A slot model's closed gaps change its outputs, and only inside their segment."""
  model = models["slots"]
  a, b = _canvas(5, 6, 7), _canvas(9, 10, 11, 12)
  inputs = _pack([[a, b]])
  run = jax.jit(lambda m, c: m(*inputs, closed=c))
  closed = np.zeros((1, W - 1), bool)
  base = np.asarray(run(model, jnp.asarray(closed)))
  closed[0, len(a) + 1] = True  # b's second gap
  out = np.asarray(run(model, jnp.asarray(closed)))
  np.testing.assert_allclose(out[:, :len(a) - 1], base[:, :len(a) - 1], atol=1e-6)
  assert not np.allclose(out[:, len(a):len(a) + len(b) - 1],
                         base[:, len(a):len(a) + len(b) - 1], atol=1e-3)


def test_causal_model_does_not_see_the_future(models):
  model = models["causal"]
  tokens = [BOS_ID, 5, 6, 7, 8, 9, 10, 11]
  out = _run(model, _pack([[tokens]]))
  t = 4
  changed = list(tokens)
  changed[t] = 30
  out2 = _run(model, _pack([[changed]]))
  np.testing.assert_allclose(out2[:, :t], out[:, :t], atol=1e-6)
  assert not np.allclose(out2[:, t], out[:, t], atol=1e-3)


def test_insertion_model_sees_both_sides(models):
  model = models["insertion"]
  tokens = _canvas(5, 6, 7, 8, 9)
  out = _run(model, _pack([[tokens]]))
  changed = list(tokens)
  changed[-2] = 30  # the last word changes the first gap's logits
  out2 = _run(model, _pack([[changed]]))
  assert not np.allclose(out2[:, 0], out[:, 0], atol=1e-3)


def test_untied_output_projection_and_bfloat16_compute():
  cfg = dataclasses.replace(CFG, tie_embeddings=False, dtype="bfloat16")
  model = _build("insertion", cfg)
  assert model.unembed[...].shape == (CFG.d_model, V)
  params = nnx.state(model, nnx.Param)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))  # params stay float32
  inputs = _pack([[_canvas(5, 6, 7)]])
  out = _run(model, inputs)
  assert out.dtype == np.float32 and out.shape == (1, W - 1, V + 1) and np.isfinite(out).all()
  # bfloat16 compute stays close to float32 compute with the same parameters.
  model32 = _build("insertion", dataclasses.replace(cfg, dtype="float32"))
  nnx.update(model32, params)
  np.testing.assert_allclose(out, _run(model32, inputs), atol=0.15, rtol=0.05)
  causal = _build("causal", cfg)
  assert _run(causal, inputs).shape == (1, W, V)


def test_remat_changes_neither_outputs_nor_gradients():
  kind = "insertion"  # remat lives in the backbone that both kinds share
  inputs = _pack([[_canvas(5, 6, 7), _canvas(8, 9)]])
  outs = []
  for remat in (False, True):
    model = _build(kind, dataclasses.replace(CFG, remat=remat, num_layers=1), seed=3)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
      return jnp.mean(jnp.square(nnx.merge(graphdef, p)(*inputs)))

    outs.append(jax.jit(jax.value_and_grad(loss))(params))
  (l0, g0), (l1, g1) = outs
  np.testing.assert_allclose(float(l0), float(l1), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g0, g1)


def test_parameters_carry_logical_axes(models):
  for model in models.values():
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
      axes = getattr(var, "out_sharding", None)
      assert axes is not None and len(axes) == var[...].ndim, path


def test_bad_model_configs_are_refused():
  with pytest.raises(ValueError, match="divisible by model.num_heads"):
    model_lib.ModelConfig.from_config({"d_model": 30, "num_heads": 4}, vocab_size=V)
  with pytest.raises(ValueError, match="even"):
    model_lib.ModelConfig.from_config({"d_model": 12, "num_heads": 4}, vocab_size=V)
  with pytest.raises(ValueError, match="Unknown model kind 'rnn'"):
    model_lib.build("rnn", CFG)
  cfg = model_lib.ModelConfig.from_config({"d_model": 16, "num_heads": 2, "unrelated": 1},
                                          vocab_size=V)
  assert (cfg.vocab_size, cfg.d_model, cfg.num_heads) == (V, 16, 2)
