"""The launchers' --dry_run output: the exact commands, nothing run."""

import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))


def dry_run(script, *args):
  """The command lines ``launch/<script> --dry_run args`` prints, split into argv lists."""
  out = subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), "--dry_run",
                        *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  return [shlex.split(line.rstrip(" &")) for line in out.stdout.splitlines() if line.strip()]


def test_tpu_pod_stages():
  lines = dry_run("tpu_pod.py", "--name=pod", "--zone=us-central2-b", "--project=proj",
                  "--accelerator_type=v4-32", "--workdir=/mnt/shared/run", "--",
                  "--config.train.batch_size=512")
  create, tar, scp, install, run, delete = lines
  assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod",
                    "--zone=us-central2-b", "--project=proj", "--accelerator-type=v4-32",
                    "--version=tpu-ubuntu2204-base"]
  assert tar[:3] == ["tar", "czf", "/tmp/semdiff_code.tar.gz"] and tar[-3:] == ["-C", ROOT, "."]
  assert "--exclude=./.venv" in tar and "--exclude=./.git" in tar
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
  assert "pip install -q -e . 'jax[tpu]'" in install[-1] and "--worker=all" in install
  assert run[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"] and "--worker=all" in run
  assert run[-1] == ("--command=cd ~/semdiff && python3 -m semdiff.main --distributed "
                     "--config=configs/default.py:base --workdir=/mnt/shared/run "
                     "--config.train.batch_size=512")
  assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod",
                    "--zone=us-central2-b", "--project=proj", "--quiet"]


def test_tpu_pod_one_stage_and_bad_stage():
  (run,) = dry_run("tpu_pod.py", "--name=p", "--zone=z", "--workdir=/w", "--stages=run")
  assert run[4] == "ssh" and "--project" not in " ".join(run)
  out = subprocess.run([sys.executable, "launch/tpu_pod.py", "--name=p", "--zone=z",
                        "--workdir=/w", "--stages=run,nope", "--dry_run"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 2 and "unknown stage(s) ['nope']" in out.stderr


def test_multi_gpu_one_process():
  (line,) = dry_run("multi_gpu.py", "--gpus=4", "--workdir=/tmp/w", "--",
                    "--config.mesh.fsdp=2")
  env = dict(a.split("=", 1) for a in line[:3])
  assert env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
  assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90"
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in env["XLA_FLAGS"]
  assert line[3:] == ["python", "-m", "semdiff.main", "--config=configs/default.py:base",
                      "--workdir=/tmp/w", "--config.mesh.fsdp=2"]


def test_multi_gpu_one_process_per_gpu():
  lines = dry_run("multi_gpu.py", "--gpus=2", "--per_gpu", "--port=5555", "--workdir=/w")
  assert len(lines) == 2
  for i, line in enumerate(lines):
    assert f"CUDA_VISIBLE_DEVICES={i}" in line
    assert line[-4:] == ["--distributed", "--coordinator_address=127.0.0.1:5555",
                         "--num_processes=2", f"--process_id={i}"]


def test_sweep_expands_the_default_config():
  lines = dry_run("sweep.py", "--config=configs/default.py:tiny", "--workdir=/tmp/sw", "--",
                  "--config.train.num_steps=5")
  assert len(lines) == 6  # 3 scorers x 2 frontier shares
  assert lines[0] == ["python", "-m", "semdiff.main", "--config=configs/default.py:tiny",
                      "--workdir=/tmp/sw/scorer.name-unigram_noise.frontier_prob-0.0",
                      "--config.scorer.name=unigram", "--config.noise.frontier_prob=0.0",
                      "--config.train.num_steps=5"]
  workdirs = {l[4] for l in lines}
  assert len(workdirs) == 6
  points = {(l[5], l[6]) for l in lines}
  assert ("--config.scorer.name=mix", "--config.noise.frontier_prob=0.5") in points


def test_sweep_through_a_launcher_and_without_a_sweep(tmp_path):
  lines = dry_run("sweep.py", "--workdir=w", "--launcher=multi_gpu", "--launcher_args=--gpus=8")
  assert lines[0][:3] == ["python", "launch/multi_gpu.py", "--gpus=8"]
  assert lines[0][5] == "--" and lines[0][6].startswith("--config.scorer.name=")
  bad = tmp_path / "nosweep.py"
  bad.write_text("def get_config():\n  return {}\n")
  out = subprocess.run([sys.executable, "launch/sweep.py", f"--config={bad}", "--workdir=w",
                        "--dry_run"], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert out.returncode == 1 and "defines no sweep()" in out.stderr


@pytest.mark.parametrize("script", ["tpu_pod.py", "multi_gpu.py", "sweep.py"])
def test_help(script):
  out = subprocess.run([sys.executable, os.path.join("launch", script), "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0 and "--dry_run" in out.stdout
