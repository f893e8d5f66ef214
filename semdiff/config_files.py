"""Config files by path, and dotted-key overrides: one way for scripts, tests and benchmarks.

The training job reads its config through absl's ``--config`` flag; everything else that
needs a config (tests, benchmarks, notebooks, `train.load_trained`) goes through here, so a
variant is chosen and a field is overridden the same way everywhere.
"""

import importlib.util
import os
from typing import Any, Mapping, Optional

import ml_collections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "configs", "default.py")


def load_module(path: str):
  """The config file at ``path`` as a module (its ``get_config``, ``VARIANTS``, ``sweep``)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"No config file at {path}.")
  spec = importlib.util.spec_from_file_location(
      "semdiff_config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load(path: str = DEFAULT, variant: Optional[str] = None,
         overrides: Optional[Mapping[str, Any]] = None) -> ml_collections.ConfigDict:
  """``get_config(variant)`` of the config file at ``path``, with ``overrides`` applied.

  Args:
    path: a Python file defining ``get_config(variant)`` (default: configs/default.py of
      this checkout).
    variant: the variant name (None: the file's default).
    overrides: {"train.num_steps": 3, ...}, as `apply_overrides` takes them.
  """
  module = load_module(path)
  config = module.get_config(variant) if variant is not None else module.get_config()
  return apply_overrides(config, overrides or {})


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Sets ``{"group.field": value}`` in ``config`` (in place; also returned).

  A string value is converted to the field's type (so ``"0.5"`` works from a command
  line); an unknown key is one clear error.
  """
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    try:
      for p in parents:
        node = node[p]
      current = node[leaf]
    except (KeyError, AttributeError, TypeError):
      raise ValueError(f"The config has no field {key!r}; see the config file for the fields "
                       "it defines.") from None
    if isinstance(value, str) and current is not None and not isinstance(current, str):
      if isinstance(current, bool):
        value = value.lower() in ("1", "true", "yes")
      else:
        value = type(current)(value)
    with config.unlocked():
      node[leaf] = value
  return config


# Fields whose default changed when they were added: a saved config that predates one ran
# with this value, not with today's default (its checkpoint has no closed-gap parameters).
LEGACY_VALUES = {"model.gap_state": False, "noise.closed_prob": 0.0, "noise.hole_prob": 0.0,
                 "noise.hole_open": 0.0}


def with_defaults(saved: Mapping[str, Any], path: str = DEFAULT) -> ml_collections.ConfigDict:
  """A saved run config (``config.json``) on top of its variant's current defaults.

  Fields added to the config file after the run was saved take their default values (or,
  for those in ``LEGACY_VALUES``, the value the run had), so a workdir written by an older
  version still loads; every field the run saved keeps its value.
  """
  base = load(path, saved.get("variant") or None)
  for key, value in LEGACY_VALUES.items():
    group, field = key.split(".")
    if field not in saved.get(group, {}):
      apply_overrides(base, {key: value})

  def merge(node, values):
    for key, value in values.items():
      if isinstance(value, Mapping) and key in node and isinstance(node[key],
                                                                    ml_collections.ConfigDict):
        merge(node[key], value)
      else:
        node[key] = value

  with base.unlocked():
    merge(base, saved)
  return base
