r"""The results table: every model trained on the grammar corpus for the same time, evaluated.

Trains, one after another and for ``--budget_s`` seconds of training each, on the embedded
grammar corpus with one shared tokenizer. Equal time is counted in CPU time: budget_s x
``--cores`` CPU-seconds per model, turned into a step count by timing a few steps of each
model first (`train.fit_to_budget`), so the comparison stays fair when other jobs share the
machine. The models:

  semdiff             the insertion model, `unigram` order
  semdiff_<scorer>    the same with each embedding scorer (embedding_loo, embedding_greedy,
                      model_embedding)
  random              the insertion model, random order
  left_to_right       the insertion model, left-to-right order (autoregressive)
  ar                  the causal Transformer of the same size (KV-cache sampling)
  masked              the masked-diffusion model (sampler.max_steps ancestral steps, and
                      the --masked_steps step counts: its quality vs steps)

then evaluates each with `evaluate.evaluate_workdir` (test split; samples at batch 32, the AR
model as the judge) and writes ``OUT/README.md`` (the table, the machine and the budget),
``OUT/results.json`` and the workdirs under ``OUT/workdirs/``. A model whose workdir is
already trained is not trained again (delete its workdir to retrain).

  python benchmarks/results.py --budget_s=900 --out=results        # the real table
  python benchmarks/results.py --budget_s=20 --variant=tiny --num_samples=32 --out=/tmp/results
"""

import datetime
import json
import os
import platform
import time

import jax
from absl import app
from absl import flags
from absl import logging

from semdiff import config_files
from semdiff import evaluate
from semdiff import scorers
from semdiff import train

_BUDGET = flags.DEFINE_float("budget_s", 900.0, "Training seconds per model on --cores cores.")
_CORES = flags.DEFINE_integer("cores", os.cpu_count(), "Cores the budget is counted on.")
_VARIANT = flags.DEFINE_string("variant", "small", "Variant of configs/default.py.")
_OUT = flags.DEFINE_string("out", "results", "Output folder: README.md, results.json, workdirs.")
_SAMPLES = flags.DEFINE_integer("samples", 256, "Samples drawn and scored per model.")
_MODELS = flags.DEFINE_list("models", [], "Which models (default: all of MODELS).")
_MASKED_STEPS = flags.DEFINE_list(
    "masked_steps", ["8", "16"], "Extra sampler.max_steps settings of the masked model "
    "(quality vs steps; the config's own max_steps is the main row).")
_SET = flags.DEFINE_multi_string("set", [], "Config overrides for every model, e.g. "
                                 "--set=model.num_layers=2.")

# The embedding scorers of the table, each a row (those registered).
EMBEDDING_SCORERS = ("embedding_loo", "embedding_greedy", "model_embedding")


def models() -> dict:
  """{name: (label, config overrides)} of the models in the table, in order."""
  out = {"ar": ("AR (causal, KV cache)", {"model_kind": "causal"}),
         "semdiff": ("semdiff (unigram)", {"scorer.name": "unigram"}),
         "semdiff_tree": ("semdiff tree model (unigram)",
                          {"model_kind": "tree", "sampler.confidence": 0.0}),
         "semdiff_slot": ("semdiff slot model (unigram)", {"model_kind": "slot"})}
  for name in EMBEDDING_SCORERS:
    if name in scorers.names():
      out[f"semdiff_{name}"] = (f"semdiff ({name})", {"scorer.name": name})
  out["random"] = ("random order", {"scorer.name": "random"})
  out["left_to_right"] = ("left_to_right order", {"scorer.name": "left_to_right"})
  out["masked"] = ("masked diffusion", {"model_kind": "masked"})
  return out


def machine() -> str:
  """CPU model and cores, accelerator devices, jax version, load average."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
  except OSError:
    pass
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", dev.platform)
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  return (f"{cpu}, {os.cpu_count()} CPU cores, {jax.device_count()} x {kind} "
          f"({dev.platform}), jax {jax.__version__}; load average {load:.1f} at the end")


def train_one(name: str, overrides: dict, out_dir: str, tokenizer_path: str) -> dict:
  """Trains model ``name`` for the budget (unless its workdir is trained); returns timings."""
  workdir = os.path.join(out_dir, "workdirs", name)
  config = config_files.load(variant=_VARIANT.value, overrides={
      **config_files.parse_overrides(_SET.value), **overrides,
      "data.tokenizer_path": tokenizer_path,
      # The training job's own final samples: a few (the evaluation draws the real ones).
      "train.num_samples": 16, "train.samples_to_print": 1})
  done = os.path.join(workdir, "eval", "trained.json")
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  plan_path = os.path.join(out_dir, "workdirs", f"{name}_plan.json")
  if os.path.exists(plan_path):  # the step count of an earlier, interrupted run: resume it
    with open(plan_path) as f:
      plan = json.load(f)
    train.set_step_budget(config, plan["steps"])
  else:
    steps, per_step = train.fit_to_budget(config, workdir, _BUDGET.value, _CORES.value)
    plan = {"steps": steps, "seconds_per_step": per_step}
    os.makedirs(os.path.dirname(plan_path), exist_ok=True)
    with open(plan_path, "w") as f:
      json.dump(plan, f)
  print(f"== {name}: {plan['seconds_per_step']:.3f} s/step on {_CORES.value} cores (CPU time) "
        f"-> {plan['steps']} steps in {_BUDGET.value:.0f} s", flush=True)
  t, cpu = time.time(), time.process_time()
  final = train.train_and_evaluate(config, workdir)
  if final.get("preempted"):  # SIGTERM: the checkpoint is saved; no "done" marker yet
    raise SystemExit(f"{name}: training stopped by SIGTERM at step {final['step']}; rerun the "
                     "same command to resume.")
  info = {**plan, "train_seconds": time.time() - t,
          "train_cpu_seconds": time.process_time() - cpu}
  os.makedirs(os.path.dirname(done), exist_ok=True)
  with open(done, "w") as f:
    json.dump(info, f)
  return info


def table(results: dict) -> str:
  lines = ["| model | params | steps | NLL bound / sentence | true entropy | grammatical | "
           "sample NLL (grammar) | judge NLL (AR) | model calls / sample | tokens/s (batch 32) |",
           "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
  for r in results.values():
    judge = r.get("judge_nll_per_sentence", float("nan"))
    lines.append(
        f"| {r['label']} | {r['params'] / 1e6:.2f}M | {r['steps']} | "
        f"{r['nll_per_sentence']:.2f} | {r['true_nll_per_sentence']:.2f} | "
        f"{r['grammatical']:.1%} | {r['sample_nll_grammatical']:.2f} | {judge:.2f} | "
        f"{r['calls_per_sample']:.1f} | {r['tokens_per_s']:,.0f} |")
  return "\n".join(lines)


def targets(results: dict) -> list[str]:
  """Where semdiff stands against the issue's targets (needs the semdiff and ar rows)."""
  if "semdiff" not in results or "ar" not in results:
    return []
  s, a = results["semdiff"], results["ar"]
  nll_gap = s["sample_nll_grammatical"] / a["sample_nll_grammatical"] - 1
  return [
      "Targets (semdiff, unigram, against AR):", "",
      f"- sample NLL under the grammar: {s['sample_nll_grammatical']:.2f} vs "
      f"{a['sample_nll_grammatical']:.2f} nats ({nll_gap:+.1%}; target: within 10%), with "
      f"{s['calls_per_sample']:.1f} model calls per sample; {s['few_calls_share']:.1%} of "
      "the samples took at most 2·log2 n + 2 calls",
      f"- sampling tokens/s at batch 32: {s['tokens_per_s']:,.0f} vs {a['tokens_per_s']:,.0f} "
      f"({s['tokens_per_s'] / a['tokens_per_s']:.2f}×; target: 3× at n = 128, see "
      "benchmarks/sampling_throughput.py for n = 128)", ""]


def readme(results: dict, command: str) -> str:
  first = next(iter(results.values()))
  return "\n".join([
      "# Results: the grammar corpus, equal training time", "",
      f"Written by `{command}` on {datetime.date.today().isoformat()}.", "",
      f"- machine: {machine()}",
      f"- budget: {_BUDGET.value:.0f} s of training per model on {_CORES.value} cores, counted "
      "in CPU time (steps set by timing each model's step first), config "
      f"`configs/default.py:{_VARIANT.value}`"
      + (f" with {', '.join(_SET.value)}" if _SET.value else ""),
      f"- evaluation: `semdiff.evaluate` on the test split ({first['num_sentences']} "
      f"sentences), {first['num_samples']} samples per model at batch "
      f"{first['sampling_batch']}, sampler settings of the config", "",
      table(results), "", *targets(results),
      "NLL bound and true entropy are nats per sentence on the same test sentences (the bound "
      "is exact for the insertion models, teacher-forcing every level, and for AR; the masked "
      "model's is a Monte-Carlo ELBO estimate). Sample NLL (grammar) is the grammar's exact NLL "
      "of the grammatical samples; judge NLL is the AR model's NLL of all samples. Model calls "
      "and tokens/s are measured while sampling, compile excluded.", ""])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  out_dir = os.path.abspath(_OUT.value)
  os.makedirs(out_dir, exist_ok=True)
  chosen = models()
  if _MODELS.value:
    unknown = set(_MODELS.value) - set(chosen)
    if unknown:
      raise app.UsageError(f"Unknown --models {sorted(unknown)}; choose from {sorted(chosen)}.")
    chosen = {k: v for k, v in chosen.items() if k in _MODELS.value}
  # One tokenizer for every model, so the judge reads every model's samples the same way.
  try:  # a bad --set is one line now, not a traceback after the first model's training
    base = config_files.load(variant=_VARIANT.value,
                             overrides=config_files.parse_overrides(_SET.value))
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  tokenizer = train.load_tokenizer(base, out_dir)
  results = {}
  judge = os.path.join(out_dir, "workdirs", "ar") if "ar" in chosen else None
  for name, (label, overrides) in chosen.items():
    info = train_one(name, overrides, out_dir, tokenizer.model_path)
    r = evaluate.evaluate_workdir(os.path.join(out_dir, "workdirs", name),
                                  num_samples=_SAMPLES.value, batch_size=32,
                                  judge_workdir=judge)
    results[name] = {"label": label, **info, **r}
    if name == "masked":
      for steps in _MASKED_STEPS.value:
        extra = evaluate.evaluate_workdir(
            os.path.join(out_dir, "workdirs", name), num_samples=_SAMPLES.value, batch_size=32,
            judge_workdir=judge, sampler_overrides={"max_steps": int(steps)}, write=False,
            bound=False)
        results[f"masked_T{steps}"] = {**results[name], **extra,
                                       "label": f"masked diffusion, T = {steps}"}
    print(f"== {name}: NLL bound {r['nll_per_sentence']:.2f} "
          f"(true {r['true_nll_per_sentence']:.2f}), {r['grammatical']:.1%} grammatical, {r['calls_per_sample']:.1f} calls, "
          f"{r['tokens_per_s']:,.0f} tokens/s", flush=True)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  command = "python benchmarks/results.py " + " ".join(
      [f"--budget_s={_BUDGET.value:g}", f"--cores={_CORES.value}", f"--variant={_VARIANT.value}",
       f"--samples={_SAMPLES.value}", f"--out={_OUT.value}"]
      + [f"--set={s}" for s in _SET.value]
      + ([f"--models={','.join(_MODELS.value)}"] if _MODELS.value else []))
  text = readme(results, command)
  with open(os.path.join(out_dir, "README.md"), "w") as f:
    f.write(text)
  print(table(results))


if __name__ == "__main__":
  app.run(main)
