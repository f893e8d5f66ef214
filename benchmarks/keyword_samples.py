r"""Keyword-conditioned sampling on a trained workdir: how varied and how grammatical.

For each keyword set, ``--num`` samples with ``semdiff.generate`` (the workdir's sampler, the
same seed for every row): the share the grammar accepts, distinct-2, mean length and model
calls, and how often the most frequent sample occurs (a collapse onto one sentence shows
here first).

    python benchmarks/keyword_samples.py --workdir=workdirs/default
    python benchmarks/keyword_samples.py --workdir=DIR --keywords="dog;alice;bird slept"
"""

import collections
import sys

import numpy as np
from absl import app
from absl import flags
from absl import logging

from semdiff import evaluation
from semdiff import generation
from semdiff import train
from semdiff.data import grammar as grammar_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained workdir.")
_KEYWORDS = flags.DEFINE_string("keywords", ";dog;alice;candles;bird slept;the student",
                                "Keyword sets separated by ';' (an empty one: unconditioned).")
_NUM = flags.DEFINE_integer("num", 128, "Samples per keyword set.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (the same for every set).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  try:
    exp, params = train.load_trained(_WORKDIR.value)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"keyword_samples: error: {e}")
  grammar = grammar_lib.default_grammar() if exp.config.data.name == "grammar" else None
  print(f"Keyword samples of {_WORKDIR.value} ({_NUM.value} per set, seed {_SEED.value})\n")
  print("| keywords | grammatical | distinct-2 | length | calls | most frequent sample |")
  print("|---|--:|--:|--:|--:|---|")
  for keywords in _KEYWORDS.value.split(";"):
    keywords = keywords.strip()
    try:
      out = generation.generate(exp, params, keywords=keywords or None, num=_NUM.value,
                                seed=_SEED.value)
    except ValueError as e:
      sys.exit(f"keyword_samples: error: {e}")
    gram = (f"{evaluation.grammar_report(out.texts, grammar)['grammatical']:.1%}"
            if grammar else "n/a")
    text, count = collections.Counter(out.texts).most_common(1)[0]
    distinct = evaluation.distinct_n([t.split() for t in out.texts], 2)
    print(f"| {keywords or '(none)'} | {gram} | {distinct:.3f} | "
          f"{np.mean(out.samples.length):.2f} | {np.mean(out.samples.calls):.2f} | "
          f"{count}/{_NUM.value} \"{text}\" |", flush=True)


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
