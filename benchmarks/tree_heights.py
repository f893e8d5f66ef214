r"""Tree heights (= parallel insertion steps) per scorer on the grammar corpus.

For every scorer in `semdiff.scorers.names()`, at token level and at word level,
computes the height of each validation sentence's Cartesian tree (the number
of insertion steps that generate it, before the final all-`none` step) and
prints Markdown tables by length bucket: mean and p95 height per scorer next to
2·log2 n and ceil(log2(n + 1)) at the bucket's mean length n (n = tokens).
Also prints the corpus statistics: vocabulary, sentence lengths, and the true
entropy per sentence and per token with its standard error.

The data, tokenizer and scorer settings are those of the default config
(`configs/default.py`, overridable with ``--config.data.vocab_size=...``): the
validation sentences are the ones the training job evaluates on, and a
tokenizer is trained in a temporary folder exactly as the job trains it,
unless ``--tokenizer`` names an existing ``.model`` file.

  python benchmarks/tree_heights.py [--num_sentences=5000] [--word_level=both]
      [--tokenizer=workdirs/default/tokenizer/spm.model] [--out=heights.md]

Takes about half a minute on 2 CPU cores.
"""

import concurrent.futures
import dataclasses
import functools
import os
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

from semdiff import model as model_lib
from semdiff import noising
from semdiff import scorers
from semdiff.data import embedding_table
from semdiff.data import grammar as grammar_lib
from semdiff.data import pipeline
from semdiff.data import tokenizer as tokenizer_lib

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                               "configs", "default.py")

_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Config whose data and scorer settings are measured.")
_NUM_SENTENCES = flags.DEFINE_integer(
    "num_sentences", 5000, "Validation sentences measured (and used for the entropy).")
_WORD_LEVEL = flags.DEFINE_enum(
    "word_level", "both", ["both", "false", "true"],
    "Token-level scoring (false), word-level (true), or a table for each (both).")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", "", "An existing SentencePiece .model; empty trains one in a temporary folder.")
_OUT = flags.DEFINE_string("out", "", "Also write the Markdown report to this file.")

_ELEMENTS_PER_CHUNK = 40_000_000


def get_tokenizer(config) -> tokenizer_lib.Tokenizer:
  """The --tokenizer model (with counts), or one trained as the training job trains it."""
  if _TOKENIZER.value:
    tok = tokenizer_lib.Tokenizer.load(_TOKENIZER.value)
    if tok.counts is None:  # counted in memory; nothing is written beside the user's model
      tok.counts = tokenizer_lib.count_tokens(
          tok, pipeline.tokenizer_texts(config)(), int(config.data.tokenizer_sentences))
    return tok
  with tempfile.TemporaryDirectory() as tmp:
    return tokenizer_lib.train_tokenizer(
        pipeline.tokenizer_texts(config)(), os.path.join(tmp, "spm.model"),
        vocab_size=int(config.data.vocab_size), model_type=config.data.tokenizer_type,
        max_sentences=int(config.data.tokenizer_sentences))


@functools.partial(jax.jit, static_argnames="scorer_cfgs")
def heights(tokens, mask, rng, stats, scorer_cfgs):
  """int32 [S, B]: tree height of every row under each of the S scorer configs.

  One compiled function for all configs: on a small CPU, compiling is most of the cost.
  """
  scores = jnp.concatenate([scorers.significance(tokens, mask, rng, stats, cfg)
                            for cfg in scorer_cfgs])
  masks = jnp.tile(mask, (len(scorer_cfgs), 1))
  depth = noising.insertion_depth(scores, masks)
  return noising.tree_height(depth, masks).reshape(len(scorer_cfgs), -1)


def all_heights(tokens, mask, rng, stats, scorer_cfgs) -> np.ndarray:
  """int32 [S, B] heights, in chunks of rows of one shape (one compile, bounded memory)."""
  num, length = tokens.shape
  # The depth computation holds a few [S * rows, L, L] arrays: keep each near 40M elements.
  rows = max(64, _ELEMENTS_PER_CHUNK // (len(scorer_cfgs) * length * length))
  rows = min(rows, num)
  out = []
  for start in range(0, num, rows):
    t, m = tokens[start:start + rows], mask[start:start + rows]
    pad = rows - len(t)  # the last chunk is padded with empty rows, so the shape never changes
    t = np.concatenate([t, np.zeros((pad, length), t.dtype)])
    m = np.concatenate([m, np.zeros((pad, length), bool)])
    h = heights(jnp.asarray(t), jnp.asarray(m), jax.random.fold_in(rng, start), stats,
                scorer_cfgs)
    out.append(np.asarray(h)[:, :rows - pad])
  return np.concatenate(out, axis=1)


def scorer_config(config, name: str, word_level: bool) -> scorers.ScorerConfig:
  """``config.scorer`` (mix settings, tie-break seed) with this name and level."""
  base = scorers.ScorerConfig.from_config(config.scorer)
  return dataclasses.replace(base, name=name, word_level=word_level).validate()


def height_table(config, n, measured: dict[str, np.ndarray], word_level: bool) -> list[str]:
  """Markdown lines: one row per length bucket, one column per scorer.

  Args:
    n: int [B], tokens per sentence; measured: scorer name -> int [B] heights.
  """
  names = list(measured)
  max_len = int(config.data.max_len)
  # Inclusive token-count ranges 1-3, 4-7, 8-15, ..., the last one ending at max_len.
  rows = [(1, min(3, max_len))]
  while rows[-1][1] < max_len:
    lo = rows[-1][1] + 1
    rows.append((lo, min(2 * lo - 1, max_len)))
  rows.append((1, max_len))
  level = "word" if word_level else "token"
  lines = [
      f"Tree height by length, {level}-level scoring: mean / p95 over sentences "
      "(n = tokens; reference columns at the bucket's mean n)",
      "",
      "| n | sentences | mean n | " + " | ".join(names) + " | 2·log2 n | ⌈log2(n+1)⌉ |",
      "|---|--:|--:|" + "--:|" * len(names) + "--:|--:|",
  ]
  for lo, hi in rows:
    sel = (n >= lo) & (n <= hi)
    if not sel.any():
      continue
    label = "all" if (lo, hi) == (1, max_len) else f"{lo}–{hi}" if lo < hi else f"{lo}"
    mean_n = float(n[sel].mean())
    cells = [f"{measured[name][sel].mean():.1f} / {np.percentile(measured[name][sel], 95):.0f}"
             for name in names]
    lines.append(f"| {label} | {int(sel.sum())} | {mean_n:.1f} | " + " | ".join(cells)
                 + f" | {2 * np.log2(mean_n):.1f} | {int(np.ceil(np.log2(mean_n + 1)))} |")
  return lines


def corpus_lines(config, tok, texts, tokens, mask, est: dict) -> list[str]:
  """Markdown lines of corpus statistics; ``est`` is `grammar.entropy_estimate`'s dict."""
  grammar = grammar_lib.default_grammar()
  words = np.array([len(t.split()) for t in texts])
  pieces = np.array([len(ids) for ids in tok.encode_batch(texts)])
  kept_words = np.where(mask, tok.word_ids(tokens), -1).max(axis=1) + 1
  per_token = est["nats_per_sentence"] / pieces.mean()
  return [
      f"Corpus: grammar (data.seed={config.data.seed}), the first {len(texts)} validation "
      f"sentences; the {len(tokens)} with at most {config.data.max_len} tokens "
      "(data.max_len) are measured in the height tables.",
      "",
      "| statistic | value |",
      "|---|--:|",
      f"| vocabulary, words (grammar terminals, punctuation included) | "
      f"{len(grammar.vocabulary)} |",
      f"| vocabulary, tokenizer pieces ({config.data.tokenizer_type}; 4 specials and 256 byte "
      f"pieces included) | {tok.vocab_size} |",
      f"| mean sentence length, words (exact expectation {grammar.expected_length():.2f}) | "
      f"{words.mean():.2f} |",
      f"| mean sentence length, tokens | {pieces.mean():.2f} |",
      f"| tokens per word | {mask.sum() / kept_words.sum():.3f} |",
      f"| true entropy, nats per sentence | {est['nats_per_sentence']:.2f} ± "
      f"{est['nats_per_sentence_se']:.2f} |",
      f"| true entropy, nats per word | {est['nats_per_token']:.3f} ± "
      f"{est['nats_per_token_se']:.3f} |",
      f"| true entropy, nats per token | {per_token:.3f} ± "
      f"{est['nats_per_sentence_se'] / pieces.mean():.3f} |",
      f"| derivation entropy (upper bound), nats per sentence | "
      f"{est['derivation_entropy']:.2f} |",
      "",
      f"Entropy: `grammar.entropy_estimate('validation', num={est['num_sentences']})`, a Monte "
      "Carlo mean over the grammar module's own validation stream (same distribution as the "
      "sentences above, not the same sentences), ± one standard error. Per word counts "
      "punctuation as words, as the grammar does; per token is nats per sentence over the "
      "mean tokens per sentence above (error of the numerator only).",
  ]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if _NUM_SENTENCES.value < 2:
    raise app.UsageError(f"--num_sentences={_NUM_SENTENCES.value} must be at least 2.")
  logging.set_verbosity(logging.WARNING)
  t0 = time.time()
  config = _CONFIG.value
  num = _NUM_SENTENCES.value
  with config.unlocked():
    config.data.name = "grammar"
    config.data.eval_examples = num
  try:
    tok = get_tokenizer(config)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"tree_heights: error: {e}")
  scorer_cfg = scorers.ScorerConfig.from_config(config.scorer)
  # The embedding scorers' tables: the fixed corpus table (as the job builds it), and for
  # model_embedding the input embedding of an untrained model of the config's size.
  table, idf = embedding_table.compute(
      tok, pipeline.tokenizer_texts(config)(), dim=scorer_cfg.embedding_dim,
      window=scorer_cfg.embedding_window, max_sentences=int(config.data.tokenizer_sentences))
  stats = scorers.ScoringStats(unigram_logprob=jnp.asarray(tok.unigram_logprob()),
                               word_start=jnp.asarray(tok.word_start_table),
                               embedding=jnp.asarray(table), idf=jnp.asarray(idf))
  untrained = model_lib.build(config.model_kind, model_lib.ModelConfig.from_config(
      config.model, tok.vocab_size), seed=int(config.seed))
  model_stats = stats.replace(embedding=untrained.token_embedding())
  # The examples the training job evaluates on: same sentences, same encoding and length cut.
  texts = pipeline.texts(config, "validation", num)
  encode = pipeline.Encode(tok, int(config.data.max_len))
  examples = [ex for ex in map(encode, texts) if ex is not None]
  if not examples:
    sys.exit(f"tree_heights: error: none of the {num} sentences fits in data.max_len="
             f"{config.data.max_len} tokens; raise --config.data.max_len.")
  tokens = np.stack([ex["tokens"] for ex in examples])
  mask = np.stack([ex["mask"] for ex in examples])

  levels = {"both": (False, True), "false": (False,), "true": (True,)}[_WORD_LEVEL.value]
  names = scorers.names()
  cfgs = tuple(scorer_config(config, name, w) for w in levels for name in names)
  # The CKY passes of the entropy estimate run in a thread while XLA compiles and runs.
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    entropy = pool.submit(grammar_lib.entropy_estimate, "validation", num=num,
                          seed=int(config.data.seed))
    by_cfg = {}
    for on_model in (False, True):
      group = tuple(c for c in cfgs if (c.table_source == "model") == on_model)
      if group:
        by_cfg.update(zip(group, all_heights(tokens, mask, jax.random.key(int(config.seed)),
                                             model_stats if on_model else stats, group)))
    measured = np.stack([by_cfg[c] for c in cfgs])
    est = entropy.result()

  lines = ["# Tree heights on the grammar corpus", ""]
  lines += corpus_lines(config, tok, texts, tokens, mask, est)
  n = mask.sum(axis=1)
  for i, word_level in enumerate(levels):
    table = dict(zip(names, measured[i * len(names):(i + 1) * len(names)]))
    lines += [""] + height_table(config, n, table, word_level)
  lines += ["", f"`mix` = {1 - config.scorer.mix_weight:g}·{config.scorer.mix_base} + "
            f"{config.scorer.mix_weight:g}·balanced (normalised ranks). `embedding_loo` and "
            f"`embedding_greedy` use the fixed corpus table (PPMI + SVD, d="
            f"{scorer_cfg.embedding_dim}, window {scorer_cfg.embedding_window}); "
            "`model_embedding` the input embedding of an untrained model (training refreshes "
            "it). Heights count insertion "
            f"steps, not the final all-`none` step. Measured in {time.time() - t0:.0f} s "
            f"({jax.devices()[0].platform})."]
  report = "\n".join(lines) + "\n"
  print(report, end="")
  if _OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
      f.write(report)


if __name__ == "__main__":
  app.run(main)
