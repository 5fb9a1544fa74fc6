"""ncl-run: start N local ranks of a program, as mpirun or torchrun do, with no MPI needed.

Guarantees:
- every rank gets NCL_RANK, NCL_WORLD_SIZE, NCL_LOCAL_RANK, NCL_LOCAL_WORLD_SIZE,
  NCL_UNIQUE_ID (the job's secret id) and torch's RANK, WORLD_SIZE, LOCAL_RANK,
  LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT (so env:// initialisation works);
- SIGINT and SIGTERM are forwarded to the ranks (a second SIGINT kills them); a rank dies with
  ncl-run even when ncl-run is killed with SIGKILL (Linux's parent-death signal);
- -n is checked (1..MAX_RANKS) before any rank starts;
- when a rank fails, the others get REPORT_S to notice and report it (their errors name
  the failed rank; NCL_TRACE_DIR gets their flight records), then are stopped (SIGTERM,
  then SIGKILL after a grace period); ncl-run exits with the failing rank's code (128 +
  signal for a signal);
- with --elastic a failed rank does not stop the others (they may shrink their communicator and go
  on, ncl/elastic.py); ncl-run waits for every rank and exits with the code of the first survivor that
  failed, 0 when every survivor succeeded (the failed rank's own code when none was left);
- whatever shared memory the job left in /dev/shm is removed on the way out;
- ncl/supervisor.py's Group does the starting, forwarding, stopping, reaping and removing;
- --hosts K > 1 splits the ranks into K emulated hosts that talk over MPI: mpiexec starts
  them (NCL_HOSTS=K; ranks come from MPI_COMM_WORLD).
Standard library only (and ncl.job's and ncl.supervisor's names), so it starts fast.
"""
import argparse
import ctypes
import os
import signal
import shutil
import socket
import subprocess
import sys
import threading
from typing import List, Optional

from .job import MAX_RANKS, get_unique_id, shm_prefix  # noqa: F401 (shm_prefix: the names ncl-run removes)
from .supervisor import Group

GRACE_S = 3.0
REPORT_S = 2.0  # after a rank fails, the others get this long to notice (~0.1 s) and report it themselves


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def own_modules_env(env: dict) -> dict:
    """env for the `python -m ncl...` commands ncl starts itself (sweeps, benchmark points, their
    ranks): PYTHONSAFEPATH (Python >= 3.11) keeps the working directory off sys.path, so that a
    folder named ncl there (the parent of a clone, with an editable install) is not imported in
    the package's place.  Never for a user's program: its own directory is on sys.path by design."""
    return dict(env, PYTHONSAFEPATH="1")


def _dies_with_launcher():
    """A Popen preexec_fn (or None off Linux): the rank gets SIGKILL when ncl-run dies, even by SIGKILL
    (PR_SET_PDEATHSIG).  It runs between fork and exec, so no other thread of ncl-run may be alive then
    (the --tag-output pumps start once every rank has)."""
    if not sys.platform.startswith("linux"):
        return None
    libc, launcher = ctypes.CDLL(None, use_errno=True), os.getpid()  # loaded before the fork

    def arm() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != launcher:  # ncl-run died before prctl: no signal would come
            os._exit(1)
    return arm


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
    p.add_argument("--elastic", action="store_true",
                   help="when a rank fails, keep the others running (they may comm.shrink() and go on); the job's "
                        "exit code is then that of the survivors")
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


def _supervise(group: Group, elastic: bool = False) -> int:
    """Wait for all ranks; on the first failure stop the rest (elastic: let them go on). Returns the exit code."""
    codes = group.wait()
    failed = group.first_failure()
    if failed is None:
        return 0
    others = sum(c is None for c in codes)
    if elastic:
        return _supervise_survivors(group, failed, [r for r, c in enumerate(codes) if c is None])
    print(f"ncl-run: {failed}; stopping the other {others} rank{'s' if others != 1 else ''}", file=sys.stderr,
          flush=True)
    group.stop(wait_s=REPORT_S)  # survivors name the failed rank and write their flight records
    return failed.status


def _supervise_survivors(group: Group, failed, survivors: List[int]) -> int:
    """--elastic after the first failure: wait for the survivors; the first of them to fail gives the code."""
    if not survivors:
        return failed.status
    print(f"ncl-run: {failed}; --elastic: the other {len(survivors)} rank{'s' if len(survivors) != 1 else ''} "
          f"go on", file=sys.stderr, flush=True)
    group.wait(through_failures=True)
    later = group.failures_after(survivors)
    return later[0].status if later else 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not 1 <= args.nproc <= MAX_RANKS:  # before anything starts (3000 ranks each failing the check was the way)
        parser.error(f"-n must be between 1 and {MAX_RANKS}, not {args.nproc}")
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
    if args.elastic and args.hosts > 1:
        parser.error("--elastic needs one host: a multi-host communicator cannot shrink (and mpiexec stops the job)")

    uid, taggers = get_unique_id(), []
    with Group(new_session=False, grace_s=GRACE_S, forward=True, job_id=uid, adopt_orphans=True) as group:
        code = _run_job(group, uid, command, args, taggers)
    for t in taggers:  # (after the group closed: a process the ranks left may hold a pipe open)
        t.thread.join(timeout=5)
    if group.orphans:  # stopped when the group closed: a job's processes do not outlive it
        print(f"ncl-run: stopped {len(group.orphans)} process{'es' if len(group.orphans) != 1 else ''} the ranks "
              f"left running (pid {', '.join(map(str, group.orphans))})", file=sys.stderr, flush=True)
    return code


def _run_job(group: Group, uid: str, command: List[str], args, taggers: list) -> int:
    """Start the ranks in the group and supervise them; the job's exit code.  With --tag-output, the
    threads that pump the ranks' output go in taggers."""
    port, n = _free_port(), args.nproc
    if args.hosts > 1:  # the emulated hosts talk over MPI: mpiexec starts the ranks
        try:
            argv, mpi_env = _mpi_command(n, uid, command, args)
            group.start(argv, env=mpi_env, preexec_fn=_dies_with_launcher())
        except OSError as exc:
            print(f"ncl-run: {exc}", file=sys.stderr)
            return 127
        return _supervise(group, args.elastic)
    pipe = subprocess.PIPE if args.tag_output else None
    arm = _dies_with_launcher()
    for rank in range(n):
        try:
            p = group.start(command, env=_rank_env(rank, n, uid, port, args), stdout=pipe, stderr=pipe,
                            preexec_fn=arm)
        except OSError as exc:
            print(f"ncl-run: cannot start {command[0]!r}: {exc}", file=sys.stderr)
            return 127
        if p is None:  # stopped while starting: start no more ranks, the ones running got the signal
            break
    if args.tag_output:  # (after the forks: see _dies_with_launcher)
        taggers += [_Tagger(r, getattr(p, name), sink) for r, p in enumerate(group.procs)
                    for name, sink in (("stdout", sys.stdout), ("stderr", sys.stderr))]
    code = _supervise(group, args.elastic)
    if len(group.procs) < n and code == 0:  # the ranks that started stopped cleanly, but the job did not run
        code = 128 + group.signals[0]
    return code

if __name__ == "__main__":
    sys.exit(main())
