r"""semdiff training job.

  python -m semdiff.main --config=configs/default.py --workdir=/tmp/semdiff \
      [--config.model.num_layers=6 ...]

Rerunning the same command resumes from the newest checkpoint in --workdir.
"""

import os
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
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Call jax.distributed.initialize() first (multi-host: TPU pods, SLURM, or the three flags "
    "below). Also on when SEMDIFF_DISTRIBUTED=1.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed() -> None:
  """Joins the multi-host job; on CPU, collectives go through gloo."""
  if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                             num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  try:
    if _DISTRIBUTED.value or os.environ.get("SEMDIFF_DISTRIBUTED") == "1":
      initialize_distributed()
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, TimeoutError, train.TrainingDiverged) as e:
    # Errors meant for the user: one line, no traceback.
    print(f"semdiff: error: {e}", file=sys.stderr)
    sys.exit(1)
  except OSError as e:
    if "Failed loading config file" not in str(e):
      raise
    # ml_collections loads config files lazily: a missing file surfaces at first use.
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    print(f"semdiff: error: cannot load --config: {lines[-1]}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv):
  """absl's parser, but a bad flag or config file gives one line, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    # An override of a field that no config defines (--config.model.nope=3).
    # ml_collections' message (maybe a KeyError inside an AttributeError) is the field's
    # name, then maybe a "Did you mean" line.
    while e.args and isinstance(e.args[0], BaseException):
      e = e.args[0]
    message = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    name, _, hint = message.partition("\n")
    key = name.strip("\"'")
    hint = hint.strip()
    hint = f" ({hint[0].lower()}{hint[1:]})" if hint else ""
    bad = next((a.split("=")[0] for a in argv[1:]
                if a.startswith("--config.") and f".{key}" in a.split("=")[0]), "--config.")
    print(f"semdiff: error: {bad}: the config has no field {key!r}{hint}; see the config file "
          "for the fields it defines.", file=sys.stderr)
    sys.exit(2)
  except flags.Error as e:
    # Config-file errors arrive wrapped with the loader's traceback: keep the last line.
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    last = lines[-1] if lines else str(e)
    flag = lines[0].split(":")[0] if lines and lines[0].startswith("flag --") else ""
    print(f"semdiff: error: {flag + ': ' if flag and flag not in last else ''}{last}",
          file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  jax.config.config_with_absl()
  app.run(main, flags_parser=parse_flags)
