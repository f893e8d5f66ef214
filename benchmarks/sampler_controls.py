r"""The sampler's stopping and creativity controls on a trained model: a table per setting.

For each setting of tau (probability threshold), epsilon (semantic stop) and delta
(creativity cap), next to the workdir's own sampler settings, draws ``--num`` samples with
`semdiff.generate` and prints mean length (tokens), mean model calls, the share the grammar
accepts (grammar corpus only) and distinct-2 (distinct word bigrams / all word bigrams over
the samples).

  python benchmarks/sampler_controls.py --workdir=workdirs/default [--num=256] \
      [--keywords="dog"] [--tau=0.005,0.01,0.05] [--epsilon=0.005,0.02] [--delta=0.1,0.3] \
      [--out=controls.md]

Every setting compiles its own sampler: about 10-30 s each for the default model on 2 CPU
cores, plus the sampling.
"""

import os
import sys
import time

import numpy as np
from absl import app
from absl import flags
from absl import logging

from semdiff import evaluation
from semdiff import generation
from semdiff import train
from semdiff.data import grammar as grammar_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained workdir.")
_NUM = flags.DEFINE_integer("num", 256, "Samples per setting.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (the same for every setting).")
_KEYWORDS = flags.DEFINE_string("keywords", None, "Keywords for every setting (optional).")
_TAU = flags.DEFINE_list("tau", ["0.002", "0.005", "0.01", "0.05"], "tau values.")
_EPSILON = flags.DEFINE_list("epsilon", ["0.005", "0.02", "0.05"], "epsilon values.")
_DELTA = flags.DEFINE_list("delta", ["0.1", "0.3", "0.6"], "delta values.")
_OUT = flags.DEFINE_string("out", "", "Also write the Markdown table to this file.")
flags.mark_flag_as_required("workdir")


def settings() -> list[tuple[str, dict]]:
  rows = [("workdir's sampler", {})]
  rows += [(f"tau = {v}", {"tau": float(v)}) for v in _TAU.value]
  rows += [(f"epsilon = {v}", {"epsilon": float(v)}) for v in _EPSILON.value]
  rows += [(f"delta = {v}", {"delta": float(v)}) for v in _DELTA.value]
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  t0 = time.time()
  try:
    exp, params = train.load_trained(_WORKDIR.value)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"sampler_controls: error: {e}")
  grammar = grammar_lib.default_grammar() if exp.config.data.name == "grammar" else None
  base = exp.sampler_cfg
  lines = [
      f"Sampler controls on {_WORKDIR.value} ({_NUM.value} samples per setting, seed "
      f"{_SEED.value}{', keywords ' + repr(_KEYWORDS.value) if _KEYWORDS.value else ''}; "
      f"base: temperature {base.temperature}, top_p {base.top_p}, top_k {base.top_k}, tau "
      f"{base.tau}, confidence {base.confidence}; sentence embedding: "
      f"{base.embedding_source} table)",
      "",
      "| setting | mean length | mean model calls | grammatical | distinct-2 |",
      "|---|--:|--:|--:|--:|",
  ]
  for label, overrides in settings():
    out = generation.generate(exp, params, keywords=_KEYWORDS.value, num=_NUM.value,
                              seed=_SEED.value, **overrides)
    gram = (f"{evaluation.grammar_report(out.texts, grammar)['grammatical']:.1%}"
            if grammar else "n/a")
    distinct = evaluation.distinct_n([t.split() for t in out.texts], 2)
    lines.append(f"| {label} | {np.mean(out.samples.length):.2f} | "
                 f"{np.mean(out.samples.calls):.2f} | {gram} | {distinct:.3f} |")
    print(lines[-1], flush=True)
  lines += ["", f"Measured in {time.time() - t0:.0f} s."]
  report = "\n".join(lines) + "\n"
  print("\n" + report, end="")
  if _OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
      f.write(report)


if __name__ == "__main__":
  app.run(main)
