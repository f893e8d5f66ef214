"""The reverse process: grow a canvas by parallel insertion, in one compiled loop.

Each step runs the model once on ``[BOS] canvas [EOS]``, picks a token or
``none`` for every gap, and inserts all chosen tokens at once: existing token
i moves right by the number of insertions in gaps 0..i, the token inserted into
gap g lands at g + (insertions in gaps 0..g-1). The loop (`lax.while_loop`)
stops per example when no gap inserts, or at the step or length cap.

Every control lives inside that loop:

* conditioning: a start canvas (keywords: insertion never removes or reorders
  anything, so they stay, in order) and a per-gap ``open_gaps`` mask: a prompt
  prefix closes the gaps before and inside it, an infilling template opens only
  its marked gaps; a gap made by inserting into an open gap is open.
* stopping: every gap ``none``; ``tau`` (no gap's choice is probable enough);
  ``epsilon`` (the step moved the sentence embedding by less); the step and
  length caps.
* creativity ``delta``: a step may move the sentence embedding of a non-empty
  draft by at most delta; the least confident insertions are dropped until it fits.
* randomness is per example: example b's draw at step t uses
  ``fold_in(keys[b], t)``, so an example comes out the same in any batch.

The sentence embedding E is the IDF-weighted mean of a token table (the model's
input embedding, or the fixed corpus table), as for the `embedding_*` scorers;
"moved" is the cosine distance 1 - cos between E of consecutive drafts (1 from
an empty draft to a non-empty one).

Shapes: ``B`` batch, ``C`` canvas capacity (max tokens), ``G = C + 1`` gaps,
``S`` recorded steps (``max_steps + 1`` drafts).
"""

import dataclasses
import re
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from semdiff import losses
from semdiff import scorers
from semdiff.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID


SELECT_MODES = ("sample", "certainty", "closing", "reserve", "level")
CLOSING = ("certainty", "closing", "reserve", "level")  # a none closes its gap for good
# The modes in which a gap decides once whether it is empty, then waits for its token.
RESERVING = ("reserve", "level")


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
    select: how confident-first picks its gaps. "sample": every gap samples,
      and the most confident of the sampled tokens insert (a gap that samples
      ``none`` is asked again next step; the run stops when all say ``none``
      at once). "certainty": the gaps whose distribution is most certain (the
      largest probability of any choice, ``none`` included) are chosen first,
      only they sample, and a ``none`` closes its gap for good (its subtree is
      empty). Each gap decision is then made once, in an order that does not
      depend on the draw, so frequent re-asking cannot bias the length; the
      run stops when no gap is open.
      "closing": every open gap samples, as with "sample", and the most
      confident draws act (probability >= ``confidence``, at least one): a
      token inserts, a ``none`` closes its gap for good. As confident-first as
      "sample" (only likely tokens go in early), yet a ``none`` is said once per
      gap, and a ``model.gap_state`` model hears which gaps are closed; the run
      stops when no gap is open.
      "reserve": whether a gap gets a token is decided once, when the gap first
      appears, with the model's own probability of ``none`` (as
      ``stop_filter="separate"``): ``none`` closes it for good, otherwise the
      gap is reserved and keeps drawing its token (``none`` excluded; the
      filters act on the tokens) until it is among the most confident and
      inserts. The length then follows the all-gaps sampler, while each token
      is chosen as late as confident-first wants; the run stops when no gap
      is open.
      "level": as "reserve", except that new gaps decide whether they are
      empty only when every reserved gap has its token, i.e. all at once on a
      complete level (the canvas of the parallel process, an exact training
      level); in between, the reserved gaps fill in confident-first. Frontier
      states (a level plus some of the next) then only ever choose tokens,
      never whether a gap is empty (measured in benchmarks/README.md: longer
      samples than "sample", fewer grammatical).
    max_steps: cap on insertion steps.
    max_len: canvas capacity C (tokens).
    epsilon: semantic stop: an example stops after a step that moved its
      sentence embedding by less than epsilon (0 = off).
    delta: creativity: a step may move the sentence embedding of a non-empty
      draft by at most delta (the least confident insertions are dropped until
      it fits; 0 = nothing is ever added to a non-empty start; < 0 = off).
    embedding_source: the table of the sentence embedding: "model" (the
      model's input embedding) or "fixed" (pass ``embedding=`` to `sample`).
    keywords, prompt, infill: conditioning texts, turned into the start canvas
      and open gaps by `conditioning` (the compiled loop never reads them).
    stop_filter: how temperature, top-k and top-p treat ``none``. "joint": as
      one more choice beside the tokens (truncating the tail of the tokens
      then raises the chance of ``none``, so nucleus sampling shortens the
      text). "separate": a gap first stops with the model's own probability of
      ``none``; only when it inserts do the filters pick its token.
    none_bias: added to every gap's ``none`` logit before any choice (0 = the
      model as trained; < 0 lengthens the text, > 0 shortens it). A length
      calibration: an undertrained model's ``none`` tends to be overconfident.
    stop_confidence: with ``select="sample"``, a step in which no gap draws a token ends
      the sample only if every open gap's p(``none``) is at least this; otherwise the gap
      least sure of ``none`` inserts its most likely token (0 = off: any all-``none``
      step stops). Against samples that stop one step short of a sentence, e.g. "the
      boy ." (a gap that is unsure it is empty still said ``none`` by chance). The
      other ``select`` modes, whose ``none`` closes its gap, ignore it.
    stop_rescues: at most this many such forced insertions per sample (0 = no limit).
      Without a limit a chain of them can run away: every forced adjective opens two
      more gaps that are unsure they are empty ("a big pretty big pretty big ...").
    stop_rescue_token: which token a forced insertion takes: "likeliest" (the gap's
      most likely token) or "sample" (drawn from the gap's tokens, ``none`` left out,
      under the same temperature, top-k and top-p). The likeliest token of an unsure gap
      is the same generic filler in most samples (the grammar's commonest adjective),
      so "likeliest" repeats it; "sample" keeps the sample's own distribution. At
      temperature 0 (greedy) "sample" takes the likeliest token too.
    refine_steps: correction rounds after the sample is finished (``model.gap_state``
      models trained with ``noise.hole_prob`` > 0; see `refine`), one model call each:
      every token is left out in turn (one canvas each, all in the same call) and the
      model, told that every other gap is closed, gives p(token | the rest of the sample);
      doubtful tokens become the model's likeliest token for their place (0 = off).
    refine_threshold: a token is doubtful if it is less than this times as likely as the
      likeliest token for its place.
    refine_parallel: each round changes every doubtful token that is more doubtful than
      both neighbours (no two adjacent), not only the most doubtful one per sample.
    refine_edits: "replace" (a doubtful token becomes another token) or "all" (also
      deleted when its place is likelier empty, and a token is inserted into a gap where
      one is much likelier than nothing; needs ``noise.hole_open`` > 0 in training).
    grow_canvas: run each step on the smallest canvas window (8, 16, 32, ...
      tokens, up to ``max_len``; see `canvas_windows`) that holds every row's
      draft, instead of all ``max_len`` positions. The samples are the same
      (up to float rounding of the logits) for a fraction of the compute: a
      draft that doubles every step costs about two full passes in all
      instead of one per step. The model is compiled once per window.
      Insertion and tree models.
  """

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  tau: float = 0.0
  gaps: str = "all"
  insert_per_step: int = 0
  insert_fraction: float = 1.0
  confidence: float = 0.0
  select: str = "sample"
  max_steps: int = 64
  max_len: int = 64
  epsilon: float = 0.0
  delta: float = -1.0
  embedding_source: str = "model"
  keywords: str = ""
  prompt: str = ""
  infill: str = ""
  stop_filter: str = "joint"
  none_bias: float = 0.0
  stop_confidence: float = 0.0
  stop_rescues: int = 0
  stop_rescue_token: str = "likeliest"
  refine_steps: int = 0
  refine_threshold: float = 0.1
  refine_parallel: bool = False
  refine_edits: str = "replace"
  grow_canvas: bool = False

  @property
  def uses_embedding(self) -> bool:
    """Whether the loop needs the sentence embedding (epsilon or delta on)."""
    return self.epsilon > 0 or self.delta >= 0

  @classmethod
  def from_config(cls, config, **overrides) -> "SamplerConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in dict(config).items() if k in fields}
    values.update(overrides)
    cfg = cls(**values)
    if cfg.stop_filter not in ("joint", "separate"):
      raise ValueError(f"sampler.stop_filter must be 'joint' or 'separate', got "
                       f"{cfg.stop_filter!r}.")
    if cfg.select not in SELECT_MODES:
      raise ValueError(f"sampler.select must be one of {', '.join(SELECT_MODES)}, got "
                       f"{cfg.select!r}.")
    if not 0.0 <= cfg.stop_confidence <= 1.0 or cfg.stop_rescues < 0:
      raise ValueError(f"sampler.stop_confidence={cfg.stop_confidence} must be in [0, 1] and "
                       f"sampler.stop_rescues={cfg.stop_rescues} >= 0.")
    if cfg.stop_rescue_token not in ("likeliest", "sample"):
      raise ValueError(f"sampler.stop_rescue_token must be 'likeliest' or 'sample', got "
                       f"{cfg.stop_rescue_token!r}.")
    if cfg.refine_steps < 0 or not 0.0 < cfg.refine_threshold <= 1.0:
      raise ValueError(f"sampler.refine_steps={cfg.refine_steps} must be >= 0 and "
                       f"sampler.refine_threshold={cfg.refine_threshold} in (0, 1].")
    if cfg.refine_edits not in ("replace", "all"):
      raise ValueError(f"sampler.refine_edits must be 'replace' or 'all', got "
                       f"{cfg.refine_edits!r}.")
    if cfg.gaps not in ("all", "last"):
      raise ValueError(f"sampler.gaps must be 'all' or 'last', got {cfg.gaps!r}.")
    if not 0.0 < cfg.insert_fraction <= 1.0:
      raise ValueError(f"sampler.insert_fraction must be in (0, 1], got {cfg.insert_fraction}.")
    if cfg.embedding_source not in ("model", "fixed"):
      raise ValueError(f"sampler.embedding_source must be 'model' or 'fixed', got "
                       f"{cfg.embedding_source!r}.")
    if cfg.epsilon < 0:
      raise ValueError(f"sampler.epsilon must be >= 0 (0 = off), got {cfg.epsilon}.")
    if cfg.infill and (cfg.keywords or cfg.prompt):
      raise ValueError("sampler.infill fixes the whole canvas: drop sampler.keywords and "
                       "sampler.prompt, or put them into the infill text.")
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
    inserted: int32 [S, B, G], per step k >= 1, the token inserted into gap g of
      draft k - 1, or -1 (row 0, the start, is all -1). None for the causal sampler.
    inserted_prob: float32 [S, B, G], the probability (temperature 1) of each
      inserted token, 0 elsewhere.
    moved: float32 [S, B], the cosine distance between E of drafts k - 1 and k
      (0 for row 0 and steps not taken; all 0 when no table was available).
  """

  tokens: jax.Array
  length: jax.Array
  calls: jax.Array
  drafts: jax.Array
  draft_length: jax.Array
  inserted_logprob: jax.Array
  inserted: Optional[jax.Array] = None
  inserted_prob: Optional[jax.Array] = None
  moved: Optional[jax.Array] = None


def _filter_logits(logits, cfg: SamplerConfig):
  """Temperature, top-k and top-p on [..., V+1] logits."""
  if cfg.top_k:
    kth = jax.lax.top_k(logits, cfg.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if cfg.top_p < 1.0:
    logits = jnp.where(nucleus(logits, cfg.top_p), logits, -jnp.inf)
  return logits


def nucleus(logits: jax.Array, top_p: float) -> jax.Array:
  """bool [..., V]: the smallest set of most likely choices whose mass reaches ``top_p``
  (with every choice tied with its least likely member).

  No sort (XLA's sort on CPU cost most of a sampling step at V = 1k): a bisection on the
  bit patterns of the probabilities (non-negative float32 order like their int32 bits)
  finds the largest cutoff whose kept mass still reaches ``top_p``, in 32 masked sums.
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  bits = jax.lax.bitcast_convert_type(probs, jnp.int32)
  # Invariant: the mass at or above lo reaches top_p, the mass at or above hi does not.
  lo = jnp.zeros(probs.shape[:-1] + (1,), jnp.int32)
  hi = jnp.max(bits, axis=-1, keepdims=True) + 1

  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    reaches = jnp.sum(jnp.where(bits >= mid, probs, 0.0), axis=-1, keepdims=True) >= top_p
    return jnp.where(reaches, mid, lo), jnp.where(reaches, hi, mid)

  lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, hi))
  return bits >= lo


def insert(canvas: jax.Array, length: jax.Array, choice: jax.Array, do_insert: jax.Array):
  """Insert ``choice[g]`` into every gap g where ``do_insert``: a scatter, no loop.

  Args:
    canvas: int [B, C]; length: int [B]; choice: int [B, C+1];
    do_insert: bool [B, C+1] (callers make sure the result fits in C). A bool canvas (a
    per-token flag, with False choices) moves its flags with their tokens.

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


def _choose(logits, keys, cfg: SamplerConfig):
  """Every gap's choice, int32 [B, G], from logits [B, G, V+1] (``none`` last).

  ``keys``: [B] PRNG keys, one per example. See ``SamplerConfig.stop_filter``.
  """
  if cfg.temperature == 0.0:
    return jnp.argmax(logits, axis=-1)
  categorical = jax.vmap(lambda k, l: jax.random.categorical(k, l, axis=-1))
  if cfg.stop_filter == "joint":
    return categorical(keys, _filter_logits(logits / cfg.temperature, cfg))
  none_id = logits.shape[-1] - 1
  stop_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
  p_none = jax.nn.softmax(logits, axis=-1)[..., none_id]
  stop = jax.vmap(lambda k, p: jax.random.uniform(k, p.shape) < p)(stop_keys, p_none)
  tokens = _filter_logits(logits[..., :none_id] / cfg.temperature, cfg)
  return jnp.where(stop, none_id, categorical(keys, tokens))


def canvas_windows(cap: int, grow: bool) -> tuple[int, ...]:
  """The canvas sizes a sampler compiles: (8, 16, 32, ... below ``cap``, ``cap``), or (cap,)."""
  if not grow:
    return (cap,)
  return tuple(w for w in (8 << i for i in range(cap.bit_length())) if w < cap) + (cap,)


def in_window(gap_logits, arrays, length, cfg: SamplerConfig):
  """``gap_logits(*windowed arrays, length)`` on the smallest window that holds every draft.

  Args:
    gap_logits: fn of canvas-aligned arrays [B, W] (and ``length``) -> logits [B, W+1, V+1].
    arrays: canvas-aligned arrays, each [B, C] (or [B, C+1]: gap-aligned, windowed to
      [B, W+1]).
    length: int [B], tokens in each draft.
    cfg: sampler controls (``max_len`` = C, ``grow_canvas``).

  Returns:
    float32 [B, C+1, V+1]: the logits of the gaps inside the window, zeros beyond it (gaps
    past a draft's end are never used).
  """
  cap = cfg.max_len
  windows = canvas_windows(cap, cfg.grow_canvas)
  if len(windows) == 1:
    return gap_logits(*arrays, length)

  def branch(w):
    def run(arrays):
      logits = gap_logits(*[a[:, :w + a.shape[1] - cap] for a in arrays], length)
      return jnp.pad(logits, ((0, 0), (0, cap - w), (0, 0)))
    return run

  index = jnp.sum(jnp.asarray(windows[:-1]) < jnp.max(length))
  return jax.lax.switch(index, [branch(w) for w in windows], tuple(arrays))


def _banned(none_id: int) -> jax.Array:
  """bool [V+1]: the ids no gap may insert (pad, bos, eos, unk)."""
  return jnp.zeros((none_id + 1,), bool).at[jnp.array([PAD_ID, BOS_ID, EOS_ID, UNK_ID])].set(
      True)


def _step(model, canvas, length, keys, cfg: SamplerConfig, closed=None):
  """One insertion step's choices: (choice, do_insert, logprob), all [B, G], and the
  log-probabilities of every choice, [B, G, V+1] (their max is a gap's certainty). With
  ``select="reserve"``, ``choice`` is a token in every gap and ``logprob`` its probability
  given that the gap is not empty; ``do_insert`` says the gap drew "not empty" (and ``tau``).

  ``keys``: [B] PRNG keys, one per example. ``closed``: optional bool [B, C+1], the gaps
  known to be empty, given to a ``model.gap_state`` model.
  """
  none_id = model.none_id
  batch, cap = canvas.shape
  if closed is None:
    logits = in_window(lambda c, n: model(*losses.canvas_inputs(c, n)), (canvas,), length,
                       cfg)  # [B, C+1, V+1]
  else:
    logits = in_window(lambda c, k, n: model(*losses.canvas_inputs(c, n), closed=k),
                       (canvas, closed), length, cfg)
  logits = jnp.where(_banned(none_id), -jnp.inf, logits)
  if cfg.none_bias:
    logits = logits.at[..., none_id].add(cfg.none_bias)
  logp = jax.nn.log_softmax(logits, axis=-1)
  if cfg.select in RESERVING:
    # The token of every gap with none excluded (its probability given that the gap is not
    # empty); whether the gap is empty is drawn from the model's own p(none).
    token_logits = logits.at[..., none_id].set(-jnp.inf)
    choice = _choose(token_logits, keys, dataclasses.replace(cfg, stop_filter="joint"))
    token_logp = jax.nn.log_softmax(token_logits, axis=-1)
    chosen_logp = jnp.take_along_axis(token_logp, choice[..., None], axis=-1)[..., 0]
    stop_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    p_none = jnp.exp(logp[..., none_id])
    empty = jax.vmap(lambda k, p: jax.random.uniform(k, p.shape) < p)(stop_keys, p_none)
  else:
    choice = _choose(logits, keys, cfg)
    chosen_logp = jnp.take_along_axis(logp, choice[..., None], axis=-1)[..., 0]
  gap = jnp.arange(cap + 1)[None, :]
  allowed = gap <= length[:, None]
  if cfg.gaps == "last":
    allowed &= gap == length[:, None]
  do_insert = allowed & (choice != none_id)
  if cfg.select in RESERVING:
    do_insert &= ~empty  # choice is a token everywhere: a reserved gap ignores the draw
  if cfg.tau > 0:
    do_insert &= chosen_logp >= jnp.log(cfg.tau)
  return choice, do_insert, chosen_logp, logp


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


def update_open_gaps(open_gaps: jax.Array, do_insert: jax.Array) -> jax.Array:
  """The open-gap mask after `insert`: bool [B, G] -> [B, G].

  Old gap g lands at g + (insertions in gaps 0..g-1); when it inserted, the gap
  after its new token inherits its (open) state too.
  """
  batch, gaps = open_gaps.shape
  ins = do_insert.astype(jnp.int32)
  dest = jnp.arange(gaps)[None, :] + jnp.cumsum(ins, axis=1) - ins
  rows = jnp.arange(batch)[:, None]
  new = jnp.zeros_like(open_gaps).at[rows, dest].set(open_gaps, mode="drop")
  return new.at[rows, jnp.where(do_insert, dest + 1, gaps)].set(True, mode="drop")


def move_gap_state(state: jax.Array, do_insert: jax.Array) -> jax.Array:
  """A per-gap flag after `insert`, bool [B, G] -> [B, G]: old gap g moves to its new index;
  the two gaps around a new token start False."""
  batch, gaps = state.shape
  ins = do_insert.astype(jnp.int32)
  dest = jnp.arange(gaps)[None, :] + jnp.cumsum(ins, axis=1) - ins
  rows = jnp.arange(batch)[:, None]
  return jnp.zeros_like(state).at[rows, dest].set(state & ~do_insert, mode="drop")


def sentence_sum(canvas, length, table, weights) -> jax.Array:
  """float32 [B, D]: sum of weights[t]·table[t] over each canvas's tokens.

  E (the weighted mean) is this over the weights' sum; cosine distances only need the sum.
  """
  real = jnp.arange(canvas.shape[1])[None, :] < length[:, None]
  w = jnp.where(real, jnp.take(weights, canvas, axis=0), 0.0)
  return jnp.einsum("bc,bcd->bd", w, jnp.take(table, canvas, axis=0))


def _distance(a, b):
  """Cosine distance between rows of a and b ([..., D])."""
  return scorers.cosine_distance(jnp.sum(a * b, -1), jnp.sum(a * a, -1), jnp.sum(b * b, -1))


def fit_delta(do_insert, confidence, vectors, prev_sum, delta):
  """Drops the least confident insertions until the step moves E by at most ``delta``.

  Args:
    do_insert: bool [B, G]; confidence: float [B, G] (the chosen tokens' log-probs);
    vectors: float32 [B, G, D], weight·embedding of each gap's choice;
    prev_sum: float32 [B, D], `sentence_sum` of the draft before the step.

  Returns:
    bool [B, G]: the largest most-confident-first prefix of the insertions whose
    distance 1 - cos(E before, E after) is <= delta (possibly none).
  """
  score = jnp.where(do_insert, confidence, -jnp.inf)
  order = jnp.argsort(-score, axis=1)  # the order keep_most_confident keeps in
  vectors = jnp.where(do_insert[..., None], vectors, 0.0)
  ranked = jnp.take_along_axis(vectors, order[..., None], axis=1)
  sums = prev_sum[:, None, :] + jnp.concatenate(
      [jnp.zeros_like(ranked[:, :1]), jnp.cumsum(ranked, axis=1)], axis=1)  # [B, G+1, D]
  dist = _distance(prev_sum[:, None, :], sums)  # after keeping the top k, k = 0..G
  k = jnp.arange(sums.shape[1])[None, :]
  fits = (dist <= delta) & (k <= jnp.sum(do_insert, axis=1, keepdims=True))
  limit = jnp.max(jnp.where(fits, k, 0), axis=1)
  kept, _ = keep_most_confident(do_insert, confidence, limit)
  return kept


def _example_keys(rng: jax.Array, batch_size: int) -> jax.Array:
  """[B] keys: ``rng`` itself when it holds one key per example, else fold_in(rng, b)."""
  if rng.shape == (batch_size,):
    return rng
  if rng.shape != ():
    raise ValueError(f"rng must be one key or {batch_size} keys (one per example), got shape "
                     f"{rng.shape}.")
  return jax.vmap(lambda b: jax.random.fold_in(rng, b))(jnp.arange(batch_size))


def sentence_table(model, cfg: SamplerConfig, embedding: Optional[jax.Array]):
  """The [V, D] table of the sentence embedding, or None where there is none to use."""
  if cfg.embedding_source == "fixed":
    table = embedding
  else:
    table = model.token_embedding() if hasattr(model, "token_embedding") else None
  if table is None and cfg.uses_embedding:
    raise ValueError(
        f"sampler.epsilon/delta need a sentence-embedding table: with "
        f"sampler.embedding_source={cfg.embedding_source!r} "
        + ("pass embedding= (the fixed corpus table)." if cfg.embedding_source == "fixed"
           else "the model must have token_embedding()."))
  return None if table is None else jax.lax.stop_gradient(table).astype(jnp.float32)


def sample(model, rng: jax.Array, cfg: SamplerConfig, *, batch_size: int,
           start: Optional[jax.Array] = None, start_length: Optional[jax.Array] = None,
           open_gaps: Optional[jax.Array] = None, embedding: Optional[jax.Array] = None,
           idf: Optional[jax.Array] = None) -> Samples:
  """Generate by parallel insertion (pure; jit it with the model split out).

  Args:
    model: an `InsertionTransformer`.
    rng: a PRNG key, or [B] keys (one per example: example b then comes out the
      same whatever the batch; a single key gives example b ``fold_in(rng, b)``).
    cfg: sampler controls (static).
    batch_size: B.
    start: optional int [B, C] starting canvases (keywords, prompt), left-aligned.
    start_length: int [B] tokens in ``start``.
    open_gaps: optional bool [B, C+1], the gaps of ``start`` that may insert
      (default: all). See `conditioning`.
    embedding: float [V, D], the fixed table (``cfg.embedding_source="fixed"``).
    idf: float [V], token weights of the sentence embedding (default: all 1).

  Returns:
    `Samples`.
  """
  cap = cfg.max_len
  gap_state = getattr(getattr(model, "cfg", None), "gap_state", False)
  if start is None:
    start = jnp.full((batch_size, cap), PAD_ID, jnp.int32)
    start_length = jnp.zeros((batch_size,), jnp.int32)
  if open_gaps is None:
    open_gaps = jnp.ones((batch_size, cap + 1), bool)
  table = sentence_table(model, cfg, embedding)
  if table is not None:
    weights = (jnp.ones((table.shape[0],), jnp.float32) if idf is None
               else jnp.asarray(idf, jnp.float32))

    def embed_sum(canvas, length):
      return sentence_sum(canvas, length, table, weights)
  else:
    def embed_sum(canvas, length):
      return jnp.zeros((canvas.shape[0], 1), jnp.float32)
  start = start.astype(jnp.int32)
  start_length = start_length.astype(jnp.int32)
  steps = cfg.max_steps + 1
  drafts = jnp.zeros((steps, batch_size, cap), jnp.int32).at[0].set(start)
  draft_len = jnp.zeros((steps, batch_size), jnp.int32).at[0].set(start_length)
  init = dict(canvas=start, length=start_length,
              done=jnp.zeros((batch_size,), bool), calls=jnp.zeros((batch_size,), jnp.int32),
              logprob=jnp.zeros((batch_size,), jnp.float32), step=jnp.int32(0),
              keys=_example_keys(rng, batch_size), open=jnp.asarray(open_gaps, bool),
              # The start's own tokens (keywords, prompt, infill text): never refined.
              given=jnp.arange(cap)[None, :] < start_length[:, None],
              reserved=jnp.zeros((batch_size, cap + 1), bool),
              rescued=jnp.zeros((batch_size,), jnp.int32),
              sum=embed_sum(start, start_length), drafts=drafts, draft_len=draft_len,
              inserted=jnp.full((steps, batch_size, cap + 1), -1, jnp.int32),
              inserted_prob=jnp.zeros((steps, batch_size, cap + 1), jnp.float32),
              moved=jnp.zeros((steps, batch_size), jnp.float32))

  def cond(s):
    return (s["step"] < cfg.max_steps) & ~jnp.all(s["done"])

  def body(s):
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(s["keys"], s["step"])
    gap = jnp.arange(cap + 1)[None, :]
    # A gap_state model hears which gaps are empty for good: every none of a sampler whose
    # none closes its gap, and the gaps a conditioning text keeps shut.
    closed = (~s["open"] & (gap <= s["length"][:, None])) if gap_state else None
    choice, do_insert, chosen_logp, logp = _step(model, s["canvas"], s["length"], keys, cfg,
                                                 closed)
    active = ~s["done"]
    threshold = jnp.log(max(cfg.confidence, 1e-30))
    open_gaps = s["open"]
    reserved = s["reserved"]
    wanted_any = jnp.zeros((batch_size,), bool)
    rescued = s["rescued"]
    live = active[:, None] & open_gaps & (gap <= s["length"][:, None])  # gaps still deciding
    if cfg.gaps == "last":
      live &= gap == s["length"][:, None]
    if cfg.select in RESERVING:
      tau_ok = (chosen_logp >= jnp.log(cfg.tau)) if cfg.tau > 0 else jnp.ones_like(live)
      # A new gap decides once whether it is empty; a reserved one only waits for its token.
      deciding = live & ~reserved
      if cfg.select == "level":  # new gaps wait until the level is complete
        deciding &= ~jnp.any(live & reserved, axis=1, keepdims=True)
      reserved = reserved | (deciding & do_insert)
      closing = deciding & ~do_insert
      wanted = live & reserved & tau_ok
      open_gaps = open_gaps & ~closing & ~(live & reserved & ~tau_ok)
      reserved = reserved & open_gaps
      wanted_any = jnp.any(wanted, axis=1)
      limit = insertion_limit(jnp.sum(wanted, axis=1),
                              jnp.sum(wanted & (chosen_logp >= threshold), axis=1), cfg)
      do_insert, _ = keep_most_confident(wanted, chosen_logp, limit)
    elif cfg.select in ("certainty", "closing"):
      # "certainty" chooses the gaps by a rule that does not look at the draw (only they
      # decide); "closing" lets every gap draw and the most confident draws act.
      score = jnp.max(logp, axis=-1) if cfg.select == "certainty" else chosen_logp
      limit = insertion_limit(jnp.sum(live, axis=1),
                              jnp.sum(live & (score >= threshold), axis=1), cfg)
      chosen, _ = keep_most_confident(live, score, limit)
      do_insert &= chosen
      # A gap that chose none (or failed tau) is empty for good.
      open_gaps = open_gaps & ~(chosen & ~do_insert)
    else:
      do_insert &= active[:, None] & open_gaps
      wanted = jnp.sum(do_insert, axis=1)
      confident = jnp.sum(do_insert & (chosen_logp >= threshold), axis=1)
      do_insert, _ = keep_most_confident(do_insert, chosen_logp,
                                         insertion_limit(wanted, confident, cfg))
      if cfg.stop_confidence > 0:
        # No gap drew a token, yet a gap is unsure it is empty: not a stop. The gap least
        # sure of none inserts a token instead (its likeliest, or one drawn without none).
        none_logp = jnp.where(live, logp[..., -1], jnp.inf)
        unsure = jnp.min(none_logp, axis=1) < jnp.log(cfg.stop_confidence)
        forced = unsure & ~jnp.any(do_insert, axis=1)
        if cfg.stop_rescues > 0:
          forced &= s["rescued"] < cfg.stop_rescues
        rescued = s["rescued"] + forced.astype(jnp.int32)
        pick = jax.nn.one_hot(jnp.argmin(none_logp, axis=1), cap + 1, dtype=bool)
        if cfg.stop_rescue_token == "sample" and cfg.temperature > 0:
          rescue_keys = jax.vmap(lambda k: jax.random.fold_in(k, 2))(keys)
          best = _choose(logp.at[..., -1].set(-jnp.inf), rescue_keys,
                         dataclasses.replace(cfg, stop_filter="joint"))
        else:
          best = jnp.argmax(logp[..., :-1], axis=-1)
        choice = jnp.where(forced[:, None] & pick, best, choice)
        chosen_logp = jnp.where(forced[:, None] & pick,
                                jnp.take_along_axis(logp, best[..., None], axis=-1)[..., 0],
                                chosen_logp)
        do_insert = do_insert | (forced[:, None] & pick)
    # Never overflow the canvas: drop the least confident insertions that don't fit.
    do_insert, overflow = keep_most_confident(do_insert, chosen_logp, cap - s["length"])
    if cfg.delta >= 0:
      # Creativity cap, for drafts that already say something (E of nothing is undefined).
      ids = jnp.minimum(choice, table.shape[0] - 1)
      vectors = weights[ids][..., None] * table[ids]
      fitted = fit_delta(do_insert, chosen_logp, vectors, s["sum"], cfg.delta)
      do_insert = jnp.where((s["length"] > 0)[:, None], fitted, do_insert)
    canvas, length = insert(s["canvas"], s["length"], choice, do_insert)
    given, _ = insert(s["given"], s["length"], jnp.zeros_like(do_insert), do_insert)
    new_sum = embed_sum(canvas, length)
    moved = jnp.where(active, _distance(s["sum"], new_sum), 0.0)
    inserted_any = jnp.any(do_insert, axis=1)
    new_open = update_open_gaps(open_gaps, do_insert)
    # A gap that inserted becomes two new, undecided gaps; the others keep their state.
    new_reserved = move_gap_state(reserved & ~do_insert, do_insert)
    if cfg.select in CLOSING:
      finished = ~jnp.any(new_open & (gap <= length[:, None]), axis=1)
      # Reserved gaps whose insertions delta (or the canvas) refused would wait forever.
      finished |= wanted_any & ~inserted_any
    else:
      finished = ~inserted_any
    done = s["done"] | finished | overflow | (length >= cap)
    if cfg.epsilon > 0:
      done |= moved < cfg.epsilon
    step = s["step"] + 1
    return dict(
        canvas=canvas, length=length, done=done,
        calls=s["calls"] + active.astype(jnp.int32),
        logprob=s["logprob"] + jnp.sum(jnp.where(do_insert, chosen_logp, 0.0), axis=1),
        step=step, keys=s["keys"], open=new_open, given=given, reserved=new_reserved,
        rescued=rescued, sum=new_sum,
        drafts=s["drafts"].at[step].set(canvas),
        draft_len=s["draft_len"].at[step].set(length),
        inserted=s["inserted"].at[step].set(jnp.where(do_insert, choice, -1).astype(jnp.int32)),
        inserted_prob=s["inserted_prob"].at[step].set(
            jnp.where(do_insert, jnp.exp(chosen_logp), 0.0)),
        moved=s["moved"].at[step].set(moved))

  out = jax.lax.while_loop(cond, body, init)
  if cfg.refine_steps:
    if not gap_state:
      raise ValueError("sampler.refine_steps needs a model.gap_state model trained with "
                       "noise.hole_prob > 0; set sampler.refine_steps=0.")
    for _ in range(cfg.refine_steps):
      canvas, length, given = refine(model, out["canvas"], out["length"], cfg, out["given"])
      step = jnp.minimum(out["step"] + 1, steps - 1)
      out = dict(out, canvas=canvas, length=length, given=given, step=step,
                 calls=out["calls"] + 1, drafts=out["drafts"].at[step].set(canvas),
                 draft_len=out["draft_len"].at[step].set(length))
  # Steps never taken repeat the final canvas, so drafts[-1] is always the result.
  taken = jnp.arange(steps) <= out["step"]
  drafts = jnp.where(taken[:, None, None], out["drafts"], out["canvas"][None])
  draft_len = jnp.where(taken[:, None], out["draft_len"], out["length"][None])
  return Samples(tokens=out["canvas"], length=out["length"], calls=out["calls"],
                 drafts=drafts, draft_length=draft_len, inserted_logprob=out["logprob"],
                 inserted=out["inserted"], inserted_prob=out["inserted_prob"],
                 moved=out["moved"])


def leave_one_out(model, canvas, length, cfg: SamplerConfig, gaps: bool = False):
  """Every token's probability given the rest: log-probabilities float32 [B, C, V+1].

  Row (b, i) is the model's gap distribution for canvas b with token i left out and every
  other gap closed (what ``noise.hole_prob`` states teach); rows i >= length are unused.
  Runs on the smallest window that holds every canvas, one canvas per (b, i).

  With ``gaps`` (what ``sampler.refine_edits="all"`` asks, of a model trained with
  ``noise.hole_open`` > 0), a left-out token's place may also hold ``none`` (the token is
  superfluous), and the same call also reads each whole canvas with every gap open:
  returns (token log-probs [B, C, V+1], gap log-probs [B, C+1, V+1], "is a token missing
  here, and which").
  """
  none_id = model.none_id
  batch, cap = canvas.shape

  def gap_logits(c, n):  # c: [B, W]
    w = c.shape[1]
    idx = jnp.arange(w)
    # Canvas i: tokens 0..i-1, then i+1..: position j reads token j + (j >= i).
    src = idx[None, :] + (idx[None, :] >= idx[:, None])  # [W (left out), W]
    left_out = jnp.take(jnp.pad(c, ((0, 0), (0, 1)), constant_values=PAD_ID),
                        jnp.minimum(src, w), axis=1)  # [B, W, W]
    flat = left_out.reshape(batch * w, w)
    n_flat = jnp.repeat(jnp.maximum(n - 1, 0), w)
    closed = jnp.arange(w + 1)[None, :] != jnp.tile(idx, batch)[:, None]  # only gap i open
    if gaps:  # the whole canvases too, every gap open
      flat = jnp.concatenate([flat, c])
      n_flat = jnp.concatenate([n_flat, n])
      closed = jnp.concatenate([closed, jnp.zeros((batch, w + 1), bool)])
    logits = model(*losses.canvas_inputs(flat, n_flat), closed=closed)  # [B*W(+B), W+1, V+1]
    hole = logits[jnp.arange(batch * w), jnp.tile(idx, batch)].reshape(batch, w, -1)
    hole = jnp.pad(hole, ((0, 0), (0, 1), (0, 0)))
    # Both on the window's W + 1 rows (in_window pads rows): token rows, then gap rows.
    return jnp.concatenate([hole, logits[batch * w:]], axis=-1) if gaps else hole

  logits = in_window(gap_logits, (canvas,), length, cfg)
  banned = _banned(none_id)
  if not gaps:  # a hole always holds a token
    return jax.nn.log_softmax(jnp.where(banned.at[none_id].set(True), -jnp.inf,
                                        logits[:, :cap]), axis=-1)
  hole, whole = jnp.split(logits, 2, axis=-1)
  logp = lambda x: jax.nn.log_softmax(jnp.where(banned, -jnp.inf, x), axis=-1)
  return logp(hole[:, :cap]), logp(whole)


def remove(canvas: jax.Array, length: jax.Array, drop: jax.Array):
  """Delete the tokens where ``drop`` (bool [B, C]): a scatter; (canvas [B, C], length [B]).

  A bool canvas (a per-token flag) loses the same positions."""
  batch, cap = canvas.shape
  keep = (jnp.arange(cap)[None, :] < length[:, None]) & ~drop
  dest = jnp.where(keep, jnp.cumsum(keep, axis=1) - 1, cap)
  new = jnp.full_like(canvas, PAD_ID).at[jnp.arange(batch)[:, None], dest].set(canvas,
                                                                               mode="drop")
  return new, jnp.sum(keep, axis=1).astype(length.dtype)


def refine(model, canvas, length, cfg: SamplerConfig, fixed=None):
  """One correction round (``sampler.refine_steps``), one model call.

  A token is doubtful if, given the rest of its sample (`leave_one_out`), it is less than
  ``cfg.refine_threshold`` times as likely as the likeliest choice for its place, and it
  becomes that choice. With ``refine_edits="all"`` the choice may be ``none`` (the token
  is deleted), and a gap is doubtful if, with every gap open, ``none`` is less than
  ``refine_threshold`` times as likely as its likeliest token (which is inserted there).
  Tokens and gaps alternate along the sample (gap 0, token 0, gap 1, ...); per sample the
  most doubtful of them changes (by how many times likelier the choice is), or with
  ``refine_parallel`` every doubtful one more doubtful than both neighbours (no two
  adjacent). The threshold is relative: a content word with many good alternatives keeps
  its low probability without being doubtful (an absolute threshold replaced them all by
  the most frequent nouns: distinct-2 0.74 -> 0.32, benchmarks/README.md).

  Args:
    model: a ``model.gap_state`` `InsertionTransformer`; canvas: int [B, C]; length: [B].
    cfg: sampler controls; fixed: optional bool [B, C], tokens that stay (the
      conditioning's keywords, prompt or infill text); no token is inserted next to them.

  Returns:
    (canvas int32 [B, C], length int32 [B], fixed bool [B, C] moved with its tokens).
  """
  batch, cap = canvas.shape
  none_id = model.none_id
  edits = cfg.refine_edits == "all"
  if fixed is None:
    fixed = jnp.zeros((batch, cap), bool)
  if edits:
    logp, gap_logp = leave_one_out(model, canvas, length, cfg, gaps=True)
  else:
    logp = leave_one_out(model, canvas, length, cfg)
  log_thr = jnp.log(cfg.refine_threshold)
  current = jnp.take_along_axis(logp, canvas[..., None], axis=-1)[..., 0]  # [B, C]
  margin = jnp.max(logp, axis=-1) - current  # how many times (log) likelier the best is
  doubtful = (jnp.arange(cap)[None, :] < length[:, None]) & ~fixed & (margin > -log_thr)
  badness = jnp.where(doubtful, margin, -jnp.inf)  # [B, C]
  if edits:  # gap g lies between tokens g - 1 and g: slots gap 0, token 0, ..., gap C
    gap_margin = jnp.max(gap_logp[..., :-1], axis=-1) - gap_logp[..., -1]
    gap_ok = (jnp.arange(cap + 1)[None, :] <= length[:, None]) & ~(
        jnp.pad(fixed, ((0, 0), (1, 0))) | jnp.pad(fixed, ((0, 0), (0, 1))))
    gap_badness = jnp.where(gap_ok & (gap_margin > -log_thr), gap_margin, -jnp.inf)
    badness = jnp.concatenate([jnp.stack([gap_badness[:, :-1], badness], axis=-1).reshape(
        batch, 2 * cap), gap_badness[:, -1:]], axis=1)  # [B, 2C+1]
  if cfg.refine_parallel:
    left = jnp.pad(badness[:, :-1], ((0, 0), (1, 0)), constant_values=-jnp.inf)
    right = jnp.pad(badness[:, 1:], ((0, 0), (0, 1)), constant_values=-jnp.inf)
    pick = (badness > -jnp.inf) & (badness >= left) & (badness > right)
  else:
    pick = jax.nn.one_hot(jnp.argmax(badness, axis=1), badness.shape[1], dtype=bool)
    pick &= badness > -jnp.inf
  pick_token, pick_gap = (pick[:, 1::2], pick[:, 0::2]) if edits else (pick, None)
  best = jnp.argmax(logp, axis=-1)
  drop = pick_token & (best == none_id)
  canvas = jnp.where(pick_token & ~drop, best, canvas).astype(jnp.int32)
  if edits:
    pick_gap, _ = keep_most_confident(pick_gap, gap_margin, cap - length)  # (before deleting)
    gap_best = jnp.argmax(gap_logp[..., :-1], axis=-1)
    canvas, new_length = insert(canvas, length, gap_best, pick_gap)
    no = jnp.zeros_like(pick_gap)
    drop, _ = insert(drop, length, no, pick_gap)
    fixed, _ = insert(fixed, length, no, pick_gap)
    canvas, length_out = remove(canvas, new_length, drop)
    fixed, _ = remove(fixed, new_length, drop)
    return canvas, length_out, fixed
  return canvas, length, fixed


def make_sampler(graphdef, cfg: SamplerConfig, batch_size: int):
  """A jitted ``fn(params, rng, start=None, start_length=None, open_gaps=None,
  embedding=None, idf=None) -> Samples`` (arguments as `sample`'s)."""

  @jax.jit
  def run(params, rng, start=None, start_length=None, open_gaps=None, embedding=None,
          idf=None):
    model = nnx.merge(graphdef, params)
    return sample(model, rng, cfg, batch_size=batch_size, start=start, start_length=start_length,
                  open_gaps=open_gaps, embedding=embedding, idf=idf)

  return run


# Sampler settings the owned-gap samplers (tree and slot models) do not take, with the value
# each must keep. Both start from the empty canvas (conditioning would need the start
# canvas's insertion times). The tree model also decides every open gap each step: a gap's
# prediction comes from its owner's hidden state, which no later insertion changes, so
# waiting for neighbours (confident-first) would gain nothing.
SLOT_FIXED = {"gaps": "all", "epsilon": 0.0, "delta": -1.0, "keywords": "", "prompt": "",
              "infill": "", "refine_steps": 0}
TREE_FIXED = {**SLOT_FIXED, "insert_per_step": 0, "insert_fraction": 1.0, "confidence": 0.0,
              "select": "sample"}


def _check_fixed(cfg: SamplerConfig, fixed: dict, kind: str, why: str) -> None:
  """Raises a one-line error for a sampler setting model ``kind`` cannot honour."""
  for name, value in fixed.items():
    got = getattr(cfg, name)
    if got != value:
      raise ValueError(f"sampler.{name}={got!r} is not available with model_kind={kind} "
                       f"(it {why}): set --config.sampler.{name}={value!r}.")


def check_tree_sampler(cfg: SamplerConfig) -> None:
  """Raises a one-line error for a sampler setting the tree model cannot honour."""
  _check_fixed(cfg, TREE_FIXED, "tree", "decides each gap once, in parallel, and starts from "
               "the empty canvas")


def check_slot_sampler(cfg: SamplerConfig) -> None:
  """Raises a one-line error for a sampler setting the slot model cannot honour."""
  _check_fixed(cfg, SLOT_FIXED, "slot", "starts from the empty canvas")
  if cfg.select in RESERVING:
    raise ValueError(f"sampler.select={cfg.select!r} is not available with model_kind=slot (its "
                     "gaps are chosen by certainty): set --config.sampler.select='certainty'.")


def _grow_owned(gap_logits, none_id: int, rng, cfg: SamplerConfig, batch_size: int,
                stamp) -> Samples:
  """The loop of the owned-gap samplers: every gap decides once, then stays decided.

  The canvas starts empty with one open gap. Each step, ``gap_logits(canvas, times, length,
  step)`` gives every gap's logits [B, C+1, V+1]; the open gaps that decide this step are all
  of them, or (``confidence`` / ``insert_per_step`` / ``insert_fraction``) the most certain
  ones, at least one. A deciding gap inserts its token, which opens the two gaps around it,
  or closes for good with ``none`` (or by failing ``tau``); the others wait. Inserted tokens
  get the time ``stamp(step)``. A row stops when no gap is open, or at the caps; its
  ``inserted_logprob`` sums the log-probabilities of all its decisions, ``none`` included.
  """
  cap = cfg.max_len
  steps = cfg.max_steps + 1
  gap = jnp.arange(cap + 1)[None, :]
  banned = _banned(none_id)
  init = dict(canvas=jnp.full((batch_size, cap), PAD_ID, jnp.int32),
              times=jnp.zeros((batch_size, cap), jnp.int32),
              length=jnp.zeros((batch_size,), jnp.int32), done=jnp.zeros((batch_size,), bool),
              calls=jnp.zeros((batch_size,), jnp.int32),
              logprob=jnp.zeros((batch_size,), jnp.float32), step=jnp.int32(0),
              keys=_example_keys(rng, batch_size), open=jnp.ones((batch_size, cap + 1), bool),
              drafts=jnp.zeros((steps, batch_size, cap), jnp.int32),
              draft_len=jnp.zeros((steps, batch_size), jnp.int32),
              inserted=jnp.full((steps, batch_size, cap + 1), -1, jnp.int32),
              inserted_prob=jnp.zeros((steps, batch_size, cap + 1), jnp.float32))

  def cond(s):
    return (s["step"] < cfg.max_steps) & ~jnp.all(s["done"])

  def body(s):
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(s["keys"], s["step"])
    logits = gap_logits(s["canvas"], s["times"], s["length"], s["step"])
    logits = jnp.where(banned, -jnp.inf, logits)
    if cfg.none_bias:
      logits = logits.at[..., none_id].add(cfg.none_bias)
    logp = jax.nn.log_softmax(logits, axis=-1)
    choice = _choose(logits, keys, cfg)
    chosen_logp = jnp.take_along_axis(logp, choice[..., None], axis=-1)[..., 0]
    active = ~s["done"]
    acting = active[:, None] & s["open"] & (gap <= s["length"][:, None])
    if cfg.confidence > 0 or cfg.insert_per_step or cfg.insert_fraction < 1.0:
      certainty = jnp.max(logp, axis=-1)
      threshold = jnp.log(max(cfg.confidence, 1e-30))
      limit = insertion_limit(jnp.sum(acting, axis=1),
                              jnp.sum(acting & (certainty >= threshold), axis=1), cfg)
      deciding, _ = keep_most_confident(acting, certainty, limit)
    else:
      deciding = acting
    do_insert = deciding & (choice != none_id)
    if cfg.tau > 0:
      do_insert &= chosen_logp >= jnp.log(cfg.tau)
    do_insert, overflow = keep_most_confident(do_insert, chosen_logp, cap - s["length"])
    canvas, length = insert(s["canvas"], s["length"], choice, do_insert)
    times, _ = insert(s["times"], s["length"], jnp.full_like(choice, stamp(s["step"])),
                      do_insert)
    # Decided gaps close; one that inserted reopens as the two gaps around its new token.
    new_open = update_open_gaps(s["open"] & ~(deciding & ~do_insert), do_insert)
    finished = ~jnp.any(new_open & (gap <= length[:, None]), axis=1)
    step = s["step"] + 1
    return dict(
        canvas=canvas, times=times, length=length,
        done=s["done"] | finished | overflow | (length >= cap),
        calls=s["calls"] + active.astype(jnp.int32),
        logprob=s["logprob"] + jnp.sum(jnp.where(deciding, chosen_logp, 0.0), axis=1),
        step=step, keys=s["keys"], open=new_open,
        drafts=s["drafts"].at[step].set(canvas), draft_len=s["draft_len"].at[step].set(length),
        inserted=s["inserted"].at[step].set(jnp.where(do_insert, choice, -1).astype(jnp.int32)),
        inserted_prob=s["inserted_prob"].at[step].set(
            jnp.where(do_insert, jnp.exp(chosen_logp), 0.0)))

  out = jax.lax.while_loop(cond, body, init)
  taken = jnp.arange(steps) <= out["step"]
  drafts = jnp.where(taken[:, None, None], out["drafts"], out["canvas"][None])
  draft_len = jnp.where(taken[:, None], out["draft_len"], out["length"][None])
  return Samples(tokens=out["canvas"], length=out["length"], calls=out["calls"],
                 drafts=drafts, draft_length=draft_len, inserted_logprob=out["logprob"],
                 inserted=out["inserted"], inserted_prob=out["inserted_prob"],
                 moved=jnp.zeros((steps, batch_size), jnp.float32))


def tree_canvas_inputs(canvas, times, length):
  """The tree model's input for a draft: (tokens, segment_ids, times) int32 [B, C+2].

  ``[BOS] canvas [EOS]`` with each token's insertion step, -1 for BOS and EOS.
  """
  tokens, segment_ids, _ = losses.canvas_inputs(canvas, length)
  batch = canvas.shape[0]
  pos = jnp.arange(canvas.shape[1] + 2)[None, :]
  n = length[:, None]
  inner = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), times.astype(jnp.int32),
                           jnp.zeros((batch, 1), jnp.int32)], axis=1)
  return tokens, segment_ids, jnp.where((pos == 0) | (pos == n + 1), -1,
                                        jnp.where(pos <= n, inner, 0))


def sample_tree(model, rng: jax.Array, cfg: SamplerConfig, *, batch_size: int) -> Samples:
  """Generate with the tree model: every open gap decides once per step, in parallel.

  Each step runs the model on ``[BOS] canvas [EOS]`` with every token's insertion step, and
  each open gap takes its owner's prediction (`TreeInsertionTransformer.gap_logits`). A
  sample takes height + 1 calls, like the level sampler, and (at temperature 1, no filters)
  its ``inserted_logprob`` is exactly the model's log p of the path it took. See
  `_grow_owned` for the loop.

  Args:
    model: a `TreeInsertionTransformer`; rng: one key or [B] keys (as `sample`'s);
    cfg: sampler controls (static; see `check_tree_sampler`); batch_size: B.
  """
  check_tree_sampler(cfg)

  def gap_logits(canvas, times, length, step):
    del step
    return in_window(lambda c, t, n: model.gap_logits(*tree_canvas_inputs(c, t, n)),
                     (canvas, times), length, cfg)

  return _grow_owned(gap_logits, model.none_id, rng, cfg, batch_size, stamp=lambda step: step)


def make_tree_sampler(graphdef, cfg: SamplerConfig, batch_size: int):
  """A jitted ``fn(params, rng) -> Samples`` for the tree model (`sample_tree`)."""
  check_tree_sampler(cfg)

  @jax.jit
  def run(params, rng):
    return sample_tree(nnx.merge(graphdef, params), rng, cfg, batch_size=batch_size)

  return run


def slot_canvas_inputs(canvas, times, length, now, slot_id: int):
  """The slot model's input for a draft: ``[BOS] S x S ... x S [EOS]``, every slot at ``now``.

  Args:
    canvas: int [B, C]; times: int [B, C], the tokens' insertion times; length: int [B];
    now: int [], the decision time (later than every token's); slot_id: the slot's id.

  Returns:
    (tokens, segment_ids, times) int32 [B, 2C+3]: slot g (gap g) at 1 + 2g, token k at
    2 + 2k, EOS at 2 + 2n.
  """
  batch, cap = canvas.shape
  width = 2 * cap + 3
  pos = jnp.arange(width)[None, :]
  n = length[:, None]
  slots = jnp.full((batch, cap), slot_id, jnp.int32)
  body_tok = jnp.stack([slots, canvas.astype(jnp.int32)], -1).reshape(batch, -1)
  body_time = jnp.stack([jnp.full((batch, cap), now, jnp.int32), times.astype(jnp.int32)],
                        -1).reshape(batch, -1)
  one = lambda v: jnp.full((batch, 1), v, jnp.int32)
  tokens = jnp.concatenate([one(BOS_ID), body_tok, one(slot_id), one(PAD_ID)], 1)
  times = jnp.concatenate([one(0), body_time, one(now), one(0)], 1)
  last_slot, eos = pos == 1 + 2 * n, pos == 2 + 2 * n
  tokens = jnp.where(eos, EOS_ID, jnp.where(last_slot, slot_id,
                                            jnp.where(pos < 1 + 2 * n, tokens, PAD_ID)))
  times = jnp.where(pos <= 1 + 2 * n, jnp.where(last_slot, now, times), 0)
  return tokens, (pos <= 2 + 2 * n).astype(jnp.int32), times


def sample_slot(model, rng: jax.Array, cfg: SamplerConfig, *, batch_size: int) -> Samples:
  """Generate with the slot model: open gaps decide, all at once or the most certain first.

  Each step runs the model on ``[BOS] S x S ... x S [EOS]``, a query slot in every gap
  deciding now, so it sees the whole draft. With ``confidence`` 0 and no per-step cap every
  open gap decides (the level order: height + 1 calls); else only those whose most probable
  choice has probability >= ``confidence`` (at least the most certain one), at most
  ``insert_per_step`` and ``insert_fraction`` of them, and the rest decide later with more
  of the sentence to see. See `_grow_owned` for the loop.

  Args:
    model: a `SlotInsertionTransformer`; rng: one key or [B] keys; cfg: sampler controls
      (static; see `check_slot_sampler`); batch_size: B.
  """
  check_slot_sampler(cfg)
  width = 2 * cfg.max_len + 3
  gap = jnp.arange(cfg.max_len + 1)[None, :]
  stamp = lambda step: (step + 1) * losses.TIME_SCALE  # the level order's clock

  def gap_logits(canvas, times, length, step):
    inputs = slot_canvas_inputs(canvas, times, length, stamp(step), model.slot_id)
    logits = model(*inputs)
    return jnp.take_along_axis(logits, jnp.minimum(1 + 2 * gap, width - 1)[..., None], axis=1)

  return _grow_owned(gap_logits, model.none_id, rng, cfg, batch_size, stamp)


def make_slot_sampler(graphdef, cfg: SamplerConfig, batch_size: int):
  """A jitted ``fn(params, rng) -> Samples`` for the slot model (`sample_slot`)."""
  check_slot_sampler(cfg)

  @jax.jit
  def run(params, rng):
    return sample_slot(nnx.merge(graphdef, params), rng, cfg, batch_size=batch_size)

  return run


GAP_MARK = re.compile(r"_{3,}")


class Conditioning(NamedTuple):
  """Start of generation: canvases int32 [B, C], lengths int32 [B], open gaps bool [B, C+1]."""

  start: jax.Array
  start_length: jax.Array
  open_gaps: jax.Array


def conditioning(encode, cap: int, batch_size: int, *, keywords: str = "", prompt: str = "",
                 infill: str = "") -> Conditioning:
  """The start canvas and open gaps for keywords, a prompt, or an infilling template.

  Args:
    encode: text -> token ids (the tokenizer's ``encode``).
    cap: canvas capacity C.
    batch_size: B (every example gets the same conditioning).
    keywords: words (whitespace-separated) that start the canvas, in order; each
      word is encoded on its own.
    prompt: a fixed prefix: it starts the canvas (before the keywords) and the
      gaps before and inside it are closed, so it is never changed.
    infill: a partial text whose marks (three or more underscores, e.g.
      ``"the ___ sleeps"``) are the only gaps that may insert.
  """
  ids, open_at = [], None
  if infill:
    if keywords or prompt:
      raise ValueError("An infilling template fixes the whole canvas: drop the keywords and "
                       "the prompt, or write them into the template.")
    pieces = GAP_MARK.split(infill)
    if len(pieces) == 1:
      raise ValueError(f"The infilling template {infill!r} has no gap: mark each gap with ___ "
                       "(e.g. 'the ___ sleeps').")
    open_at = []
    for k, text in enumerate(pieces):
      if k:
        open_at.append(len(ids))
      if text.strip():
        ids += list(encode(text.strip()))
  else:
    prompt_ids = list(encode(prompt.strip())) if prompt.strip() else []
    ids = prompt_ids + [i for word in keywords.split() for i in encode(word)]
  start, start_length = keyword_canvas([ids] * batch_size, cap)
  gaps = np.arange(cap + 1)
  if open_at is not None:
    open_row = np.isin(gaps, open_at)
  else:
    open_row = gaps >= (len(prompt_ids) if prompt.strip() else 0)
  open_gaps = jnp.asarray(np.broadcast_to(open_row, (batch_size, cap + 1)))
  return Conditioning(start, start_length, open_gaps)


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


def _next_token(s: dict, logits: jax.Array, key: jax.Array, cfg: SamplerConfig,
                banned: jax.Array) -> dict:
  """One left-to-right step of the causal samplers, from next-token logits [B, V].

  ``s`` holds tokens [B, C+1] (BOS first), length, done, calls and logprob; returns their
  new values: a row writes its choice after its last token, or stops at EOS or the cap.
  """
  cap = s["tokens"].shape[1] - 1
  n = s["length"]
  logits = jnp.where(banned, -jnp.inf, logits)
  if cfg.temperature == 0.0:
    choice = jnp.argmax(logits, axis=-1)
  else:
    choice = jax.random.categorical(key, _filter_logits(logits / cfg.temperature, cfg))
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits), choice[:, None], axis=1)[:, 0]
  active = ~s["done"]
  stop = (choice == EOS_ID) | (n >= cap)
  write = active & ~stop
  rows = jnp.arange(n.shape[0])
  tokens = s["tokens"].at[rows, jnp.where(write, n + 1, cap + 1)].set(
      choice.astype(jnp.int32), mode="drop")
  return dict(tokens=tokens, length=n + write, done=s["done"] | stop,
              calls=s["calls"] + active, logprob=s["logprob"] + jnp.where(active, logp, 0.0))


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
    return dict(_next_token(s, logits, key, cfg, banned), step=s["step"] + 1, rng=rng)

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

  def cond(s):
    return (s["step"] < cap + 1) & ~jnp.all(s["done"])

  def body(s):
    rng, key = jax.random.split(s["rng"])
    step = s["step"]
    logits, cache = model.decode_step(s["tokens"][:, step], step, s["cache"])
    return dict(_next_token(s, logits, key, cfg, banned), step=step + 1, rng=rng, cache=cache)

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
