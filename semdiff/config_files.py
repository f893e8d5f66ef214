"""Config files by path, and dotted-key overrides: one way for scripts, tests and benchmarks.

The training job reads its config through absl's ``--config`` flag; everything else that
needs a config (tests, benchmarks, notebooks, `train.load_trained`) goes through here, so a
variant is chosen and a field is overridden the same way everywhere.
"""

import importlib.util
import os
from typing import Any, Mapping, Optional, Sequence

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


def parse_overrides(items: Sequence[str], flag: str = "--set",
                    groups: Optional[Sequence[str]] = None) -> dict[str, str]:
  """Command-line ``["group.field=value", ...]`` -> ``{"group.field": "value"}``.

  The values stay strings; `apply_overrides` converts them to the fields' types. An item
  without ``=`` or a dotted key (or, with ``groups``, outside those groups) is one clear
  error naming ``flag``.
  """
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    group = key.split(".")[0]
    if not sep or "." not in key or (groups and group not in groups):
      shape = f"{groups[0]}.FIELD=VALUE" if groups else "GROUP.FIELD=VALUE"
      raise ValueError(f"{flag}={item!r} must look like {shape} (e.g. {flag}="
                       f"{'sampler.confidence=0.5' if groups else 'model.num_layers=1'}).")
    out[key] = value
  return out


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
      value = _convert(key, value, current)
    with config.unlocked():
      node[leaf] = value
  return config


def _convert(key: str, value: str, current: Any) -> Any:
  """A command-line string as the type of the field's current value, or one clear error."""
  if isinstance(current, bool):
    words = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
    if value.lower() not in words:
      raise ValueError(f"{key}={value!r}: expected true or false.")
    return words[value.lower()]
  try:
    return type(current)(value)
  except (TypeError, ValueError):
    raise ValueError(f"{key}={value!r}: expected {type(current).__name__}, like "
                     f"{current!r}.") from None


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
