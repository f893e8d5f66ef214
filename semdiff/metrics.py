"""Metric writing (JSON lines + TensorBoard) and the progress line.

Only process 0 writes; other processes get a writer that does nothing.
"""

import json
import math
import os
import time
from typing import Mapping, Optional

from absl import logging


class MetricWriter:
  """Scalars to ``<workdir>/metrics.jsonl`` and TensorBoard events in ``<workdir>/tb``."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.path.join(workdir, "tb"))
      except ImportError:
        logging.warning("tensorboardX is not installed: no TensorBoard events.")

  def write(self, step: int, scalars: Mapping[str, float], prefix: str = "") -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{f"{prefix}{k}": float(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        if math.isfinite(float(v)):  # TensorBoard warns on NaN; the JSON line keeps it
          self._tb.add_scalar(f"{prefix}{k}", float(v), step)

  def write_text(self, step: int, tag: str, text: str) -> None:
    if self.enabled and self._tb is not None:
      self._tb.add_text(tag, text, step)

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
  """ETA from the mean step time in this process (evaluation and sampling included)."""

  def __init__(self, start_step: int, num_steps: int):
    self.start_step = start_step
    self.num_steps = num_steps
    self.t0: Optional[float] = None
    self.first_step = start_step

  def tick(self, step: int) -> None:
    if self.t0 is None:  # start timing after the first (compiling) step
      self.t0, self.first_step = time.time(), step

  def eta(self, step: int) -> float:
    """Seconds left (nan until a step after the first has run)."""
    if self.t0 is None or step <= self.first_step:
      return float("nan")
    per_step = (time.time() - self.t0) / (step - self.first_step)
    return per_step * (self.num_steps - step)
