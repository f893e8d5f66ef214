"""Text datasets of the TensorFlow Datasets catalog, read without TensorFlow.

A dataset is prepared once by its TFDS builder as ArrayRecord files in `data.tfds_data_dir`
(`builder.download_and_prepare(file_format="array_record")`, by process 0; the others wait)
and then read by random access through `builder.as_data_source(split)`, which is what
`tfds.data_source` does. Records are dicts of NumPy values; `Text` features come back as
UTF-8 bytes.

Named datasets (`data.name`), with the feature that holds their text:
  lm1b              `lm1b`, "text": one sentence per record; no validation split (the test
                    split serves for validation and test).
  tiny_shakespeare  `tiny_shakespeare`, "text": one record per split holding the whole text,
                    cut into lines or paragraphs by `data.unit`.
  wikitext103       `huggingface:wikitext/wikitext-103-raw-v1`, "text": one line of
                    Wikipedia per record (blank lines are counted and skipped); TFDS builds it
                    from the Hugging Face hub, which needs `pip install datasets`.
  c4                `c4/en`, "text": one web page per record; preparing it is an Apache Beam
                    job over Common Crawl (hundreds of GB): prepare it on a cluster.
Any other text dataset of the catalog: `data.name = "tfds:<name>[/<config>][:<version>]"` with
`data.text_key` naming its text feature.

Offline, a dataset that is not prepared fails in seconds: the download hosts are probed first
(TFDS's own retries take minutes), and `data.tfds_download = False` never downloads.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

from absl import logging

PREFIX = "tfds:"
SPLITS = ("train", "validation", "test")
# The last share of the training split held out when a dataset has no held-out split.
HOLDOUT = "1%"
_PROBE_TIMEOUT_S = 3.0
_POLL_S = 2.0
_WAIT_LOG_S = 60.0
_WAIT_TIMEOUT_S = 48 * 3600.0  # preparing c4 takes long; other processes wait for process 0


@dataclasses.dataclass(frozen=True)
class CatalogEntry:
  """A text dataset of the TFDS catalog.

  Attributes:
    tfds_name: the name `tfds.builder` takes ("c4/en", "huggingface:...").
    text_key: the feature holding the text.
    documents: the records are a few whole texts (one per split), cut into `data.unit`s.
    needs: modules that preparing it imports beyond tensorflow-datasets.
    note: what preparing it takes, for messages.
  """

  tfds_name: str
  text_key: str = "text"
  documents: bool = False
  needs: tuple[str, ...] = ()
  note: str = ""


CATALOG = {
    "lm1b": CatalogEntry("lm1b", note="downloads 1.7 GB from statmt.org"),
    "tiny_shakespeare": CatalogEntry(
        "tiny_shakespeare", documents=True, needs=("tensorflow",),
        note="downloads 1 MB from GitHub; its builder reads with tf.io.gfile"),
    "wikitext103": CatalogEntry(
        "huggingface:wikitext/wikitext-103-raw-v1", needs=("datasets",),
        note="downloads 190 MB from the Hugging Face hub"),
    "c4": CatalogEntry(
        "c4/en", needs=("apache_beam",),
        note="an Apache Beam job over Common Crawl, hundreds of GB: prepare it on a cluster "
        "(Dataflow) with file_format=array_record"),
}


def entry_for(name: str, text_key: str = "") -> CatalogEntry | None:
  """The catalog entry of ``data.name``, None if it names no TFDS dataset."""
  if name.startswith(PREFIX):
    tfds_name = name[len(PREFIX):].strip()
    if not tfds_name:
      raise ValueError(f"data.name={name!r} names no dataset: use tfds:<name>, e.g. "
                       "tfds:ag_news_subset with --config.data.text_key=description.")
    return CatalogEntry(tfds_name, text_key=text_key or "text")
  entry = CATALOG.get(name)
  if entry is not None and text_key:
    entry = dataclasses.replace(entry, text_key=text_key)
  return entry


class DataSource:
  """The records of one split of a prepared TFDS dataset, and how to read their text.

  Attributes:
    records: random-access sequence of dicts (`ArrayRecordDataSource`).
    text_key: the key of the text in each record.
    entry: the catalog entry.
    split: the TFDS split read, e.g. "test" or "train[:99%]".
  """

  def __init__(self, records: Sequence[Any], entry: CatalogEntry, split: str):
    self.records = records
    self.text_key = entry.text_key
    self.entry = entry
    self.split = split


def data_source(entry: CatalogEntry, split: str, *, data_dir: str = "",
                download: bool = True) -> DataSource:
  """The records of ``split`` ("train", "validation" or "test") of a TFDS dataset.

  Prepares the dataset first where it is missing (process 0 only; the others wait).
  """
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; choose one of {', '.join(SPLITS)}.")
  builder = _builder(entry, data_dir)
  if not builder.is_prepared():
    _prepare(builder, entry, download=download)
  features = builder.info.features
  if entry.text_key not in features:
    text_like = [k for k, f in features.items() if _is_text(f)]
    raise ValueError(
        f"{entry.tfds_name} has no feature {entry.text_key!r}; its text features are "
        f"{text_like or 'none'}: set --config.data.text_key to one of them.")
  tfds_split = _split_for(builder, entry, split)
  try:
    records = builder.as_data_source(split=tfds_split)
  except (ValueError, NotImplementedError) as e:
    raise ValueError(
        f"{entry.tfds_name} in {builder.data_dir} cannot be read by random access ("
        f"{_first_line(e)}): it was prepared in another file format (tfds.load's tfrecord); "
        "prepare it again with file_format='array_record' (delete that folder and rerun), or "
        "convert it with `tfds convert_format --out_file_format=array_record`.") from None
  logging.info("TFDS %s split %s: %d records in %s", entry.tfds_name, tfds_split, len(records),
               builder.data_dir)
  return DataSource(records, entry, tfds_split)


def _tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"TFDS datasets need tensorflow-datasets ({e}): pip install "
                      "tensorflow-datasets, or use data.name=text_files.") from None
  return tfds


def _builder(entry: CatalogEntry, data_dir: str):
  tfds = _tfds()
  if entry.tfds_name.startswith("huggingface:") and importlib.util.find_spec("datasets") is None:
    # TFDS's Hugging Face builder cannot even be opened without it (and prints a banner).
    raise ImportError(f"{entry.tfds_name} is read through TFDS's Hugging Face builder, which "
                      "needs the datasets package: pip install datasets (preparing it also "
                      "needs network), or use data.name=text_files.")
  # No file_format here: a dataset already prepared in another format could not be opened to
  # say so. download_and_prepare gets it instead.
  kwargs = {"data_dir": os.path.expanduser(data_dir) if data_dir else None}
  try:
    try:
      return tfds.builder(entry.tfds_name, **kwargs)
    except tfds.core.registered.DatasetNotFoundError:
      # Builders of the older layout (c4, ...) register when their module is imported.
      import tensorflow_datasets.text  # pylint: disable=g-import-not-at-top,unused-import
      return tfds.builder(entry.tfds_name, **kwargs)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(
        f"{entry.tfds_name!r} is not a dataset of the TFDS catalog "
        f"(tensorflow-datasets {tfds.__version__}): check the name at "
        "https://www.tensorflow.org/datasets/catalog, or use data.name=text_files.") from None
  except ImportError as e:
    raise ImportError(f"the TFDS builder of {entry.tfds_name} needs a module that is not "
                      f"installed ({e}): install it, or use data.name=text_files.") from None


def _is_text(feature) -> bool:
  dtype = getattr(feature, "np_dtype", None)
  return type(feature).__name__ == "Text" or (dtype is not None and dtype.kind in "SUO")


def _split_for(builder, entry: CatalogEntry, split: str) -> str:
  available = set(builder.info.splits)
  if "train" not in available:
    raise ValueError(f"{entry.tfds_name} has no train split (it has {sorted(available)}).")
  held_out = [s for s in ("validation", "test") if s in available]
  if split == "train":
    return "train" if held_out else f"train[:-{HOLDOUT}]"
  if split in available:
    return split
  return held_out[0] if held_out else f"train[-{HOLDOUT}:]"


def _prepare(builder, entry: CatalogEntry, *, download: bool) -> None:
  """Downloads and prepares ``builder`` as ArrayRecord, or fails in seconds saying why."""
  where = f"{entry.tfds_name} is not prepared in {builder.data_dir}"
  if not download:
    raise FileNotFoundError(
        f"{where} and data.tfds_download is False: prepare it on a machine with network "
        f"(python -m semdiff.data.tfds_sources --name=... --data_dir=...) and copy the folder, "
        f"or set --config.data.tfds_download=True.")
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    _wait_until_prepared(builder, entry)
    return
  missing = [m for m in entry.needs if importlib.util.find_spec(m) is None]
  if missing:
    raise ImportError(
        f"{where}, and preparing it ({entry.note}) needs {', '.join(missing)}, which is not "
        f"installed: pip install {' '.join(_pip_name(m) for m in missing)} for the one-time "
        "preparation (reading it does not need that), or prepare it elsewhere and copy the "
        "folder.")
  unreachable = _unreachable(_download_urls(builder, entry))
  if unreachable:
    raise ConnectionError(
        f"{where}, and its download host {unreachable} (no network?): prepare it on a "
        f"machine with network (python -m semdiff.data.tfds_sources --name={entry.tfds_name} "
        f"--data_dir=DIR) and copy DIR here, or use data.name=text_files.")
  logging.info("Preparing %s in %s (%s).", entry.tfds_name, builder.data_dir, entry.note)
  start = time.time()
  builder.download_and_prepare(file_format="array_record")
  logging.info("Prepared %s in %.0f s.", entry.tfds_name, time.time() - start)


def _pip_name(module: str) -> str:
  return {"tensorflow": "tensorflow-cpu", "apache_beam": "apache-beam"}.get(module, module)


def _wait_until_prepared(builder, entry: CatalogEntry) -> None:
  start = last_log = time.monotonic()
  while not builder.is_prepared():
    now = time.monotonic()
    if now - start > _WAIT_TIMEOUT_S:
      raise TimeoutError(f"waited {now - start:.0f} s for process 0 to prepare "
                         f"{entry.tfds_name} in {builder.data_dir}: look for its error.")
    if now - last_log > _WAIT_LOG_S:
      logging.info("Still waiting for process 0 to prepare %s (%.0f s).", entry.tfds_name,
                   now - start)
      last_log = now
    time.sleep(_POLL_S)


def _download_urls(builder, entry: CatalogEntry) -> list[str]:
  if entry.tfds_name.startswith("huggingface:"):
    return ["https://huggingface.co"]
  try:
    return list(builder.url_infos or ())
  except Exception:  # pylint: disable=broad-except
    return []  # a builder without checksums: TFDS reports its own errors


def _unreachable(urls: Sequence[str], timeout_s: float = _PROBE_TIMEOUT_S) -> str | None:
  """"host:port (why)" of the first download host that does not answer; None if all do.

  Skipped behind a proxy (the environment's *_proxy variables), which only requests uses.
  """
  if any(os.environ.get(v) for v in ("https_proxy", "HTTPS_PROXY", "http_proxy",
                                      "HTTP_PROXY", "all_proxy", "ALL_PROXY")):
    return None
  hosts = []
  for url in urls:
    parsed = urllib.parse.urlparse(url)
    if parsed.hostname and parsed.scheme in ("http", "https"):
      host = (parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80))
      if host not in hosts:
        hosts.append(host)
  for host, port in hosts[:3]:
    error = _connect(host, port, timeout_s)
    if error:
      return f"{host}:{port} is unreachable ({error})"
  return None


def _connect(host: str, port: int, timeout_s: float) -> str | None:
  """None if a TCP connection opens within ``timeout_s``, else why not."""
  result = []

  def attempt():
    try:
      socket.create_connection((host, port), timeout=timeout_s).close()
      result.append(None)
    except OSError as e:
      result.append(str(e) or type(e).__name__)

  # Name resolution ignores socket timeouts; a daemon thread bounds it too.
  thread = threading.Thread(target=attempt, daemon=True)
  thread.start()
  thread.join(timeout_s + 0.5)
  return result[0] if result else f"no answer in {timeout_s:g} s"


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:200] if text else type(e).__name__


def main(argv: Sequence[str]) -> None:
  """Prepares a dataset (run on a machine with network): --name=lm1b --data_dir=DIR."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument("--name", required=True,
                      help=f"one of {sorted(CATALOG)} or tfds:<catalog name>")
  parser.add_argument("--data_dir", default="", help="TFDS data_dir (default: TFDS's own)")
  args = parser.parse_args(argv)
  entry = entry_for(args.name)
  if entry is None:
    parser.error(f"unknown dataset {args.name!r}: use one of {sorted(CATALOG)} or "
                 "tfds:<catalog name>.")
  try:
    builder = _builder(entry, args.data_dir)
    if builder.is_prepared():
      print(f"{entry.tfds_name} is already prepared in {builder.data_dir}")
      return
    _prepare(builder, entry, download=True)
  except (ValueError, ImportError, OSError) as e:  # ConnectionError is an OSError
    parser.exit(1, f"{parser.prog}: error: {e}\n")
  print(f"prepared {entry.tfds_name} in {builder.data_dir}")


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top
  main(sys.argv[1:])
