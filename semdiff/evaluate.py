r"""The evaluation job: a trained workdir's likelihood bound and the quality of its samples.

  python -m semdiff.evaluate --workdir=DIR [--num_samples=256] [--split=test] \
      [--sampler.temperature=0.7 ...] [--judge_workdir=CAUSAL_DIR]

Restores the newest checkpoint of ``DIR`` (`train.load_trained`), computes the exact NLL bound
on the held-out ``split`` (`evaluation.NllEvaluator`; on the grammar corpus also the true
entropy of the same sentences), draws ``num_samples`` samples in batches of ``batch_size`` and
scores them: fraction grammatical and their NLL under the grammar (grammar corpus),
distinct-1/2/3 and self-BLEU (on words), the total-variation distance between the samples'
lengths and the split's (in tokens), model calls per sample and sampling tokens/s (compile
excluded). With ``--judge_workdir`` (a trained causal model) it adds the judge's NLL of the
samples. Writes ``DIR/eval/results.json`` and ``DIR/eval/results.md``.

`evaluate_workdir` is the whole job as a function (the results script calls it); `main` only
parses flags.
"""

import json
import os
import sys
import time
from typing import Optional

import jax
import numpy as np
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from semdiff import config_files
from semdiff import evaluation
from semdiff import sampling
from semdiff import train
from semdiff.data import grammar as grammar_lib
from semdiff.data import pipeline


def _check_workdir(workdir: str, what: str = "--workdir") -> str:
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"{what}={workdir} does not exist: give the workdir of a trained "
                            "run (python -m semdiff.main --config=... --workdir=DIR).")
  if not os.listdir(workdir):
    raise FileNotFoundError(f"{what}={workdir} is empty: train into it first "
                            "(python -m semdiff.main --config=... --workdir=DIR).")
  return workdir


def draw_samples(exp: train.Experiment, params, num: int, batch_size: int,
                 seed: int = 0, cfg: Optional[sampling.SamplerConfig] = None) -> dict:
  """``num`` samples in batches of ``batch_size``, timed without compilation.

  Returns:
    {"texts": [num] str, "length": int [num] tokens, "calls": int [num] model calls,
     "seconds": sampling wall time after compiling, "compile_seconds"}.
  """
  batch_size = min(batch_size, num)
  run = train.sampler_for(exp, batch_size, cfg)
  key = jax.random.key(seed)
  t = time.time()
  compiled = run.lower(params, key).compile()
  compile_s = time.time() - t
  texts, lengths, calls = [], [], []
  seconds = 0.0
  for k in range(-(-num // batch_size)):
    t = time.time()
    samples = jax.block_until_ready(compiled(params, jax.random.fold_in(key, k)))
    seconds += time.time() - t
    samples = jax.device_get(samples)
    texts += train.decode_samples(exp, samples)
    lengths.append(np.asarray(samples.length))
    calls.append(np.asarray(samples.calls))
  return {"texts": texts[:num], "length": np.concatenate(lengths)[:num],
          "calls": np.concatenate(calls)[:num], "seconds": seconds, "compile_seconds": compile_s}


def judge_nll(judge_workdir: str, texts: list[str]) -> dict:
  """NLL of ``texts`` under a trained causal model (the judge), per sentence and per token.

  Texts are encoded with the judge's tokenizer and cut at its ``data.max_len``; empty texts
  are left out (``judge_scored`` counts the rest).
  """
  exp, params = train.load_trained(_check_workdir(judge_workdir, "--judge_workdir"))
  if exp.config.model_kind != "causal":
    raise ValueError(f"--judge_workdir={judge_workdir} holds a {exp.config.model_kind!r} model; "
                     "the judge must be a causal one (train it with --config.model_kind=causal).")
  max_len, size = int(exp.config.data.max_len), int(exp.config.train.batch_size)
  ids = [exp.tokenizer.encode(t)[:max_len] for t in texts if t.strip()]
  evaluator = evaluation.NllEvaluator(exp.graphdef, "causal", exp.stats, exp.scorer_cfg)
  nll, tokens = [], []
  for start in range(0, len(ids), size):
    batch_tokens = np.zeros((size, max_len), np.int32)
    mask = np.zeros((size, max_len), bool)
    for row, x in enumerate(ids[start:start + size]):
      batch_tokens[row, :len(x)] = x
      mask[row, :len(x)] = True
    n, _ = evaluator.per_sentence(params, {"tokens": batch_tokens, "mask": mask})
    nll.append(n)
    tokens.append(mask.sum(axis=1)[mask.any(axis=1)])
  if not nll:
    return {"judge_nll_per_sentence": float("nan"), "judge_nll_per_token": float("nan"),
            "judge_scored": 0}
  nll, tokens = np.concatenate(nll), np.concatenate(tokens)
  return {"judge_nll_per_sentence": float(nll.mean()),
          "judge_nll_per_token": float(nll.sum() / (tokens + 1).sum()),
          "judge_scored": int(len(nll))}


def evaluate_workdir(workdir: str, *, num_samples: int = 256, split: str = "test",
                     batch_size: int = 32, sampler_overrides: Optional[dict] = None,
                     judge_workdir: Optional[str] = None, seed: int = 0,
                     write: bool = True, bound: bool = True) -> dict:
  """Evaluates the trained run in ``workdir``; returns (and writes) the results.

  Args:
    workdir: a directory written by `train.train_and_evaluate`.
    num_samples: samples drawn and scored.
    split: the held-out split of the NLL bound and of the reference lengths.
    batch_size: sampling batch (tokens/s is measured at this batch).
    sampler_overrides: {"temperature": 0.7, ...}: `config.sampler` fields for this evaluation.
    judge_workdir: optional workdir of a trained causal model that scores the samples.
    seed: sampling seed.
    write: write ``workdir/eval/results.json`` and ``results.md``.
    bound: compute the NLL bound (False: only the samples, e.g. for other sampler settings).

  Returns:
    A flat dict of floats and strings (the keys of `markdown_table`).
  """
  workdir = _check_workdir(workdir)
  overrides = {f"sampler.{k}": v for k, v in (sampler_overrides or {}).items()}
  exp, params = train.load_trained(workdir, overrides=overrides)
  config = exp.config
  out = {"workdir": workdir, "model_kind": config.model_kind, "scorer": config.scorer.name,
         "data": config.data.name, "train_steps": int(config.train.num_steps), "split": split,
         "params": int(sum(x.size for x in jax.tree.leaves(params)))}

  batches = pipeline.eval_batches(config, exp.tokenizer, split)
  evaluator = train.make_evaluator(exp)
  if bound:
    out.update(evaluator(params, batches))
  data_lengths = np.concatenate([b["mask"].sum(axis=1)[b["mask"].any(axis=1)] for b in batches])
  grammar = grammar_lib.default_grammar() if config.data.name == "grammar" else None
  if grammar is not None:
    held_out = evaluation.held_out_texts(batches, exp.tokenizer.decode)
    out["true_nll_per_sentence"] = float(evaluation.grammar_nll(held_out, grammar).mean())

  drawn = draw_samples(exp, params, num_samples, batch_size, seed)
  texts = drawn["texts"]
  out.update({
      "num_samples": len(texts),
      "sampling_batch": min(batch_size, num_samples),
      "sample_length": float(drawn["length"].mean()),
      "calls_per_sample": float(drawn["calls"].mean()),
      # The budget of sequential steps: at most 2·log2 n + 2 model calls.
      "few_calls_share": float(np.mean(
          drawn["calls"] <= 2 * np.log2(np.maximum(drawn["length"], 1)) + 2)),
      "tokens_per_s": float(drawn["length"].sum() / max(drawn["seconds"], 1e-9)),
      "samples_per_s": float(len(texts) / max(drawn["seconds"], 1e-9)),
      "sampling_seconds": drawn["seconds"],
      "compile_seconds": drawn["compile_seconds"],
  })
  if grammar is not None:
    # Short samples are easier: also the share with lengths weighted as in held-out data.
    out.update(evaluation.grammar_report(texts, grammar, reference=held_out))
  out.update(evaluation.text_report(texts, data_lengths=data_lengths,
                                    sample_lengths=drawn["length"]))
  if judge_workdir:
    out.update(judge_nll(judge_workdir, texts))
  if write and jax.process_index() == 0:
    path = os.path.join(workdir, "eval")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "results.json"), "w") as f:
      json.dump(out, f, indent=2)
    with open(os.path.join(path, "results.md"), "w") as f:
      f.write(markdown_table(out) + "\n")
    with open(os.path.join(path, "samples.jsonl"), "w") as f:
      for text, n, c in zip(texts, drawn["length"], drawn["calls"]):
        f.write(json.dumps({"text": text, "length": int(n), "calls": int(c)}) + "\n")
  return out


# (key, label, format) of the markdown table, in order; missing keys are left out.
ROWS = (
    ("model_kind", "model", "{}"),
    ("scorer", "scorer", "{}"),
    ("params", "parameters", "{:,}"),
    ("train_steps", "training steps", "{}"),
    ("nll_per_sentence", "NLL bound per sentence (nats)", "{:.2f}"),
    ("true_nll_per_sentence", "true entropy of the same sentences (nats)", "{:.2f}"),
    ("nll_per_token", "NLL bound per token (nats)", "{:.3f}"),
    ("perplexity_bound", "perplexity bound", "{:.2f}"),
    ("grammatical", "samples grammatical", "{:.1%}"),
    ("grammatical_at_data_lengths", "samples grammatical at the data's lengths", "{:.1%}"),
    ("sample_nll_grammatical", "sample NLL under the grammar (grammatical ones, nats)",
     "{:.2f}"),
    ("judge_nll_per_sentence", "sample NLL under the judge (nats)", "{:.2f}"),
    ("distinct_1", "distinct-1", "{:.3f}"),
    ("distinct_2", "distinct-2", "{:.3f}"),
    ("distinct_3", "distinct-3", "{:.3f}"),
    ("self_bleu", "self-BLEU-4", "{:.3f}"),
    ("length_tv", "length TV distance to the data", "{:.3f}"),
    ("sample_length", "mean sample length (tokens)", "{:.2f}"),
    ("calls_per_sample", "model calls per sample", "{:.2f}"),
    ("few_calls_share", "samples made in <= 2·log2 n + 2 calls", "{:.1%}"),
    ("tokens_per_s", "sampling tokens/s", "{:,.0f}"),
    ("sampling_batch", "sampling batch", "{}"),
    ("num_samples", "samples", "{}"),
)


def markdown_table(results: dict) -> str:
  """One run's results as a two-column Markdown table."""
  lines = [f"Evaluation of {results.get('workdir', '')} ({results.get('split', '')} split)", "",
           "| metric | value |", "|---|--:|"]
  for key, label, fmt in ROWS:
    if key in results:
      lines.append(f"| {label} | {fmt.format(results[key])} |")
  return "\n".join(lines)


_WORKDIR = flags.DEFINE_string("workdir", None, "The trained run's workdir.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 256, "Samples to draw and score.")
_SPLIT = flags.DEFINE_string("split", "test", "Held-out split for the NLL bound.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Sampling batch (tokens/s is measured at it).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_JUDGE = flags.DEFINE_string("judge_workdir", None,
                             "Optional: workdir of a trained causal model that scores samples.")
# The sampler fields of the default config; only those given on the command line override the
# workdir's saved values. (--workdir is checked in main, not marked required, so that scripts
# can import this module and call evaluate_workdir.)
_SAMPLER = config_flags.DEFINE_config_dict("sampler", config_files.load().sampler,
                                           "Sampler overrides, e.g. --sampler.temperature=0.7.")


def sampler_overrides_from_flags() -> dict:
  """The ``--sampler.<field>`` flags actually given: {field: value}."""
  return dict(config_flags.get_override_values(flags.FLAGS["sampler"]))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  try:
    if not _WORKDIR.value:
      raise ValueError("--workdir is required: the workdir of a trained run.")
    results = evaluate_workdir(_WORKDIR.value, num_samples=_NUM_SAMPLES.value,
                               split=_SPLIT.value, batch_size=_BATCH.value,
                               sampler_overrides=sampler_overrides_from_flags(),
                               judge_workdir=_JUDGE.value, seed=_SEED.value)
  except (ValueError, FileNotFoundError) as e:
    print(f"semdiff.evaluate: error: {e}", file=sys.stderr)
    sys.exit(1)
  print(markdown_table(results), flush=True)
  print(f"Wrote {os.path.join(results['workdir'], 'eval', 'results.json')} and results.md.",
        flush=True)


if __name__ == "__main__":
  jax.config.config_with_absl()
  app.run(main)
