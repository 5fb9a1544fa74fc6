"""Mismatched calls: a table of collectives where the last rank's call differs from the others'
(size, dtype, op, root, the collective itself, all_to_allv counts).  Every rank must raise
NclMismatchError quickly (never hang, never move data), with one message saying which rank
differs and how; afterwards the group still computes right answers.

Each case runs on a fresh sub-communicator (`comm.split`), which the mismatch breaks; the world
communicator of the pool stays healthy, so one pool runs the whole table.
"""
import re

import numpy as np
import pytest

import ncl
from harness import case_seed, mismatch, rank_data, reference_reduce


def f32(n):
    return np.arange(n, dtype=np.float32)


def _a2av(c, odd, to_first):
    """all_to_allv with explicit counts: 2 rows to every peer, except that the odd rank sends
    `to_first` rows to rank 0 (which expects 2)."""
    send = [2] * c.size
    if odd:
        send[0] = to_first
    return c.all_to_allv(f32(sum(send)), send, [2] * c.size)


def _ones(dtype, n=4):
    return np.ones(n, dtype)


# name: (call(comm, odd), what every rank's message must say; {odd} is the odd rank)
CASES = {
    "all_reduce count": (
        lambda c, odd: c.all_reduce(f32(5 if odd else 3)),
        r"rank 0 called all_reduce\(float32, count=3.*rank {odd} called all_reduce\(float32, count=5"),
    "all_reduce 8 B vs 64 MiB": (
        lambda c, odd: c.all_reduce(f32(16 << 20 if odd else 2)),
        r"count=2, op=sum, algorithm=one_shot\); "
        r"rank {odd} called all_reduce\(float32, count=16777216, op=sum, algorithm=(one|two)_shot"),  # (tuning.py)
    "all_reduce dtype": (
        lambda c, odd: c.all_reduce(_ones(np.float64 if odd else np.float32)),
        r"rank {odd} called all_reduce\(float64, count=4"),
    "all_reduce op": (
        lambda c, odd: c.all_reduce(f32(4), op=ncl.MAX if odd else ncl.SUM),
        r"rank 0 called all_reduce\(float32, count=4, op=sum.*rank {odd} called all_reduce\(float32, count=4, op=max"),
    "all_reduce AVG vs SUM": (
        lambda c, odd: c.all_reduce(f32(4), op=ncl.AVG if odd else ncl.SUM),
        r"rank {odd} called all_reduce\(float32, count=4, op=avg"),
    "reduce root": (
        lambda c, odd: c.reduce(f32(4), root=1 if odd else 0),
        r"rank 0 called reduce\(.*root=0.*rank {odd} called reduce\(.*root=1"),
    "broadcast root": (
        lambda c, odd: c.broadcast(f32(4), root=1 if odd else 0),
        r"rank {odd} called broadcast\(float32, count=4, root=1\)"),
    "scatter root": (
        lambda c, odd: c.scatter(f32(4 * c.size), root=1 if odd else 0),
        r"rank {odd} called scatter\(float32, count=4, root=1\)"),
    "gather count": (
        lambda c, odd: c.gather(f32(6 if odd else 4), root=0),
        r"rank {odd} called gather\(float32, count=6, root=0\)"),
    "all_gather count": (
        lambda c, odd: c.all_gather(f32(7 if odd else 4)),
        r"rank {odd} called all_gather\(float32, count=7\)"),
    "reduce_scatter op": (
        lambda c, odd: c.reduce_scatter(f32(4 * c.size), op=ncl.MIN if odd else ncl.SUM),
        r"rank {odd} called reduce_scatter\(float32, count=4, op=min\)"),
    "all_to_all dtype of equal size": (
        lambda c, odd: c.all_to_all(_ones(np.int32 if odd else np.float32, 4 * c.size)),
        r"rank {odd} called all_to_all\(int32, count=4\)"),
    "all_reduce vs all_gather": (
        lambda c, odd: c.all_gather(f32(4)) if odd else c.all_reduce(f32(4)),
        r"rank 0 called all_reduce.*rank {odd} called all_gather"),
    "all_reduce vs barrier": (
        lambda c, odd: c.barrier() if odd else c.all_reduce(f32(4)),
        r"rank {odd} called barrier\(\)"),
    "broadcast vs reduce": (
        lambda c, odd: c.reduce(f32(4), root=0) if odd else c.broadcast(f32(4), root=0),
        r"rank 0 called broadcast\(float32, count=4, root=0\); "
        r"rank {odd} called reduce\(float32, count=4, op=sum, root=0\)"),
    "all_to_allv send count vs peer's recv count": (
        lambda c, odd: _a2av(c, odd, 3),
        r"all_to_allv counts disagree: rank {odd} sends 3 elements to rank 0, which expects 2 from it"),
    "all_to_allv dtype": (
        lambda c, odd: c.all_to_allv(_ones(np.int64 if odd else np.float64, 2 * c.size), [2] * c.size, [2] * c.size),
        r"rank {odd} called all_to_allv\(int64"),
}


def _run_table(comm, names):
    """Every case on a fresh sub-communicator of all ranks; {name: (exception mro, message) or
    None}, then a valid all_reduce on the world checked against numpy (failures as text)."""
    outcomes = {}
    for name in names:
        sub = comm.split(0)
        try:
            CASES[name][0](sub, sub.rank == sub.size - 1)
            outcomes[name] = None
        except Exception as exc:
            outcomes[name] = (tuple(t.__name__ for t in type(exc).__mro__), str(exc))
        finally:
            sub.close()
    datas = [rank_data(case_seed("after mismatches"), r, (999,), "float32", "SUM") for r in range(comm.size)]
    x = datas[comm.rank].copy()
    comm.all_reduce(x)
    bad = mismatch(f"all_reduce after the mismatch table rank={comm.rank}", x, reference_reduce(datas, "SUM"))
    return outcomes, bad


@pytest.mark.timeout(120)
@pytest.mark.parametrize("size", [2, 3])
def test_every_rank_raises_the_same_mismatch_error(pool_factory, size):
    """2 ranks (each waits for each) and 3 ranks on 2 CPUs (the last arrival checks for all)."""
    results = pool_factory(size).run(_run_table, list(CASES), timeout=100)
    odd = size - 1
    problems = []
    for rank, (outcomes, bad) in enumerate(results):
        if bad:
            problems.append(bad)
        for name, (_, says) in CASES.items():
            outcome = outcomes[name]
            if outcome is None:
                problems.append(f"{name}: rank {rank} raised nothing")
            elif "NclMismatchError" not in outcome[0]:
                problems.append(f"{name}: rank {rank} raised {outcome[0][0]}: {outcome[1]}")
            elif not re.search(says.format(odd=odd), outcome[1]):
                problems.append(f"{name}: rank {rank} says {outcome[1]!r}, not {says.format(odd=odd)!r}")
    for name in CASES:  # one story on every rank
        messages = {results[r][0][name][1] for r in range(size) if results[r][0][name]}
        if len(messages) > 1:
            problems.append(f"{name}: ranks word it differently: {messages}")
    assert not problems, "\n".join(problems)


def _recv_count_mismatch(comm):
    if comm.rank == 0:
        comm.send(f32(4), dst=1)
        return None
    comm.recv(f32(5), src=0)


@pytest.mark.timeout(60)
def test_recv_of_another_size_than_sent_raises_on_the_receiver(pool_factory):
    """Point to point is between two ranks: the receiver names the sender and both sizes (the
    sender's message was buffered, so its send returned)."""
    replies, errors, missing = pool_factory(2)._call(_recv_count_mismatch, (), {}, 30)
    assert not missing and [e.rank for e in errors] == [1], errors
    assert errors[0].is_a("NclMismatchError")
    assert "recv from rank 0 expected 5 float32 elements, but rank 0 sent 4 float32" in errors[0].message
