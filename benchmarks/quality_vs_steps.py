r"""Quality vs sequential steps: semdiff against a same-size AR model, equal compute.

Trains the causal baseline and the insertion model on the grammar corpus for
the same training time each (same config otherwise, so the same parameter
count up to the gap head), then samples both under several sampler settings
and prints a table: fraction of grammatical samples, the samples' NLL under
the grammar (the true judge), the fraction at the data's lengths (each length
bucket's share weighted by how often held-out sentences have that length: short
samples are easier), mean model calls and length, and the share of
samples made in at most 2·log2 n + 2 model calls. A PNG plots the fraction
grammatical against mean model calls.

Equal time is counted in CPU time, not wall time: ``--budget_s`` seconds on
``--cores`` cores is a budget of budget_s x cores CPU-seconds per model, turned
into a step count from the CPU time of a few timed steps. So the comparison
stays fair when other jobs share the machine (they stretch the wall clock,
not the CPU time a step needs).

With ``--clock=wall`` the step count comes from the wall time of the timed steps
instead (for a machine of its own): a model whose step keeps the cores less busy then gets
fewer steps than by CPU time.

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

from semdiff import checkpointing
from semdiff import config_files
from semdiff import evaluation
from semdiff import sampling
from semdiff import train
from semdiff.data import grammar as grammar_lib

_BUDGET = flags.DEFINE_float("budget_s", 900.0, "Training seconds per model on --cores cores.")
_CORES = flags.DEFINE_integer("cores", os.cpu_count(), "Cores the budget is counted on.")
_VARIANT = flags.DEFINE_string("variant", "small", "Config variant of configs/default.py.")
_OUT = flags.DEFINE_string("out", "results/quality", "Output folder (workdirs, table, plot).")
_SAMPLES = flags.DEFINE_integer("num_samples", 256, "Samples per sampler setting.")
_OVERRIDES = flags.DEFINE_multi_string(
    "set", [], "Config overrides for the insertion-type models, e.g. "
    "--set=noise.frontier_prob=0.5.")
_OVERRIDES_ALL = flags.DEFINE_multi_string(
    "set_all", [], "Config overrides for every model, the causal baseline included (the "
    "shared architecture and optimiser), e.g. --set_all=model.num_layers=1.")
_CLOCK = flags.DEFINE_enum("clock", "cpu", ["cpu", "wall"],
                           "How the budget is counted: CPU time on --cores cores, or wall time.")
_MODELS = flags.DEFINE_list("models", ["causal", "insertion"], "Which models to train.")
_MERGE = flags.DEFINE_list(
    "merge", [], "Output folders of earlier runs whose results.json join this table (e.g. the "
    "two models trained side by side in two processes).")

# Every setting states all the knobs it uses, so none inherits the config's sampler.
_PLAIN = {"temperature": 1.0, "top_p": 1.0, "insert_fraction": 1.0, "insert_per_step": 0,
          "confidence": 0.0, "select": "sample", "none_bias": 0.0, "stop_confidence": 0.0}
INSERTION_SETTINGS = {
    "all gaps, T=1": dict(_PLAIN),
    "all gaps, top-p 0.9": dict(_PLAIN, top_p=0.9),
    "half the gaps, top-p 0.9": dict(_PLAIN, top_p=0.9, insert_fraction=0.5),
    "confidence 0.5, top-p 0.9": dict(_PLAIN, top_p=0.9, confidence=0.5),
    "confidence 0.8, top-p 0.9": dict(_PLAIN, top_p=0.9, confidence=0.8),
    "confidence 0.95, top-p 0.9": dict(_PLAIN, top_p=0.9, confidence=0.95),
    "confidence 0.8, T=0.7": dict(_PLAIN, temperature=0.7, confidence=0.8),
    "all gaps, T=0.7": dict(_PLAIN, temperature=0.7),
    "one gap per step, top-p 0.9": dict(_PLAIN, top_p=0.9, insert_per_step=1),
    "one gap per step, T=1": dict(_PLAIN, insert_per_step=1),
    # Emptiness decided once per gap (the model's p(none)); tokens confident-first.
    "reserve, confidence 0.5, top-p 0.9": dict(_PLAIN, top_p=0.9, confidence=0.5,
                                               select="reserve"),
    # Length calibration of the best schedule.
    "confidence 0.5, top-p 0.9, none bias -1": dict(_PLAIN, top_p=0.9, confidence=0.5,
                                                    none_bias=-1.0),
    # Gaps chosen by certainty before they sample; a none closes its gap.
    "certainty, all gaps, top-p 0.9": dict(_PLAIN, top_p=0.9, select="certainty"),
    "certainty 0.9, top-p 0.9": dict(_PLAIN, top_p=0.9, select="certainty", confidence=0.9),
    "certainty 0.7, top-p 0.9": dict(_PLAIN, top_p=0.9, select="certainty", confidence=0.7),
    "certainty 0.5, top-p 0.9": dict(_PLAIN, top_p=0.9, select="certainty", confidence=0.5),
    "certainty 0.7, T=1": dict(_PLAIN, select="certainty", confidence=0.7),
    "certainty, one gap per step, top-p 0.9": dict(_PLAIN, top_p=0.9, select="certainty",
                                                   insert_per_step=1),
    # Every gap samples, the most confident draws act; a none closes its gap (a gap_state
    # model hears it).
    "closing 0.5, top-p 0.9": dict(_PLAIN, top_p=0.9, select="closing", confidence=0.5),
    # An all-none step stops only when every gap is sure of none (the default sampler).
    "confidence 0.5, top-p 0.9, stop confidence 0.95": dict(_PLAIN, top_p=0.9, confidence=0.5,
                                                            stop_confidence=0.95),
    # The same at top-p 0.85 (the job's sampler since the last 2026-12-07 session).
    "confidence 0.5, top-p 0.85, stop confidence 0.95": dict(_PLAIN, top_p=0.85,
                                                             confidence=0.5,
                                                             stop_confidence=0.95),
}
# The tree and slot models decide every gap once; "separate" keeps p(none) out of top-p.
_SEP = dict(_PLAIN, stop_filter="separate")
TREE_SETTINGS = {
    "all gaps, T=1": dict(_PLAIN),
    "all gaps, top-p 0.9": dict(_PLAIN, top_p=0.9),
    "all gaps, top-p 0.9, separate stop": dict(_SEP, top_p=0.9),
    "all gaps, T=0.7, separate stop": dict(_SEP, temperature=0.7),
}
SLOT_SETTINGS = {
    **TREE_SETTINGS,
    "certainty 0.5, top-p 0.9, separate stop": dict(_SEP, top_p=0.9, confidence=0.5),
    "certainty 0.8, top-p 0.9, separate stop": dict(_SEP, top_p=0.9, confidence=0.8),
    "certainty 0.95, top-p 0.9, separate stop": dict(_SEP, top_p=0.9, confidence=0.95),
    "certainty 0.8, T=1": dict(_PLAIN, confidence=0.8),
    "half the gaps, top-p 0.9, separate stop": dict(_SEP, top_p=0.9, insert_fraction=0.5),
    "one gap per step, top-p 0.9, separate stop": dict(_SEP, top_p=0.9, insert_per_step=1),
}
SETTINGS = {"insertion": INSERTION_SETTINGS, "tree": TREE_SETTINGS, "slot": SLOT_SETTINGS}
CAUSAL_SETTINGS = {"T=1": dict(_PLAIN), "top-p 0.9": dict(_PLAIN, top_p=0.9),
                   "T=0.7": dict(_PLAIN, temperature=0.7)}


def sample_quality(exp, params, settings, num, grammar) -> dict:
  reference = grammar_lib.sentences("validation", 2000, grammar=grammar)
  out = {}
  for name, overrides in settings.items():
    cfg = sampling.SamplerConfig.from_config(exp.config.sampler, **overrides)
    if exp.config.model_kind == "causal":
      run = sampling.make_causal_sampler(exp.graphdef, cfg, num)
    elif exp.config.model_kind == "insertion":
      run = sampling.make_sampler(exp.graphdef, cfg, num)
    else:
      run = train.sampler_for(exp, num, cfg)
    t = time.time()
    samples = jax.device_get(run(params, jax.random.key(1234)))
    dt = time.time() - t
    texts = [exp.tokenizer.decode(samples.tokens[i, :samples.length[i]].tolist())
             for i in range(num)]
    nll = evaluation.grammar_nll(texts, grammar)
    rep = evaluation.grammar_report(texts, grammar, reference=reference, nll=nll)
    length = np.asarray(samples.length)
    few_calls = np.asarray(samples.calls) <= 2 * np.log2(np.maximum(length, 1)) + 2
    out[name] = {
        **rep,
        "few_calls_share": float(np.mean(few_calls)),
        "few_calls_grammatical": float(np.mean(np.isfinite(nll[few_calls])))
                                 if few_calls.any() else float("nan"),
        "mean_calls": float(np.mean(samples.calls)),
        "mean_length": float(np.mean(samples.length)),
        "long_grammatical": float(np.mean(np.isfinite(nll[samples.length >= 16])))
                            if np.any(samples.length >= 16) else float("nan"),
        "seconds_incl_compile": dt,
    }
  return out


def train_model(kind: str, out_dir: str) -> tuple[str, dict]:
  """Trains ``kind`` for the budget in ``out_dir/kind`` (once: a rerun resumes or reuses)."""
  config = config_files.load(variant=_VARIANT.value)
  config.model_kind = kind
  if kind == "tree":  # decides every gap in parallel: no confident-first
    config.sampler.confidence = 0.0
  config_files.apply_overrides(config, config_files.parse_overrides(_OVERRIDES_ALL.value,
                                                                    flag="--set_all"))
  if kind != "causal":
    config_files.apply_overrides(config, config_files.parse_overrides(_OVERRIDES.value))
  workdir = os.path.join(out_dir, kind)
  plan_path = os.path.join(out_dir, f"{kind}_plan.json")
  # A resumed run keeps the step count it started with (its schedule depends on it); a run
  # with no checkpoint yet times its steps again, so a timing taken under other load (or on
  # another machine) does not carry over.
  if checkpointing.has_checkpoint(workdir) and os.path.exists(plan_path):
    with open(plan_path) as f:
      plan = json.load(f)
  else:
    steps, per_step = train.fit_to_budget(config, workdir, _BUDGET.value, _CORES.value,
                                          clock=_CLOCK.value)
    plan = {"seconds_per_step": per_step, "steps": steps, "clock": _CLOCK.value}
    with open(plan_path, "w") as f:
      json.dump(plan, f)
  steps = plan["steps"]
  train.set_step_budget(config, steps)
  config.train.num_samples = 64
  config.train.samples_to_print = 2
  clock = "CPU time" if plan.get("clock", "cpu") == "cpu" else "wall time"
  print(f"== {kind}: {plan['seconds_per_step']:.3f} s/step on {_CORES.value} cores ({clock}) "
        f"-> {steps} steps in {_BUDGET.value:.0f} s", flush=True)
  t, cpu = time.time(), time.process_time()
  final = train.train_and_evaluate(config, workdir)
  if final.get("preempted"):  # SIGTERM: the checkpoint is saved; a rerun resumes it
    raise SystemExit(f"{kind}: training stopped by SIGTERM at step {final['step']}; rerun the "
                     "same command to resume.")
  stats = {**plan, "train_seconds": time.time() - t, "train_cpu_seconds": time.process_time() - cpu,
           "nll_per_sentence": final.get("eval/nll_per_sentence"),
           "closure_nll_per_sentence": final.get("eval/closure_nll_per_sentence"),
           "true_nll_per_sentence": final.get("true_nll_per_sentence")}
  return workdir, stats


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:  # a bad override is one line now, not a traceback after the first model's training
    config_files.load(variant=_VARIANT.value, overrides={
        **config_files.parse_overrides(_OVERRIDES_ALL.value, flag="--set_all"),
        **config_files.parse_overrides(_OVERRIDES.value)})
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  out_dir = os.path.abspath(_OUT.value)
  os.makedirs(out_dir, exist_ok=True)
  grammar = grammar_lib.default_grammar()
  results = {}
  for path in _MERGE.value:
    with open(os.path.join(path, "results.json")) as f:
      results.update(json.load(f))
  for kind in _MODELS.value:
    workdir, stats = train_model(kind, out_dir)
    exp, params = train.load_trained(workdir)
    settings = CAUSAL_SETTINGS if kind == "causal" else SETTINGS[kind]
    results[kind] = {
        **stats,
        "params": int(sum(x.size for x in jax.tree.leaves(params))),
        "samples": sample_quality(exp, params, settings, _SAMPLES.value, grammar),
    }
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  lines = ["| model | sampler | grammatical | at the data's lengths | grammatical (>=16 tok) | "
           "sample NLL (grammar) | model calls | length | <= 2log2n+2 calls | grammatical there |",
           "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
  for kind, r in results.items():
    for name, s in r["samples"].items():
      matched = s.get("grammatical_at_data_lengths", float("nan"))  # absent in older results
      lines.append(f"| {kind} | {name} | {s['grammatical']:.1%} | {matched:.1%} | "
                   f"{s['long_grammatical']:.1%} | "
                   f"{s['sample_nll_grammatical']:.1f} | {s['mean_calls']:.1f} | "
                   f"{s['mean_length']:.1f} | {s['few_calls_share']:.0%} | "
                   f"{s['few_calls_grammatical']:.1%} |")
  lines.append("")
  lines.append("| model | params | steps | train wall s | train CPU s | NLL bound / sentence | "
               "closed-gap bound | true entropy |")
  lines.append("|---|--:|--:|--:|--:|--:|--:|--:|")
  for kind, r in results.items():
    closed = r.get("closure_nll_per_sentence")
    lines.append(f"| {kind} | {r['params'] / 1e6:.2f}M | {r['steps']} | "
                 f"{r['train_seconds']:.0f} | {r['train_cpu_seconds']:.0f} | "
                 f"{r['nll_per_sentence']:.2f} | {'' if closed is None else f'{closed:.2f}'} | "
                 f"{r['true_nll_per_sentence']:.2f} |")
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
