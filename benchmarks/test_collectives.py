"""Latency and bandwidth of every collective on 2 ranks (and a subset on 4), float32 from 8 B
to 16 MiB, plus all_reduce with each algorithm forced through NCL_ALGO, and every collective on
registered buffers (comm.empty, the direct paths).

Rank 0 is timed in the pytest process while the peers make the same calls (conftest.py), so
rounds are fixed per size (`PLAN`): many small rounds for latency, few for 16 MiB so the file
stays under a minute.  Outputs are preallocated (`out=`) so the figures measure the collective,
not the allocator.  Each case first checks one call against numpy on every rank (the data are
small integers, so float32 sums are exact in any order), so a fast but wrong collective fails.

extra_info: bytes (each rank's input), ranks, algo, algbw_GBps and busbw_GBps from the median
round, with nccl-tests' conventions (algbw counts the larger of input and output; busbw scales
it by the share of data that must cross between ranks).
"""
import functools

import numpy as np
import pytest

SIZES = {"8B": 8, "64KiB": 64 << 10, "1MiB": 1 << 20, "16MiB": 16 << 20}
# size -> (rounds, iterations per round, warmup rounds); see the README on pedantic rounds.
PLAN = {8: (100, 50, 5), 64 << 10: (50, 10, 2), 1 << 20: (30, 4, 2), 16 << 20: (15, 1, 2)}
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all")
FORCED_ALGOS = ("one_shot", "two_shot")


def rank_values(rank: int, count: int) -> np.ndarray:
    """Rank `rank`'s input: small integers (0..1023) scrambled by global position, so that
    every block of every rank differs and a misrouted chunk shows."""
    position = np.arange(rank * count, (rank + 1) * count, dtype=np.uint64)
    return ((position * np.uint64(2654435761)) >> np.uint64(16) & np.uint64(1023)).astype(np.float32)


class CollectiveWorkload:
    """One collective on `nbytes` of float32 per rank, as built identically on every rank."""

    def __init__(self, comm, collective: str, nbytes: int, registered: bool = False):
        self.comm = comm
        self.collective = collective
        count = nbytes // 4
        self.count = count
        alloc = (lambda n: comm.empty(n, np.float32)) if registered else (lambda n: np.empty(n, np.float32))
        self.x = alloc(count)
        self.x[...] = rank_values(comm.rank, count)
        block = count // comm.size
        if collective == "all_reduce":
            self.out, self.call = self.x, functools.partial(comm.all_reduce, self.x)
        elif collective == "broadcast":
            self.out, self.call = self.x, functools.partial(comm.broadcast, self.x, root=0)
        elif collective == "all_gather":
            self.out = alloc(comm.size * count)
            self.call = functools.partial(comm.all_gather, self.x, out=self.out)
        elif collective == "reduce_scatter":
            self.out = alloc(block)
            self.call = functools.partial(comm.reduce_scatter, self.x, out=self.out)
        elif collective == "all_to_all":
            self.out = alloc(count)
            self.call = functools.partial(comm.all_to_all, self.x, out=self.out)
        else:
            raise ValueError(f"unknown collective {collective!r}")

    def expected(self) -> np.ndarray:
        rank, size, count = self.comm.rank, self.comm.size, self.count
        everyone = [rank_values(r, count) for r in range(size)]
        mine = slice(rank * (count // size), (rank + 1) * (count // size))
        if self.collective == "all_reduce":
            return np.sum(everyone, axis=0, dtype=np.float32)
        if self.collective == "broadcast":
            return everyone[0]
        if self.collective == "all_gather":
            return np.concatenate(everyone)
        if self.collective == "reduce_scatter":
            return np.sum(everyone, axis=0, dtype=np.float32)[mine]
        return np.concatenate([theirs[mine] for theirs in everyone])  # all_to_all

    def verify(self) -> None:
        """One call, compared with numpy; then all_reduce's buffer is zeroed, so that the timed
        in-place calls keep summing zeros instead of growing towards inf."""
        self.call()
        want = self.expected()
        if not np.array_equal(self.out, want):
            bad = np.flatnonzero(self.out != want)
            raise AssertionError(f"{self.collective} on rank {self.comm.rank} of {self.comm.size}: {bad.size} of "
                                 f"{want.size} elements wrong, first at {bad[0]}: got {self.out[bad[0]]}, "
                                 f"want {want[bad[0]]}")
        if self.collective == "all_reduce":
            self.x.fill(0)

    def moved_bytes(self) -> int:
        """nccl-tests' message size: the larger of one rank's input and output."""
        return max(self.x.nbytes, self.out.nbytes)

    def bus_factor(self) -> float:
        n = self.comm.size
        return {"all_reduce": 2 * (n - 1) / n, "broadcast": 1.0}.get(self.collective, (n - 1) / n)


def algo_label(forced: str) -> str:
    """NCL_ALGO of the group, or "auto" (ncl's tuning picks per call)."""
    return forced or "auto"


def run_case(benchmark, rank_group, ranks: int, collective: str, size_label: str, forced_algo: str = "",
             registered: bool = False) -> None:
    nbytes = SIZES[size_label]
    rounds, iterations, warmup_rounds = PLAN[nbytes]
    group = rank_group(ranks, {"NCL_ALGO": forced_algo} if forced_algo else None)
    benchmark.group = f"{collective} {size_label}"
    workload = group.run_benchmark(benchmark, CollectiveWorkload, (collective, nbytes, registered), rounds=rounds,
                                   iterations=iterations, warmup_rounds=warmup_rounds)
    benchmark.extra_info.update(bytes=nbytes, ranks=ranks, registered=registered)
    if collective == "all_reduce":
        benchmark.extra_info["algo"] = algo_label(forced_algo)
    if benchmark.stats is not None:  # None under --benchmark-disable
        seconds = benchmark.stats.stats.median
        algbw = workload.moved_bytes() / seconds / 1e9
        benchmark.extra_info.update(algbw_GBps=round(algbw, 4), busbw_GBps=round(algbw * workload.bus_factor(), 4))


@pytest.mark.parametrize("size_label", SIZES)
@pytest.mark.parametrize("collective", COLLECTIVES)
def test_two_ranks(benchmark, rank_group, collective, size_label):
    run_case(benchmark, rank_group, 2, collective, size_label)


@pytest.mark.parametrize("size_label", SIZES)
@pytest.mark.parametrize("forced_algo", FORCED_ALGOS)
def test_two_ranks_all_reduce_forced(benchmark, rank_group, forced_algo, size_label):
    run_case(benchmark, rank_group, 2, "all_reduce", size_label, forced_algo)


@pytest.mark.parametrize("size_label", ("64KiB", "1MiB", "16MiB"))
@pytest.mark.parametrize("collective", COLLECTIVES)
def test_two_ranks_registered(benchmark, rank_group, collective, size_label):
    """comm.empty buffers: the direct paths above the cost model's threshold."""
    run_case(benchmark, rank_group, 2, collective, size_label, registered=True)


@pytest.mark.parametrize("size_label", ("64KiB", "1MiB", "16MiB"))
def test_two_ranks_all_reduce_direct(benchmark, rank_group, size_label):
    run_case(benchmark, rank_group, 2, "all_reduce", size_label, "direct", registered=True)


FOUR_RANK_CASES = [("all_reduce", "8B")] + [(c, s) for c in COLLECTIVES for s in ("64KiB", "1MiB")]


@pytest.mark.parametrize("collective,size_label", FOUR_RANK_CASES, ids=[f"{c}-{s}" for c, s in FOUR_RANK_CASES])
def test_four_ranks(benchmark, rank_group, collective, size_label):
    run_case(benchmark, rank_group, 4, collective, size_label)
