r"""Quality vs sequential steps: semdiff against a same-size AR model, equal time.

Trains the causal baseline and the insertion model on the grammar corpus for
the same wall-clock budget each (same config otherwise, so the same parameter
count up to the gap head), then samples both under several sampler settings
and prints a table: fraction of grammatical samples, the samples' NLL under
the grammar (the true judge), mean model calls and length. A PNG plots the
fraction grammatical against mean model calls.

  python benchmarks/quality_vs_steps.py --budget_s=900 --out=results/quality
"""

import json
import os
import time

import jax
import numpy as np
from absl import app
from absl import flags
from absl import logging

from semdiff import evaluation
from semdiff import sampling
from semdiff import sharding
from semdiff import train
from semdiff.data import grammar as grammar_lib
from semdiff.data import pipeline

_BUDGET = flags.DEFINE_float("budget_s", 900.0, "Training seconds per model.")
_VARIANT = flags.DEFINE_string("variant", "small", "Config variant of configs/default.py.")
_OUT = flags.DEFINE_string("out", "results/quality", "Output folder (workdirs, table, plot).")
_SAMPLES = flags.DEFINE_integer("num_samples", 256, "Samples per sampler setting.")
_OVERRIDES = flags.DEFINE_multi_string(
    "set", [], "Config overrides for the insertion model, e.g. --set=noise.frontier_prob=0.5.")
_MODELS = flags.DEFINE_list("models", ["causal", "insertion"], "Which models to train.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

INSERTION_SETTINGS = {
    "all gaps, T=1": {},
    "all gaps, top-p 0.9": {"top_p": 0.9},
    "half the gaps, top-p 0.9": {"top_p": 0.9, "insert_fraction": 0.5},
    "quarter of the gaps, top-p 0.9": {"top_p": 0.9, "insert_fraction": 0.25},
    "one gap per step, top-p 0.9": {"top_p": 0.9, "insert_per_step": 1},
}
CAUSAL_SETTINGS = {"T=1": {}, "top-p 0.9": {"top_p": 0.9}}


def load_config(variant):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, "configs/default.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def apply(config, key, value):
  node = config
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = type(node[leaf])(value) if node[leaf] is not None else value


def seconds_per_step(config, workdir) -> float:
  """Times a few training steps (after compiling) of ``config``."""
  exp = train.build_experiment(config, workdir)
  it = pipeline.train_iterator(config, exp.tokenizer)
  batches = [sharding.global_batch(next(it), exp.mesh) for _ in range(8)]
  state = train.init_state(exp)
  step = train.make_train_step(exp)
  state, m = step(state, batches[0])
  jax.block_until_ready(m)
  t = time.time()
  for b in batches[1:]:
    state, m = step(state, b)
  jax.block_until_ready(m)
  return (time.time() - t) / (len(batches) - 1)


def sample_quality(exp, params, settings, num, grammar) -> dict:
  out = {}
  for name, overrides in settings.items():
    cfg = sampling.SamplerConfig.from_config(exp.config.sampler, **overrides)
    if exp.config.model_kind == "causal":
      run = sampling.make_causal_sampler(exp.graphdef, cfg, num)
    else:
      run = sampling.make_sampler(exp.graphdef, cfg, num)
    t = time.time()
    samples = jax.device_get(run(params, jax.random.key(1234)))
    dt = time.time() - t
    texts = [exp.tokenizer.decode(samples.tokens[i, :samples.length[i]].tolist())
             for i in range(num)]
    rep = evaluation.grammar_report(texts, grammar)
    logps = np.array([grammar.logprob(t) for t in texts])
    out[name] = {
        **rep,
        "mean_calls": float(np.mean(samples.calls)),
        "mean_length": float(np.mean(samples.length)),
        "long_grammatical": float(np.mean(np.isfinite(logps[samples.length >= 16])))
                            if np.any(samples.length >= 16) else float("nan"),
        "seconds_incl_compile": dt,
    }
  return out


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  out_dir = os.path.abspath(_OUT.value)
  os.makedirs(out_dir, exist_ok=True)
  grammar = grammar_lib.default_grammar()
  results = {}
  for kind in _MODELS.value:
    config = load_config(_VARIANT.value)
    config.model_kind = kind
    if kind == "insertion":
      for item in _OVERRIDES.value:
        key, value = item.split("=", 1)
        apply(config, key, value)
    workdir = os.path.join(out_dir, kind)
    per_step = seconds_per_step(config, workdir)
    steps = max(int(_BUDGET.value / per_step), 10)
    config.train.num_steps = steps
    config.train.eval_every = steps
    config.train.sample_every = steps
    config.train.checkpoint_every = max(steps // 4, 1)
    config.train.log_every = max(steps // 20, 1)
    config.train.num_samples = 64
    config.train.samples_to_print = 2
    print(f"== {kind}: {per_step:.3f} s/step -> {steps} steps in {_BUDGET.value:.0f} s",
          flush=True)
    t = time.time()
    final = train.train_and_evaluate(config, workdir)
    train_time = time.time() - t
    exp, params = train.load_trained(workdir)
    settings = CAUSAL_SETTINGS if kind == "causal" else INSERTION_SETTINGS
    results[kind] = {
        "steps": steps, "seconds_per_step": per_step, "train_seconds": train_time,
        "params": int(sum(x.size for x in jax.tree.leaves(params))),
        "nll_per_sentence": final.get("eval/nll_per_sentence"),
        "true_nll_per_sentence": final.get("true_nll_per_sentence"),
        "samples": sample_quality(exp, params, settings, _SAMPLES.value, grammar),
    }
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  lines = ["| model | sampler | grammatical | grammatical (>=16 tok) | sample NLL (grammar) | "
           "model calls | length |", "|---|---|---|---|---|---|---|"]
  for kind, r in results.items():
    for name, s in r["samples"].items():
      lines.append(f"| {kind} | {name} | {s['grammatical']:.1%} | {s['long_grammatical']:.1%} | "
                   f"{s['sample_nll_grammatical']:.1f} | {s['mean_calls']:.1f} | "
                   f"{s['mean_length']:.1f} |")
  lines.append("")
  lines.append("| model | params | steps | NLL bound / sentence | true entropy |")
  lines.append("|---|---|---|---|---|")
  for kind, r in results.items():
    lines.append(f"| {kind} | {r['params'] / 1e6:.2f}M | {r['steps']} | "
                 f"{r['nll_per_sentence']:.2f} | {r['true_nll_per_sentence']:.2f} |")
  table = "\n".join(lines)
  print(table)
  with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write(table + "\n")
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, r in results.items():
      xs = [s["mean_calls"] for s in r["samples"].values()]
      ys = [s["grammatical"] for s in r["samples"].values()]
      ax.scatter(xs, ys, label=kind)
      for (name, s) in r["samples"].items():
        ax.annotate(name, (s["mean_calls"], s["grammatical"]), fontsize=6)
    ax.set_xlabel("mean model calls per sample")
    ax.set_ylabel("fraction grammatical")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "quality_vs_steps.png"), dpi=120)
  except ImportError:
    print("matplotlib is not installed: no plot.")


if __name__ == "__main__":
  app.run(main)
