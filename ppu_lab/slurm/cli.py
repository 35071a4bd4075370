"""``python -m ppu_lab.slurm``: write the experiment grid's sbatch script, check Slurm + MPI here, wait for a job."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ppu_lab.slurm.commands import SlurmError
from ppu_lab.slurm.nodes import wait
from ppu_lab.slurm.preflight import preflight
from ppu_lab.slurm.scripts import MPI_MODES, experiments_script


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ppu_lab.slurm", description="Slurm helpers for PPU Lab.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("script", help="print an sbatch script that runs the experiment grid "
                                      "(arguments after -- become its default `experiments run` arguments)")
    s.add_argument("-n", "--ntasks", type=int, default=4, help="MPI ranks (Slurm tasks). Default: 4")
    s.add_argument("--partition"), s.add_argument("--account")
    s.add_argument("--time", default="01:00:00", help="time limit (minutes, HH:MM:SS or D-HH:MM:SS). Default: 01:00:00")
    s.add_argument("--nodes", type=int)
    s.add_argument("--extra", action="append", default=[], help="another sbatch option (repeatable)")
    s.add_argument("--env-setup", default=None, help="shell line(s) before the launch, e.g. 'module load mpich'")
    s.add_argument("--mpi", choices=MPI_MODES, default="pmi2")
    s.add_argument("-o", "--output", default=None, help="write the script here instead of printing it")
    s.add_argument("run_args", nargs="*", help="default arguments of `experiments run`")
    c = sub.add_parser("check", help="preflight: can n ranks run as one MPI job through Slurm here?")
    c.add_argument("-n", "--ntasks", type=int, default=2)
    c.add_argument("--partition"), c.add_argument("--account")
    c.add_argument("--mpi", choices=MPI_MODES, default="pmi2")
    c.add_argument("--nodes", type=int, help="spread the tasks over this many nodes (sbatch --nodes)")
    w = sub.add_parser("wait", help="wait for a batch job; exit 0 if it completed, else say how it ended "
                                    "(a lost node by name) and exit 1")
    w.add_argument("job", help="the job id (sbatch --parsable prints it)")
    w.add_argument("--timeout", type=float, default=24 * 3600, help="seconds to wait at most. Default: one day")
    args = p.parse_args(argv)
    try:
        if args.command == "check":
            info = preflight(args.ntasks, partition=args.partition, account=args.account, mpi=args.mpi,
                             nodes=args.nodes)
            hosts = sorted(set(info["hosts"]))
            print(f"ok: {args.ntasks} tasks form one MPI job with `{info['launch']}` (ranks {info['ranks']}) on "
                  f"{len(hosts)} host(s): " + ", ".join(f"rank {r} on {h}" for r, h in enumerate(info["hosts"])))
            return 0
        if args.command == "wait":
            try:
                end = wait(args.job, args.timeout)
            except SlurmError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            print(f"job {args.job} completed (exit code {end['exit_code']}, nodes {end['nodes']})")
            return 0
        kw = {} if args.env_setup is None else {"env_setup": args.env_setup}
        text = experiments_script(args.ntasks, partition=args.partition, account=args.account, time=args.time,
                                  nodes=args.nodes, extra=args.extra, mpi=args.mpi,
                                  **({"default_args": args.run_args} if args.run_args else {}), **kw)
    except (ValueError, SlurmError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.output:
        Path(args.output).write_text(text)
        os.chmod(args.output, 0o755)
    else:
        print(text, end="")
    return 0
