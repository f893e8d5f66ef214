r"""Sample from a trained semdiff model: print the drafts, write JSON lines.

  python -m semdiff.sample --workdir=workdirs/default [--keywords="dog park"]
      [--prompt="the old man"] [--infill="the ___ sleeps ."] [--num=8] [--seed=0]
      [--tau=0.2 --epsilon=0.01 --delta=0.3 --temperature=0.7 --top_k=0 --top_p=0.9]
      [--set=sampler.confidence=0.5] [--jsonl=out.jsonl]

Unset flags keep the value in the workdir's config.json (``config.sampler``); ``--set``
overrides any other sampler field. Each JSON line holds the text, the model calls, the
distinct drafts and, per step, the pieces inserted, their probabilities and how far the
step moved the sentence embedding (see `semdiff.generation.records`).
"""

import json
import os
import sys

import jax
from absl import app
from absl import flags
from absl import logging

from semdiff import config_files
from semdiff import generation

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by python -m semdiff.main.")
_KEYWORDS = flags.DEFINE_string("keywords", None, "Words kept in the output, in this order.")
_PROMPT = flags.DEFINE_string("prompt", None, "A fixed prefix, never changed.")
_INFILL = flags.DEFINE_string("infill", None, "A partial text; only its ___ gaps grow.")
_NUM = flags.DEFINE_integer("num", 8, "Samples to draw.")
_SEED = flags.DEFINE_integer("seed", 0, "Sample i uses fold_in(key(seed), i).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_TAU = flags.DEFINE_float("tau", None, "Probability threshold (0 = off).")
_EPSILON = flags.DEFINE_float("epsilon", None, "Semantic stop threshold (0 = off).")
_DELTA = flags.DEFINE_float("delta", None, "Creativity: max embedding move per step (<0 off).")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Softmax temperature (0 = greedy).")
_TOP_K = flags.DEFINE_integer("top_k", None, "Top-k filter (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus mass (1 = off).")
_SET = flags.DEFINE_multi_string("set", [], "sampler.FIELD=VALUE, any other sampler field.")
_JSONL = flags.DEFINE_string("jsonl", None, "Also write one JSON line per sample here.")
_PRINT = flags.DEFINE_integer("print", 8, "Samples printed with their drafts.")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  try:
    sets = config_files.parse_overrides(_SET.value, groups=("sampler",))
    from semdiff import train  # pylint: disable=g-import-not-at-top
    exp, params = train.load_trained(_WORKDIR.value, step=_STEP.value)
    config_files.apply_overrides(exp.config, sets)
    overrides = dict(tau=_TAU.value, epsilon=_EPSILON.value, delta=_DELTA.value,
                     temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value)
    out = generation.generate(exp, params, keywords=_KEYWORDS.value, prompt=_PROMPT.value,
                              infill=_INFILL.value, num=_NUM.value, seed=_SEED.value,
                              **overrides)
  except (ValueError, FileNotFoundError) as e:
    print(f"semdiff.sample: error: {e}", file=sys.stderr)
    sys.exit(1)
  lines = []
  for i, rec in enumerate(out.records[:_PRINT.value]):
    lines.append(f"sample {i} ({rec['calls']} model calls, {rec['length']} tokens):")
    lines += [f"    {d if d else '(empty)'}" for d in rec["drafts"]]
  print("\n".join(lines), flush=True)
  if _JSONL.value:
    os.makedirs(os.path.dirname(os.path.abspath(_JSONL.value)), exist_ok=True)
    with open(_JSONL.value, "w") as f:
      for rec in out.records:
        f.write(json.dumps(rec) + "\n")
    print(f"wrote {len(out.records)} samples to {_JSONL.value}", flush=True)


if __name__ == "__main__":
  jax.config.config_with_absl()
  app.run(main)
