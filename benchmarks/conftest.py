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
import os
import sys
from typing import Any, Callable, List, Mapping, Optional, Tuple

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from harness import GRACE_S, Pools, RankPool, scoped_environ  # noqa: E402  (the one rank harness)

# Every rank (the pytest process included) sees these, so that no wait lasts forever.
GROUP_ENV = {"NCL_TIMEOUT": "60"}
# Knobs a group decides itself: removed before its own values apply.  Other NCL_* knobs
# (NCL_SPIN_US, NCL_BUFFSIZE, ...) pass through from the caller's environment to every rank.
GROUP_KNOBS = ("NCL_RANK", "NCL_WORLD_SIZE", "NCL_LOCAL_RANK", "NCL_UNIQUE_ID", "NCL_ALGO", "NCL_TIMEOUT")
STARTUP_TIMEOUT_S = 120.0   # spawning and importing numpy + ncl on a loaded 2-core machine
REPLY_TIMEOUT_S = 90.0      # a peer's benchmark loop ends when rank 0's does; > NCL_TIMEOUT


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


def prepare(comm, factory: Callable, args: Tuple) -> Any:
    """Build a workload, check one call of it, and line every rank up before the timing."""
    workload = factory(comm, *args)
    workload.verify()
    comm.barrier()
    return workload


def _peer_calls(comm, factory: Callable, args: Tuple, calls: int) -> None:
    """A peer's part of run_benchmark: the same workload, called as often as rank 0's will be."""
    try:
        workload = prepare(comm, factory, args)
        for _ in range(calls):
            workload.call()
    except BaseException:
        comm.abort()  # rank 0 is waiting for this rank: let it fail now rather than at NCL_TIMEOUT
        raise


class RankGroup:
    """`size` ranks of one communicator: rank 0 here (`self.comm`), the others a RankPool's (tests/harness.py)."""

    def __init__(self, size: int, env: Optional[Mapping[str, str]] = None):
        self.pool = RankPool(size, {**GROUP_ENV, **(env or {})}, startup_timeout=STARTUP_TIMEOUT_S,
                             local_rank0=True, controlled=GROUP_KNOBS)
        self.comm = self.pool.comm

    def __repr__(self) -> str:
        return f"<RankGroup of {self.pool.size} ranks, env {self.pool.env}{', dead' if self.dead else ''}>"

    @property
    def dead(self) -> bool:
        return self.pool.dead

    def _peer_failures(self, timeout: float) -> List[str]:
        replies, missing = self.pool.collect(timeout)
        return ([f"{e}\n{e.traceback}" for e in self.pool.errors(replies)]
                + [f"rank {r} did not answer within {timeout:g} s" for r in missing])

    def run_benchmark(self, benchmark, factory: Callable, args: Tuple, *, rounds: int, iterations: int,
                      warmup_rounds: int) -> Any:
        """Time `factory(comm, *args).call()` on rank 0 with pedantic(rounds, iterations,
        warmup_rounds) while every peer makes the same calls; returns rank 0's workload.
        Any rank's failure fails the test (with that rank's traceback) and retires the group."""
        if self.dead:
            raise RuntimeError(f"{self!r} is dead")
        calls = pedantic_calls(benchmark, rounds, iterations, warmup_rounds)
        try:
            self.pool.send(_peer_calls, (factory, args, calls))
            workload = prepare(self.comm, factory, args)
            budget = CallBudget(workload.call, calls)
            benchmark.pedantic(budget, rounds=rounds, iterations=iterations, warmup_rounds=warmup_rounds)
            if budget.used != calls:
                raise RuntimeError(f"pytest-benchmark called the target {budget.used} times, not the {calls} "
                                   "agreed with the peer ranks; update pedantic_calls() for this version")
        except BaseException as exc:
            self.comm.abort()  # peers waiting for rank 0 fail now instead of at NCL_TIMEOUT
            failures = self._peer_failures(GRACE_S)
            self.pool.kill()
            if failures and isinstance(exc, Exception):
                raise PeerFailure(f"rank 0: {exc!r}\n" + "\n".join(failures)) from exc
            raise
        failures = self._peer_failures(REPLY_TIMEOUT_S)
        if failures:
            self.pool.kill()
            raise PeerFailure("\n".join(failures))
        return workload

    def close(self) -> List[str]:
        return self.pool.close()

    def shm_leftovers(self) -> List[str]:
        return self.pool.shm_leftovers()


class PeerFailure(AssertionError):
    """A peer rank failed; the message holds its traceback."""


@pytest.fixture(scope="session")
def rank_group():
    """rank_group(size, env=None) -> a live RankGroup, reused across tests for the same
    (size, env); a group that failed is replaced.  At the end of the session every group is
    closed and must leave nothing in /dev/shm."""
    groups = Pools(RankGroup)
    yield groups.get
    problems = groups.close()
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="session")
def solo_comm():
    """A communicator of one rank (`ncl.init()` with no arguments)."""
    import ncl
    with scoped_environ(GROUP_ENV, GROUP_KNOBS):
        comm = ncl.init()
    yield comm
    comm.close()
