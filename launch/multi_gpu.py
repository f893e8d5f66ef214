r"""Train semdiff on one host with N GPUs.

Default: one process that sees all N GPUs (``CUDA_VISIBLE_DEVICES=0..N-1``); the mesh
(``config.mesh``, data = -1 by default) spreads the batch over them. With ``--per_gpu``:
N processes, one GPU each, joined through ``jax.distributed`` on 127.0.0.1 (what a
multi-host GPU job looks like, on one host).

  python launch/multi_gpu.py --gpus=4 --workdir=/tmp/semdiff --dry_run \
      -- --config.train.batch_size=256 --config.mesh.fsdp=2

Arguments after ``--`` go to semdiff.main unchanged. ``--dry_run`` prints the exact command
lines (environment included) and runs nothing; without it the processes run and the launcher
waits for all of them. Needs ``pip install -e . "jax[cuda12]"``.
"""

import argparse
import os
import shlex
import subprocess
import sys

# Overlap collectives with compute; leave some GPU memory to cuDNN/NCCL workspaces.
XLA_FLAGS = "--xla_gpu_enable_latency_hiding_scheduler=true"
MEM_FRACTION = "0.90"


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--gpus", type=int, required=True, help="GPUs to use (0..N-1).")
  p.add_argument("--config", default="configs/default.py:base")
  p.add_argument("--workdir", required=True)
  p.add_argument("--per_gpu", action="store_true",
                 help="One process per GPU with jax.distributed (default: one process).")
  p.add_argument("--port", type=int, default=12355, help="Coordinator port (--per_gpu).")
  p.add_argument("--dry_run", action="store_true", help="Print the commands, run nothing.")
  p.add_argument("overrides", nargs="*", help="After --: flags for semdiff.main.")
  args = p.parse_args(argv)
  if args.gpus < 1:
    p.error(f"--gpus must be >= 1, got {args.gpus}")
  return args


def commands(args) -> list[tuple[dict, list[str]]]:
  """(environment additions, argv) of each process to start."""
  base = [sys.executable if not args.dry_run else "python", "-m", "semdiff.main",
          f"--config={args.config}", f"--workdir={args.workdir}"]
  env = {"XLA_FLAGS": XLA_FLAGS, "XLA_PYTHON_CLIENT_MEM_FRACTION": MEM_FRACTION}
  if not args.per_gpu:
    visible = ",".join(str(i) for i in range(args.gpus))
    return [(dict(env, CUDA_VISIBLE_DEVICES=visible), base + list(args.overrides))]
  return [(dict(env, CUDA_VISIBLE_DEVICES=str(i)),
           base + ["--distributed", f"--coordinator_address=127.0.0.1:{args.port}",
                   f"--num_processes={args.gpus}", f"--process_id={i}"] + list(args.overrides))
          for i in range(args.gpus)]


def format_command(env: dict, argv: list[str]) -> str:
  return " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(argv)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  cmds = commands(args)
  for env, cmd in cmds:
    print(format_command(env, cmd) + (" &" if len(cmds) > 1 else ""), flush=True)
  if args.dry_run:
    return 0
  procs = [subprocess.Popen(cmd, env=dict(os.environ, **env)) for env, cmd in cmds]
  codes = [p.wait() for p in procs]
  return max(codes, key=abs)


if __name__ == "__main__":
  sys.exit(main())
