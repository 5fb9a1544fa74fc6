"""What every ncl-perf command shares (ncl-perf, ncl-perf moe, python -m ncl.perf.calibrate): argument
types, the command that starts a sweep's ranks, reading the rows rank 0 prints, and the progress display.
The commands import this module; it imports none of them."""
import argparse
import json
import os
import shutil
import subprocess
import sys
from typing import List, Optional

from .. import supervisor
from . import report


def counts_parser(what: str, example: str):
    """An argparse type for comma-separated positive ints (rank counts, token counts, ...)."""
    def parse(text: str) -> List[int]:
        try:
            counts = [int(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"give {what} like {example}, not {text!r}") from None
        if not counts or min(counts) < 1:
            raise argparse.ArgumentTypeError(f"{what} must be >= 1, not {text!r}")
        return counts
    return parse


rank_counts = counts_parser("rank counts", "8 or 2,4,8")


def peers_parser(*allowed: str):
    """An argparse type for --compare: comma-separated names among `allowed`."""
    listed = " and/or ".join([", ".join(allowed[:-1]), allowed[-1]] if len(allowed) > 1 else allowed)

    def parse(text: str) -> List[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        for p in names:
            if p not in allowed:
                raise argparse.ArgumentTypeError(f"--compare takes {listed}, not {p!r}")
        return names
    return parse


peers = peers_parser("mpi", "gloo")  # ncl-perf moe's peers


def mpiexec():
    """The launcher beside this Python first (the mpich wheel's, matching the mpi4py it built
    against), else the one on PATH."""
    return shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")


def launch_argv(backend: str, n: int, module: str, settings: dict, rendezvous: str, hosts: int = 1,
                timeout: float = 300.0, topology: Optional[str] = None, emulate: str = "account") -> List[str]:
    """The command that starts a sweep worker (`python -m module`) on n ranks of a backend:
    mpiexec for MPI, ncl-run for the others (gloo and DeepSpeed meet through a rendezvous file)."""
    worker = [sys.executable, "-m", module, "--backend", backend, "--config", json.dumps(settings)]
    if backend == "mpi":
        return [mpiexec(), "-n", str(n)] + worker
    if backend in ("gloo", "deepspeed"):
        worker += ["--rendezvous-file", rendezvous]
    flags = ["--hosts", str(hosts)] if backend == "ncl" and hosts > 1 else []
    if backend == "ncl" and topology:
        flags += ["--topology", topology, "--emulate", emulate]
    return [sys.executable, "-m", "ncl.run", "-n", str(n), *flags, "--timeout", str(timeout), "--"] + worker


def run_worker(cmd: List[str], env: dict, progress, on_row) -> int:
    """Start a sweep's ranks; pass each JSON line rank 0 prints to on_row and anything else
    to progress; the launcher's exit code."""
    with supervisor.Group() as group:  # a Ctrl-C or an error here stops the launcher and its ranks
        proc = group.start(cmd, stdout=subprocess.PIPE, text=True, env=env)
        for text in proc.stdout:
            try:
                row = json.loads(text)
            except json.JSONDecodeError:
                progress.write(text.rstrip("\n"))
                continue
            on_row(row)
        return proc.wait()


class Progress:
    """Rows to stdout as they come; a tqdm bar on a terminal (tqdm.write keeps them apart)."""

    def __init__(self, total: int):
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="size", file=sys.stderr, leave=False)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            report.log(text)

    def update(self, k: int) -> None:
        if self.bar is not None:
            self.bar.update(k)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
