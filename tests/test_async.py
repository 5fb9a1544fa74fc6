"""Real asynchrony and point-to-point that never deadlocks (issue 22 items 2 and 3), one thread
per communicator (issue 21 item 1), and torch's version counter (issue 21 item 8).

Every wait has a timeout, so a deadlock fails the test instead of hanging it.  Messages are
checked against rank_data recomputed on the receiver.
"""
import threading
import time

import numpy as np
import pytest

from harness import case_seed, garbage_like, rank_data, report

pytestmark = pytest.mark.timeout(240)
WAIT_S = 30
NO_CMA = (("NCL_CMA", "0"),)


def _msg(tag, r, n_floats, k=0):
    return rank_data(case_seed("async", tag, n_floats, k), r, (n_floats,), "float32")


def _ring_sends_first(comm, n_floats, rounds):
    """Every rank isends to the right before it irecvs from the left (both large): NCCL's group
    semantics let these complete; blocking sends through staging would wait in a cycle."""
    me, n = comm.rank, comm.size
    right, left = (me + 1) % n, (me - 1) % n
    failures = []
    for k in range(rounds):
        x, buf = _msg("ring", me, n_floats, k), garbage_like(_msg("ring", left, n_floats, k))
        sent = comm.send(x, right, async_op=True)
        got = comm.recv(buf, left, async_op=True)
        got.wait(WAIT_S)
        sent.wait(WAIT_S)
        if not np.array_equal(buf, _msg("ring", left, n_floats, k)):
            failures.append(f"ring round {k} rank {me}: wrong data from {left}")
    return failures


@pytest.mark.parametrize("env", [(), NO_CMA], ids=["cma", "staged"])
@pytest.mark.parametrize("size", [2, 3])
def test_ring_of_large_messages_where_every_rank_sends_first(pool_factory, size, env):
    failures = pool_factory(size, env).run(_ring_sends_first, 1 << 18, 3, timeout=90)  # 1 MiB each
    assert not sum(failures, []), report(sum(failures, []))


def _many_outstanding(comm):
    """Both ranks of a pair queue several sends of mixed sizes (0, 1, beyond two slots) before
    their recvs; everything arrives in order."""
    me, peer = comm.rank, 1 - comm.rank
    sizes = [0, 1, 300_000, 7, 70_000]
    sends = [comm.send(_msg("many", me, s, k), peer, async_op=True) for k, s in enumerate(sizes)]
    bufs = [np.full(s, np.nan, np.float32) for s in sizes]
    recvs = [comm.recv(b, peer, async_op=True) for b in bufs]
    for w in sends + recvs:
        w.wait(WAIT_S)
    return [f"message {k} ({s} floats) to rank {me} wrong" for k, (s, b) in enumerate(zip(sizes, bufs))
            if not np.array_equal(b, _msg("many", peer, s, k))]


@pytest.mark.parametrize("env", [(), NO_CMA], ids=["cma", "staged"])
def test_many_outstanding_sends_before_the_recvs(pool_factory, env):
    failures = pool_factory(2, env).run(_many_outstanding, timeout=90)
    assert not sum(failures, []), report(sum(failures, []))


def _async_returns_at_once(comm):
    """Rank 1 posts an irecv and an all_reduce, both of which wait for rank 0 (which sleeps
    0.5 s first): the calls return at once and complete later, in order."""
    out = {}
    if comm.rank == 1:
        buf = np.zeros(1000, np.float32)
        x = np.ones(4, np.float32)
        t0 = time.monotonic()
        r = comm.recv(buf, 0, async_op=True)
        a = comm.all_reduce(x, async_op=True)
        out["returned_s"] = time.monotonic() - t0
        out["done_at_once"] = r.is_completed() or a.is_completed()
        assert a.wait(WAIT_S) is x
        r.wait(WAIT_S)
        out["data"] = bool(np.array_equal(buf, _msg("late", 0, 1000)) and np.all(x == 2))
        out["took_s"] = time.monotonic() - t0
    else:
        time.sleep(0.5)
        comm.send(_msg("late", 0, 1000), 1)
        comm.all_reduce(np.ones(4, np.float32))
    return out


def test_async_calls_return_at_once_and_complete_in_program_order(pool_factory):
    got = pool_factory(2, ()).run(_async_returns_at_once, timeout=60)[1]
    assert got["returned_s"] < 0.2 and not got["done_at_once"], got
    assert got["data"] and got["took_s"] >= 0.4, got


def _two_threads(comm):
    """Rank 0: a thread blocked in all_reduce (rank 1 comes 0.5 s late); a second thread calling
    all_reduce meanwhile gets NclStateError at once, and the first thread's result is right."""
    import ncl
    if comm.rank == 1:
        time.sleep(0.5)
        x = np.full(3, 2.0, np.float32)
        comm.all_reduce(x)
        return {}
    x = np.full(3, 1.0, np.float32)
    first = threading.Thread(target=comm.all_reduce, args=(x,))
    first.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    try:
        comm.all_reduce(np.zeros(3, np.float32))
        second = "no error"
    except ncl.NclStateError as exc:
        second = str(exc)
    took = time.monotonic() - t0
    first.join(WAIT_S)
    return {"second": second, "took": took, "first": x.tolist()}


def test_a_second_thread_in_a_call_gets_NclStateError(pool_factory):
    got = pool_factory(2, ()).run(_two_threads, timeout=60)[0]
    assert "another thread" in got["second"] and got["took"] < 0.1, got
    assert got["first"] == [3.0, 3.0, 3.0], got


def _version_counter(comm):
    import torch
    w = torch.ones(4, requires_grad=True)
    x = torch.full((4,), float(comm.rank + 1))
    y = w * x  # saves x for backward
    before = x._version
    comm.all_reduce(x)
    bumped = x._version > before
    try:
        y.sum().backward()
        caught = "no error"
    except RuntimeError as exc:
        caught = str(exc)
    reduce_src = torch.ones(2)
    v = reduce_src._version
    comm.reduce(reduce_src, root=0)  # written on the root only
    arr = np.ones(2, np.float32)
    comm.all_reduce(arr)
    return {"bumped": bumped, "caught": caught, "reduce_bumped": reduce_src._version > v}


def test_in_place_calls_bump_torch_version_counter(pool_factory):
    pytest.importorskip("torch")
    got = pool_factory(2, ()).run(_version_counter, timeout=60)
    for r, g in enumerate(got):
        assert g["bumped"] and "modified by an inplace operation" in g["caught"], g
        assert g["reduce_bumped"] == (r == 0), g


def _any_source(comm, n_floats):
    """Rank 0 receives from whichever rank sends first, sync and async; the others send twice
    (rank 1 after rank 2 the first time, so the first message is rank 2's)."""
    me = comm.rank
    if me != 0:
        if me == 1:
            time.sleep(0.3)
        comm.send(_msg("any", me, n_floats, 0), 0)
        comm.barrier()
        comm.send(_msg("any", me, n_floats, 1), 0)
        return []
    failures, senders = [], []
    for k in (0, 1):
        for j in range(comm.size - 1):
            buf = np.full(n_floats, np.nan, np.float32)
            if k == 0:
                src = comm.recv(buf, None)
            else:
                src = comm.recv(buf, None, async_op=True).wait(WAIT_S)
            senders.append(src)
            if not np.array_equal(buf, _msg("any", src, n_floats, k)):
                failures.append(f"round {k}: data from rank {src} wrong")
        if k == 0:
            comm.barrier()
    if senders[0] != 2 or sorted(senders[:2]) != [1, 2] or sorted(senders[2:]) != [1, 2]:
        failures.append(f"senders {senders}")
    return failures


@pytest.mark.parametrize("n_floats", [5, 200_000])
def test_recv_from_any_source_returns_the_sender(pool_factory, n_floats):
    failures = pool_factory(3, ()).run(_any_source, n_floats, timeout=60)
    assert not sum(failures, []), report(sum(failures, []))


def _any_source_alone(comm):
    import ncl
    try:
        comm.recv(np.zeros(1, np.float32), None)
    except ncl.NclTimeoutError as exc:
        return str(exc)
    return "no error"


def test_recv_from_any_source_times_out_when_nothing_comes(pool_factory):
    got = pool_factory(2, (("NCL_TIMEOUT", "1"),)).run(_any_source_alone, timeout=60)
    assert all("any rank" in g for g in got), got


def _grouped(comm):
    """Inside comm.group(): every rank sends 1 MiB to every other before any recv (a cycle
    of blocking sends otherwise), plus an all_reduce; leaving the block completes them all."""
    me, n = comm.rank, comm.size
    bufs = {p: np.full(1 << 18, np.nan, np.float32) for p in range(n) if p != me}
    x = np.full(5, float(me + 1), np.float32)
    with comm.group():
        for p in bufs:
            comm.send(_msg("group", me, 1 << 18, p), p)
        works = [comm.recv(b, p) for p, b in bufs.items()]
        comm.all_reduce(x)
    failures = [f"group recv from {p} wrong" for p, b in bufs.items()
                if not np.array_equal(b, _msg("group", p, 1 << 18, me))]
    if not all(w.is_completed() for w in works) or not np.all(x == n * (n + 1) / 2):
        failures.append(f"group not complete at exit: {x}")
    return failures


def test_calls_in_a_group_progress_together_and_complete_at_its_end(pool_factory):
    failures = pool_factory(3, ()).run(_grouped, timeout=60)
    assert not sum(failures, []), report(sum(failures, []))
