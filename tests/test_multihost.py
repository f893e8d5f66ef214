"""Multi-process training: 2 local processes x 4 fake CPU devices, jax.distributed on loopback.

Both processes run the real entry point (``python -m semdiff.main --distributed ...``,
collectives through gloo). Each reads its own shard of the data (texts i, i + 2, ...), so
the global batch of a step is process 0's rows then process 1's. The losses process 0 writes
to ``metrics.jsonl`` must equal those of one process that builds that same global batch
itself. Only process 0 writes metrics and samples; the checkpoint is saved by both together.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import portpicker
import pytest

from semdiff import sharding
from semdiff import train
from semdiff.data import pipeline
import test_sharding  # tests/ is on sys.path under pytest

ROOT = test_sharding.ROOT
NUM_STEPS = 4
OVERRIDES = {
    "data.tokenizer_path": test_sharding.TOKENIZER,
    "model.num_layers": 1,
    "train.num_steps": NUM_STEPS,
    "train.log_every": 1,
    "train.eval_every": 1000,
    "train.checkpoint_every": 1000,
    "train.sample_every": 1000,
    "train.num_samples": 8,
    "data.eval_examples": 16,
}


def launch(workdir, process_id, port):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  cmd = [sys.executable, "-m", "semdiff.main", "--config=configs/default.py:tiny",
         f"--workdir={workdir}", "--distributed", f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2", f"--process_id={process_id}"]
  cmd += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def reference_losses(tmp_path):
  """Losses of steps 1..NUM_STEPS in this process (8 devices), on the 2-process global batch."""
  config = test_sharding.tiny_config()
  for key, value in OVERRIDES.items():
    group, field = key.split(".")
    config[group][field] = value
  tok = test_sharding.tokenizer_lib.Tokenizer.load(test_sharding.TOKENIZER)
  exp = train.build_experiment(config, str(tmp_path), tokenizer=tok)
  state = train.init_state(exp)
  step_fn = train.make_train_step(exp)
  shards = [pipeline.train_iterator(config, tok, process_index=i, process_count=2)
            for i in range(2)]
  out = []
  for _ in range(NUM_STEPS):
    parts = [next(s) for s in shards]
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    state, metrics = step_fn(state, sharding.global_batch(batch, exp.mesh))
    out.append(float(jax.device_get(metrics["loss"])))
  return out


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  workdir = str(tmp_path / "run")
  port = portpicker.pick_unused_port()
  procs = [launch(workdir, i, port) for i in range(2)]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=420)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} failed:\n{out[-3000:]}"
  # Process 0 reports; process 1 trains silently.
  assert f"step {NUM_STEPS}/{NUM_STEPS}" in outputs[0]
  assert "step " not in outputs[1] and "sample 0" not in outputs[1], outputs[1][-2000:]
  assert "mesh {'data': 8, 'fsdp': 1}" in outputs[0]

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  got = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
  # Step 1 (compilation) is left out of the logged windows; steps 2.. are one step each.
  assert sorted(got) == list(range(2, NUM_STEPS + 1)), sorted(got)
  want = reference_losses(tmp_path / "ref")
  for step in got:
    assert got[step] == pytest.approx(want[step - 1], rel=1e-5), (step, got, want)
  # One checkpoint, written by both processes together; samples by process 0.
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(NUM_STEPS)]
  assert os.path.exists(os.path.join(workdir, "samples", f"step_{NUM_STEPS:08d}.jsonl"))
