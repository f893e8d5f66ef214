"""The reverse process: grow a canvas by parallel insertion, in one compiled loop.

Each step runs the model once on ``[BOS] canvas [EOS]``, picks a token or
``none`` for every gap, and inserts all chosen tokens at once: existing token
i moves right by the number of insertions in gaps 0..i, the token inserted into
gap g lands at g + (insertions in gaps 0..g-1). The loop (`lax.while_loop`)
stops per example when no gap inserts, or at the step or length cap.

Shapes: ``B`` batch, ``C`` canvas capacity (max tokens), ``G = C + 1`` gaps,
``S`` recorded steps (``max_steps + 1`` drafts).
"""

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from semdiff import losses
from semdiff.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Sampling controls (fields mirror ``config.sampler``).

  Attributes:
    temperature: softmax temperature; 0 means greedy.
    top_k: keep the k most likely choices per gap (0 = all).
    top_p: nucleus sampling mass (1 = off).
    tau: probability threshold; a gap inserts only if its chosen token's
      probability (at temperature 1) is >= tau; 0 = off.
    gaps: which gaps may insert each step: "all", or "last" (only the gap
      after the last token: left-to-right decoding with the same model).
    insert_per_step: confident-first insertion: at most this many gaps
      insert per step, the most confident first (0 = no limit; 1 = one
      token per step).
    insert_fraction: confident-first insertion: at most this fraction
      (rounded up, at least one) of the gaps that want a token insert per step
      (1 = all of them).
    confidence: confident-first insertion: only the gaps whose chosen token
      has probability >= confidence insert, and at least the single most
      confident gap, so a step never stalls (0 = off). Unlike ``tau`` it
      never stops generation: an unsure gap waits for a later step, when its
      neighbours have been filled in.
    max_steps: cap on insertion steps.
    max_len: canvas capacity C (tokens).
  """

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  tau: float = 0.0
  gaps: str = "all"
  insert_per_step: int = 0
  insert_fraction: float = 1.0
  confidence: float = 0.0
  max_steps: int = 64
  max_len: int = 64

  @classmethod
  def from_config(cls, config, **overrides) -> "SamplerConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in dict(config).items() if k in fields}
    values.update(overrides)
    cfg = cls(**values)
    if cfg.gaps not in ("all", "last"):
      raise ValueError(f"sampler.gaps must be 'all' or 'last', got {cfg.gaps!r}.")
    if not 0.0 < cfg.insert_fraction <= 1.0:
      raise ValueError(f"sampler.insert_fraction must be in (0, 1], got {cfg.insert_fraction}.")
    return cfg


class Samples(NamedTuple):
  """Result of `sample`.

  Attributes:
    tokens: int32 [B, C], final canvases (left-aligned, PAD after).
    length: int32 [B].
    calls: int32 [B], model calls made for each example (its last call is the
      one in which nothing was inserted, unless a cap stopped it).
    drafts: int32 [S, B, C], the canvas after each step (draft 0 = the start).
    draft_length: int32 [S, B].
    inserted_logprob: float32 [B], sum of log-probabilities of the choices made.
  """

  tokens: jax.Array
  length: jax.Array
  calls: jax.Array
  drafts: jax.Array
  draft_length: jax.Array
  inserted_logprob: jax.Array


def _filter_logits(logits, cfg: SamplerConfig):
  """Temperature, top-k and top-p on [..., V+1] logits."""
  if cfg.top_k:
    kth = jax.lax.top_k(logits, cfg.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if cfg.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Smallest set whose mass reaches top_p: keep logits >= the cutoff logit.
    cutoff_idx = jnp.sum(cum < cfg.top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def insert(canvas: jax.Array, length: jax.Array, choice: jax.Array, do_insert: jax.Array):
  """Insert ``choice[g]`` into every gap g where ``do_insert``: a scatter, no loop.

  Args:
    canvas: int [B, C]; length: int [B]; choice: int [B, C+1];
    do_insert: bool [B, C+1] (callers make sure the result fits in C).

  Returns:
    (new canvas int32 [B, C], new length int32 [B]).
  """
  batch, cap = canvas.shape
  ins = do_insert.astype(jnp.int32)
  before = jnp.cumsum(ins, axis=1) - ins  # insertions in gaps 0..g-1
  rows = jnp.arange(batch)[:, None]
  idx = jnp.arange(cap)[None, :]
  # Token i sits after gaps 0..i: it moves by insertions in gaps 0..i.
  old_dest = jnp.where(idx < length[:, None], idx + before[:, :cap] + ins[:, :cap], cap)
  new = jnp.full_like(canvas, PAD_ID).at[rows, old_dest].set(canvas, mode="drop")
  gap_dest = jnp.where(do_insert, jnp.arange(cap + 1)[None, :] + before, cap)
  new = new.at[rows, gap_dest].set(choice.astype(canvas.dtype), mode="drop")
  return new, length + jnp.sum(ins, axis=1)


def _step(model, canvas, length, rng, cfg: SamplerConfig):
  """One insertion step's choices: (choice [B,G], do_insert [B,G], logprob [B,G])."""
  none_id = model.none_id
  batch, cap = canvas.shape
  logits = model(*losses.canvas_inputs(canvas, length))  # [B, C+1, V+1]
  banned = jnp.zeros((none_id + 1,), bool).at[jnp.array([PAD_ID, BOS_ID, EOS_ID, UNK_ID])].set(
      True)
  logits = jnp.where(banned, -jnp.inf, logits)
  logp = jax.nn.log_softmax(logits, axis=-1)
  if cfg.temperature == 0.0:
    choice = jnp.argmax(logits, axis=-1)
  else:
    filtered = _filter_logits(logits / cfg.temperature, cfg)
    choice = jax.random.categorical(rng, filtered, axis=-1)
  chosen_logp = jnp.take_along_axis(logp, choice[..., None], axis=-1)[..., 0]
  gap = jnp.arange(cap + 1)[None, :]
  allowed = gap <= length[:, None]
  if cfg.gaps == "last":
    allowed &= gap == length[:, None]
  do_insert = allowed & (choice != none_id)
  if cfg.tau > 0:
    do_insert &= chosen_logp >= jnp.log(cfg.tau)
  return choice, do_insert, chosen_logp


def keep_most_confident(do_insert, confidence, limit):
  """Keeps at most ``limit`` [B] insertions per row, the most confident ones.

  Returns (kept bool [B, G], whether anything was cut bool [B]).
  """
  score = jnp.where(do_insert, confidence, -jnp.inf)
  rank = jnp.argsort(jnp.argsort(-score, axis=1), axis=1)  # 0 = most confident
  kept = do_insert & (rank < limit[:, None])
  return kept, jnp.any(do_insert & ~kept, axis=1)


def insertion_limit(wanted, confident, cfg: SamplerConfig):
  """How many of the ``wanted`` [B] insertions a step makes (confident-first).

  ``confident`` [B] counts the wanted insertions whose probability reaches
  ``cfg.confidence``; the limit is never below one.
  """
  limit = jnp.ceil(wanted * cfg.insert_fraction).astype(jnp.int32)
  if cfg.insert_per_step:
    limit = jnp.minimum(limit, cfg.insert_per_step)
  if cfg.confidence > 0:
    limit = jnp.minimum(limit, confident)
  return jnp.maximum(limit, 1)


def sample(model, rng: jax.Array, cfg: SamplerConfig, *, batch_size: int,
           start: Optional[jax.Array] = None, start_length: Optional[jax.Array] = None) -> Samples:
  """Generate by parallel insertion (pure; jit it with the model split out).

  Args:
    model: an `InsertionTransformer`.
    rng: PRNG key.
    cfg: sampler controls (static).
    batch_size: B.
    start: optional int [B, C] starting canvases (keywords), left-aligned.
    start_length: int [B] tokens in ``start``.

  Returns:
    `Samples`.
  """
  cap = cfg.max_len
  if start is None:
    start = jnp.full((batch_size, cap), PAD_ID, jnp.int32)
    start_length = jnp.zeros((batch_size,), jnp.int32)
  drafts = jnp.zeros((cfg.max_steps + 1, batch_size, cap), jnp.int32).at[0].set(start)
  draft_len = jnp.zeros((cfg.max_steps + 1, batch_size), jnp.int32).at[0].set(start_length)
  init = dict(canvas=start.astype(jnp.int32), length=start_length.astype(jnp.int32),
              done=jnp.zeros((batch_size,), bool), calls=jnp.zeros((batch_size,), jnp.int32),
              logprob=jnp.zeros((batch_size,), jnp.float32), step=jnp.int32(0), rng=rng,
              drafts=drafts, draft_len=draft_len)

  def cond(s):
    return (s["step"] < cfg.max_steps) & ~jnp.all(s["done"])

  def body(s):
    rng, key = jax.random.split(s["rng"])
    choice, do_insert, chosen_logp = _step(model, s["canvas"], s["length"], key, cfg)
    active = ~s["done"]
    do_insert &= active[:, None]
    wanted = jnp.sum(do_insert, axis=1)
    confident = jnp.sum(do_insert & (chosen_logp >= jnp.log(max(cfg.confidence, 1e-30))), axis=1)
    do_insert, _ = keep_most_confident(do_insert, chosen_logp,
                                       insertion_limit(wanted, confident, cfg))
    # Never overflow the canvas: drop the least confident insertions that don't fit.
    do_insert, overflow = keep_most_confident(do_insert, chosen_logp, cap - s["length"])
    canvas, length = insert(s["canvas"], s["length"], choice, do_insert)
    inserted_any = jnp.any(do_insert, axis=1)
    done = s["done"] | ~inserted_any | overflow | (length >= cap)
    step = s["step"] + 1
    return dict(
        canvas=canvas, length=length, done=done,
        calls=s["calls"] + active.astype(jnp.int32),
        logprob=s["logprob"] + jnp.sum(jnp.where(do_insert, chosen_logp, 0.0), axis=1),
        step=step, rng=rng,
        drafts=s["drafts"].at[step].set(canvas),
        draft_len=s["draft_len"].at[step].set(length))

  out = jax.lax.while_loop(cond, body, init)
  # Steps never taken repeat the final canvas, so drafts[-1] is always the result.
  taken = jnp.arange(cfg.max_steps + 1) <= out["step"]
  drafts = jnp.where(taken[:, None, None], out["drafts"], out["canvas"][None])
  draft_len = jnp.where(taken[:, None], out["draft_len"], out["length"][None])
  return Samples(tokens=out["canvas"], length=out["length"], calls=out["calls"],
                 drafts=drafts, draft_length=draft_len, inserted_logprob=out["logprob"])


def make_sampler(graphdef, cfg: SamplerConfig, batch_size: int):
  """A jitted ``fn(params, rng, start=None, start_length=None) -> Samples``."""

  @jax.jit
  def run(params, rng, start=None, start_length=None):
    model = nnx.merge(graphdef, params)
    return sample(model, rng, cfg, batch_size=batch_size, start=start, start_length=start_length)

  return run


def keyword_canvas(keyword_ids: list[list[int]], cap: int):
  """Left-aligned starting canvases from token-id lists: (int32 [B, C], int32 [B])."""
  for ids in keyword_ids:
    if len(ids) >= cap:
      raise ValueError(f"Keywords take {len(ids)} tokens but the canvas holds {cap}: use fewer "
                       f"keywords or raise --config.sampler.max_len.")
  canvas = np.full((len(keyword_ids), cap), PAD_ID, np.int32)
  for i, ids in enumerate(keyword_ids):
    canvas[i, :len(ids)] = ids
  return jnp.asarray(canvas), jnp.asarray([len(x) for x in keyword_ids], jnp.int32)


def draft_texts(samples: Samples, index: int, decode) -> list[str]:
  """The distinct drafts of example ``index`` as text, start to finish."""
  drafts = np.asarray(samples.drafts[:, index])
  lengths = np.asarray(samples.draft_length[:, index])
  texts = []
  for d, n in zip(drafts, lengths):
    t = decode(d[:n].tolist())
    if not texts or t != texts[-1]:
      texts.append(t)
  return texts


def sample_causal(model, rng: jax.Array, cfg: SamplerConfig, *, batch_size: int) -> Samples:
  """Left-to-right sampling from the causal baseline (one token per model call).

  Recomputes the prefix every step (no KV cache); the drafts are the prefixes.
  """
  cap = cfg.max_len
  init = dict(tokens=jnp.full((batch_size, cap + 1), PAD_ID, jnp.int32).at[:, 0].set(BOS_ID),
              length=jnp.zeros((batch_size,), jnp.int32), done=jnp.zeros((batch_size,), bool),
              calls=jnp.zeros((batch_size,), jnp.int32),
              logprob=jnp.zeros((batch_size,), jnp.float32), step=jnp.int32(0), rng=rng)
  pos = jnp.arange(cap + 1)[None, :]
  banned = jnp.zeros((model.cfg.vocab_size,), bool).at[jnp.array([PAD_ID, BOS_ID, UNK_ID])].set(
      True)

  def cond(s):
    return (s["step"] < cap + 1) & ~jnp.all(s["done"])

  def body(s):
    rng, key = jax.random.split(s["rng"])
    n = s["length"]
    seg = (pos <= n[:, None]).astype(jnp.int32)
    logits = model(s["tokens"], seg, jnp.broadcast_to(pos, s["tokens"].shape).astype(jnp.int32))
    logits = jnp.take_along_axis(logits, n[:, None, None], axis=1)[:, 0]  # [B, V]
    logits = jnp.where(banned, -jnp.inf, logits)
    if cfg.temperature == 0.0:
      choice = jnp.argmax(logits, axis=-1)
    else:
      choice = jax.random.categorical(key, _filter_logits(logits / cfg.temperature, cfg))
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), choice[:, None], axis=1)[:, 0]
    active = ~s["done"]
    stop = (choice == EOS_ID) | (n >= cap)
    write = active & ~stop
    tokens = s["tokens"].at[jnp.arange(batch_size), jnp.where(write, n + 1, cap + 1)].set(
        choice.astype(jnp.int32), mode="drop")
    return dict(tokens=tokens, length=n + write, done=s["done"] | stop,
                calls=s["calls"] + active, logprob=s["logprob"] + jnp.where(active, logp, 0.0),
                step=s["step"] + 1, rng=rng)

  out = jax.lax.while_loop(cond, body, init)
  tokens = out["tokens"][:, 1:]
  # Drafts of an AR model are its prefixes: record only the final one.
  return Samples(tokens=tokens, length=out["length"], calls=out["calls"],
                 drafts=tokens[None], draft_length=out["length"][None],
                 inserted_logprob=out["logprob"])


def make_causal_sampler(graphdef, cfg: SamplerConfig, batch_size: int):
  """A jitted ``fn(params, rng) -> Samples`` for the causal baseline."""

  @jax.jit
  def run(params, rng):
    return sample_causal(nnx.merge(graphdef, params), rng, cfg, batch_size=batch_size)

  return run


def sample_causal_cached(model, rng: jax.Array, cfg: SamplerConfig, *,
                         batch_size: int) -> Samples:
  """`sample_causal` with a KV cache: each model call processes one new token.

  Same choices, same random keys and the same stopping rules as `sample_causal` (so the
  same tokens up to float rounding of the logits), in one `lax.while_loop`; every row
  stops at its EOS (or the cap ``cfg.max_len``), the loop when every row has stopped.
  All rows decode position ``step`` together, so one scalar index serves the cache.

  Args:
    model: a `CausalTransformer` (``init_cache`` / ``decode_step``).
    rng: PRNG key; cfg: sampler controls (static); batch_size: B.

  Returns:
    `Samples` (drafts hold only the final sequences, as in `sample_causal`).
  """
  cap = cfg.max_len
  init = dict(tokens=jnp.full((batch_size, cap + 1), PAD_ID, jnp.int32).at[:, 0].set(BOS_ID),
              length=jnp.zeros((batch_size,), jnp.int32), done=jnp.zeros((batch_size,), bool),
              calls=jnp.zeros((batch_size,), jnp.int32),
              logprob=jnp.zeros((batch_size,), jnp.float32), step=jnp.int32(0), rng=rng,
              cache=model.init_cache(batch_size, cap + 1))
  banned = jnp.zeros((model.cfg.vocab_size,), bool).at[jnp.array([PAD_ID, BOS_ID, UNK_ID])].set(
      True)
  rows = jnp.arange(batch_size)

  def cond(s):
    return (s["step"] < cap + 1) & ~jnp.all(s["done"])

  def body(s):
    rng, key = jax.random.split(s["rng"])
    n, step = s["length"], s["step"]
    logits, cache = model.decode_step(s["tokens"][:, step], step, s["cache"])
    logits = jnp.where(banned, -jnp.inf, logits)
    if cfg.temperature == 0.0:
      choice = jnp.argmax(logits, axis=-1)
    else:
      choice = jax.random.categorical(key, _filter_logits(logits / cfg.temperature, cfg))
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), choice[:, None], axis=1)[:, 0]
    active = ~s["done"]
    stop = (choice == EOS_ID) | (n >= cap)
    write = active & ~stop
    tokens = s["tokens"].at[rows, jnp.where(write, n + 1, cap + 1)].set(
        choice.astype(jnp.int32), mode="drop")
    return dict(tokens=tokens, length=n + write, done=s["done"] | stop,
                calls=s["calls"] + active, logprob=s["logprob"] + jnp.where(active, logp, 0.0),
                step=step + 1, rng=rng, cache=cache)

  out = jax.lax.while_loop(cond, body, init)
  tokens = out["tokens"][:, 1:]
  return Samples(tokens=tokens, length=out["length"], calls=out["calls"],
                 drafts=tokens[None], draft_length=out["length"][None],
                 inserted_logprob=out["logprob"])


def make_causal_cached_sampler(graphdef, cfg: SamplerConfig, batch_size: int):
  """A jitted ``fn(params, rng) -> Samples``: the causal baseline with its KV cache."""

  @jax.jit
  def run(params, rng):
    return sample_causal_cached(nnx.merge(graphdef, params), rng, cfg, batch_size=batch_size)

  return run


def sample_masked(model, rng: jax.Array, cfg: SamplerConfig, *, batch_size: int) -> Samples:
  """Ancestral sampling of the masked-diffusion baseline in ``cfg.max_steps`` steps.

  The canvas has ``cfg.max_len + 1`` positions (the training canvas ``data.max_len + 1``:
  keep ``sampler.max_len == data.max_len``) and starts fully masked. Step k = T..1 goes from
  time t = k/T to s = (k-1)/T: the model predicts every position once, and each masked
  position is revealed with probability (t - s) / t (= 1 at the last step) as a token drawn
  from its prediction (temperature / top-k / top-p as configured; BOS and UNK banned);
  revealed positions stay. The sentence is the canvas up to its first EOS or PAD.

  Returns:
    `Samples` with ``calls`` = T for every row (one model call per step, no early stop),
    drafts [T+1, B, C]: the revealed tokens after each step (masked positions hold the mask
    id, which decodes to nothing); the last one is the result.
  """
  steps, cap = cfg.max_steps, cfg.max_len
  width = cap + 1
  mask_id = model.mask_id
  z0 = jnp.full((batch_size, width), mask_id, jnp.int32)
  seg, pos = losses.masked_inputs(z0)
  banned = jnp.zeros((model.cfg.vocab_size,), bool).at[jnp.array([BOS_ID, UNK_ID])].set(True)

  def body(i, s):
    z, logprob, drafts, rng = s
    rng, k_tok, k_rev = jax.random.split(rng, 3)
    t = (steps - i) / steps
    s_next = (steps - i - 1) / steps
    logits = jnp.where(banned, -jnp.inf, model(z, seg, pos))
    if cfg.temperature == 0.0:
      choice = jnp.argmax(logits, axis=-1)
    else:
      choice = jax.random.categorical(k_tok, _filter_logits(logits / cfg.temperature, cfg))
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), choice[..., None], axis=-1)[..., 0]
    reveal = (z == mask_id) & (jax.random.uniform(k_rev, z.shape) < (t - s_next) / t)
    z = jnp.where(reveal, choice.astype(jnp.int32), z)
    logprob = logprob + jnp.sum(jnp.where(reveal, logp, 0.0), axis=1)
    return z, logprob, drafts.at[i + 1].set(z[:, :cap]), rng

  drafts = jnp.full((steps + 1, batch_size, cap), mask_id, jnp.int32)
  z, logprob, drafts, _ = jax.lax.fori_loop(
      0, steps, body, (z0, jnp.zeros((batch_size,), jnp.float32), drafts, rng))
  ends = (z == EOS_ID) | (z == PAD_ID)
  length = jnp.minimum(jnp.where(jnp.any(ends, axis=1), jnp.argmax(ends, axis=1), width), cap)
  tokens = jnp.where(jnp.arange(cap)[None, :] < length[:, None], z[:, :cap], PAD_ID)
  tokens = tokens.astype(jnp.int32)
  drafts = drafts.at[steps].set(tokens)  # the last draft is the result, cut at its end
  return Samples(tokens=tokens, length=length.astype(jnp.int32),
                 calls=jnp.full((batch_size,), steps, jnp.int32), drafts=drafts,
                 draft_length=jnp.full((steps + 1, batch_size), cap, jnp.int32),
                 inserted_logprob=logprob)


def make_masked_sampler(graphdef, cfg: SamplerConfig, batch_size: int):
  """A jitted ``fn(params, rng) -> Samples`` for the masked-diffusion baseline."""

  @jax.jit
  def run(params, rng):
    return sample_masked(nnx.merge(graphdef, params), rng, cfg, batch_size=batch_size)

  return run
