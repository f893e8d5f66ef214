"""The training loop: jitted steps over a mesh, checkpoints, metrics, samples.

`train_and_evaluate(config, workdir)` is the whole job. A rerun of the same
command resumes from the newest complete checkpoint in ``workdir`` with the
same data order; the final step also evaluates and prints samples.
"""

import dataclasses
import functools
import json
import os
import signal
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from semdiff import checkpointing
from semdiff import config_files
from semdiff import evaluation
from semdiff import generation
from semdiff import losses
from semdiff import metrics as metrics_lib
from semdiff import model as model_lib
from semdiff import sampling
from semdiff import scorers
from semdiff import sharding
from semdiff.data import embedding_table
from semdiff.data import grammar as grammar_lib
from semdiff.data import pipeline
from semdiff.data import tokenizer as tokenizer_lib


class TrainingDiverged(RuntimeError):
  """The loss became NaN or infinite."""


@dataclasses.dataclass
class Experiment:
  """Everything built from a config before the loop starts."""

  config: ml_collections.ConfigDict
  workdir: str
  mesh: Any
  tokenizer: tokenizer_lib.Tokenizer
  model_cfg: model_lib.ModelConfig
  graphdef: Any
  stats: scorers.ScoringStats
  scorer_cfg: scorers.ScorerConfig
  noise_cfg: losses.NoiseConfig
  sampler_cfg: sampling.SamplerConfig
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  state_sharding: Any
  abstract_state: Any


def make_schedule(config) -> optax.Schedule:
  o, steps = config.optim, int(config.train.num_steps)
  warmup = min(int(o.warmup_steps), max(steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.learning_rate, warmup_steps=warmup,
      decay_steps=max(steps, warmup + 1), end_value=o.learning_rate * o.min_lr_ratio)


def make_optimizer(config, schedule) -> optax.GradientTransformation:
  o = config.optim
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim > 1, params)
  return optax.chain(
      optax.clip_by_global_norm(o.grad_clip),
      optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask))


def tokenizer_path(config, workdir: str) -> str:
  return config.data.tokenizer_path or os.path.join(workdir, "tokenizer", "spm.model")


def load_tokenizer(config, workdir: str) -> tokenizer_lib.Tokenizer:
  """The configured tokenizer, trained in ``<workdir>/tokenizer`` on first use."""
  return tokenizer_lib.get_tokenizer(
      tokenizer_path(config, workdir), pipeline.tokenizer_texts(config),
      vocab_size=int(config.data.vocab_size),
      model_type=config.data.tokenizer_type, max_sentences=int(config.data.tokenizer_sentences),
      is_writer=jax.process_index() == 0)


def scoring_stats(tok: tokenizer_lib.Tokenizer) -> scorers.ScoringStats:
  return scorers.ScoringStats(
      unigram_logprob=jnp.asarray(tok.unigram_logprob()),
      word_start=jnp.asarray(tok.word_start_table))


LOSSES = {"insertion": losses.insertion_loss, "tree": losses.tree_loss, "slot": losses.slot_loss,
          "causal": losses.ar_loss, "masked": losses.masked_loss}
# Each loss is a sum over the batch divided by a count that does not depend on the
# parameters; this names the metric holding that count (the masked loss also divides by the
# constant L + 1, the same for every micro-batch).
LOSS_NORMALISERS = {"insertion": "loss_weight", "tree": "gap_count", "slot": "gap_count",
                    "causal": "gap_count",
                    "masked": "nll_bound_sentences"}


def fixed_embedding(config, workdir: str, tok: tokenizer_lib.Tokenizer,
                    scorer_cfg: scorers.ScorerConfig):
  """(table float32 [V, D], idf float32 [V]) from the corpus, cached beside the tokenizer."""
  return embedding_table.get(
      tokenizer_path(config, workdir), tok, pipeline.tokenizer_texts(config),
      dim=scorer_cfg.embedding_dim, window=scorer_cfg.embedding_window,
      max_sentences=int(config.data.tokenizer_sentences), is_writer=jax.process_index() == 0)


@functools.partial(jax.jit, static_argnums=0)
def _token_embedding(graphdef, params):
  return jax.lax.stop_gradient(nnx.merge(graphdef, params).token_embedding())


def model_stats(exp: "Experiment", params) -> scorers.ScoringStats:
  """``exp.stats`` holding a snapshot of the model's input embedding (a new buffer, so
  that donating ``params`` to the next step leaves it alive)."""
  table = jax.device_put(_token_embedding(exp.graphdef, params), sharding.replicated(exp.mesh))
  return exp.stats.replace(embedding=table)


def loss_fn_for(kind: str):
  return LOSSES[kind]


def build_experiment(config: ml_collections.ConfigDict, workdir: str,
                     tokenizer: Optional[tokenizer_lib.Tokenizer] = None,
                     devices: Optional[list] = None) -> Experiment:
  """Validates the config and builds the pieces of a run (no training).

  Args:
    config: the run's config (``model.vocab_size`` is set from the tokenizer).
    workdir: where a tokenizer is trained when ``config.data.tokenizer_path`` is "".
    tokenizer: a loaded tokenizer, instead of the configured one.
    devices: the devices of the mesh (default: all of ``jax.devices()``).
  """
  if config.model_kind not in model_lib.MODELS:
    raise ValueError(f"Unknown model_kind {config.model_kind!r}; choose one of "
                     f"{sorted(model_lib.MODELS)}.")
  scorer_cfg = scorers.ScorerConfig.from_config(config.scorer)
  mesh = sharding.make_mesh(config, devices=devices)
  sharding.check_batch(int(config.train.batch_size), mesh,
                       grad_accum_steps=int(config.train.grad_accum_steps))
  tok = tokenizer or load_tokenizer(config, workdir)
  with config.unlocked():
    config.model.vocab_size = tok.vocab_size
  model_cfg = model_lib.ModelConfig.from_config(config.model, tok.vocab_size)
  noise_cfg = losses.NoiseConfig.from_config(config.noise)
  sampler_cfg = sampling.SamplerConfig.from_config(config.sampler)
  schedule = make_schedule(config)
  optimizer = make_optimizer(config, schedule)
  stats = scoring_stats(tok)
  if scorer_cfg.table_source:
    table, idf = fixed_embedding(config, workdir, tok, scorer_cfg)
    stats = stats.replace(idf=jnp.asarray(idf), embedding=(
        jnp.asarray(table) if scorer_cfg.table_source == "fixed" else None))

  abstract_model = nnx.eval_shape(lambda: model_lib.build(config.model_kind, model_cfg))
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  params_sharding = sharding.param_shardings(abstract_params, mesh)
  abstract_state = jax.eval_shape(functools.partial(_init_state, config, model_cfg, optimizer))
  state_sharding = sharding.state_shardings(abstract_state, params_sharding, mesh)
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state,
      state_sharding)
  return Experiment(config=config, workdir=workdir, mesh=mesh, tokenizer=tok, model_cfg=model_cfg,
                    graphdef=graphdef, stats=stats, scorer_cfg=scorer_cfg,
                    noise_cfg=noise_cfg, sampler_cfg=sampler_cfg, optimizer=optimizer,
                    schedule=schedule, state_sharding=state_sharding,
                    abstract_state=abstract_state)


def _init_state(config, model_cfg, optimizer) -> dict:
  model = model_lib.build(config.model_kind, model_cfg, seed=int(config.seed))
  params = nnx.state(model, nnx.Param)
  return {"params": params, "opt_state": optimizer.init(params),
          "step": jnp.zeros((), jnp.int32),
          "rng": jax.random.key_data(jax.random.key(int(config.seed) + 1))}


def init_state(exp: Experiment) -> dict:
  """Parameters born sharded: init jitted with the state's out_shardings."""
  init = jax.jit(functools.partial(_init_state, exp.config, exp.model_cfg, exp.optimizer),
                 out_shardings=exp.state_sharding)
  return init()


# Metrics that are not sums over the batch (every other one is): normalised like the loss,
# by the gap count, or a mean over examples.
_PER_GAP_METRICS = ("embed_distance",)
_PER_EXAMPLE_METRICS = ("mean_height",)


def make_train_step(exp: Experiment):
  """``train_step(state, batch) -> (state, metrics)``, jitted with donated state.

  When the scorer reads the model's own embedding (``scorer_cfg.table_source ==
  "model"``) it is ``train_step(state, batch, stats)``: the loop passes `model_stats`,
  refreshed every ``scorer.refresh_every`` steps.

  With ``train.grad_accum_steps`` A > 1 the batch is split into A micro-batches
  (micro-batch i holds rows i, i + A, i + 2A, ..., so every device keeps a share
  of each), a `jax.lax.scan` runs forward and backward on one micro-batch at a
  time (activation memory of B / A examples) and one optimizer update follows.
  Each loss is a sum over the batch divided by a count (`LOSS_NORMALISERS`: gaps,
  or sentences for the masked model), so the scan adds up the un-normalised
  gradients, sums and counts and divides once at the end: the update is the
  gradient of the loss over all the micro-batches' examples, as one batch
  holding them would give. Micro-batch i draws its training states with
  ``fold_in(step_rng, i)`` and packs them into ``ceil(pack_rows / A)`` rows
  (``causal_pack_rows`` likewise), so the insertion and masked models' states
  are other draws than at A = 1 (same distribution); a loss without randomness
  (the causal model) gets the A = 1 update to float tolerance, as long as no
  sequence is dropped for want of pack rows.
  """
  loss_fn = loss_fn_for(exp.config.model_kind)
  graphdef, fixed_stats = exp.graphdef, exp.stats
  scorer_cfg, noise_cfg = exp.scorer_cfg, exp.noise_cfg
  optimizer, schedule = exp.optimizer, exp.schedule
  accum = int(exp.config.train.grad_accum_steps)
  normaliser = LOSS_NORMALISERS[exp.config.model_kind]
  micro_noise_cfg = dataclasses.replace(  # each micro-batch packs into 1/A of the rows
      noise_cfg, pack_rows=-(-noise_cfg.pack_rows // accum),
      causal_pack_rows=-(-noise_cfg.causal_pack_rows // accum))
  micro_sharding = NamedSharding(exp.mesh, P(None, sharding.BATCH_AXES))

  def batch_grads(params, batch, rng, stats):
    def compute_loss(params):
      model = nnx.merge(graphdef, params)
      return loss_fn(model, batch["tokens"], batch["mask"], rng, stats, scorer_cfg, noise_cfg)

    (_, metrics), grads = jax.value_and_grad(compute_loss, has_aux=True)(params)
    return grads, metrics

  def accumulated_grads(params, batch, rng, stats):
    def split(x):  # [B, ...] -> [A, B / A, ...]
      x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
      return jax.lax.with_sharding_constraint(x, micro_sharding)

    def micro_step(grad_sum, xs):
      index, tokens, mask = xs

      def summed_loss(params):
        model = nnx.merge(graphdef, params)
        loss, metrics = loss_fn(model, tokens, mask, jax.random.fold_in(rng, index), stats,
                                scorer_cfg, micro_noise_cfg)
        # The count does not depend on the parameters: scaling by it un-normalises.
        return loss * jnp.maximum(metrics[normaliser], 1.0), metrics

      (_, metrics), grads = jax.value_and_grad(summed_loss, has_aux=True)(params)
      gaps = jnp.maximum(metrics["gap_count"], 1.0)
      metrics = dict(metrics, loss=metrics["loss"] * jnp.maximum(metrics[normaliser], 1.0),
                     **{k: metrics[k] * gaps for k in _PER_GAP_METRICS})
      return jax.tree.map(jnp.add, grad_sum, grads), metrics

    xs = (jnp.arange(accum), split(batch["tokens"]), split(batch["mask"]))
    grad_sum, per_micro = jax.lax.scan(micro_step, jax.tree.map(jnp.zeros_like, params), xs)
    metrics = jax.tree.map(lambda x: jnp.sum(x, axis=0), per_micro)
    count = jnp.maximum(metrics[normaliser], 1.0)
    gaps = jnp.maximum(metrics["gap_count"], 1.0)
    metrics["loss"] = metrics["loss"] / count
    metrics.update({k: metrics[k] / gaps for k in _PER_GAP_METRICS})
    metrics.update({k: metrics[k] / accum for k in _PER_EXAMPLE_METRICS})
    return jax.tree.map(lambda g: g / count, grad_sum), metrics

  def train_step(state, batch, stats=fixed_stats):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    if accum == 1:
      grads, metrics = batch_grads(state["params"], batch, rng, stats)
    else:
      grads, metrics = accumulated_grads(state["params"], batch, rng, stats)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads),
                   learning_rate=schedule(state["step"]))
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
            "rng": state["rng"]}, metrics

  in_shardings = (exp.state_sharding, sharding.batch_sharding(exp.mesh))
  if scorer_cfg.table_source == "model":
    in_shardings += (sharding.replicated(exp.mesh),)
  return jax.jit(train_step, in_shardings=in_shardings,
                 out_shardings=(exp.state_sharding, sharding.replicated(exp.mesh)),
                 donate_argnums=0)


def summarize(window: list[dict]) -> dict:
  """Average a window of per-step metrics into readable scalars."""
  total = {k: float(np.sum([m[k] for m in window])) for k in window[0]}
  n = len(window)
  out = {
      "loss": total["loss"] / n,
      "gap_accuracy": total["gap_correct"] / max(total["gap_count"], 1),
      "grad_norm": total["grad_norm"] / n,
      "learning_rate": window[-1]["learning_rate"],
      "mean_height": total["mean_height"] / n,
  }
  if total["nll_bound_tokens"]:
    out["nll_per_token"] = total["nll_bound_sum"] / total["nll_bound_tokens"]
    out["nll_per_sentence"] = total["nll_bound_sum"] / max(total["nll_bound_sentences"], 1)
  if total["embed_distance"]:
    out["embed_distance"] = total["embed_distance"] / n
  if total.get("span_count"):
    out["span_nll"] = total["span_nll_sum"] / total["span_count"]
  out["tokens"] = total["tokens"]
  out["canvas_positions"] = total["canvas_positions"]
  out["padding_share"] = 1.0 - total["canvas_positions"] / max(total["computed_positions"], 1)
  out["dropped_states"] = total["dropped_states"] / n
  return out


class _Preempted:
  """Turns SIGTERM into a flag checked between steps."""

  def __init__(self):
    self.requested = False

  def __call__(self, signum, frame):
    del signum, frame
    self.requested = True


def sampler_for(exp: Experiment, batch_size: int,
                cfg: Optional[sampling.SamplerConfig] = None):
  """The jitted sampler of the run's model kind: ``fn(params, rng) -> sampling.Samples``.

  The causal baseline decodes with its KV cache (`sampling.sample_causal_cached`), the
  masked-diffusion one ancestrally in ``sampler.max_steps`` steps (`sampling.sample_masked`).
  """
  cfg = cfg or exp.sampler_cfg
  if exp.config.model_kind == "causal":
    return sampling.make_causal_cached_sampler(exp.graphdef, cfg, batch_size)
  if exp.config.model_kind == "masked":
    return sampling.make_masked_sampler(exp.graphdef, cfg, batch_size)
  if exp.config.model_kind == "tree":
    return sampling.make_tree_sampler(exp.graphdef, cfg, batch_size)
  if exp.config.model_kind == "slot":
    return sampling.make_slot_sampler(exp.graphdef, cfg, batch_size)
  return sampling.make_sampler(exp.graphdef, cfg, batch_size)


def decode_samples(exp: Experiment, samples: sampling.Samples) -> list[str]:
  """The texts of host-side ``samples``."""
  return [exp.tokenizer.decode(samples.tokens[i, :samples.length[i]].tolist())
          for i in range(samples.tokens.shape[0])]


def generate(exp: Experiment, params, num: int, rng) -> tuple[sampling.Samples, list[str]]:
  """``num`` samples from the trained model and their texts (``config.sampler`` controls,
  conditioning included; `semdiff.generate` is the notebook version)."""
  if exp.config.model_kind != "insertion":
    samples = jax.device_get(sampler_for(exp, num)(params, rng))
    return samples, decode_samples(exp, samples)
  cfg, tables = exp.sampler_cfg, {}
  if cfg.uses_embedding and exp.config.model_kind != "causal":
    tables = dict(zip(("embedding", "idf"), fixed_embedding(exp.config, exp.workdir,
                                                            exp.tokenizer, exp.scorer_cfg)))
  return generation.draw(exp, params, cfg, num, rng, **tables)


def sample_report(exp: Experiment, params, step: int, writer, *, num: int,
                  to_print: int, reference: Optional[list[str]] = None) -> dict:
  """Draw samples, write them as JSON lines, print a few with drafts.

  On the grammar corpus the report holds the grammatical share, and with ``reference``
  (held-out texts) also the share at the data's lengths (`evaluation.grammar_report`).
  """
  samples, texts = generate(exp, params, num, jax.random.key(int(exp.config.seed) + 7 + step))
  report = {"sample_length": float(np.mean(samples.length)),
            "sample_calls": float(np.mean(samples.calls))}
  if exp.config.data.name == "grammar":
    report.update(evaluation.grammar_report(texts, grammar_lib.default_grammar(), reference))
  if jax.process_index() == 0:
    path = os.path.join(exp.workdir, "samples", f"step_{step:08d}.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      for i, t in enumerate(texts):
        f.write(json.dumps({"text": t, "calls": int(samples.calls[i]),
                            "drafts": sampling.draft_texts(samples, i, exp.tokenizer.decode)})
                + "\n")
    lines = []
    for i in range(min(to_print, num)):
      lines.append(f"sample {i} ({int(samples.calls[i])} model calls):")
      for d in sampling.draft_texts(samples, i, exp.tokenizer.decode):
        lines.append(f"    {d if d else '(empty)'}")
    print("\n".join(lines), flush=True)
    writer.write_text(step, "samples", "\n".join(lines))
  return report


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains ``config`` in ``workdir`` (resuming if possible); returns final metrics."""
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(workdir, exist_ok=True)
  exp = build_experiment(config, workdir)
  config_json = json.loads(config.to_json_best_effort())
  checkpointing.check_run_config(workdir, config_json)
  if is_main:
    checkpointing.write_run_config(workdir, config_json)

  mgr = checkpointing.manager(workdir, keep=int(config.train.keep_checkpoints))
  train_iter = pipeline.train_iterator(config, exp.tokenizer, process_index=jax.process_index(),
                                       process_count=jax.process_count())
  restored = checkpointing.restore_latest(mgr, exp.abstract_state)
  if restored is None:
    state = init_state(exp)
    start = 0
  else:
    start, state, data_state = restored
    train_iter.set_state(data_state)
    logging.info("Resumed from step %d in %s.", start, workdir)
    print(f"Resuming from the checkpoint at step {start}.", flush=True)

  if is_main:
    print(pipeline.describe(config, exp.tokenizer).line(), flush=True)
  num_params = model_lib.count_params(state["params"])
  num_steps = int(config.train.num_steps)
  if is_main:
    print(f"semdiff: {config.model_kind} model, {num_params / 1e6:.2f}M parameters, "
          f"vocab {exp.tokenizer.vocab_size}, scorer {exp.scorer_cfg.name}, "
          f"mesh {dict(exp.mesh.shape)}, steps {start}->{num_steps}", flush=True)
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  train_step = make_train_step(exp)
  # A scorer on the model's own embedding reads a snapshot refreshed every K steps.
  refresh = exp.scorer_cfg.table_source == "model"
  step_stats = ()
  eval_batches = pipeline.eval_batches(config, exp.tokenizer, "validation")
  evaluator = make_evaluator(exp)
  if refresh:  # trees of the current parameters' embedding
    evaluator = functools.partial(_evaluate_on_own_table, exp)
  preempted = _Preempted()
  old_handler = signal.signal(signal.SIGTERM, preempted)
  progress = metrics_lib.Progress(start, num_steps)
  window, pending = [], None
  t_window = time.time()

  def on_metrics(step, m):
    if not np.isfinite(m["loss"]):
      raise TrainingDiverged(
          f"Loss is {m['loss']} at step {step}; stopping. The last good checkpoint in "
          f"{workdir}/checkpoints is kept: lower --config.optim.learning_rate or raise "
          f"--config.optim.warmup_steps and rerun.")
    window.append(m)

  def save(step):
    checkpointing.save(mgr, step, state, train_iter.get_state())

  def evaluate(step) -> dict:
    sweep = bool(config.train.eval_sweep) and step >= num_steps
    ev = evaluator(state["params"], eval_batches, sweep=sweep)
    writer.write(step, ev, prefix="eval/")
    if is_main:
      print(f"eval @ {step}: NLL bound {ev['nll_per_sentence']:.2f} nats/sentence, "
            f"{ev['nll_per_token']:.3f} nats/token (ppl {ev['perplexity_bound']:.2f})"
            + (f"; level sweep {ev['sweep_nll_per_sentence']:.2f} nats/sentence"
               if "sweep_nll_per_sentence" in ev else "")
            + (f"; closed gaps {ev['closure_nll_per_sentence']:.2f} nats/sentence"
               if "closure_nll_per_sentence" in ev else ""), flush=True)
    return {f"eval/{k}": v for k, v in ev.items()}

  final = {}
  try:
    step = start
    while step < num_steps:
      batch = sharding.global_batch(next(train_iter), exp.mesh)
      if refresh and (not step_stats or step % exp.scorer_cfg.refresh_every == 0):
        step_stats = (model_stats(exp, state["params"]),)
      state, step_metrics = train_step(state, batch, *step_stats)
      step += 1
      # Read the previous step's metrics only now, so the device stays busy.
      if pending is not None:
        on_metrics(*pending)
      pending = (step, step_metrics)
      if step == start + 1:
        # Leave the compiling first step out of the throughput figures.
        jax.block_until_ready(step_metrics)
        on_metrics(*jax.device_get(pending))
        pending, window, t_window = None, [], time.time()
      progress.tick(step)
      boundary = (step % int(config.train.log_every) == 0 or step == num_steps
                  or step % int(config.train.checkpoint_every) == 0 or preempted.requested)
      if boundary and pending is not None:
        on_metrics(*jax.device_get(pending))
        pending = None
      if (step % int(config.train.log_every) == 0 or step == num_steps) and window:
        summary = summarize(window)
        dt = time.time() - t_window
        summary["tokens_per_s"] = summary.pop("tokens") / dt
        summary["positions_per_s"] = summary.pop("canvas_positions") / dt
        # s/step: this window's training steps (evaluation and sampling left out); the ETA
        # is from the mean since the start, which counts them.
        per_step = dt / len(window)
        left = progress.eta(step)
        summary["step_time_s"] = per_step
        writer.write(step, summary, prefix="train/")
        if is_main:
          nll = (f" | nll/tok {summary['nll_per_token']:.3f}" if "nll_per_token" in summary
                 else "")
          print(f"step {step}/{num_steps} | loss {summary['loss']:.3f}{nll} | gap acc "
                f"{summary['gap_accuracy']:.3f} | grad {summary['grad_norm']:.2f} | lr "
                f"{summary['learning_rate']:.2e} | {summary['tokens_per_s']:,.0f} tok/s | "
                f"{per_step:.3f} s/step | ETA {metrics_lib.format_duration(left)}", flush=True)
        window, t_window = [], time.time()
      if step % int(config.train.checkpoint_every) == 0 or step == num_steps or \
          preempted.requested:
        save(step)
      if preempted.requested:
        mgr.wait_until_finished()
        print(f"SIGTERM: saved the checkpoint at step {step}; rerun the same command to resume.",
              flush=True)
        return {"step": step, "preempted": True}
      if step % int(config.train.eval_every) == 0 or step == num_steps:
        final.update(evaluate(step))
        t_window = time.time()  # evaluation time is not training throughput
      if step % int(config.train.sample_every) == 0 and step != num_steps:
        rep = sample_report(exp, state["params"], step, writer, num=32, to_print=0)
        writer.write(step, rep, prefix="samples/")
        t_window = time.time()
    if start >= num_steps:
      print(f"{workdir} is already trained to step {start}; evaluating it.", flush=True)
      final.update(evaluate(start))
    held_out = (evaluation.held_out_texts(eval_batches, exp.tokenizer.decode)
                if config.data.name == "grammar" else None)
    rep = sample_report(exp, state["params"], num_steps, writer,
                        num=int(config.train.num_samples),
                        to_print=int(config.train.samples_to_print), reference=held_out)
    writer.write(num_steps, rep, prefix="samples/")
    final.update({f"samples/{k}": v for k, v in rep.items()})
    final["step"] = num_steps
    if config.data.name == "grammar" and is_main:
      final.update(_grammar_summary(config, held_out, final))
    mgr.wait_until_finished()
    return final
  finally:
    signal.signal(signal.SIGTERM, old_handler)
    mgr.close()
    writer.close()


def make_evaluator(exp: Experiment, stats=None) -> evaluation.NllEvaluator:
  """The held-out NLL bound of ``exp``'s model (``stats``: the scorer's, default exp's)."""
  return evaluation.NllEvaluator(exp.graphdef, exp.config.model_kind,
                                 exp.stats if stats is None else stats, exp.scorer_cfg,
                                 exp.noise_cfg.slot_order, closures=exp.model_cfg.gap_state)


def _evaluate_on_own_table(exp: Experiment, params, batches, **kwargs) -> dict:
  """`evaluation.NllEvaluator` with the trees of ``params``' own input embedding."""
  return make_evaluator(exp, model_stats(exp, params))(params, batches, **kwargs)


def _grammar_summary(config, held_out: list[str], final) -> dict:
  """The true entropy of the validation sentences (``held_out``), next to the model's bound."""
  true_nll = evaluation.grammar_nll(held_out, grammar_lib.default_grammar())
  out = {"true_nll_per_sentence": float(true_nll.mean())}
  lines = [
      "",
      "summary (validation sentences, grammar corpus)",
      f"  NLL bound per sentence   {final.get('eval/nll_per_sentence', float('nan')):8.2f} nats",
      f"  true entropy (grammar)   {out['true_nll_per_sentence']:8.2f} nats (same sentences)",
      *([f"  level-sweep NLL bound    {final['eval/sweep_nll_per_sentence']:8.2f} nats "
         "(the same path, one gap at a time)"] if "eval/sweep_nll_per_sentence" in final else []),
      *([f"  closed-gap NLL bound     {final['eval/closure_nll_per_sentence']:8.2f} nats "
         "(the same path, each gap decides once)"]
        if "eval/closure_nll_per_sentence" in final else []),
      f"  samples grammatical      {final['samples/grammatical']:8.1%} of "
      f"{int(config.train.num_samples)}",
      f"  at the data's lengths    {final['samples/grammatical_at_data_lengths']:8.1%} "
      "(length buckets weighted as in the validation sentences)",
      f"  mean sample length       {final['samples/sample_length']:8.2f} tokens",
      f"  mean model calls/sample  {final['samples/sample_calls']:8.2f}",
  ]
  print("\n".join(lines), flush=True)
  return out


def step_seconds(config: ml_collections.ConfigDict, workdir: str, steps: int = 20,
                 clock: str = "cpu") -> float:
  """Seconds of one training step of ``config`` after compiling, by ``clock``: "cpu" (CPU
  time of all threads, so that a budget stays fair when other jobs share the machine: they
  stretch the wall clock, not the CPU time a step needs) or "wall" (for a machine of its
  own: a model that keeps the cores less busy gets fewer steps than by CPU time).

  The input pipeline runs in the same process and counts, as it does in training. Builds
  the run in ``workdir`` (training its tokenizer there if it has none) but writes no
  checkpoint.
  """
  if clock not in ("cpu", "wall"):
    raise ValueError(f"clock must be 'cpu' or 'wall', got {clock!r}.")
  now = time.process_time if clock == "cpu" else time.perf_counter
  exp = build_experiment(config, workdir)
  it = pipeline.train_iterator(config, exp.tokenizer)
  state = init_state(exp)
  step = make_train_step(exp)
  # A scorer on the model's own table takes its snapshot as an argument (see `train_loop`);
  # refreshed every scorer.refresh_every steps, the snapshot's cost per step is small.
  stats = ((model_stats(exp, state["params"]),) if exp.scorer_cfg.table_source == "model"
           else ())
  state, m = step(state, sharding.global_batch(next(it), exp.mesh), *stats)
  jax.block_until_ready(m)
  t = now()
  for _ in range(steps):
    state, m = step(state, sharding.global_batch(next(it), exp.mesh), *stats)
  jax.block_until_ready(m)
  return (now() - t) / steps


def set_step_budget(config: ml_collections.ConfigDict, steps: int) -> None:
  """Trains ``config`` for ``steps`` steps: logging in 20 windows, 4 checkpoints, and the
  periodic evaluation and samples only at the end (in place)."""
  with config.unlocked():
    config.train.num_steps = steps
    config.train.eval_every = steps
    config.train.sample_every = steps
    config.train.checkpoint_every = max(steps // 4, 1)
    config.train.log_every = max(steps // 20, 1)


def fit_to_budget(config: ml_collections.ConfigDict, workdir: str, budget_s: float,
                  cores: Optional[int] = None, min_steps: int = 10,
                  clock: str = "cpu") -> tuple[int, float]:
  """Sets ``config``'s step count so that training takes ``budget_s`` s on ``cores`` cores.

  The budget is budget_s x cores CPU-seconds, turned into steps with
  `step_seconds`, so that runs of different models get the same training compute,
  not the same step count. With ``clock="wall"`` it is budget_s seconds of wall time
  (`step_seconds`).

  Returns:
    (num_steps, seconds per step on ``cores`` cores).
  """
  per_step = step_seconds(config, workdir, clock=clock)
  if clock == "cpu":
    per_step /= cores or os.cpu_count()
  steps = max(int(budget_s / per_step), min_steps)
  set_step_budget(config, steps)
  return steps, per_step


def load_trained(workdir: str, step: Optional[int] = None,
                 overrides: Optional[dict] = None) -> tuple[Experiment, Any]:
  """(experiment, params) of a trained run, from its workdir alone.

  Args:
    workdir: a directory written by `train_and_evaluate`.
    step: which checkpoint (default: the newest readable one).
    overrides: {"sampler.temperature": 0.7, ...} applied to the saved config.
  """
  workdir = os.path.abspath(workdir)
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir} has no config.json: is it a semdiff workdir? Train "
                            "with python -m semdiff.main --config=... --workdir=DIR first.")
  with open(path) as f:
    config = config_files.with_defaults(json.load(f))
  config_files.apply_overrides(config, overrides or {})
  exp = build_experiment(config, workdir)
  mgr = checkpointing.manager(workdir, keep=int(config.train.keep_checkpoints))
  try:
    if step is None:
      restored = checkpointing.restore_latest(mgr, exp.abstract_state)
      if restored is None:
        raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint yet.")
      _, state, _ = restored
    else:
      import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
      state = mgr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(exp.abstract_state)))["state"]
  finally:
    mgr.close()
  if exp.scorer_cfg.table_source == "model":
    exp.stats = model_stats(exp, state["params"])
  return exp, state["params"]
