"""One supervisor of rank processes: ncl-run's ranks, the launchers ncl-perf and ncl-bench start, and the ranks of
the test and benchmark harnesses.  A `Group` starts processes, waits for them, names the first that failed, and
stops them together.

Invariants:
- a process is in the group's list before any handler of SIGINT or SIGTERM can run without it: both are held
  over each fork (main thread) and delivered once the new process is registered;
- leaving a group's `with` block, by any way, stops what still runs: SIGTERM, then SIGKILL after the grace period,
  then every process is reaped; a Ctrl-C during the grace period SIGKILLs at once (and is re-raised);
- with new_session each process leads its own process group and signals go to that whole group, so a
  launcher's ranks go with it; without, they go to the processes themselves (ranks that share their launcher's
  group, so that whoever started the launcher can take them all down with one killpg);
- forward=True (a launcher): SIGINT and SIGTERM are passed on to the processes while the block runs (a second
  SIGINT kills them) and no process starts after one; otherwise SIGINT raises KeyboardInterrupt as usual and a
  default SIGTERM unwinds the block (SystemExit) and, once the processes are stopped, ends this process as it
  would have;
- with adopt_orphans (a launcher, Linux), this process is a child subreaper: what a rank leaves running
  (`sleep 77 &`, a daemon in its own session) is reparented here when the rank ends, and stopped (SIGTERM, SIGKILL
  after the grace period, reaped) when the group closes, after the ranks;
- a job's files in /dev/shm (<shm_prefix(job_id)>*: rendezvous notes a rank that died during setup left, as the
  C core removes each once every rank is attached; segments themselves have no name) are removed when the group
  closes.
Standard library only (and ncl.job's names), so that a launcher starts fast.
"""
import contextlib
import ctypes
import glob
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, List, NamedTuple, Optional

from .job import shm_prefix

GRACE_S = 3.0
POLL_S = 0.02
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


def describe(code: int) -> str:
    """A Popen return code in words: "exited with code 3", "killed by signal SIGKILL"."""
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class Exit(NamedTuple):
    """How one rank of a group ended."""
    rank: int
    pid: int
    code: int  # as Popen's returncode: negative for a signal

    @property
    def status(self) -> int:
        """The code a shell would report: 128 + the signal for a signal."""
        return 128 - self.code if self.code < 0 else self.code

    def __str__(self) -> str:
        return f"rank {self.rank} (pid {self.pid}) {describe(self.code)}"


def _children() -> List[int]:
    """The pids whose parent is this process, zombies included (from /proc)."""
    me, pids = os.getpid(), []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold anything
        except (OSError, IndexError):  # gone meanwhile
            continue
        if int(fields[1]) == me:
            pids.append(int(stat.split("/")[2]))
    return pids


def _set_subreaper(on: bool) -> bool:
    """Make this process adopt its descendants' orphans (PR_SET_CHILD_SUBREAPER); False where it cannot."""
    if not sys.platform.startswith("linux"):
        return False
    return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def signals_held(signums=STOP_SIGNALS):
    """Hold these signals inside the block and deliver them on the way out, once the block's work (a child
    forked and its handle kept) cannot be cut in half.  Ignored signals stay ignored; outside the main
    thread (where no handler runs anyway) this does nothing."""
    held: List[int] = []
    previous = {}
    if _in_main_thread():
        for s in signums:
            if signal.getsignal(s) not in (signal.SIG_IGN, None):
                previous[s] = signal.signal(s, lambda signum, _frame: held.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in held:
            signal.raise_signal(s)


class _Spawned:
    """A multiprocessing process seen through the part of Popen's interface the group uses."""

    def __init__(self, process):
        self.process = process
        self.pid = process.pid

    @property
    def returncode(self) -> Optional[int]:
        return self.process.exitcode

    def poll(self) -> Optional[int]:
        return self.process.exitcode

    def wait(self, timeout: Optional[float] = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(self.process.name, timeout)
        return self.process.exitcode

    def send_signal(self, signum: int) -> None:
        if self.process.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)


class Group:
    """Rank processes started, watched and stopped together; see the module docstring.

        with Group(forward=True, job_id=uid) as group:
            for rank in range(n):
                group.start(argv, env=env_of(rank))
            group.wait()
            failed = group.first_failure()   # an Exit, or None
    """

    def __init__(self, *, new_session: bool = True, grace_s: float = GRACE_S, forward: bool = False,
                 job_id: Optional[str] = None, adopt_orphans: bool = False):
        self.new_session = new_session
        self.adopt_orphans = adopt_orphans
        self.orphans: List[int] = []   # pids of the processes the ranks left behind, stopped by close()
        self._children_before = set()  # (adopt_orphans) this process's children when the block began
        self.grace_s = grace_s
        self.forward = forward
        self.job_id = job_id
        self.procs: list = []          # Popen (or _Spawned) objects, in rank order
        self.signals: List[int] = []   # every SIGINT / SIGTERM the group handled, in order
        self._leaders = set()          # pids of the processes that lead their own process group
        self._exits: List[Exit] = []   # in the order they were seen
        self._previous = {}

    # ---- starting ---------------------------------------------------------------------------------------
    def start(self, argv: List[str], **popen) -> Optional[subprocess.Popen]:
        """Start the next rank (argv and Popen's keyword arguments); its Popen.  With forward, None and
        nothing started once a signal has told the group to stop.  OSError as Popen raises it."""
        if self.signals:
            return None
        with signals_held():
            proc = subprocess.Popen(argv, start_new_session=self.new_session, **popen)
            self._register(proc, self.new_session)
        return proc

    def start_function(self, target: Callable, *args, name: Optional[str] = None):
        """Start the next rank as target(*args) in a fresh interpreter (multiprocessing's spawn: target is
        pickled by reference).  It stays in this process group; its multiprocessing.Process."""
        process = multiprocessing.get_context("spawn").Process(target=target, args=args, name=name, daemon=True)
        with signals_held():
            process.start()
            self._register(_Spawned(process), False)
        return process

    def _register(self, proc, leader: bool) -> None:
        self.procs.append(proc)
        if leader:
            self._leaders.add(proc.pid)

    # ---- watching ---------------------------------------------------------------------------------------
    def poll(self) -> List[Optional[int]]:
        """Every rank's exit code (None: running), reaping those that ended."""
        codes = [p.poll() for p in self.procs]
        seen = {e.rank for e in self._exits}
        self._exits += [Exit(r, self.procs[r].pid, c) for r, c in enumerate(codes) if c is not None and r not in seen]
        return codes

    def code(self, rank: int, wait_s: float = 0.0) -> Optional[int]:
        """Rank's exit code after waiting up to wait_s for it (None: still running)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.procs[rank].wait(wait_s)
        return self.poll()[rank]

    def wait(self, timeout: Optional[float] = None, *, through_failures: bool = False) -> List[Optional[int]]:
        """Wait until every rank has exited, or one has failed (unless through_failures), or timeout; the exit
        codes (None: running)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            codes = self.poll()
            if all(c is not None for c in codes) or (not through_failures and any(c not in (None, 0) for c in codes)):
                return codes
            if deadline is not None and time.monotonic() >= deadline:
                return codes
            time.sleep(POLL_S)

    def first_failure(self) -> Optional[Exit]:
        """The first rank seen to exit non-zero (or by a signal), or None."""
        self.poll()
        return next((e for e in self._exits if e.code != 0), None)

    def failures_after(self, ranks) -> List[Exit]:
        """The exits of these ranks that were failures, in the order seen (an elastic job's survivors)."""
        self.poll()
        return [e for e in self._exits if e.rank in ranks and e.code != 0]

    # ---- signalling and stopping ------------------------------------------------------------------------
    def send(self, signum: int) -> None:
        """signum to every rank not yet reaped (to its whole process group when it leads one)."""
        for p in self.procs:
            if p.returncode is not None:  # reaped: its pid may be someone else's now
                continue
            if p.pid in self._leaders:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signum)
            else:
                p.send_signal(signum)

    def _wait_all(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while any(c is None for c in self.poll()) and time.monotonic() < deadline:
            time.sleep(POLL_S)

    def stop(self, grace_s: Optional[float] = None, wait_s: float = 0.0) -> None:
        """Stop every rank still running: after wait_s for them to exit by themselves, SIGTERM, then SIGKILL
        after the grace period; all reaped.  An exception while waiting (another Ctrl-C) kills at once."""
        try:
            self._wait_all(wait_s)
            if any(c is None for c in self.poll()):
                self.send(signal.SIGTERM)
                self._wait_all(self.grace_s if grace_s is None else grace_s)
        except BaseException:
            self.kill()
            raise
        self.kill()

    def kill(self) -> None:
        """SIGKILL to every rank still running, and reap them all."""
        self.send(signal.SIGKILL)
        for p in self.procs:
            p.wait()
        self.poll()

    def leftovers(self) -> List[str]:
        """The job's shared-memory files still in /dev/shm (none without a job_id)."""
        if self.job_id is None:
            return []
        return sorted(glob.glob(os.path.join("/dev/shm", shm_prefix(self.job_id) + "*")))

    def _stop_orphans(self) -> None:
        """Once the ranks are reaped, every child left, but those this process had before the block, is an orphan
        adopted from them (adopt_orphans): SIGTERM, SIGKILL after the grace period, until none is left (an
        orphan's own children come here next)."""
        signalled, deadline = set(), time.monotonic() + self.grace_s
        ours = self._children_before | {p.pid for p in self.procs}  # this process's other children stay
        while True:
            for pid in signalled:  # reap only what we stopped: another child's status is its owner's
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
            pids = [pid for pid in _children() if pid not in ours]
            if not pids:
                return
            late = time.monotonic() > deadline
            for pid in pids:
                if late or pid not in signalled:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL if late else signal.SIGTERM)
                    signalled.add(pid)
                    if pid not in self.orphans:
                        self.orphans.append(pid)
            time.sleep(POLL_S)

    def close(self) -> List[str]:
        """Stop and reap every rank (and with adopt_orphans what they left behind), then remove the job's shared
        memory; the files removed."""
        self.stop()
        if self.adopt_orphans:
            self._stop_orphans()
        removed = []
        for path in self.leftovers():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed.append(path)
        return removed

    # ---- the block --------------------------------------------------------------------------------------
    def _forward(self, signum, _frame) -> None:
        self.signals.append(signum)
        self.send(signal.SIGKILL if self.signals.count(signal.SIGINT) > 1 else signum)

    def _terminate(self, signum, _frame) -> None:
        self.signals.append(signum)
        raise SystemExit(128 + signum)  # unwind the block, which stops the group; __exit__ then dies of it

    def __enter__(self) -> "Group":
        if self.adopt_orphans:
            self._children_before = set(_children())  # not orphans (when the launcher runs inside a test, say)
            self.adopt_orphans = _set_subreaper(True)
        if _in_main_thread():
            if self.forward:
                self._previous = {s: signal.signal(s, self._forward) for s in STOP_SIGNALS}
            elif signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                self._previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, self._terminate)}
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.close()
        finally:
            if self.adopt_orphans:
                _set_subreaper(False)
            for s, handler in self._previous.items():
                signal.signal(s, handler)
            self._previous = {}
            if not self.forward and self.signals:  # a default SIGTERM, held until the group was stopped
                signal.raise_signal(signal.SIGTERM)


class Finished(NamedTuple):
    code: Optional[int]   # as Popen's returncode; None when it was stopped at the timeout
    stdout: str
    stderr: str


class _Reader:
    """Read a text pipe to its end in a thread, so that a process writing a lot never blocks on it."""

    def __init__(self, pipe):
        self.chunks: List[str] = []
        self.thread = None
        if pipe is not None:
            self.thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
            self.thread.start()

    def _read(self, pipe) -> None:
        with pipe:
            self.chunks += iter(pipe.readline, "")

    def text(self) -> str:
        if self.thread is not None:
            self.thread.join()
        return "".join(self.chunks)


def run(argv: List[str], *, timeout: Optional[float] = None, grace_s: float = GRACE_S, **popen) -> Finished:
    """argv in its own session, as subprocess.run with text pipes (stdout=/stderr= PIPE to read them); at the
    timeout, or on a Ctrl-C (re-raised), its whole process group is stopped (SIGTERM, SIGKILL after grace_s)."""
    with Group(grace_s=grace_s) as group:
        proc = group.start(argv, text=True, **popen)
        readers = [_Reader(proc.stdout), _Reader(proc.stderr)]
        code = group.wait(timeout)[0]
        group.stop()
    return Finished(code, readers[0].text(), readers[1].text())
