"""Live groups of ranks for the benchmarks, with rank 0 inside the pytest process.

Why rank 0 is local: pytest-benchmark can only time code that runs in the pytest process, so
rank 0 calls the collective under `benchmark.pedantic` while ranks 1..N-1 (spawned processes)
call it in a plain loop.  A collective completes only when every rank has called it, so all
ranks must agree beforehand on exactly how many calls pytest-benchmark will make; automatic
calibration decides that on rank 0 alone, hence pedantic with fixed rounds (`pedantic_calls`).

A workload is a picklable factory `factory(comm, *args)` returning an object with `verify()`
(one checked call, the same on every rank) and `call()` (the timed call); peers import the
factory by reference, so it must live at module level in a `benchmarks.*` module.
"""
import contextlib
import glob
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import signal
import time
import traceback
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import pytest

# Every rank (the pytest process included) sees these, so that no wait lasts forever.
GROUP_ENV = {"NCL_TIMEOUT": "60"}
# Knobs a group decides itself: removed before its own values apply.  Other NCL_* knobs
# (NCL_SPIN_US, NCL_BUFFSIZE, ...) pass through from the caller's environment to every rank.
GROUP_KNOBS = ("NCL_RANK", "NCL_WORLD_SIZE", "NCL_LOCAL_RANK", "NCL_UNIQUE_ID", "NCL_ALGO", "NCL_TIMEOUT")
STARTUP_TIMEOUT_S = 120.0   # spawning and importing numpy + ncl on a loaded 2-core machine
REPLY_TIMEOUT_S = 90.0      # a peer's benchmark loop ends when rank 0's does; > NCL_TIMEOUT
GRACE_S = 10.0              # after rank 0 aborted the group, time for peers to report why


def pedantic_calls(benchmark, rounds: int, iterations: int, warmup_rounds: int) -> int:
    """How many times `benchmark.pedantic(target, rounds=..., iterations=..., warmup_rounds=...)`
    calls target (pytest-benchmark 5.x, checked against its source and by counting): once when
    benchmarks are disabled; otherwise `iterations` per warmup round and per round, one more to
    get the result when iterations > 1, and --benchmark-cprofile-loops more under --benchmark-cprofile."""
    if benchmark.disabled:
        return 1
    calls = (warmup_rounds + rounds) * iterations + (1 if iterations > 1 else 0)
    if benchmark.cprofile:
        loops = benchmark.cprofile_loops
        calls += loops if loops is not None else iterations
    return calls


class CallBudget:
    """Wraps rank 0's target: refuses to call it more than the peers will (which would hang
    until NCL_TIMEOUT), so a change in pytest-benchmark's call pattern fails at once."""

    def __init__(self, target: Callable[[], Any], budget: int):
        self.target = target
        self.budget = budget
        self.used = 0

    def __call__(self):
        if self.used >= self.budget:
            raise RuntimeError(f"pytest-benchmark called the target more than the {self.budget} times agreed "
                               "with the peer ranks; update pedantic_calls() for this pytest-benchmark version")
        self.used += 1
        return self.target()


@contextlib.contextmanager
def scoped_environ(values: Mapping[str, str], remove: Sequence[str] = GROUP_KNOBS):
    """os.environ without `remove` and with `values`, restored afterwards (ncl reads its knobs
    when a communicator is created, so this only needs to last through ncl.init)."""
    saved = {name: os.environ.get(name) for name in set(remove) | set(values)}
    try:
        for name in remove:
            os.environ.pop(name, None)
        os.environ.update(values)
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def prepare(comm, factory: Callable, args: Tuple) -> Any:
    """Build a workload, check one call of it, and line every rank up before the timing."""
    workload = factory(comm, *args)
    workload.verify()
    comm.barrier()
    return workload


def _error_text(where: str) -> Tuple[str, str]:
    return ("err", f"{where}:\n{traceback.format_exc()}")


def _peer_main(rank: int, size: int, unique_id: str, env: Dict[str, str], conn) -> None:
    """Ranks 1..N-1: join the group, then run each requested workload `calls` times."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the pytest process's to handle
    for name in GROUP_KNOBS:
        os.environ.pop(name, None)
    os.environ.update(env)
    try:
        import ncl
    except BaseException:
        conn.send(_error_text(f"rank {rank} could not import ncl"))
        return
    conn.send(("ready", os.getpid()))
    try:
        comm = ncl.init(rank=rank, size=size, unique_id=unique_id)
    except BaseException:
        conn.send(_error_text(f"rank {rank}: ncl.init failed"))
        return
    conn.send(("ok", None))
    try:
        while True:
            try:
                request = conn.recv()
            except (EOFError, OSError):
                return  # the pytest process is gone
            except BaseException:  # the workload could not be unpickled (an import error)
                comm.abort()  # rank 0 is about to wait for this rank: let it fail now
                conn.send(_error_text(f"rank {rank} could not load its workload"))
                continue
            if request is None:
                break
            factory, args, calls = request
            try:
                workload = prepare(comm, factory, args)
                for _ in range(calls):
                    workload.call()
                reply = ("ok", None)
            except BaseException:
                comm.abort()
                reply = _error_text(f"rank {rank} failed in {getattr(factory, '__name__', factory)}{args}")
            conn.send(reply)
    finally:
        try:
            comm.close()
            reply = ("ok", None)
        except BaseException:
            reply = _error_text(f"rank {rank}: close failed")
        try:
            conn.send(reply)
        except OSError:
            pass


class RankGroup:
    """`size` ranks of one communicator: rank 0 here (`self.comm`), the others spawned."""

    def __init__(self, size: int, env: Optional[Mapping[str, str]] = None):
        import ncl
        self.size = size
        self.env = {**GROUP_ENV, **(env or {})}
        self.unique_id = ncl.get_unique_id()
        self.dead = False
        self.comm = None
        ctx = mp.get_context("spawn")
        self._conns: List[Any] = []
        self._procs: List[Any] = []
        for rank in range(1, size):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=_peer_main, args=(rank, size, self.unique_id, self.env, child_end),
                               name=f"ncl-bench-rank{rank}", daemon=True)
            proc.start()
            child_end.close()
            self._conns.append(parent_end)
            self._procs.append(proc)
        try:
            self._expect_all("ready", STARTUP_TIMEOUT_S, "start")
            with scoped_environ(self.env):
                self.comm = ncl.init(rank=0, size=size, unique_id=self.unique_id)
            self._expect_all("ok", GRACE_S, "join the group")
        except BaseException as exc:
            details = self._peer_failures(self._collect(GRACE_S)) if not isinstance(exc, PeerFailure) else []
            self.kill()
            if details:
                raise PeerFailure(f"{self!r} failed to start: {exc!r}\n" + "\n".join(details)) from exc
            raise

    def __repr__(self) -> str:
        return f"<RankGroup of {self.size} ranks, env {self.env}{', dead' if self.dead else ''}>"

    # ---- talking to the peers -------------------------------------------------------------------
    def _collect(self, timeout: float, ranks: Optional[Sequence[int]] = None) -> Dict[int, tuple]:
        """One reply from each peer rank in `ranks` (default: all) that answers within
        `timeout`; a dead or silent peer answers "err"."""
        deadline = time.monotonic() + timeout
        pending = {conn: rank for rank, conn in enumerate(self._conns, start=1)
                   if not conn.closed and (ranks is None or rank in ranks)}
        replies: Dict[int, tuple] = {}
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for conn in mpc.wait(list(pending), timeout=left):
                rank = pending.pop(conn)
                try:
                    replies[rank] = conn.recv()
                except (EOFError, OSError):
                    proc = self._procs[rank - 1]
                    proc.join(1)
                    replies[rank] = ("err", f"rank {rank} died (exit code {proc.exitcode})")
        for rank in pending.values():
            replies[rank] = ("err", f"rank {rank} did not answer within {timeout:g} s")
        return replies

    @staticmethod
    def _peer_failures(replies: Dict[int, tuple]) -> List[str]:
        return [reply[1] for _, reply in sorted(replies.items()) if reply[0] == "err"]

    def _expect_all(self, kind: str, timeout: float, what: str) -> None:
        replies = self._collect(timeout)
        failures = self._peer_failures(replies)
        if failures or any(reply[0] != kind for reply in replies.values()):
            details = failures or [str(reply) for reply in replies.values()]
            raise PeerFailure(f"{self!r}: peers failed to {what}:\n" + "\n".join(details))

    # ---- benchmarking ---------------------------------------------------------------------------
    def run_benchmark(self, benchmark, factory: Callable, args: Tuple, *, rounds: int, iterations: int,
                      warmup_rounds: int) -> Any:
        """Time `factory(comm, *args).call()` on rank 0 with pedantic(rounds, iterations,
        warmup_rounds) while every peer makes the same calls; returns rank 0's workload.
        Any rank's failure fails the test (with that rank's traceback) and retires the group."""
        if self.dead:
            raise RuntimeError(f"{self!r} is dead")
        calls = pedantic_calls(benchmark, rounds, iterations, warmup_rounds)
        asked: List[int] = []  # peers that got the request (and so will answer)
        try:
            for rank, conn in enumerate(self._conns, start=1):
                conn.send((factory, args, calls))
                asked.append(rank)
            workload = prepare(self.comm, factory, args)
            budget = CallBudget(workload.call, calls)
            benchmark.pedantic(budget, rounds=rounds, iterations=iterations, warmup_rounds=warmup_rounds)
            if budget.used != calls:
                raise RuntimeError(f"pytest-benchmark called the target {budget.used} times, not the {calls} "
                                   "agreed with the peer ranks; update pedantic_calls() for this version")
        except BaseException as exc:
            self.comm.abort()  # peers waiting for rank 0 fail now instead of at NCL_TIMEOUT
            failures = self._peer_failures(self._collect(GRACE_S, asked))
            self.kill()
            if failures and isinstance(exc, Exception):
                raise PeerFailure(f"rank 0: {exc!r}\n" + "\n".join(failures)) from exc
            raise
        failures = self._peer_failures(self._collect(REPLY_TIMEOUT_S))
        if failures:
            self.kill()
            raise PeerFailure("\n".join(failures))
        return workload

    # ---- lifetime -------------------------------------------------------------------------------
    def close(self) -> List[str]:
        """Close every rank's communicator and join the peers; the problems met, as text."""
        problems: List[str] = []
        if self.dead:
            return problems
        for conn in self._conns:
            try:
                conn.send(None)
            except OSError as exc:
                problems.append(f"{self!r}: could not ask a peer to close: {exc!r}")
        try:
            self.comm.close()
        except Exception as exc:
            problems.append(f"{self!r}: rank 0 close failed: {exc!r}")
        problems += self._peer_failures(self._collect(GRACE_S))
        for rank, proc in enumerate(self._procs, start=1):
            proc.join(GRACE_S)
            if proc.is_alive():
                problems.append(f"{self!r}: rank {rank} did not exit after close")
        self.kill()
        return problems

    def kill(self) -> None:
        """Stop everything now (after a failure): abort rank 0, SIGKILL the peers."""
        if self.comm is not None:
            self.comm.abort()
            self.comm.close()
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
        for proc in self._procs:
            proc.join(GRACE_S)
        for conn in self._conns:
            conn.close()
        self.dead = True

    def shm_leftovers(self) -> List[str]:
        """Shared-memory files named after this group's job id (ncl's prefix: ncl-<id[:12]>-)."""
        return sorted(glob.glob(f"/dev/shm/ncl-{self.unique_id[:12]}-*"))


class PeerFailure(AssertionError):
    """A peer rank failed; the message holds its traceback."""


@pytest.fixture(scope="session")
def rank_group():
    """rank_group(size, env=None) -> a live RankGroup, reused across tests for the same
    (size, env); a group that failed is replaced.  At the end of the session every group is
    closed and must leave nothing in /dev/shm."""
    groups: Dict[tuple, RankGroup] = {}
    retired: List[RankGroup] = []

    def get(size: int, env: Optional[Mapping[str, str]] = None) -> RankGroup:
        key = (size, tuple(sorted((env or {}).items())))
        group = groups.get(key)
        if group is None or group.dead:
            if group is not None:
                retired.append(group)
            group = groups[key] = RankGroup(size, dict(key[1]))
        return group

    yield get
    problems: List[str] = []
    for group in [*groups.values(), *retired]:
        problems += group.close()
        for path in group.shm_leftovers():
            problems.append(f"{group!r} left {path}")
            os.unlink(path)
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="session")
def solo_comm():
    """A communicator of one rank (`ncl.init()` with no arguments)."""
    import ncl
    with scoped_environ(GROUP_ENV):
        comm = ncl.init()
    yield comm
    comm.close()
