"""The Transformers: the bidirectional insertion model and its baselines.

One backbone (pre-norm, gated MLP; rotary positions, or relative-distance biases
for the tree-causal models) serves them all:

* `InsertionTransformer` reads the canvas ``[BOS] x_h [EOS] [PAD]...`` with full
  (bidirectional) attention inside each segment and, for every gap ``g``
  between canvas positions ``g`` and ``g + 1``, gives logits over the
  vocabulary plus ``none_id = vocab_size`` ("no insertion here").
* `TreeInsertionTransformer` is the insertion model with tree-causal attention:
  a token sees only the tokens inserted no later than itself, so its state is
  fixed once inserted and one pass over ``[BOS] x [EOS]`` teacher-forces every
  level (each token predicts its two children in the tree).
* `SlotInsertionTransformer` adds a query slot per gap that decides with every
  token inserted before its decision time: one pass teacher-forces any
  insertion order, so waiting gaps (confident-first) decide with more context.
* `CausalTransformer` is the same backbone with causal attention and a
  next-token head: the autoregressive baseline of the same size (with a KV
  cache for decoding).
* `MaskedDiffusionTransformer` is the same backbone, bidirectional, over a
  fixed-length canvas with an absorbing mask id: the masked-diffusion peer.

Parameters carry logical axis names (``vocab``, ``embed``, ``heads``, ``kv``,
``mlp``) in their ``out_sharding`` metadata; `semdiff.sharding` maps them to
mesh axes. Shapes: ``B`` batch, ``T`` canvas positions, ``D`` model width,
``V`` vocabulary (with pad/bos/eos), ``G = T - 1`` gaps.
"""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from semdiff.data.tokenizer import PAD_ID


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture (hashable; fields mirror ``config.model``).

  Attributes:
    vocab_size: V, the tokenizer's vocabulary (pad/bos/eos included).
    d_model: width D.
    num_layers: Transformer blocks.
    num_heads: attention heads (D must divide by it).
    mlp_dim: hidden width of the gated MLP.
    tie_embeddings: share the input embedding with the output projection.
    dtype: compute dtype ("float32" or "bfloat16"); parameters stay float32.
    remat: rematerialise each block in the backward pass (saves memory).
    rope_base: rotary-embedding wavelength base.
    gap_state: the insertion model also reads which gaps are known to be empty (closed
      gaps: a sampler's decided ``none``s, the bound's earlier levels), as two learned
      vectors added to each closed gap's two neighbours (see `InsertionTransformer`).
    gap_slots: the insertion model gives every gap a position of its own between its two
      neighbours (a learned slot vector; the sequence is 2T-1 long), so each gap has a
      hidden state through every layer instead of being read off its neighbours at the end.
    span_head: the insertion model also has a second output head over each gap's features,
      trained (``noise.span_loss_weight``) to predict every token the gap still lacks, not
      only the one to insert next (`InsertionTransformer.span_logits`).
  """

  vocab_size: int
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  mlp_dim: int = 1024
  tie_embeddings: bool = True
  dtype: str = "float32"
  remat: bool = False
  rope_base: float = 10000.0
  gap_state: bool = False
  gap_slots: bool = False
  span_head: bool = False

  @classmethod
  def from_config(cls, config, vocab_size: int) -> "ModelConfig":
    fields = {f.name for f in dataclasses.fields(cls)} - {"vocab_size"}
    cfg = cls(vocab_size=vocab_size, **{k: v for k, v in dict(config).items() if k in fields})
    if cfg.d_model % cfg.num_heads:
      raise ValueError(f"model.d_model={cfg.d_model} must be divisible by "
                       f"model.num_heads={cfg.num_heads}.")
    if (cfg.d_model // cfg.num_heads) % 2:
      raise ValueError("model.d_model / model.num_heads must be even for rotary embeddings.")
    return cfg

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)


def _param(rngs: nnx.Rngs, init, shape, axes) -> nnx.Param:
  """A float32 parameter with logical axis names."""
  init = nnx.with_partitioning(init, axes, eager_sharding=False)
  return nnx.Param(init(rngs.params(), shape, jnp.float32))


def rotary(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Rotary position embedding. x: [B, T, H, K]; positions: int [B, T]."""
  half = x.shape[-1] // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions[..., None].astype(jnp.float32) * freq  # [B, T, K/2]
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, rngs: nnx.Rngs):
    self.scale = _param(rngs, nnx.initializers.ones, (dim,), ("embed",))

  def __call__(self, x):
    var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    y = x.astype(jnp.float32) * jax.lax.rsqrt(var + 1e-6) * self.scale[...]
    return y.astype(x.dtype)


class Block(nnx.Module):
  """Pre-norm attention + gated-MLP block."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, h = cfg.d_model, cfg.num_heads
    k = d // h
    init = nnx.initializers.lecun_normal()
    self.cfg = cfg
    self.attn_norm = RMSNorm(d, rngs)
    self.qkv = _param(rngs, nnx.initializers.variance_scaling(1.0, "fan_in", "normal",
                                                              in_axis=0, out_axis=(1, 2, 3)),
                      (d, 3, h, k), ("embed", None, "heads", "kv"))
    self.out = _param(rngs, nnx.initializers.variance_scaling(1.0, "fan_in", "normal",
                                                              in_axis=(0, 1), out_axis=2),
                      (h, k, d), ("heads", "kv", "embed"))
    self.mlp_norm = RMSNorm(d, rngs)
    self.gate_up = _param(rngs, nnx.initializers.variance_scaling(1.0, "fan_in", "normal",
                                                                  in_axis=0, out_axis=(1, 2)),
                          (d, 2, cfg.mlp_dim), ("embed", None, "mlp"))
    self.down = _param(rngs, init, (cfg.mlp_dim, d), ("mlp", "embed"))

  def __call__(self, x, positions, attn_mask, bias=None):
    """One block.

    Args:
      x: [B, T, D].
      positions: int [B, T] rotary positions, or None (no rotary: ``bias`` carries order).
      attn_mask: bool [B, T, T] (query, key).
      bias: optional float32 [B, H, T, T] added to the attention logits.
    """
    q, k, v = self._qkv(x, positions)
    return self._finish(x, q, k, v, attn_mask, bias)

  def decode(self, x, position, cache: dict):
    """One new position with cached keys and values (causal decoding).

    Args:
      x: [B, 1, D], the new position's input.
      position: int32 [], its index (the same for every row: all rows start together).
      cache: {"k", "v"}: [B, C, H, K] keys and values of positions < ``position``.

    Returns:
      ([B, 1, D] output, the cache with this position's keys and values written).
    """
    batch = x.shape[0]
    q, k, v = self._qkv(x, jnp.full((batch, 1), position, jnp.int32))
    start = (0, position, 0, 0)
    keys = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
    values = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
    visible = jnp.arange(keys.shape[1]) <= position
    mask = jnp.broadcast_to(visible[None, None, :], (batch, 1, keys.shape[1]))
    return self._finish(x, q, keys, values, mask), {"k": keys, "v": values}

  def _qkv(self, x, positions):
    """Rotary queries, keys and values, each [B, T, H, K] in the compute dtype."""
    cfg = self.cfg
    y = self.attn_norm(x)
    q, k, v = jnp.unstack(
        jnp.einsum("btd,dchk->cbthk", y, self.qkv[...].astype(cfg.compute_dtype)), axis=0)
    if positions is None:
      return q, k, v
    return rotary(q, positions, cfg.rope_base), rotary(k, positions, cfg.rope_base), v

  def _finish(self, x, q, k, v, attn_mask, bias=None):
    """Attention of q [B, Q, H, K] over k, v [B, S, H, K] (mask [B, Q, S]), then the MLP."""
    dt = self.cfg.compute_dtype
    logits = jnp.einsum("bqhk,bshk->bhqs", q, k).astype(jnp.float32)
    logits = logits / jnp.sqrt(jnp.float32(q.shape[-1]))
    if bias is not None:
      logits = logits + bias
    logits = jnp.where(attn_mask[:, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dt)
    attn = jnp.einsum("bhqs,bshk->bqhk", probs, v)
    x = x + jnp.einsum("bqhk,hkd->bqd", attn, self.out[...].astype(dt))
    y = self.mlp_norm(x)
    gate, up = jnp.unstack(jnp.einsum("btd,dcf->cbtf", y, self.gate_up[...].astype(dt)), axis=0)
    return x + jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, self.down[...].astype(dt))


class Backbone(nnx.Module):
  """Embedding + blocks + final norm, shared by both model kinds."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = _param(rngs, nnx.initializers.normal(1.0), (cfg.vocab_size, cfg.d_model),
                        ("vocab", "embed"))
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, rngs)

  def __call__(self, tokens, segment_ids, positions, causal: bool, extra=None):
    """Hidden states.

    Args:
      tokens: int [B, T] input ids.
      segment_ids: int [B, T]; attention stays inside a segment; 0 = padding.
      positions: int [B, T], position of each token inside its segment.
      causal: attend only to earlier positions.
      extra: optional float [B, T, D] added to the token embeddings.

    Returns:
      [B, T, D] in the compute dtype.
    """
    cfg = self.cfg
    x = jnp.take(self.embed[...], tokens, axis=0)
    if extra is not None:
      x = x + extra
    x = x.astype(cfg.compute_dtype)
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)
    if causal:
      t = tokens.shape[1]
      same &= jnp.tril(jnp.ones((t, t), bool))[None]
    # A padding query attends to itself so its softmax stays finite.
    same |= jnp.eye(tokens.shape[1], dtype=bool)[None]
    for block in self.blocks:
      if cfg.remat:
        x = nnx.remat(lambda blk, x_: blk(x_, positions, same))(block, x)
      else:
        x = block(x, positions, same)
    return self.final_norm(x)

  def decode(self, tokens, position, cache):
    """Causal decoding of one position: tokens int [B] at index ``position`` (int32 []).

    ``cache`` is a tuple of per-layer {"k", "v"} [B, C, H, K]; returns (hidden [B, D], the
    updated cache).
    """
    x = jnp.take(self.embed[...], tokens[:, None], axis=0).astype(self.cfg.compute_dtype)
    new_cache = []
    for block, layer in zip(self.blocks, cache):
      x, layer = block.decode(x, position, layer)
      new_cache.append(layer)
    return self.final_norm(x)[:, 0], tuple(new_cache)


class InsertionTransformer(nnx.Module):
  """Bidirectional encoder over the canvas with a per-gap insertion head."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.backbone = Backbone(cfg, rngs)
    d = cfg.d_model
    self.gap_in = _param(rngs, nnx.initializers.lecun_normal(), (2 * d, d), (None, "embed"))
    self.gap_norm = RMSNorm(d, rngs)
    self.none_embed = _param(rngs, nnx.initializers.normal(1.0), (1, d), (None, "embed"))
    if not cfg.tie_embeddings:
      self.unembed = _param(rngs, nnx.initializers.lecun_normal(), (d, cfg.vocab_size),
                            ("embed", "vocab"))
    if cfg.gap_state and not cfg.gap_slots:  # [closed gap after me, closed gap before me]
      self.closed_embed = _param(rngs, nnx.initializers.normal(1.0), (2, d), (None, "embed"))
    if cfg.gap_slots:  # [open gap slot, closed gap slot]: closed gaps are told here
      self.slot_embed = _param(rngs, nnx.initializers.normal(1.0), (2, d), (None, "embed"))
    if cfg.span_head:
      self.span_in = _param(rngs, nnx.initializers.lecun_normal(), (d, d), (None, "embed"))

  @property
  def none_id(self) -> int:
    return self.cfg.vocab_size

  def __call__(self, tokens, segment_ids, positions, closed=None):
    """Gap logits (see `gap_features` for the arguments): float32 [B, T-1, V+1]."""
    return self.gap_head(self.gap_features(tokens, segment_ids, positions, closed))

  def gap_head(self, features: jax.Array) -> jax.Array:
    """Logits over the vocabulary and ``none``, float32 [..., V+1], from gap features [..., D]."""
    dt = self.cfg.compute_dtype
    return jnp.einsum("...d,vd->...v", features,
                      self.output_table().astype(dt)).astype(jnp.float32)

  def span_logits(self, features: jax.Array) -> jax.Array:
    """``model.span_head`` models: logits float32 [..., V] of "a token this gap still lacks"
    (any of them, not only the next), from gap features [..., D]."""
    if not self.cfg.span_head:
      raise ValueError("This model was built without model.span_head: set "
                       "--config.model.span_head=True to train noise.span_loss_weight.")
    dt = self.cfg.compute_dtype
    f = jnp.einsum("...c,cd->...d", features, self.span_in[...].astype(dt))
    table = self.output_table()[:self.cfg.vocab_size].astype(dt)
    return jnp.einsum("...d,vd->...v", f, table).astype(jnp.float32)

  def gap_features(self, tokens, segment_ids, positions, closed=None):
    """Every gap's features, the input of the output heads.

    Args:
      tokens: int [B, T], canvases ``[BOS] x [EOS]`` (one or more per row).
      segment_ids: int [B, T], 0 on padding.
      positions: int [B, T], position inside the segment.
      closed: optional bool [B, T-1], gaps known to be empty (``model.gap_state``
        models only; None = no gap is known).

    Returns:
      [B, T-1, D] in the compute dtype: features of gap g, between positions g and g+1;
      meaningful where both neighbours are in the same segment and the left one is not EOS.
    """
    cfg = self.cfg
    if closed is not None and not cfg.gap_state:
      raise ValueError("This model was built without model.gap_state: it cannot read "
                       "closed gaps.")
    if cfg.gap_slots:
      return self._slot_features(tokens, segment_ids, positions, closed)
    extra = None
    if closed is not None:
      c = closed.astype(jnp.float32)
      after = jnp.pad(c, ((0, 0), (0, 1)))   # position t: gap t (after t) is closed
      before = jnp.pad(c, ((0, 0), (1, 0)))  # position t: gap t-1 (before t) is closed
      table = self.closed_embed[...]
      extra = after[..., None] * table[0] + before[..., None] * table[1]
    h = self.backbone(tokens, segment_ids, positions, causal=False, extra=extra)
    return self._project(jnp.concatenate([h[:, :-1], h[:, 1:]], axis=-1))

  def _slot_features(self, tokens, segment_ids, positions, closed):
    """`gap_features` with a slot per gap: the canvas interleaved as t0 g0 t1 g1 ... t(T-1)."""
    b, t = tokens.shape
    # A gap is real where both neighbours share a segment; its slot sits at 2p + 1.
    gap_seg = jnp.where(segment_ids[:, :-1] == segment_ids[:, 1:], segment_ids[:, :-1], 0)
    c = (jnp.zeros((b, t - 1)) if closed is None else closed.astype(jnp.float32))[..., None]
    slot = (1.0 - c) * self.slot_embed[0] + c * self.slot_embed[1]  # [B, T-1, D]

    def interleave(a, between):
      tail = a[:, -1:]
      pairs = jnp.stack([a[:, :-1], between], axis=2).reshape(b, 2 * (t - 1), *a.shape[2:])
      return jnp.concatenate([pairs, tail], axis=1)

    seq_tokens = interleave(tokens, jnp.full((b, t - 1), PAD_ID, tokens.dtype))
    seq_segments = interleave(segment_ids, gap_seg)
    seq_positions = interleave(2 * positions, 2 * positions[:, :-1] + 1)
    extra = interleave(jnp.zeros((b, t, slot.shape[-1])), slot)
    h = self.backbone(seq_tokens, seq_segments, seq_positions, causal=False, extra=extra)
    return self._project(jnp.concatenate([h[:, 1::2], h[:, 0:-1:2] + h[:, 2::2]], axis=-1))

  def _project(self, pair: jax.Array) -> jax.Array:
    """Gap features [B, G, D] from each gap's two read-outs side by side [B, G, 2D]."""
    dt = self.cfg.compute_dtype
    return self.gap_norm(jax.nn.gelu(jnp.einsum("btc,cd->btd", pair,
                                                self.gap_in[...].astype(dt))))

  def output_table(self) -> jax.Array:
    """[V+1, D]: output embedding of every id, ``none`` last."""
    return _output_table(self)

  def token_embedding(self) -> jax.Array:
    """[V, D]: the input embedding table (embedding losses and scorers)."""
    return self.backbone.embed[...]


TREE_MAX_DISTANCE = 32  # relative distances beyond this share one bias (per sign)
TREE_MAX_TIME = 63      # insertion steps beyond this share one time embedding


def tree_attention(segment_ids: jax.Array, times: jax.Array):
  """Who sees whom in a tree-causal canvas, and how far apart they are.

  Token i (inserted at step ``times[i]``; BOS and EOS at -1) attends to token j
  iff j is in its segment and ``times[j] <= times[i]``: it sees exactly the
  canvas it was inserted into plus its siblings of the same step, so its hidden
  state never changes once it is in the canvas (the tree analogue of a causal
  mask). The distance of j from i counts only the tokens i sees, so it too is
  fixed at insertion.

  Args:
    segment_ids: int [B, T], 0 on padding.
    times: int [B, T].

  Returns:
    (visible bool [B, T, T] (query, key; padding sees itself), distance int32
    [B, T, T]: signed number of visible tokens from i to j, -1 = i's left
    neighbour in its own view, +1 = its right neighbour).
  """
  real = segment_ids > 0
  visible = ((segment_ids[:, :, None] == segment_ids[:, None, :]) & real[:, None, :]
             & (times[:, None, :] <= times[:, :, None]))
  visible |= jnp.eye(segment_ids.shape[1], dtype=bool)[None]
  count = jnp.cumsum(visible, axis=2, dtype=jnp.int32)
  own = jnp.diagonal(count, axis1=1, axis2=2)[:, :, None]
  return visible, count - own


def _relative_encode(backbone, rel_bias, x, visible, distance):
  """The blocks over inputs x [B, T, D] with mask ``visible`` and distance biases (no rotary).

  Returns the final-normed hidden states [B, T, D].
  """
  cfg = backbone.cfg
  bucket = jnp.clip(distance, -TREE_MAX_DISTANCE, TREE_MAX_DISTANCE) + TREE_MAX_DISTANCE
  for layer, block in enumerate(backbone.blocks):
    bias = jnp.moveaxis(jnp.take(rel_bias[layer], bucket, axis=0), -1, 1)  # [B, H, T, T]
    if cfg.remat:
      x = nnx.remat(lambda blk, x_, b_: blk(x_, None, visible, b_))(block, x, bias)
    else:
      x = block(x, None, visible, bias)
  return backbone.final_norm(x)


def _neighbours(h, visible, distance):
  """Hidden states [B, T, D] of each position's left and right neighbour in its own view
  (itself where it has none)."""
  idx = jnp.arange(h.shape[1])
  gather = lambda i: jnp.take_along_axis(h, jnp.where(i < 0, idx[None], i)[..., None], axis=1)
  left = jnp.max(jnp.where(visible & (distance == -1), idx, -1), axis=2)
  right = jnp.max(jnp.where(visible & (distance == 1), idx, -1), axis=2)
  return gather(left), gather(right)


def _output_table(model) -> jax.Array:
  """[V+1, D]: a gap head's output embedding of every id, ``none`` last (scaled)."""
  cfg = model.cfg
  table = (model.backbone.embed[:cfg.vocab_size] if cfg.tie_embeddings
           else model.unembed[...].T)
  scale = 1.0 / jnp.sqrt(jnp.float32(cfg.d_model))
  return jnp.concatenate([table, model.none_embed[...]], axis=0) * scale


class TreeInsertionTransformer(nnx.Module):
  """The insertion model with tree-causal attention: every level in one pass.

  The canvas ``[BOS] x [EOS]`` carries each token's insertion step ``t``
  (its depth in the Cartesian tree when the levels are inserted one per step).
  Attention is tree-causal (`tree_attention`): a token sees the tokens inserted
  no later than itself, with relative-distance biases counted in its own view
  instead of rotary positions, so its hidden state is the same in every later
  draft. Each token then predicts its two children in the tree: the token to
  insert into the gap on its left and the one on its right (or ``none``), from
  the pair of hidden states around that gap. Every gap of a draft is owned by
  the later-inserted of its two neighbours (BOS for the first gap of the empty
  canvas), and only its owner's prediction is used; a gap that says ``none``
  is empty for good. So one forward pass over the whole sentence teacher-forces
  all levels at once: 2n + 1 predictions from n + 2 positions, as dense a
  signal as an autoregressive model's, and -log p(path) exactly.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.backbone = Backbone(cfg, rngs)
    d, h = cfg.d_model, cfg.num_heads
    self.rel_bias = _param(rngs, nnx.initializers.zeros,
                           (cfg.num_layers, 2 * TREE_MAX_DISTANCE + 1, h), (None, None, "heads"))
    self.time_embed = _param(rngs, nnx.initializers.normal(0.02), (TREE_MAX_TIME + 1, d),
                             (None, "embed"))
    self.gap_in = _param(rngs, nnx.initializers.lecun_normal(), (2 * d, d), (None, "embed"))
    self.side_embed = _param(rngs, nnx.initializers.normal(0.02), (2, d), (None, "embed"))
    self.gap_norm = RMSNorm(d, rngs)
    self.none_embed = _param(rngs, nnx.initializers.normal(1.0), (1, d), (None, "embed"))
    if not cfg.tie_embeddings:
      self.unembed = _param(rngs, nnx.initializers.lecun_normal(), (d, cfg.vocab_size),
                            ("embed", "vocab"))

  @property
  def none_id(self) -> int:
    return self.cfg.vocab_size

  def __call__(self, tokens, segment_ids, times):
    """Child logits of every position.

    Args:
      tokens: int [B, T], canvases ``[BOS] x [EOS]`` (one or more per row).
      segment_ids: int [B, T], 0 on padding.
      times: int [B, T], insertion step of each token (-1 for BOS and EOS).

    Returns:
      float32 [B, T, 2, V+1]: ``[..., 0, :]`` the left child (the gap between a
      token and its left neighbour in its own view), ``[..., 1, :]`` the right one.
      Meaningful for real tokens' both sides and BOS's right side.
    """
    cfg = self.cfg
    dt = cfg.compute_dtype
    backbone = self.backbone
    visible, distance = tree_attention(segment_ids, times)
    x = jnp.take(backbone.embed[...], tokens, axis=0)
    x = x + jnp.take(self.time_embed[...], jnp.clip(times + 1, 0, TREE_MAX_TIME), axis=0)
    h = _relative_encode(backbone, self.rel_bias[...], x.astype(dt), visible, distance)
    left, right = _neighbours(h, visible, distance)
    pairs = jnp.stack([jnp.concatenate([left, h], -1),
                       jnp.concatenate([h, right], -1)], axis=2)  # [B, T, 2, 2D]
    g = jnp.einsum("btsc,cd->btsd", pairs, self.gap_in[...].astype(dt))
    g = self.gap_norm(jax.nn.gelu(g + self.side_embed[...].astype(dt)))
    return jnp.einsum("btsd,vd->btsv", g, self.output_table().astype(dt)).astype(jnp.float32)

  def gap_logits(self, tokens, segment_ids, times):
    """float32 [B, T-1, V+1]: the owner's prediction for gap g (between positions g, g+1).

    The owner is the later-inserted neighbour; on a tie (only BOS and EOS of the empty
    canvas) the left one. Gaps whose owner was inserted earlier than the latest step are
    still given (their logits never change); the sampler closes a gap once it says none.
    """
    logits = self(tokens, segment_ids, times)
    right_owns = times[:, 1:] > times[:, :-1]
    return jnp.where(right_owns[..., None], logits[:, 1:, 0], logits[:, :-1, 1])

  def output_table(self) -> jax.Array:
    """[V+1, D]: output embedding of every id, ``none`` last."""
    return _output_table(self)

  def token_embedding(self) -> jax.Array:
    """[V, D]: the input embedding table (embedding losses and scorers)."""
    return self.backbone.embed[...]


def slot_attention(tokens: jax.Array, segment_ids: jax.Array, times: jax.Array, slot_id: int):
  """`tree_attention` with query slots: (visible bool [B, T, T], distance int32 [B, T, T]).

  A real token sees the real tokens of its segment inserted no later than itself; a slot
  (``tokens == slot_id``) sees the real tokens inserted strictly before its decision time,
  and itself. Nobody sees a slot but itself, so the real tokens' states do not depend on
  the slots, and a slot's on no other slot.
  """
  slot = tokens == slot_id
  real = (segment_ids > 0) & ~slot
  earlier = jnp.where(slot[:, :, None], times[:, None, :] < times[:, :, None],
                      times[:, None, :] <= times[:, :, None])
  visible = ((segment_ids[:, :, None] == segment_ids[:, None, :]) & real[:, None, :] & earlier)
  visible |= jnp.eye(tokens.shape[1], dtype=bool)[None]
  count = jnp.cumsum(visible, axis=2, dtype=jnp.int32)
  own = jnp.diagonal(count, axis1=1, axis2=2)[:, :, None]
  return visible, count - own


class SlotInsertionTransformer(nnx.Module):
  """The tree model with a query slot per gap: one pass teaches any insertion order.

  Like `TreeInsertionTransformer`, real tokens attend tree-causally (to tokens inserted no
  later than themselves), so their hidden states never change once inserted. Each gap's
  decision is read from its own *slot*: an extra position (embedding ``slot_id =
  vocab_size``) in the gap that sees every real token inserted before the decision time,
  however long after its neighbours that is. So a gap that waits while other gaps fill in
  decides with the newer context, which is what confident-first insertion needs, and one
  forward pass still teacher-forces a whole path: the sentence with a left and a right slot
  around every token (3n + 3 positions, 2n + 1 decisions), for any schedule of times.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    # One extra input row: the slot embedding.
    self.backbone = Backbone(dataclasses.replace(cfg, vocab_size=cfg.vocab_size + 1), rngs)
    d = cfg.d_model
    self.rel_bias = _param(rngs, nnx.initializers.zeros,
                           (cfg.num_layers, 2 * TREE_MAX_DISTANCE + 1, cfg.num_heads),
                           (None, None, "heads"))
    self.gap_in = _param(rngs, nnx.initializers.lecun_normal(), (3 * d, d), (None, "embed"))
    self.gap_norm = RMSNorm(d, rngs)
    self.none_embed = _param(rngs, nnx.initializers.normal(1.0), (1, d), (None, "embed"))
    if not cfg.tie_embeddings:
      self.unembed = _param(rngs, nnx.initializers.lecun_normal(), (d, cfg.vocab_size),
                            ("embed", "vocab"))

  @property
  def none_id(self) -> int:
    return self.cfg.vocab_size

  @property
  def slot_id(self) -> int:
    return self.cfg.vocab_size

  def __call__(self, tokens, segment_ids, times):
    """Decision logits of every slot.

    Args:
      tokens: int [B, T]: real tokens, and ``slot_id`` at the slots.
      segment_ids: int [B, T], 0 on padding.
      times: int [B, T]: insertion time of real tokens (BOS and EOS earliest), decision
        time of slots.

    Returns:
      float32 [B, T, V+1]; meaningful at the slots.
    """
    cfg = self.cfg
    dt = cfg.compute_dtype
    backbone = self.backbone
    visible, distance = slot_attention(tokens, segment_ids, times, self.slot_id)
    x = jnp.take(backbone.embed[...], tokens, axis=0).astype(dt)
    h = _relative_encode(backbone, self.rel_bias[...], x, visible, distance)
    left, right = _neighbours(h, visible, distance)
    trio = jnp.concatenate([left, h, right], axis=-1)
    g = self.gap_norm(jax.nn.gelu(jnp.einsum("btc,cd->btd", trio, self.gap_in[...].astype(dt))))
    return jnp.einsum("btd,vd->btv", g, self.output_table().astype(dt)).astype(jnp.float32)

  def output_table(self) -> jax.Array:
    """[V+1, D]: output embedding of every id, ``none`` last."""
    return _output_table(self)

  def token_embedding(self) -> jax.Array:
    """[V, D]: the input embedding table of the real tokens."""
    return self.backbone.embed[:self.cfg.vocab_size]


class CausalTransformer(nnx.Module):
  """The autoregressive baseline: same backbone, causal mask, next-token head."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.backbone = Backbone(cfg, rngs)
    if not cfg.tie_embeddings:
      self.unembed = _param(rngs, nnx.initializers.lecun_normal(), (cfg.d_model, cfg.vocab_size),
                            ("embed", "vocab"))

  def __call__(self, tokens, segment_ids, positions):
    """Next-token logits, float32 [B, T, V], for input [B, T]."""
    h = self.backbone(tokens, segment_ids, positions, causal=True)
    return self._logits(h)

  def _logits(self, h):
    """[B, T, D] hidden states -> float32 [B, T, V] logits."""
    cfg = self.cfg
    table = self.backbone.embed[...].T if cfg.tie_embeddings else self.unembed[...]
    table = table / jnp.sqrt(jnp.float32(cfg.d_model))
    return jnp.einsum("btd,dv->btv", h, table.astype(cfg.compute_dtype)).astype(jnp.float32)

  def init_cache(self, batch: int, capacity: int) -> tuple:
    """An empty KV cache for ``capacity`` positions: per layer {"k", "v"} [B, C, H, K]."""
    cfg = self.cfg
    shape = (batch, capacity, cfg.num_heads, cfg.d_model // cfg.num_heads)
    zeros = lambda: jnp.zeros(shape, cfg.compute_dtype)
    return tuple({"k": zeros(), "v": zeros()} for _ in range(cfg.num_layers))

  def decode_step(self, tokens, position, cache):
    """Incremental decoding: the logits after one more token.

    Args:
      tokens: int [B], the token at index ``position`` of every row (BOS at 0).
      position: int32 [], the same for every row.
      cache: from `init_cache` or the previous call (positions < ``position`` filled).

    Returns:
      (float32 [B, V] next-token logits, equal to ``self(...)[:, position]`` on the prefix up
      to float rounding, and the cache with ``position`` written).
    """
    h, cache = self.backbone.decode(tokens, position, cache)
    return self._logits(h[:, None])[:, 0], cache


class MaskedDiffusionTransformer(nnx.Module):
  """The masked-diffusion baseline: absorbing-state discrete diffusion on a fixed canvas.

  The canvas is ``x [EOS] [PAD]...`` of a fixed width (``data.max_len + 1``); noising
  replaces tokens by the absorbing ``mask_id`` and the model predicts every masked position,
  EOS and PAD ones included, so the sentence length is learned (as in MDLM). The mask id is
  ``vocab_size``: one extra row of the input embedding (the ``none_id = vocab_size`` trick of
  the insertion model), never a tokenizer piece and never an output.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.backbone = Backbone(dataclasses.replace(cfg, vocab_size=cfg.vocab_size + 1), rngs)
    if not cfg.tie_embeddings:
      self.unembed = _param(rngs, nnx.initializers.lecun_normal(), (cfg.d_model, cfg.vocab_size),
                            ("embed", "vocab"))

  @property
  def mask_id(self) -> int:
    return self.cfg.vocab_size

  def __call__(self, tokens, segment_ids, positions):
    """Logits of the clean token at every position, float32 [B, T, V].

    Args:
      tokens: int [B, T], canvases with ``mask_id`` at the noised positions.
      segment_ids: int [B, T] (1 on the whole canvas: PAD positions are predicted too).
      positions: int [B, T].
    """
    cfg = self.cfg
    h = self.backbone(tokens, segment_ids, positions, causal=False)
    table = (self.backbone.embed[:cfg.vocab_size].T if cfg.tie_embeddings
             else self.unembed[...])
    table = table / jnp.sqrt(jnp.float32(cfg.d_model))
    return jnp.einsum("btd,dv->btv", h, table.astype(cfg.compute_dtype)).astype(jnp.float32)


MODELS = {"insertion": InsertionTransformer, "tree": TreeInsertionTransformer,
          "slot": SlotInsertionTransformer,
          "causal": CausalTransformer, "masked": MaskedDiffusionTransformer}


def build(kind: str, cfg: ModelConfig, seed: int = 0):
  """A freshly initialised model of ``kind`` (a key of MODELS)."""
  if kind not in MODELS:
    raise ValueError(f"Unknown model kind {kind!r}; choose one of {sorted(MODELS)}.")
  return MODELS[kind](cfg, rngs=nnx.Rngs(params=seed))


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
