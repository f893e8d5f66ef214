r"""semdiff training job.

  python -m semdiff.main --config=configs/default.py --workdir=/tmp/semdiff \
      [--config.model.num_layers=6 ...]

Rerunning the same command resumes from the newest checkpoint in --workdir.
"""

import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from semdiff import train

_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and samples go.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "An ML Collections config file.",
                                          lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, TimeoutError, train.TrainingDiverged) as e:
    # Errors meant for the user: one line, no traceback.
    print(f"semdiff: error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  jax.config.config_with_absl()
  app.run(main)
