r"""Sampling throughput and model calls vs length: semdiff's insertion sampler vs AR + KV cache.

For each length n and batch size, both models generate exactly n tokens per row and the table
gives the model calls per sample (sequential steps), wall time per batch (compile excluded,
best of ``--repeats``) and tokens/s.

To make calls vs length meaningful without a trained model, both models have random
parameters (the config's architecture, so the cost per call is real) and their outputs are
forced so that every sample has exactly n tokens:

* semdiff: the insertion model never chooses ``none``, so every gap inserts every step (the
  canvas grows 0 -> 1 -> 3 -> 7 ...) until the canvas of capacity ``sampler.max_len = n`` is
  full: ceil(log2(n + 1)) calls, the balanced tree's height, the fewest any order can take.
  A trained model takes its sentences' tree height + 1 calls (about 2·log2 n for the
  `unigram` order: see tree_heights.py), at the same cost per call.
* AR: the causal model never chooses EOS and stops at the cap n: n + 1 calls, one new
  token each with the KV cache (`sampling.sample_causal_cached`).

The insertion sampler runs its full canvas (n + 2 positions) at every step, or with
``sampler.grow_canvas`` (the "grown" columns) the smallest of the windows 8, 16, 32, ... that
holds the draft; the AR model one position against the cache.

  python benchmarks/sampling_throughput.py                        # small config, n = 16..256
  python benchmarks/sampling_throughput.py --lengths=16,32,64 --batches=1,32 --repeats=2 \
      --out=benchmarks/sampling_throughput
"""

import dataclasses
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from flax import nnx

from semdiff import config_files
from semdiff import model as model_lib
from semdiff import sampling
from semdiff.data.tokenizer import EOS_ID

_VARIANT = flags.DEFINE_string("variant", "small", "Variant of configs/default.py (architecture).")
_LENGTHS = flags.DEFINE_list("lengths", ["16", "32", "64", "128", "256"], "Lengths n.")
_BATCHES = flags.DEFINE_list("batches", ["1", "32"], "Batch sizes.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per setting (the best is kept).")
_OUT = flags.DEFINE_string("out", "", "Write OUT.md (table) and OUT.png (plot) if given.")


class NeverNone(nnx.Module):
  """An insertion model whose `none` logit is -inf: every gap inserts every step."""

  def __init__(self, inner: model_lib.InsertionTransformer):
    self.inner = inner
    self.cfg = inner.cfg

  @property
  def none_id(self) -> int:
    return self.inner.none_id

  def __call__(self, tokens, segment_ids, positions):
    logits = self.inner(tokens, segment_ids, positions)
    return logits.at[..., self.none_id].set(-jnp.inf)


class NeverEos(nnx.Module):
  """A causal model whose EOS logit is -inf: it writes until the cap."""

  def __init__(self, inner: model_lib.CausalTransformer):
    self.inner = inner
    self.cfg = inner.cfg

  def init_cache(self, batch: int, capacity: int):
    return self.inner.init_cache(batch, capacity)

  def decode_step(self, tokens, position, cache):
    logits, cache = self.inner.decode_step(tokens, position, cache)
    return logits.at[:, EOS_ID].set(-jnp.inf), cache


def measure(model, sample_fn, cfg, batch: int, repeats: int) -> dict:
  """Best-of-``repeats`` wall time of one batch (compiled first), calls and length."""
  graphdef, params = nnx.split(model)
  run = jax.jit(lambda p, key: sample_fn(nnx.merge(graphdef, p), key, cfg, batch_size=batch))
  key = jax.random.key(0)
  compiled = run.lower(params, key).compile()
  best = math.inf
  for r in range(repeats):
    t = time.time()
    out = jax.block_until_ready(compiled(params, jax.random.fold_in(key, r)))
    best = min(best, time.time() - t)
  out = jax.device_get(out)
  return {"seconds": best, "calls": float(np.mean(out.calls)),
          "length": float(np.mean(out.length)),
          "tokens_per_s": float(np.sum(out.length)) / best}


def run_all(config, lengths, batches, repeats) -> list[dict]:
  vocab = int(config.data.vocab_size)
  model_cfg = model_lib.ModelConfig.from_config(config.model, vocab)
  insertion = NeverNone(model_lib.build("insertion", model_cfg))
  causal = NeverEos(model_lib.build("causal", model_cfg))
  rows = []
  for n in lengths:
    # Greedy: sampling adds the same small cost to both; the forced outputs decide the length.
    cfg = sampling.SamplerConfig(temperature=0.0, max_len=n, max_steps=n + 1)
    grown_cfg = dataclasses.replace(cfg, grow_canvas=True)
    for batch in batches:
      semdiff = measure(insertion, sampling.sample, cfg, batch, repeats)
      grown = measure(insertion, sampling.sample, grown_cfg, batch, repeats)
      ar = measure(causal, sampling.sample_causal_cached, cfg, batch, repeats)
      row = {"n": n, "batch": batch, "semdiff": semdiff, "grown": grown, "ar": ar}
      rows.append(row)
      print(f"n={n:4d} batch={batch:3d} | semdiff {semdiff['calls']:5.1f} calls "
            f"{semdiff['tokens_per_s']:10,.0f} tok/s, grown {grown['tokens_per_s']:10,.0f} "
            f"tok/s | AR {ar['calls']:6.1f} calls {ar['tokens_per_s']:10,.0f} tok/s", flush=True)
  return rows


def table(rows) -> str:
  lines = ["| n | batch | semdiff calls | AR calls | 2·log2 n | semdiff s/batch | "
           "grown s/batch | AR s/batch | semdiff tokens/s | grown tokens/s | AR tokens/s | "
           "semdiff / AR | grown / AR |",
           "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
  for r in rows:
    s, g, a = r["semdiff"], r["grown"], r["ar"]
    lines.append(f"| {r['n']} | {r['batch']} | {s['calls']:.0f} | {a['calls']:.0f} | "
                 f"{2 * math.log2(r['n']):.1f} | {s['seconds']:.3f} | {g['seconds']:.3f} | "
                 f"{a['seconds']:.3f} | {s['tokens_per_s']:,.0f} | {g['tokens_per_s']:,.0f} | "
                 f"{a['tokens_per_s']:,.0f} | {s['tokens_per_s'] / a['tokens_per_s']:.2f}× | "
                 f"{g['tokens_per_s'] / a['tokens_per_s']:.2f}× |")
  return "\n".join(lines)


def plot(rows, path) -> bool:
  """Model calls vs length with n, 2·log2 n and log2 n; False if matplotlib is missing."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  ns = sorted({r["n"] for r in rows})
  first = {r["n"]: r for r in rows if r["batch"] == rows[0]["batch"]}
  grid = np.linspace(min(ns), max(ns), 200)
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(grid, grid, ":", color="gray", label="n")
  ax.plot(grid, 2 * np.log2(grid), "--", color="gray", label="2·log2 n")
  ax.plot(grid, np.log2(grid), "-.", color="gray", label="log2 n")
  ax.plot(ns, [first[n]["ar"]["calls"] for n in ns], "o-", label="AR (KV cache)")
  ax.plot(ns, [first[n]["semdiff"]["calls"] for n in ns], "s-",
          label="semdiff (every gap inserts)")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log", base=2)
  ax.set_xlabel("sequence length n (tokens)")
  ax.set_ylabel("model calls per sample")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return True


def main(argv):
  del argv
  config = config_files.load(variant=_VARIANT.value)
  lengths = [int(x) for x in _LENGTHS.value]
  batches = [int(x) for x in _BATCHES.value]
  print(f"{_VARIANT.value} architecture: d_model {config.model.d_model}, "
        f"{config.model.num_layers} layers, vocab {config.data.vocab_size}; "
        f"{jax.devices()[0].platform} x{jax.device_count()}, {os.cpu_count()} CPU cores",
        flush=True)
  rows = run_all(config, lengths, batches, _REPEATS.value)
  text = table(rows)
  print(text)
  if _OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value + ".md", "w") as f:
      f.write(text + "\n")
    if not plot(rows, _OUT.value + ".png"):
      print("matplotlib is not installed: no plot (pip install matplotlib).")


if __name__ == "__main__":
  app.run(main)
