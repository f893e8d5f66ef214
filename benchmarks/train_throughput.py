r"""Training throughput: the semdiff insertion model next to the same-size causal AR model.

For each model kind, on the same batches of the configured data (default: the `small`
variant of configs/default.py), times the jitted train step of `semdiff.train` (the
rows' steps taken in turn, so that a shared machine's load falls on all of them alike)
and prints a Markdown table:

  step time     median seconds per step (after compilation and warm-up);
  tokens/s      data tokens (real tokens of the batch) per second;
  positions     model input positions computed per step (rows x width, padding included);
  noising share the time of a jitted function that does only the input preparation of the
                step (insertion: `losses.draw_states` -- scoring, trees, level draw,
                noising -- plus canvas building and packing; causal: `losses.ar_inputs`
                and packing) on the same batch, divided by the step time;
  MFU           6 * parameters * positions per step / step time, over a peak measured here
                with a 2048^3 matmul in the row's compute dtype (attention FLOPs are left
                out, so this is a model-FLOPs estimate, not hardware utilisation).

Rows: semdiff and AR in float32, then semdiff with bfloat16 compute (`model.dtype`;
parameters and optimizer state stay float32), unless ``--bfloat16=false``.
Then the ratios: semdiff tokens/s / AR tokens/s, and semdiff's scoring + noising share.

  python benchmarks/train_throughput.py [--steps=8] [--tokenizer=PATH/spm.model]
      [--config=configs/default.py:small] [--config.train.batch_size=32 ...]

Without ``--tokenizer`` a tokenizer is trained in a temporary folder as the job would.
Runs on whatever devices JAX sees (the config's mesh); takes 1.5-3.5 minutes on 2 shared
CPU cores.
"""

import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from semdiff import losses
from semdiff import model as model_lib
from semdiff import sharding
from semdiff import train
from semdiff.data import pipeline
from semdiff.data import tokenizer as tokenizer_lib

_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_ROOT, "configs", "default.py"), "An ML Collections config file.",
    lock_config=False)
_STEPS = flags.DEFINE_integer("steps", 8, "Timed steps per model (after warm-up).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "A trained .model file; '' trains one.")
_BFLOAT16 = flags.DEFINE_bool("bfloat16", True, "Also time semdiff with bfloat16 compute.")
# (model kind, compute dtype) of each row; the first two are the ratio's.
_ROWS = (("insertion", "float32"), ("causal", "float32"), ("insertion", "bfloat16"))


def measure_peak_flops(n: int = 2048, repeats: int = 8, dtype: str = "float32") -> float:
  """FLOP/s of a jitted n^3 matmul in ``dtype`` (best of ``repeats``)."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32), dtype)
  mm = jax.jit(lambda x, y: x @ y)
  mm(a, a).block_until_ready()
  best = min(_timed(lambda: mm(a, a).block_until_ready()) for _ in range(repeats))
  return 2.0 * n ** 3 / best


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def input_prep_fn(exp):
  """A jitted function doing only the step's input preparation (no model)."""
  noise_cfg, scorer_cfg, stats = exp.noise_cfg, exp.scorer_cfg, exp.stats
  if exp.config.model_kind == "causal":

    def ar_prep(tokens, mask, rng):
      del rng
      inputs, targets = losses.ar_inputs(tokens, mask)
      if noise_cfg.causal_pack_rows:
        return losses.pack(*inputs, targets, rows=noise_cfg.causal_pack_rows)
      return inputs, targets

    return jax.jit(ar_prep, in_shardings=(sharding.batch_sharding(exp.mesh),) * 2 + (None,))
  none_id = exp.model_cfg.vocab_size  # `none` is the last output, after the vocabulary

  def prep(tokens, mask, rng):
    noised, height, *_ = losses.draw_states(
        tokens, mask, rng, stats, scorer_cfg, noise_cfg, none_id,
        repeats=noise_cfg.states_per_example)
    inputs = losses.canvas_inputs(noised.canvas, noised.length)
    if noise_cfg.pack_rows:
      return losses.pack(*inputs, noised.gap_targets, rows=noise_cfg.pack_rows), height
    return inputs, noised.gap_targets, height

  return jax.jit(prep, in_shardings=(sharding.batch_sharding(exp.mesh),) * 2 + (None,))


class _Row:
  """One (model kind, compute dtype) row: its compiled step, state and batches."""

  def __init__(self, config, kind: str, dtype: str, tok, workdir: str):
    config = config.copy_and_resolve_references()
    config.model_kind = kind
    config.model.dtype = dtype
    self.kind, self.dtype = kind, dtype
    exp = train.build_experiment(config, workdir, tokenizer=tok)
    self.state = train.init_state(exp)
    self.params = model_lib.count_params(self.state["params"])
    self.step_fn = train.make_train_step(exp)
    self.prep = input_prep_fn(exp)
    batches = pipeline.train_iterator(config, tok)
    self.batches = [sharding.global_batch(next(batches), exp.mesh)
                    for _ in range(_WARMUP.value + _STEPS.value + 1)]
    self.times, self.prep_times, self.tokens, self.positions = [], [], [], []
    self.rng = jax.random.key(1)

  def warm_up(self):
    """Compiles the step and the input preparation, then runs the untimed steps."""
    for b in self.batches[:1 + _WARMUP.value]:
      self.state, metrics = self.step_fn(self.state, b)
    jax.block_until_ready(metrics)
    b = self.batches[0]
    jax.block_until_ready(self.prep(b["tokens"], b["mask"], self.rng))

  def timed_step(self, i: int):
    b = self.batches[1 + _WARMUP.value + i]
    t = time.perf_counter()
    self.state, metrics = self.step_fn(self.state, b)
    jax.block_until_ready(metrics)
    self.times.append(time.perf_counter() - t)
    m = jax.device_get(metrics)
    self.tokens.append(float(m["tokens"]))
    self.positions.append(float(m["computed_positions"]))
    self.prep_times.append(_timed(lambda: jax.block_until_ready(
        self.prep(b["tokens"], b["mask"], self.rng))))

  def result(self) -> dict:
    step_time = statistics.median(self.times)
    prep_time = statistics.median(self.prep_times)
    return {"kind": self.kind, "dtype": self.dtype, "params": self.params,
            "step_time": step_time, "tokens_per_s": statistics.mean(self.tokens) / step_time,
            "positions": statistics.mean(self.positions), "prep_time": prep_time,
            "prep_share": prep_time / step_time}


def bench(config, kinds, tok, workdir: str) -> list[dict]:
  """Times the rows' steps in turn (row 1 step i, row 2 step i, ...), so that the drifting
  load of a shared machine falls on every row alike."""
  rows = [_Row(config, kind, dtype, tok, workdir) for kind, dtype in kinds]
  for row in rows:
    row.warm_up()
  for i in range(_STEPS.value):
    for row in rows:
      row.timed_step(i)
  return [row.result() for row in rows]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  with tempfile.TemporaryDirectory() as workdir:
    if _TOKENIZER.value:
      tok = tokenizer_lib.Tokenizer.load(_TOKENIZER.value)
    else:
      print("training the tokenizer ...", file=sys.stderr, flush=True)
      tok = train.load_tokenizer(config, workdir)
    kinds = _ROWS if _BFLOAT16.value else _ROWS[:2]
    dtypes = sorted({dtype for _, dtype in kinds})
    peak = {dtype: measure_peak_flops(dtype=dtype) for dtype in dtypes}
    rows = bench(config, kinds, tok, workdir)
    # The best of two measurements: a shared machine's peak drifts with its load.
    peak = {dtype: max(peak[dtype], measure_peak_flops(dtype=dtype)) for dtype in dtypes}

  devices = jax.devices()
  print(f"\n{config.get('variant', '?')} config, batch {config.train.batch_size}, "
        f"max_len {config.data.max_len}, {len(devices)} x {devices[0].device_kind}, "
        f"matmul peak {', '.join(f'{d} {p / 1e9:.0f}' for d, p in peak.items())} GFLOP/s, "
        f"{_STEPS.value} timed steps\n")
  print("| model | params | step time (s) | tokens/s | positions/step | "
        "scoring+noising (s) | share of step | MFU |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    mfu = 6.0 * r["params"] * r["positions"] / r["step_time"] / peak[r["dtype"]]
    name = "semdiff (insertion)" if r["kind"] == "insertion" else "AR (causal)"
    if r["dtype"] != "float32":
      name += f", {r['dtype']}"
    print(f"| {name} | {r['params'] / 1e6:.2f}M | {r['step_time']:.3f} | "
          f"{r['tokens_per_s']:,.0f} | {r['positions']:,.0f} | {r['prep_time']:.4f} | "
          f"{r['prep_share']:.1%} | {mfu:.1%} |")
  ins, ar = rows[:2]
  print(f"\nsemdiff tokens/s / AR tokens/s = {ins['tokens_per_s'] / ar['tokens_per_s']:.2f}; "
        f"semdiff scoring+noising share of the step = {ins['prep_share']:.1%} "
        f"(AR input preparation: {ar['prep_share']:.1%}).")
  if len(rows) > 2:
    print(f"semdiff bfloat16 tokens/s / float32 tokens/s = "
          f"{rows[2]['tokens_per_s'] / ins['tokens_per_s']:.2f}.")


if __name__ == "__main__":
  jax.config.config_with_absl()
  app.run(main)
