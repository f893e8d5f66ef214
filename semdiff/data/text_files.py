"""The user's own text files as a random-access source of texts (`data.name = "text_files"`).

`data.files` is a glob (or several, comma-separated; a folder stands for every `.txt` and
`.jsonl` file under it). The files are read once, line by line, into an index of byte ranges;
texts are then read on demand with `os.pread`, so a corpus larger than memory costs 16 bytes
per text.

What a text is:
  `.jsonl`  one text per line: the string field `data.jsonl_field` of the JSON object;
  other     (`.txt`, ...) one text per line (`data.unit = "line"`) or per paragraph, a run of
            non-blank lines (`data.unit = "paragraph"`), its line breaks kept.

Bad data is skipped and counted in `TextFiles.stats` with the first place of each reason
(`path:line`): `empty` (blank lines in line mode, empty fields), `undecodable` (not UTF-8;
in paragraph mode such a line also ends its paragraph), `bad_json`, `missing_field` (absent,
or not a string). Files without a text are counted as `empty_files`. A glob that matches no
file, or files that hold no text at all, raise one ValueError that names them.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import threading
from collections.abc import Sequence

import numpy as np

UNITS = ("line", "paragraph")
JSONL_SUFFIX = ".jsonl"
_DIR_SUFFIXES = (".txt", ".jsonl")  # what a folder in data.files stands for


@dataclasses.dataclass
class ScanStats:
  """What indexing the files found.

  Attributes:
    files: files read.
    empty_files: files that gave no text.
    texts: texts indexed.
    skipped: reason -> number of lines skipped for it.
    first: reason -> "path:line" of the first such line.
  """

  files: int = 0
  empty_files: int = 0
  texts: int = 0
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)
  first: dict[str, str] = dataclasses.field(default_factory=dict)

  def skip(self, reason: str, path: str, line: int) -> None:
    self.skipped[reason] = self.skipped.get(reason, 0) + 1
    self.first.setdefault(reason, f"{path}:{line}")


def expand(patterns: str) -> list[str]:
  """`data.files` -> the sorted, distinct files it names; ValueError if none."""
  if not patterns or not patterns.strip():
    raise ValueError("data.name=text_files needs data.files, a glob of .txt/.jsonl files: "
                     "e.g. --config.data.files='corpus/*.txt'.")
  paths = set()
  for pattern in (p.strip() for p in patterns.split(",")):
    if not pattern:
      continue
    pattern = os.path.expanduser(pattern)
    matched = glob.glob(pattern, recursive=True)
    if not matched:
      raise ValueError(f"data.files pattern {pattern!r} matches no file: give a glob of "
                       ".txt/.jsonl files that exist, e.g. --config.data.files='corpus/*.txt'.")
    for path in matched:
      if os.path.isdir(path):
        for root, _, names in os.walk(path):
          paths.update(os.path.join(root, n) for n in names if n.endswith(_DIR_SUFFIXES))
      else:
        paths.add(path)
  files = sorted(os.path.abspath(p) for p in paths)
  if not files:
    raise ValueError(f"data.files={patterns!r} names only folders without .txt/.jsonl files.")
  return files


class TextFiles(Sequence):
  """Random access to the texts of some files: `files[i] -> str`.

  Attributes:
    paths: the files, in index order.
    file_ids: int32 [n], which path each text is in.
    starts: int64 [n], byte offset of each text.
    lengths: int64 [n], byte length of each text (without the final line break).
    stats: what the scan skipped.
  """

  def __init__(self, paths: Sequence[str], *, unit: str = "line", field: str = "text"):
    if unit not in UNITS:
      raise ValueError(f"data.unit={unit!r} is not supported: use one of {UNITS}.")
    self.paths = tuple(paths)
    self.unit = unit
    self.field = field
    self.stats = ScanStats()
    ids, starts, lengths = [], [], []
    for i, path in enumerate(self.paths):
      found = self._scan(path)
      self.stats.files += 1
      self.stats.empty_files += not found
      ids.append(np.full(len(found), i, np.int32))
      spans = np.asarray(found, np.int64).reshape(-1, 2)
      starts.append(spans[:, 0])
      lengths.append(spans[:, 1])
    self.file_ids = np.concatenate(ids) if ids else np.zeros(0, np.int32)
    self.starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
    self.lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    self.stats.texts = len(self.starts)
    self._fds: dict[int, int] = {}
    self._lock = threading.Lock()

  def _scan(self, path: str) -> list[tuple[int, int]]:
    """[(start, length)] of the texts of one file, counting what it skips."""
    jsonl = path.endswith(JSONL_SUFFIX)
    found = []
    para = None  # [start, end] of the paragraph being read
    offset = 0
    try:
      f = open(path, "rb")
    except OSError as e:
      raise ValueError(f"cannot read {path} ({e.strerror}): fix its permissions or leave it "
                       "out of data.files.") from None
    with f:
      for number, raw in enumerate(f, 1):
        start, offset = offset, offset + len(raw)
        line = raw.rstrip(b"\r\n")
        end = start + len(line)
        blank = not line.strip()
        try:
          text = line.decode("utf-8")
        except UnicodeDecodeError:
          text = None
        if jsonl:
          reason = None if blank else _jsonl_problem(text, self.field)
          if blank or reason:
            self.stats.skip(reason or "empty", path, number)
          else:
            found.append((start, end - start))
        elif self.unit == "line":
          if blank:
            self.stats.skip("empty", path, number)
          elif text is None:
            self.stats.skip("undecodable", path, number)
          else:
            found.append((start, end - start))
        else:  # paragraphs: runs of decodable, non-blank lines
          if text is None:
            self.stats.skip("undecodable", path, number)
          if blank or text is None:
            if para:
              found.append((para[0], para[1] - para[0]))
            para = None
          elif para:
            para[1] = end
          else:
            para = [start, end]
    if para:
      found.append((para[0], para[1] - para[0]))
    return found

  def __len__(self) -> int:
    return len(self.starts)

  def __getitem__(self, index: int) -> str:
    if isinstance(index, slice):
      raise TypeError("TextFiles takes integer indices; slice its grain.MapDataset instead.")
    file_id = int(self.file_ids[index])
    raw = os.pread(self._fd(file_id), int(self.lengths[index]), int(self.starts[index]))
    text = raw.decode("utf-8")
    if self.paths[file_id].endswith(JSONL_SUFFIX):
      return json.loads(text)[self.field].strip()
    return text.replace("\r\n", "\n").strip()

  def _fd(self, file_id: int) -> int:
    fd = self._fds.get(file_id)
    if fd is None:
      with self._lock:
        fd = self._fds.get(file_id)
        if fd is None:
          fd = self._fds[file_id] = os.open(self.paths[file_id], os.O_RDONLY)
    return fd

  def close(self) -> None:
    with self._lock:
      for fd in self._fds.values():
        os.close(fd)
      self._fds.clear()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass

  # Picklable (grain worker processes): open files are reopened on first read.
  def __getstate__(self):
    state = dict(self.__dict__)
    state["_fds"], state["_lock"] = {}, None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()


def _jsonl_problem(text: str | None, field: str) -> str | None:
  """Why a non-blank .jsonl line gives no text, or None."""
  if text is None:
    return "undecodable"
  try:
    record = json.loads(text)
  except ValueError:
    return "bad_json"
  if not isinstance(record, dict) or not isinstance(record.get(field), str):
    return "missing_field"
  if not record[field].strip():
    return "empty"
  return None


_CACHE: dict[tuple, TextFiles] = {}
_CACHE_SIZE = 4


def load(patterns: str, *, unit: str = "line", field: str = "text") -> TextFiles:
  """The indexed files of ``patterns``, scanned once per process while they are unchanged."""
  paths = expand(patterns)
  key = (tuple((p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths), unit, field)
  files = _CACHE.get(key)
  if files is None:
    files = TextFiles(paths, unit=unit, field=field)
    if not len(files):
      raise ValueError(
          f"the {len(paths)} file(s) of data.files={patterns!r} hold no text ({_skips(files)})"
          f": check the files"
          + (f", and that their records have a string field {field!r} (data.jsonl_field)"
             if any(p.endswith(JSONL_SUFFIX) for p in paths) else "") + ".")
    while len(_CACHE) >= _CACHE_SIZE:  # a few corpora at a time (training, held-out files)
      _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = files
  return files


def _skips(files: TextFiles) -> str:
  parts = [f"{n} {reason} (first at {files.stats.first[reason]})"
           for reason, n in sorted(files.stats.skipped.items())]
  return "skipped: " + ", ".join(parts) if parts else "all empty"
