"""Soak: random collectives (kind, dtype, op, size, root, registered or not, world or a split
communicator) on 4 ranks for a bounded time, every result checked against numpy.

All ranks draw the same sequence from one seed, so they call the same collectives in the same
order; every 25 calls they agree (an all_reduce of the elapsed time, MAX) whether the time is
up, so they stop together.  The figures (calls and bytes verified) are printed (pytest -s)."""
import random
import time

import numpy as np
import pytest

from harness import DTYPES, FLOATS, OPS, case_seed, mismatch, rank_data, reference_reduce, report

KINDS = ("all_reduce", "reduce", "broadcast", "all_gather", "gather", "reduce_scatter", "scatter", "all_to_all",
         "all_to_allv")
SECONDS = 20.0


def _one(comm, rng, seed, registered):
    """One random collective on `comm`; (failure or None, bytes checked on this rank)."""
    import ncl
    n, me = comm.size, comm.rank
    kind, dtype = rng.choice(KINDS), rng.choice(sorted(DTYPES))
    op = rng.choice([o for o in OPS if dtype in FLOATS or o != "AVG"])
    rows = int(10 ** rng.uniform(0, 5.3)) // n * n if rng.random() < 0.9 else 0   # 0 .. ~200k elements
    root = rng.randrange(n)
    label = f"{kind} {dtype} {op} rows={rows} root={root} registered={registered} n={n}"
    datas = [rank_data(seed, r, (rows,), dtype, op if kind in ("all_reduce", "reduce", "reduce_scatter") else None)
             for r in range(n)]

    def buf(a):
        if not registered:
            return a.copy()
        x = comm.empty(a.shape, a.dtype)
        x[...] = a
        return x

    x = buf(datas[me])
    block = rows // n
    if kind == "all_reduce":
        got, want = comm.all_reduce(x, getattr(ncl, op)), reference_reduce(datas, op)
    elif kind == "reduce":
        got, want = comm.reduce(x, root, getattr(ncl, op)), reference_reduce(datas, op)
        if me != root:
            got, want = x, datas[me]   # other ranks' buffers are untouched
    elif kind == "broadcast":
        got, want = comm.broadcast(x, root), datas[root]
    elif kind == "all_gather":
        got, want = comm.all_gather(x), np.concatenate(datas)
    elif kind == "gather":
        got = comm.gather(x, root)
        if me != root:
            return (None if got is None else f"{label}: a non-root got {type(got).__name__}"), 0
        want = np.concatenate(datas)
    elif kind == "reduce_scatter":
        got, want = comm.reduce_scatter(x, getattr(ncl, op)), reference_reduce(datas, op)[me * block:(me + 1) * block]
    elif kind == "scatter":
        got, want = comm.scatter(x, root), datas[root][me * block:(me + 1) * block]
    elif kind == "all_to_all":
        got = comm.all_to_all(x)
        want = np.concatenate([d[me * block:(me + 1) * block] for d in datas])
    else:  # all_to_allv: a random count matrix, the same on every rank
        counts = [[rng.randrange(0, 50) for _ in range(n)] for _ in range(n)]
        sends = [rank_data(seed, r, (sum(counts[r]),), dtype) for r in range(n)]
        offsets = [np.cumsum([0] + counts[r]) for r in range(n)]
        got = comm.all_to_allv(sends[me], counts[me])
        want = np.concatenate([sends[r][offsets[r][me]:offsets[r][me + 1]] for r in range(n)])
    return mismatch(label, got, want), want.nbytes


def _soak(comm, seed, seconds):
    rng = random.Random(seed)
    halves = comm.split(comm.rank % 2)                    # 2 communicators of 2 ranks
    reversed_world = comm.split(0, key=-comm.rank)       # the world, ranks in reverse order
    failures, calls, checked = [], 0, 0
    start = time.monotonic()
    clock = np.zeros(1)
    while True:
        for _ in range(25):
            which = rng.random()
            target = comm if which < 0.6 else reversed_world if which < 0.8 else halves
            # the halves draw from their own stream, so both halves stay in step whatever they draw
            sub_rng = rng if target is not halves else random.Random(rng.random())
            failure, nbytes = _one(target, sub_rng, case_seed(seed, calls), registered=rng.random() < 0.25)
            calls += 1
            checked += nbytes
            if failure:
                failures.append(failure)
        clock[0] = time.monotonic() - start
        if comm.all_reduce(clock, __import__("ncl").MAX)[0] > seconds or len(failures) > 20:
            break
    halves.close()
    reversed_world.close()
    return failures, calls, checked


@pytest.mark.timeout(180)
def test_soak_four_ranks(pool_factory):
    results = pool_factory(4).run(_soak, 20261126, SECONDS, timeout=150)
    failures = sum((r[0] for r in results), [])
    assert not failures, report(failures)
    calls = results[0][1]
    checked = sum(r[2] for r in results)
    assert all(r[1] == calls for r in results) and calls >= 200, [r[1] for r in results]
    print(f"\nsoak: {calls} collectives on 4 ranks in {SECONDS:.0f} s, {checked / 1e6:.1f} MB of results verified, "
          "0 wrong")
