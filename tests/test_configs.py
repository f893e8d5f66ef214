"""Every shipped config, and every variant it lists, loads and trains one step.

Also checked without running anything: every ``config.<group>.<field>`` that the library
reads exists in every variant, and the groups mirrored by a dataclass (``model``, ``scorer``,
``noise``, ``sampler``) hold no field that the dataclass would silently ignore.
"""

import ast
import dataclasses
import glob
import os
import re
import shutil

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

from semdiff import config_files
from semdiff import losses
from semdiff import model as model_lib
from semdiff import sampling
from semdiff import scorers
from semdiff import sharding
from semdiff import train
from semdiff.data import pipeline

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
# Config groups whose fields are read through a dataclass's ``from_config``.
MIRRORED = {"model": model_lib.ModelConfig, "scorer": scorers.ScorerConfig,
            "noise": losses.NoiseConfig, "sampler": sampling.SamplerConfig}


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
  """Programs compiled by several tests (and test files) of this session compile once."""
  compilation_cache.set_cache_dir(str(tmp_path_factory.getbasetemp() / "jax_cache"))
  compilation_cache.reset_cache()


def variants(path):
  """The variant arguments of a config file: None (its default), then its VARIANTS."""
  return [None, *getattr(config_files.load_module(path), "VARIANTS", ())]


CASES = [(os.path.relpath(p, ROOT), v) for p in CONFIG_FILES for v in variants(p)]
IDS = [f"{p}:{v}" if v else p for p, v in CASES]


def get_config(path, variant):
  module = config_files.load_module(os.path.join(ROOT, path))
  return module.get_config() if variant is None else module.get_config(variant)


def test_configs_are_shipped():
  assert any(os.path.basename(p) == "default.py" for p in CONFIG_FILES)


@pytest.mark.parametrize("path", [os.path.relpath(p, ROOT) for p in CONFIG_FILES])
def test_unknown_variant_names_the_choices(path):
  module = config_files.load_module(os.path.join(ROOT, path))
  choices = getattr(module, "VARIANTS", ())
  if not choices:
    pytest.skip(f"{path} has no variants")
  with pytest.raises(ValueError, match="Unknown config variant 'bogus'") as error:
    module.get_config("bogus")
  for name in choices:
    assert name in str(error.value)


_READ = re.compile(r"(?:^|\.)config\.(\w+)(?:\.(\w+))?$")


def _reads(tree):
  """{(group, field)} or {(field,)}: the config fields a module reads.

  Follows ``config.<group>.<field>`` (also ``exp.config....``) and aliases such as
  ``o = config.optim``; skips ``jax.config`` and functions whose ``config`` parameter is
  annotated as something else (a dataclass).
  """
  found = set()
  for func in ast.walk(tree):
    if not isinstance(func, ast.FunctionDef):
      continue
    args = func.args.args + func.args.kwonlyargs
    annotated = {a.arg: a.annotation for a in args if a.annotation is not None}
    if "config" in annotated and "ConfigDict" not in ast.unparse(annotated["config"]):
      continue
    aliases = {}
    for node in ast.walk(func):
      if isinstance(node, ast.Assign):
        pairs = []
        for target in node.targets:
          if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
            pairs += zip(target.elts, node.value.elts)
          else:
            pairs.append((target, node.value))
        for t, v in pairs:
          if (isinstance(t, ast.Name) and isinstance(v, ast.Attribute)
              and isinstance(v.value, ast.Name) and v.value.id == "config"):
            aliases[t.id] = v.attr
    for node in ast.walk(func):
      if not isinstance(node, ast.Attribute):
        continue
      if isinstance(node.value, ast.Name) and node.value.id in aliases:
        found.add((aliases[node.value.id], node.attr))
        continue
      text = ast.unparse(node)
      match = _READ.search(text)
      if match and not text.startswith("jax.config"):
        found.add(tuple(g for g in match.groups() if g))
  return found


def fields_read_by_the_library():
  reads = set()
  for path in glob.glob(os.path.join(ROOT, "semdiff", "**", "*.py"), recursive=True):
    with open(path) as f:
      reads |= {(os.path.relpath(path, ROOT), r) for r in _reads(ast.parse(f.read()))}
  return reads


def test_the_field_scan_sees_the_library():
  reads = {r for _, r in fields_read_by_the_library()}
  # A few reads known to exist, through each access style the scan follows.
  assert {("train", "batch_size"), ("optim", "warmup_steps"), ("data", "max_len"),
          ("model_kind",)} <= reads


@pytest.mark.parametrize("path, variant", CASES, ids=IDS)
def test_every_field_the_library_reads_exists(path, variant):
  config = get_config(path, variant)
  methods = set(dir(type(config)))
  missing = []
  for where, read in sorted(fields_read_by_the_library()):
    if len(read) == 1:
      if read[0] not in methods and read[0] not in config:
        missing.append((where, read))
    elif read[0] in config and hasattr(config[read[0]], "keys"):
      if read[1] not in config[read[0]] and read[1] not in methods:
        missing.append((where, read))
    elif read[0] not in methods:
      missing.append((where, read))
  assert not missing, f"fields read by the library but not defined: {missing}"


@pytest.mark.parametrize("path, variant", CASES, ids=IDS)
def test_mirrored_groups_hold_only_dataclass_fields(path, variant):
  config = get_config(path, variant)
  for group, cls in MIRRORED.items():
    unknown = set(config[group].keys()) - {f.name for f in dataclasses.fields(cls)}
    assert not unknown, (f"config.{group} fields {sorted(unknown)} are not fields of "
                         f"{cls.__name__}: from_config would ignore them")


def small_enough(config):
  """Shrinks a large variant to CPU size; its structure (every field) stays as it is."""
  if config.model.d_model > 128:
    batch = 16
    config.noise.pack_rows = int(np.ceil(config.noise.pack_rows * batch
                                         / config.train.batch_size))
    config.train.batch_size = batch
    config.model.d_model, config.model.num_heads = 64, 2
    config.model.num_layers, config.model.mlp_dim = 2, 128
  return config


def skip_if_default_is_a_variant(path, variant):
  if variant is None:
    default = get_config(path, None).to_dict()
    same = [v for p, v in CASES if p == path and v and get_config(p, v).to_dict() == default]
    if same:
      pytest.skip(f"the default of {path} is its variant {same[0]!r}, trained on its own")


@pytest.mark.parametrize("path, variant", CASES, ids=IDS)
def test_every_variant_trains_one_step(path, variant, tmp_path_factory):
  skip_if_default_is_a_variant(path, variant)
  # Not even num_steps is overridden: the tiny step is then the very program that the
  # training tests compile (and find in the compilation cache).
  config = small_enough(get_config(path, variant))
  # One tokenizer per corpus and vocabulary, trained once.
  key = f"tok_{config.data.name}_{config.data.vocab_size}_{config.data.tokenizer_type}"
  base = tmp_path_factory.getbasetemp() / key
  exp = train.build_experiment(config, str(base))
  assert exp.model_cfg.vocab_size == exp.tokenizer.vocab_size == config.model.vocab_size
  state = train.init_state(exp)
  batch = next(pipeline.train_iterator(config, exp.tokenizer))
  assert batch["tokens"].shape == (config.train.batch_size, config.data.max_len)
  state, metrics = train.make_train_step(exp)(state, sharding.global_batch(batch, exp.mesh))
  metrics = jax.device_get(metrics)
  assert int(state["step"]) == 1
  assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0
  assert np.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
  summary = train.summarize([metrics])
  assert np.isfinite(summary["loss"])


@pytest.mark.slow
@pytest.mark.parametrize("path, variant", CASES, ids=IDS)
def test_every_variant_runs_the_whole_job_for_one_step(path, variant, tmp_path_factory,
                                                       tmp_path):
  """`train_and_evaluate` with num_steps=1: the step, a checkpoint, eval and samples."""
  skip_if_default_is_a_variant(path, variant)
  config = small_enough(get_config(path, variant))
  config.train.num_steps = 1
  config.data.eval_examples = 16
  config.train.num_samples = 4
  key = f"tok_{config.data.name}_{config.data.vocab_size}_{config.data.tokenizer_type}"
  tokenizer = tmp_path_factory.getbasetemp() / key / "tokenizer"
  if tokenizer.exists():
    shutil.copytree(tokenizer, tmp_path / "tokenizer")
  final = train.train_and_evaluate(config, str(tmp_path))
  assert final["step"] == 1 and np.isfinite(final["eval/nll_per_sentence"])
  assert os.listdir(tmp_path / "checkpoints") == ["1"]
