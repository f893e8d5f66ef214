r"""Train semdiff on a Cloud TPU VM pod slice with gcloud.

Stages (``--stages``, in this order, default all):
  create   create the TPU VM slice;
  copy     pack this checkout (without .git/.venv/workdirs) and scp it to every worker;
  install  unpack it on every worker and ``pip install -e . "jax[tpu]"``;
  run      start the same ``python -m semdiff.main --distributed ...`` on all workers
           (jax.distributed finds the coordinator and process ids on TPU VMs by itself);
  delete   delete the slice.

  python launch/tpu_pod.py --name=semdiff-pod --zone=us-central2-b \
      --accelerator_type=v4-32 --workdir=/mnt/shared/semdiff --dry_run \
      -- --config.train.batch_size=512

Arguments after ``--`` go to semdiff.main unchanged (config overrides). ``--dry_run`` prints
the exact commands and runs nothing; without it they run one after another and the first
failure stops the launch. The workdir must be a directory every worker sees (NFS/Filestore,
or a gcsfuse mount of a bucket): checkpoints are written by all workers together.
"""

import argparse
import os
import shlex
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
STAGES = ("create", "copy", "install", "run", "delete")
ARCHIVE = "/tmp/semdiff_code.tar.gz"
REMOTE_ARCHIVE = "semdiff_code.tar.gz"
REMOTE_DIR = "semdiff"


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--name", required=True, help="TPU VM (slice) name.")
  p.add_argument("--zone", required=True)
  p.add_argument("--project", default="", help="GCP project ('' = gcloud's default).")
  p.add_argument("--accelerator_type", default="v4-32", help="e.g. v4-32, v5litepod-16.")
  p.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU VM software version.")
  p.add_argument("--spot", action="store_true", help="Create a spot (preemptible) slice.")
  p.add_argument("--config", default="configs/default.py:base")
  p.add_argument("--workdir", default="", help="A path every worker sees (stage run).")
  p.add_argument("--stages", default=",".join(STAGES),
                 help=f"Comma-separated subset of {','.join(STAGES)}.")
  p.add_argument("--dry_run", action="store_true", help="Print the commands, run nothing.")
  p.add_argument("overrides", nargs="*", help="After --: flags for semdiff.main.")
  args = p.parse_args(argv)
  stages = [s for s in args.stages.split(",") if s]
  unknown = sorted(set(stages) - set(STAGES))
  if unknown:
    p.error(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
  args.stages = [s for s in STAGES if s in stages]
  if "run" in args.stages and not args.workdir:
    p.error("the run stage needs --workdir (a directory every worker sees)")
  return args


def _common(args) -> list[str]:
  out = [f"--zone={args.zone}"]
  if args.project:
    out.append(f"--project={args.project}")
  return out


def _ssh(args, remote: str) -> list[str]:
  return (["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name] + _common(args)
          + ["--worker=all", f"--command={remote}"])


def train_command(args) -> str:
  """The command every worker runs (one process per host)."""
  cmd = ["python3", "-m", "semdiff.main", "--distributed", f"--config={args.config}",
         f"--workdir={args.workdir}"] + list(args.overrides)
  return f"cd ~/{REMOTE_DIR} && " + shlex.join(cmd)


def commands(args) -> list[list[str]]:
  """The gcloud (and tar) commands of the chosen stages, in order."""
  out = []
  if "create" in args.stages:
    create = (["gcloud", "compute", "tpus", "tpu-vm", "create", args.name] + _common(args)
              + [f"--accelerator-type={args.accelerator_type}", f"--version={args.version}"])
    out.append(create + (["--spot"] if args.spot else []))
  if "copy" in args.stages:
    out.append(["tar", "czf", ARCHIVE, "--exclude=./.git", "--exclude=./.venv",
                "--exclude=./workdirs", "--exclude=*.egg-info", "--exclude=__pycache__",
                "-C", ROOT, "."])
    out.append(["gcloud", "compute", "tpus", "tpu-vm", "scp", ARCHIVE,
                f"{args.name}:~/{REMOTE_ARCHIVE}"] + _common(args) + ["--worker=all"])
  if "install" in args.stages:
    out.append(_ssh(args, f"mkdir -p ~/{REMOTE_DIR} && tar xzf ~/{REMOTE_ARCHIVE} -C "
                          f"~/{REMOTE_DIR} && cd ~/{REMOTE_DIR} && pip install -q -e . "
                          "'jax[tpu]'"))
  if "run" in args.stages:
    out.append(_ssh(args, train_command(args)))
  if "delete" in args.stages:
    out.append(["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name] + _common(args)
               + ["--quiet"])
  return out


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  for cmd in commands(args):
    print(shlex.join(cmd), flush=True)
    if not args.dry_run:
      rc = subprocess.run(cmd, check=False).returncode
      if rc:
        print(f"tpu_pod: command failed with exit status {rc}; stopping.", file=sys.stderr)
        return rc
  return 0


if __name__ == "__main__":
  sys.exit(main())
