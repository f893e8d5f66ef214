"""Checkpoints: train state and data-iterator position together, with orbax.

A checkpoint holds ``state`` (params, optimiser state, step, rng) and ``data``
(the grain iterator's state) under one step, written asynchronously and made
visible only when complete, so a run killed mid-save restarts from the last
complete step. The run's config (with the tokenizer's vocabulary size) sits in
``<workdir>/config.json`` so that a mismatched restart is caught before any
restore is attempted.
"""

import itertools
import json
import os
import signal
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging


# Test hook (tests/test_faults.py): with SEMDIFF_TEST_KILL_IN_SAVE=N the process SIGKILLs
# itself during its N-th checkpoint save, in orbax's background thread once the files are
# written and before the temporary folder is renamed to the step's: a save that never
# completed. Unset (any real run), the manager is built without it.
KILL_IN_SAVE_ENV = "SEMDIFF_TEST_KILL_IN_SAVE"


def _kill_in_save_hook() -> Optional[Callable[[], None]]:
  """The `AsyncOptions.post_finalization_callback` of the test hook, or None."""
  nth = int(os.environ.get(KILL_IN_SAVE_ENV) or 0)
  if nth <= 0:
    return None
  saves = itertools.count(1)

  def hook():
    if next(saves) == nth:
      os.kill(os.getpid(), signal.SIGKILL)

  return hook


def directory(workdir: str) -> str:
  """The folder of a workdir's checkpoints (one subfolder per saved step)."""
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def has_checkpoint(workdir: str) -> bool:
  """Whether ``workdir`` holds a finished checkpoint (a half-written one does not count)."""
  path = directory(workdir)
  return os.path.isdir(path) and any(name.isdigit() for name in os.listdir(path))


def manager(workdir: str, *, keep: int) -> ocp.CheckpointManager:
  hook = _kill_in_save_hook()
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=True,
      async_options=ocp.AsyncOptions(post_finalization_callback=hook) if hook else None)
  return ocp.CheckpointManager(directory(workdir), options=options)


def save(mgr: ocp.CheckpointManager, step: int, state: Any, data_state: dict) -> None:
  mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                         data=ocp.args.JsonSave(data_state)))


def restore_latest(mgr: ocp.CheckpointManager, abstract_state: Any
                   ) -> Optional[tuple[int, Any, dict]]:
  """(step, state, data_state) of the newest readable checkpoint, or None.

  A checkpoint that fails to read (e.g. truncated files) is reported and the
  next older one is tried; if none can be read, one clear error says so. A
  checkpoint that reads but holds other arrays than ``abstract_state`` (another
  parameter structure or shape: a config change that `check_run_config` does
  not know) raises a ValueError saying "config mismatch" at once, since older
  checkpoints of the same run would not match either.
  """
  steps = sorted(mgr.all_steps(), reverse=True)
  errors = []
  for step in steps:
    try:
      restored = mgr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
      return step, restored["state"], restored["data"]
    except Exception as e:  # pylint: disable=broad-except
      mismatch = _structure_mismatch(mgr, step, abstract_state)
      if mismatch:
        raise ValueError(
            f"config mismatch: the checkpoint at step {step} in {mgr.directory} holds other "
            f"arrays than this run's config builds ({mismatch}); resume with the config the "
            f"run was trained with (its config.json), or start a new --workdir.") from e
      msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
      logging.warning("Checkpoint at step %d is unreadable (%s); trying an older one.", step, msg)
      errors.append((step, msg))
  if errors:
    raise RuntimeError(
        f"No readable checkpoint in {mgr.directory}: steps {[s for s, _ in errors]} all failed "
        f"(newest: {errors[0][1]}). Delete the broken step folders or start a new --workdir.")
  return None


def _shapes_by_path(tree: Any) -> dict[str, tuple]:
  """{"params/backbone/embed": shape, ...} of a state or its checkpoint metadata."""
  def name(key):
    for attr in ("key", "idx", "name"):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(n for n in map(name, path) if n != "value"): tuple(leaf.shape)
          for path, leaf in flat}


def _structure_mismatch(mgr: ocp.CheckpointManager, step: int, abstract_state: Any
                        ) -> Optional[str]:
  """What differs between the saved state's arrays and ``abstract_state``, or None.

  None also when the checkpoint's metadata cannot be read: that checkpoint is
  broken, not mismatched.
  """
  try:
    saved = _shapes_by_path(mgr.item_metadata(step)["state"].tree)
  except Exception:  # pylint: disable=broad-except
    return None
  wanted = _shapes_by_path(abstract_state)
  if saved == wanted:
    return None
  only_saved = sorted(set(saved) - set(wanted))
  only_wanted = sorted(set(wanted) - set(saved))
  if only_saved or only_wanted:
    parts = []
    if only_saved:
      parts.append(f"{len(only_saved)} arrays only in the checkpoint, e.g. {only_saved[0]}")
    if only_wanted:
      parts.append(f"{len(only_wanted)} arrays only in this run, e.g. {only_wanted[0]}")
    return "; ".join(parts)
  path = next(p for p in sorted(wanted) if saved[p] != wanted[p])
  return f"{path} has shape {saved[path]} in the checkpoint but {wanted[path]} in this run"


def check_run_config(workdir: str, config_json: dict) -> None:
  """Refuses to resume a workdir trained with an incompatible config."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f)
  for group, key in (("model", "vocab_size"), ("model", "d_model"), ("model", "num_layers"),
                     ("model", "num_heads"), ("model", "mlp_dim"), ("model", "tie_embeddings"),
                     (None, "model_kind")):
    a = old.get(group, {}).get(key) if group else old.get(key)
    b = config_json.get(group, {}).get(key) if group else config_json.get(key)
    if a is not None and a != b:
      name = f"{group}.{key}" if group else key
      raise ValueError(
          f"{workdir} holds a run with {name}={a}, but this run has {name}={b}; use a new "
          f"--workdir, or the same tokenizer and model settings to resume.")


def write_run_config(workdir: str, config_json: dict) -> None:
  path = os.path.join(workdir, "config.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(config_json, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
