"""ncl-run: start N local ranks of a program, as mpirun or torchrun do, with no MPI needed.

Guarantees:
- every rank gets NCL_RANK, NCL_WORLD_SIZE, NCL_LOCAL_RANK, NCL_LOCAL_WORLD_SIZE,
  NCL_UNIQUE_ID (the job's secret id) and torch's RANK, WORLD_SIZE, LOCAL_RANK,
  LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT (so env:// initialisation works);
- SIGINT and SIGTERM are forwarded to the ranks (a second SIGINT kills them);
- when a rank fails, the others get REPORT_S to notice and report it (their errors name
  the failed rank; NCL_TRACE_DIR gets their flight records), then are stopped (SIGTERM,
  then SIGKILL after a grace period); ncl-run exits with the failing rank's code (128 +
  signal for a signal);
- whatever shared memory the job left in /dev/shm is removed on the way out;
- --hosts K > 1 splits the ranks into K emulated hosts that talk over MPI: mpiexec starts
  them (NCL_HOSTS=K; ranks come from MPI_COMM_WORLD).
Standard library only (and ncl.job's names), so it starts fast.
"""
import argparse
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import List, Optional

from .job import get_unique_id, shm_prefix

GRACE_S = 3.0
REPORT_S = 2.0  # after a rank fails, the others get this long to notice (~0.1 s) and report it themselves
POLL_S = 0.02


def remove_job_segments(unique_id: str) -> None:
    for path in glob.glob(os.path.join("/dev/shm", shm_prefix(unique_id) + "*")):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ncl-run", description="Start N local ranks of a program.")
    p.add_argument("-n", "--nproc", type=int, required=True, help="number of ranks")
    p.add_argument("--tag-output", action="store_true", help="prefix every output line with [rank]")
    p.add_argument("--topology", help="the emulated interconnect: a topology file or a shipped name such as "
                                      "pcie-gen5-8card (exported as NCL_TOPOLOGY; ncl-topo show describes it)")
    p.add_argument("--emulate", choices=("account", "pace", "off"),
                   help="with --topology: report emulated time beside wall time (account, the default), also "
                        "stretch each call to it (pace), or neither (exported as NCL_EMULATE)")
    p.add_argument("--hosts", type=int, default=1, help="emulated hosts the ranks are split into")
    p.add_argument("--timeout", type=float, help="NCL_TIMEOUT for the ranks, in seconds")
    p.add_argument("command", nargs=argparse.REMAINDER, help="program and its arguments")
    return p


def _mpiexec() -> str:
    """The mpiexec of this Python's environment (the mpich wheel puts it beside python), else PATH's."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")
    if not found:
        raise FileNotFoundError("ncl-run --hosts K needs MPI between the emulated hosts, and no mpiexec was found: "
                                "pip install 'ncl[mpi]' (mpi4py and the mpich wheel)")
    return found


def _mpi_command(n: int, uid: str, command: List[str], args):
    """(argv, env): mpiexec starting all n ranks, with the knobs ncl-run would set in its
    environment (MPICH's hydra and Open MPI both pass it on to local ranks; ranks come from MPI)."""
    env = dict(os.environ, NCL_HOSTS=str(args.hosts), NCL_UNIQUE_ID=uid)
    for name in ("NCL_RANK", "NCL_WORLD_SIZE"):
        env.pop(name, None)
    env.update(_emulation_env(args))
    if args.timeout is not None:
        env["NCL_TIMEOUT"] = str(args.timeout)
    mpiexec = _mpiexec()
    version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30).stdout
    if "Open MPI" in version or "OpenRTE" in version:  # one machine: more ranks than cores is the point
        flags = ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
        flags += ["--tag-output"] if args.tag_output else []
    else:  # MPICH's hydra
        flags = ["-prepend-rank"] if args.tag_output else []
    return [mpiexec, "-n", str(n), *flags, *command], env


def _emulation_env(args) -> dict:
    out = {}
    if args.topology:
        out["NCL_TOPOLOGY"] = os.path.abspath(args.topology) if os.path.exists(args.topology) else args.topology
    if args.emulate:
        out["NCL_EMULATE"] = args.emulate
    return out


def _rank_env(rank: int, n: int, uid: str, port: int, args) -> dict:
    env = dict(os.environ)
    for names, value in ((("NCL_RANK", "RANK", "NCL_LOCAL_RANK", "LOCAL_RANK"), rank),
                         (("NCL_WORLD_SIZE", "WORLD_SIZE", "NCL_LOCAL_WORLD_SIZE", "LOCAL_WORLD_SIZE"), n)):
        env.update({name: str(value) for name in names})
    env.update(NCL_UNIQUE_ID=uid, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env.update(_emulation_env(args))
    if args.timeout is not None:
        env["NCL_TIMEOUT"] = str(args.timeout)
    if "OMP_NUM_THREADS" not in env:  # as torchrun: N ranks with a thread per CPU each would fight for the CPUs
        env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // n))
    return env


class _Tagger:
    """Re-emit each line of a rank's pipe with a [rank] prefix, whole lines only."""
    lock = threading.Lock()

    def __init__(self, rank: int, pipe, sink):
        self.thread = threading.Thread(target=self._pump, args=(rank, pipe, sink), daemon=True)
        self.thread.start()

    def _pump(self, rank, pipe, sink):
        for line in iter(pipe.readline, b""):
            with self.lock:
                sink.buffer.write(f"[{rank}]: ".encode() + line if line.endswith(b"\n") else
                                  f"[{rank}]: ".encode() + line + b"\n")
                sink.flush()
        pipe.close()


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def _stop(procs: List[subprocess.Popen], wait_s: float = 0.0) -> None:
    """Stop every rank still running, after giving them wait_s to exit by themselves."""
    deadline = time.monotonic() + wait_s
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while any(p.poll() is None for p in alive) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    for p in alive:
        if p.poll() is None:
            p.kill()
            p.wait()


def _supervise(procs: List[subprocess.Popen]) -> int:
    """Wait for all ranks; on the first failure stop the rest. Returns the exit code."""
    while True:
        codes = [p.poll() for p in procs]
        failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            rank, code = failed[0]
            others = sum(c is None for c in codes)
            print(f"ncl-run: rank {rank} (pid {procs[rank].pid}) {_describe(code)}; stopping the other {others} "
                  f"rank{'s' if others != 1 else ''}", file=sys.stderr, flush=True)
            _stop(procs, REPORT_S)  # survivors name the failed rank and write their flight records
            return 128 - code if code < 0 else code
        if all(c == 0 for c in codes):
            return 0
        time.sleep(POLL_S)


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.nproc < 1:
        parser.error(f"-n must be at least 1, not {args.nproc}")
    if not command:
        parser.error("no program given: ncl-run -n N prog args...")
    if not 1 <= args.hosts <= args.nproc or args.nproc % args.hosts:
        parser.error(f"--hosts {args.hosts} must divide -n {args.nproc}")
    if args.topology:
        try:  # a bad file fails here, once, not in every rank
            from .topology import load_topology
            topology = load_topology(args.topology)
        except (ValueError, OSError) as exc:
            parser.error(f"--topology {args.topology}: {exc}")
        if topology.num_chips < args.nproc:
            parser.error(f"--topology {args.topology} has {topology.num_chips} chips, fewer than -n {args.nproc}")
    if args.timeout is not None and not args.timeout > 0:
        parser.error("--timeout must be positive")

    uid, port, n = get_unique_id(), _free_port(), args.nproc
    procs: List[subprocess.Popen] = []
    signals: List[int] = []  # every SIGINT / SIGTERM received, in order

    def forward(signum, _frame):
        signals.append(signum)
        for p in procs:
            if p.poll() is None:
                if signals.count(signal.SIGINT) > 1:
                    p.kill()
                else:
                    p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    taggers = []
    try:
        if args.hosts > 1:  # the emulated hosts talk over MPI: mpiexec starts the ranks
            try:
                argv, mpi_env = _mpi_command(n, uid, command, args)
                procs.append(subprocess.Popen(argv, env=mpi_env))
            except (OSError, FileNotFoundError) as exc:
                print(f"ncl-run: {exc}", file=sys.stderr)
                return 127
            return _supervise(procs)
        pipe = subprocess.PIPE if args.tag_output else None
        for rank in range(n):
            if signals:  # stopped while starting: start no more ranks, the ones running got the signal
                break
            before = len(signals)
            try:
                p = subprocess.Popen(command, env=_rank_env(rank, n, uid, port, args), stdout=pipe, stderr=pipe)
            except OSError as exc:
                print(f"ncl-run: cannot start {command[0]!r}: {exc}", file=sys.stderr)
                _stop(procs)
                return 127
            missed = signals[before:]  # forwarded while this rank was being started, so not to it
            procs.append(p)
            for signum in missed:
                p.send_signal(signum)
            if args.tag_output:
                taggers += [_Tagger(rank, p.stdout, sys.stdout), _Tagger(rank, p.stderr, sys.stderr)]
        code = _supervise(procs)
        if len(procs) < n and code == 0:  # the ranks that started stopped cleanly, but the job did not run
            code = 128 + signals[0]
        for t in taggers:
            t.thread.join(timeout=5)
        return code
    finally:
        _stop(procs)
        for s, handler in previous.items():
            signal.signal(s, handler)
        remove_job_segments(uid)


if __name__ == "__main__":
    sys.exit(main())
