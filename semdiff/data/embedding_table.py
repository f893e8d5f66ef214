"""A fixed token-embedding table and IDF weights, computed once from the corpus.

The `embedding_*` scorers and the sampler's semantic controls measure a sentence by
E(x) = the IDF-weighted mean of its tokens' embeddings. With
``scorer.embedding_source=fixed`` the table is this module's: the truncated SVD of
the positive pointwise mutual information (PPMI) of token co-occurrences within a
window, over the tokenizer's training sample (the same texts the unigram counts
come from). It is deterministic, needs no training run, and takes a few seconds.

IDF weights come from document frequencies over the same texts:
``idf[v] = log((1 + N) / (1 + df[v])) + 1`` (N texts), and 0 for the special ids,
so pad/bos/eos/unk never move an embedding.

Cached beside the tokenizer, written atomically like the counts:

    <dir>/<name>.embedding.npz   table float32 [V, D], idf float32 [V], dim, window.

A cache made with another ``dim`` or ``window`` is recomputed.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
from absl import logging

from semdiff.data import tokenizer as tokenizer_lib

_CHUNK = 4096  # texts per encode_batch call


def cache_path_for(model_path: str) -> str:
  """`<dir>/<name>.model` -> `<dir>/<name>.embedding.npz`."""
  root, ext = os.path.splitext(model_path)
  return (root if ext == ".model" else model_path) + ".embedding.npz"


def cooccurrence(id_lists: Iterable[list[int]], vocab_size: int, window: int):
  """(co-occurrence counts, document frequencies) of encoded texts.

  Args:
    id_lists: token ids of each text.
    vocab_size: V.
    window: tokens i and j co-occur when 0 < |i - j| <= window (symmetric counts).

  Returns:
    (scipy.sparse.csr_matrix float64 [V, V], int64 [V] texts containing each id).
  """
  rows, cols = [], []
  df = np.zeros(vocab_size, np.int64)
  for ids in id_lists:
    ids = np.asarray(ids, np.int64)
    if not ids.size:
      continue
    df[np.unique(ids)] += 1
    for offset in range(1, min(window, len(ids) - 1) + 1):
      rows += [ids[:-offset], ids[offset:]]
      cols += [ids[offset:], ids[:-offset]]
  if rows:
    r, c = np.concatenate(rows), np.concatenate(cols)
  else:
    r = c = np.zeros(0, np.int64)
  counts = scipy.sparse.coo_matrix((np.ones(len(r)), (r, c)), shape=(vocab_size, vocab_size))
  return counts.tocsr(), df


def ppmi_svd(counts, dim: int) -> np.ndarray:
  """float32 [V, dim]: U·sqrt(S) of the rank-``dim`` SVD of PPMI(counts).

  Rows of ids that never co-occur are 0. Signs are fixed (largest entry of each
  singular vector positive), so the table is deterministic.
  """
  counts = scipy.sparse.csr_matrix(counts, dtype=np.float64)
  vocab = counts.shape[0]
  total = counts.sum()
  out = np.zeros((vocab, dim), np.float32)
  if total == 0:
    return out
  row = np.asarray(counts.sum(axis=1)).ravel()
  coo = counts.tocoo()
  pmi = np.log(coo.data * total / (row[coo.row] * row[coo.col]))
  keep = pmi > 0
  ppmi = scipy.sparse.csr_matrix((pmi[keep], (coo.row[keep], coo.col[keep])), shape=counts.shape)
  k = min(dim, vocab - 1)
  if vocab <= 2048:
    u, s, _ = np.linalg.svd(ppmi.toarray())
    u, s = u[:, :k], s[:k]
  else:
    u, s, _ = scipy.sparse.linalg.svds(ppmi, k=k, random_state=0)
    order = np.argsort(-s)
    u, s = u[:, order], s[order]
  signs = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(u.shape[1])])
  out[:, :k] = (u * signs * np.sqrt(s)).astype(np.float32)
  return out


def idf_weights(df: np.ndarray, num_texts: int) -> np.ndarray:
  """float32 [V]: smoothed inverse document frequency, 0 on the special ids."""
  idf = np.log((1.0 + num_texts) / (1.0 + df.astype(np.float64))) + 1.0
  idf[:tokenizer_lib.NUM_SPECIALS] = 0.0
  return idf.astype(np.float32)


def compute(tokenizer: tokenizer_lib.Tokenizer, texts: Iterable[str], *, dim: int,
            window: int, max_sentences: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(table float32 [V, dim], idf float32 [V]) from ``texts`` (the first max_sentences)."""
  if dim < 1 or window < 1:
    raise ValueError(f"The embedding table needs dim >= 1 and window >= 1, got dim={dim} "
                     f"window={window}: set --config.scorer.embedding_dim/embedding_window.")
  texts = iter(itertools.islice(texts, max_sentences))
  num = 0

  def encoded():
    nonlocal num
    while chunk := list(itertools.islice(texts, _CHUNK)):
      num += len(chunk)
      yield from tokenizer.encode_batch(chunk)

  counts, df = cooccurrence(encoded(), tokenizer.vocab_size, window)
  return ppmi_svd(counts, dim), idf_weights(df, num)


def get(model_path: str, tokenizer: tokenizer_lib.Tokenizer,
        texts_fn: Callable[[], Iterable[str]], *, dim: int, window: int,
        max_sentences: int | None = None, is_writer: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """(table, idf) cached beside the tokenizer at ``model_path``; computed on first use.

  Every process computes a missing cache itself (deterministic); only the writer saves it.
  A folder that cannot be written (a user's read-only tokenizer) keeps it in memory only.
  """
  path = cache_path_for(model_path)
  if os.path.isfile(path):
    with np.load(path, allow_pickle=False) as f:
      if (int(f["dim"]), int(f["window"])) == (dim, window) and \
          f["table"].shape[0] == tokenizer.vocab_size:
        return f["table"], f["idf"]
  table, idf = compute(tokenizer, texts_fn(), dim=dim, window=window,
                       max_sentences=max_sentences)
  if is_writer:
    try:
      tokenizer_lib._write_atomic(  # pylint: disable=protected-access
          path, lambda f: np.savez(f, table=table, idf=idf, dim=dim, window=window))
    except OSError as e:
      logging.warning("could not save the embedding table beside %s (%s); it is kept in "
                      "memory only.", model_path, e)
  return table, idf
