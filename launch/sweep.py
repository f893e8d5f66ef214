r"""Expand a config's sweep into training commands, one workdir per point.

A config file defines ``sweep()`` (any name, ``--sweep``) returning a list of override dicts
such as ``{"scorer.name": "balanced", "noise.frontier_prob": 0.5}``; each becomes

  python -m semdiff.main --config=FILE[:VARIANT] --workdir=BASE/<point name> \
      --config.scorer.name=balanced --config.noise.frontier_prob=0.5 [-- extra flags]

  python launch/sweep.py --config=configs/default.py:small --workdir=workdirs/sweep --dry_run
  python launch/sweep.py --config=configs/default.py:tiny --workdir=/tmp/sw \
      -- --config.train.num_steps=100

``--dry_run`` prints the commands; without it they run one after another (a failed point is
reported and the others still run). ``--launcher=multi_gpu --launcher_args="--gpus=8"`` (or
``tpu_pod`` with its flags) starts each point through that launcher instead.
"""

import argparse
import importlib.util
import os
import re
import shlex
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/default.py:small", help="FILE[:VARIANT].")
  p.add_argument("--sweep", default="sweep", help="The function of the config file to call.")
  p.add_argument("--workdir", required=True, help="Base directory; one subfolder per point.")
  p.add_argument("--launcher", default="local", choices=("local", "multi_gpu", "tpu_pod"),
                 help="local: python -m semdiff.main; else launch/<launcher>.py per point.")
  p.add_argument("--launcher_args", default="",
                 help="Flags for launch/<launcher>.py, e.g. '--gpus=8' or '--name=pod "
                      "--zone=us-central2-b --stages=run'.")
  p.add_argument("--dry_run", action="store_true", help="Print the commands, run nothing.")
  p.add_argument("overrides", nargs="*", help="After --: flags added to every command.")
  return p.parse_args(argv)


def load_sweep(config_arg: str, fn_name: str = "sweep") -> list[dict]:
  """The override dicts of ``fn_name()`` in the config file of ``config_arg``."""
  path = config_arg.split(":", 1)[0]
  full = path if os.path.isabs(path) else os.path.join(os.getcwd(), path)
  if not os.path.exists(full):
    full = os.path.join(ROOT, path)
  if not os.path.exists(full):
    raise SystemExit(f"sweep: error: no config file {path!r}.")
  spec = importlib.util.spec_from_file_location("semdiff_sweep_config", full)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  fn = getattr(module, fn_name, None)
  if fn is None:
    raise SystemExit(f"sweep: error: {path} defines no {fn_name}(); add one returning a list "
                     "of override dicts.")
  points = list(fn())
  if not points or not all(isinstance(p, dict) for p in points):
    raise SystemExit(f"sweep: error: {path}:{fn_name}() must return a non-empty list of dicts.")
  return points


def point_name(overrides: dict) -> str:
  """A folder name for one point: 'scorer.name-mix_noise.frontier_prob-0.5'."""
  parts = [f"{k}-{v}" for k, v in overrides.items()]
  return re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(parts)) or "default"


def commands(args) -> list[list[str]]:
  out = []
  for point in load_sweep(args.config, args.sweep):
    workdir = os.path.join(args.workdir, point_name(point))
    flags = [f"--config.{k}={v}" for k, v in point.items()] + list(args.overrides)
    if args.launcher == "local":
      out.append(["python", "-m", "semdiff.main", f"--config={args.config}",
                  f"--workdir={workdir}"] + flags)
    else:
      out.append(["python", os.path.join("launch", f"{args.launcher}.py")]
                 + shlex.split(args.launcher_args)
                 + [f"--config={args.config}", f"--workdir={workdir}", "--"] + flags)
  return out


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  cmds = commands(args)
  failed = []
  for cmd in cmds:
    print(shlex.join(cmd), flush=True)
    if not args.dry_run:
      run = [sys.executable] + cmd[1:]
      if subprocess.run(run, check=False).returncode:
        failed.append(cmd)
  if failed:
    print(f"sweep: {len(failed)} of {len(cmds)} points failed:", file=sys.stderr)
    for cmd in failed:
      print("  " + shlex.join(cmd), file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
