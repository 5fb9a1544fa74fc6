"""Argument checking: a table of malformed calls, each expected to raise ValueError/TypeError
with a message naming the bad argument, before any rank communicates.

Every case runs on a size-1 communicator in this process (where it applies) and on a live
2-rank pool.  On the pool, the last rank alone makes the bad call while the others do
nothing, then every rank runs a valid all_reduce: if the bad call had posted anything to its
peers, that all_reduce would hang or see a mismatch.  Cases that every rank rejects in the
same way are also made by all ranks at once.
"""
import re
from typing import Callable, NamedTuple, Tuple

import numpy as np
import pytest

import ncl
from harness import SMALL_STAGING, case_seed, mismatch, rank_data, reference_reduce


def _torch():
    import torch
    return torch


def f32(n=8):
    return np.arange(n, dtype=np.float32)


def read_only(n=8):
    a = f32(n)
    a.flags.writeable = False
    return a


class Case(NamedTuple):
    call: Callable            # call(comm): the malformed call
    raises: Tuple[type, ...]  # accepted exception types
    says: Tuple[str, ...]     # regexes the message must all match (case-insensitive)
    where: str = "any"        # "any": size 1 and the pool; "multi": the pool only (needs 2 ranks)
    everyone: bool = True     # on the pool, every rank rejects it the same way (else last rank only)


T, V, TV = (TypeError,), (ValueError,), (TypeError, ValueError)
X = r"\bx\b"
OUT = r"\bout\b"
CONTIG = r"contiguous"
DTYPE = r"dtype"
RO = r"read-only|readonly|writ"
ALIAS = (OUT, r"overlaps x")


def _on(buffer, call):
    """call(buffer): lets a table entry build overlapping views of one fresh buffer."""
    return call(buffer)

_LONGDOUBLE = np.dtype(np.longdouble).itemsize > 8

CASES = {
    # not a buffer
    "all_reduce(list)": Case(lambda c: c.all_reduce([1.0, 2.0]), T, (X,)),
    "all_reduce(str)": Case(lambda c: c.all_reduce("abc"), T, (X,)),
    "all_reduce(None)": Case(lambda c: c.all_reduce(None), T, (X,)),
    "broadcast(list)": Case(lambda c: c.broadcast([1, 2, 3]), T, (X,)),
    "all_gather(float)": Case(lambda c: c.all_gather(3.0), T, (X,)),
    "reduce_scatter(tuple)": Case(lambda c: c.reduce_scatter((1.0, 2.0)), T, (X,)),
    "send(list)": Case(lambda c: c.send([1.0], dst=0), T, (X,), "multi", False),
    "reduce_scatter(0-d array)": Case(lambda c: c.reduce_scatter(np.ones((), np.float32)),
                                      V, (X,)),
    # not C-contiguous
    "all_reduce(strided)": Case(lambda c: c.all_reduce(f32(16)[::2]), V, (CONTIG,)),
    "all_reduce(fortran order)": Case(lambda c: c.all_reduce(np.zeros((4, 4), np.float32).T), V, (CONTIG,)),
    "all_gather(strided)": Case(lambda c: c.all_gather(f32(16)[::2]), V, (CONTIG,)),
    "torch all_reduce(transposed)": Case(lambda c: c.all_reduce(_torch().zeros(4, 4).t()), V, (CONTIG,)),
    "torch all_reduce(meta device)": Case(lambda c: c.all_reduce(_torch().zeros(4, device="meta")), V,
                                          (r"\bx\b", r"device|cpu")),
    "torch broadcast(strided)": Case(lambda c: c.broadcast(_torch().zeros(16)[::2]), V, (CONTIG,)),
    # unsupported dtypes
    "all_reduce(complex64)": Case(lambda c: c.all_reduce(np.zeros(4, np.complex64)), T, (DTYPE,)),
    "all_reduce(bool)": Case(lambda c: c.all_reduce(np.zeros(4, bool)), T, (DTYPE,)),
    "all_reduce(object)": Case(lambda c: c.all_reduce(np.array([1, 2], dtype=object)), T, (DTYPE,)),
    "all_reduce(int16)": Case(lambda c: c.all_reduce(np.zeros(4, np.int16)), T, (DTYPE,)),
    "all_gather(uint64)": Case(lambda c: c.all_gather(np.zeros(4, np.uint64)), T, (DTYPE,)),
    "torch all_reduce(complex64)": Case(lambda c: c.all_reduce(_torch().zeros(4, dtype=_torch().complex64)),
                                        T, (DTYPE,)),
    "torch broadcast(bool)": Case(lambda c: c.broadcast(_torch().zeros(4, dtype=_torch().bool)), T, (DTYPE,)),
    # malformed out
    "all_reduce(out wrong shape)": Case(lambda c: c.all_reduce(f32(8), out=np.empty(7, np.float32)), V, (OUT,)),
    "all_reduce(out 2-d)": Case(lambda c: c.all_reduce(f32(8), out=np.empty((2, 4), np.float32)), V, (OUT,)),
    "all_reduce(out wrong dtype)": Case(lambda c: c.all_reduce(f32(8), out=np.empty(8, np.float64)), TV, (OUT,)),
    "all_reduce(out strided)": Case(lambda c: c.all_reduce(f32(8), out=np.empty(16, np.float32)[::2]), V,
                                    (OUT, CONTIG)),
    "all_reduce(out list)": Case(lambda c: c.all_reduce(f32(8), out=[0.0] * 8), T, (OUT,)),
    "all_reduce(out read-only)": Case(lambda c: c.all_reduce(f32(8), out=read_only(8)), V, (OUT, RO)),
    "all_gather(out wrong shape)": Case(lambda c: c.all_gather(f32(8), out=np.empty(8 * c.size - 1, np.float32)),
                                        V, (OUT,)),
    "all_gather(out wrong dtype)": Case(lambda c: c.all_gather(f32(8), out=np.empty(8 * c.size, np.int32)),
                                        TV, (OUT,)),
    "reduce_scatter(out wrong shape)": Case(lambda c: c.reduce_scatter(f32(4 * c.size), out=np.empty(5, np.float32)),
                                            V, (OUT,)),
    "all_to_all(out wrong dtype)": Case(lambda c: c.all_to_all(f32(4 * c.size), out=np.empty(4 * c.size, np.int32)),
                                        TV, (OUT,)),
    "scatter(out wrong shape)": Case(lambda c: c.scatter(f32(4 * c.size), root=c.size - 1,
                                                         out=np.empty(3, np.float32)), V, (OUT,), everyone=False),
    "gather(out wrong shape) on root": Case(lambda c: c.gather(f32(8), root=c.size - 1,
                                                               out=np.empty(8 * c.size + 1, np.float32)), V, (OUT,),
                                            everyone=False),
    "torch all_reduce(out wrong dtype)": Case(lambda c: c.all_reduce(_torch().zeros(8),
                                                                     out=_torch().zeros(8, dtype=_torch().float64)),
                                              TV, (OUT,)),
    # read-only buffers that would be written
    "all_reduce(read-only)": Case(lambda c: c.all_reduce(read_only()), V, (RO,)),
    "reduce(read-only) on root": Case(lambda c: c.reduce(read_only(), root=c.size - 1), V, (RO,), everyone=False),
    "broadcast(read-only) on non-root": Case(lambda c: c.broadcast(read_only(), root=0), V, (RO,), "multi", False),
    "recv(read-only)": Case(lambda c: c.recv(read_only(), src=0), V, (RO,), "multi", False),
    # ranks out of range or not ints
    "reduce(root=size)": Case(lambda c: c.reduce(f32(), root=c.size), V, (r"\broot\b",)),
    "reduce(root=-1)": Case(lambda c: c.reduce(f32(), root=-1), V, (r"\broot\b",)),
    "reduce(root=None)": Case(lambda c: c.reduce(f32(), root=None), T, (r"\broot\b",)),
    "broadcast(root=1.0)": Case(lambda c: c.broadcast(f32(), root=1.0), T, (r"\broot\b",)),
    "broadcast(root='0')": Case(lambda c: c.broadcast(f32(), root="0"), T, (r"\broot\b",)),
    "gather(root=size)": Case(lambda c: c.gather(f32(), root=c.size), V, (r"\broot\b",)),
    "scatter(root=-1)": Case(lambda c: c.scatter(f32(4 * c.size), root=-1), V, (r"\broot\b",)),
    "send(dst=size)": Case(lambda c: c.send(f32(), dst=c.size), V, (r"\bdst\b",)),
    "send(dst=-1)": Case(lambda c: c.send(f32(), dst=-1), V, (r"\bdst\b",)),
    "send(dst=0.0)": Case(lambda c: c.send(f32(), dst=0.0), T, (r"\bdst\b",)),
    "recv(src=size)": Case(lambda c: c.recv(f32(), src=c.size), V, (r"\bsrc\b",)),
    "recv(src='0')": Case(lambda c: c.recv(f32(), src="0"), T, (r"\bsrc\b",)),
    # dim 0 not divisible by the size
    "reduce_scatter(indivisible)": Case(lambda c: c.reduce_scatter(f32(2 * c.size + 1)), V,
                                        (r"divisible|shape\[0\]",), "multi"),
    "all_to_all(indivisible)": Case(lambda c: c.all_to_all(f32(2 * c.size + 1)), V,
                                    (r"divisible|shape\[0\]",), "multi"),
    "scatter(indivisible) on root": Case(lambda c: c.scatter(f32(2 * c.size + 1), root=c.size - 1), V,
                                         (r"divisible|shape\[0\]",), "multi", False),
    # scatter without a buffer
    "scatter(None) on root": Case(lambda c: c.scatter(None, root=c.size - 1), TV, (X,), everyone=False),
    "scatter(None, no out) on non-root": Case(lambda c: c.scatter(None, root=0), TV, (r"\bout\b|\bx\b",),
                                              "multi", False),
    # all_to_allv counts
    "all_to_allv(negative count)": Case(lambda c: c.all_to_allv(f32(2 * c.size), [-1] + [2] * (c.size - 2) + [5]
                                                                if c.size > 1 else [-1]), V, (r"send_counts",)),
    "all_to_allv(too many counts)": Case(lambda c: c.all_to_allv(f32(2 * c.size + 2), [2] * (c.size + 1)), V,
                                         (r"send_counts",)),
    "all_to_allv(counts don't sum to rows)": Case(lambda c: c.all_to_allv(f32(2 * c.size + 1), [2] * c.size), V,
                                                  (r"send_counts",)),
    "all_to_allv(float counts)": Case(lambda c: c.all_to_allv(f32(2 * c.size), [2.0] * c.size), T,
                                      (r"send_counts",)),
    "all_to_allv(counts None)": Case(lambda c: c.all_to_allv(f32(2 * c.size), None), T, (r"send_counts",)),
    "all_to_allv(negative recv_counts)": Case(lambda c: c.all_to_allv(f32(2 * c.size), [2] * c.size,
                                                                      [-1] * c.size), V, (r"recv_counts",)),
    "all_to_allv(too few recv_counts)": Case(lambda c: c.all_to_allv(f32(2 * c.size), [2] * c.size,
                                                                     [2] * (c.size - 1)), V, (r"recv_counts",)),
    "all_to_allv(out too small)": Case(lambda c: c.all_to_allv(f32(2 * c.size), [2] * c.size, [2] * c.size,
                                                               out=np.empty(2 * c.size - 1, np.float32)), V, (OUT,)),
    # not a ReduceOp
    "all_reduce(op='sum')": Case(lambda c: c.all_reduce(f32(), op="sum"), TV, (r"\bop\b",)),
    "all_reduce(op=None)": Case(lambda c: c.all_reduce(f32(), op=None), TV, (r"\bop\b",)),
    "reduce(op=99)": Case(lambda c: c.reduce(f32(), op=99), TV, (r"\bop\b",)),
    "reduce_scatter(op='max')": Case(lambda c: c.reduce_scatter(f32(2 * c.size), op="max"), TV, (r"\bop\b",)),
    # split
    "split(color='a')": Case(lambda c: c.split("a"), T, (r"\bcolor\b",)),
    "split(color=1.5)": Case(lambda c: c.split(1.5), T, (r"\bcolor\b",)),
    "split(key='a')": Case(lambda c: c.split(0, key="a"), T, (r"\bkey\b",)),
    # out sharing memory with x where the call forbids it (peers would read half-written data);
    # b = f32(k): x and out are overlapping views of one array
    "all_reduce(out overlaps x)": Case(lambda c: _on(f32(9), lambda b: c.all_reduce(b[:8], out=b[1:])), V, ALIAS),
    "torch all_reduce(out overlaps x)": Case(
        lambda c: _on(_torch().arange(9.0), lambda b: c.all_reduce(b[:8], out=b[1:])), V, ALIAS),
    "reduce(out overlaps x, root)": Case(
        lambda c: _on(f32(9), lambda b: c.reduce(b[1:], root=c.rank, out=b[:8])), V, ALIAS),
    "broadcast(out overlaps x, root)": Case(
        lambda c: _on(f32(9), lambda b: c.broadcast(b[:8], root=c.rank, out=b[1:])), V, ALIAS),
    "all_gather(x inside out, not its block)": Case(
        lambda c: _on(f32(4 * c.size + 1), lambda b: c.all_gather(b[1:5], out=b[:4 * c.size])), V, ALIAS),
    "gather(x inside out, not its block)": Case(
        lambda c: _on(f32(4 * c.size + 1), lambda b: c.gather(b[1:5], root=c.rank, out=b[:4 * c.size])), V, ALIAS),
    "reduce_scatter(out inside x, not its block)": Case(
        lambda c: _on(f32(4 * c.size + 1), lambda b: c.reduce_scatter(b[:4 * c.size], out=b[1:5])), V, ALIAS),
    "scatter(out inside x, not its block)": Case(
        lambda c: _on(f32(4 * c.size + 1), lambda b: c.scatter(b[:4 * c.size], root=c.rank, out=b[1:5])), V, ALIAS),
    "all_to_all(out overlaps x)": Case(
        lambda c: _on(f32(4 * c.size + 1), lambda b: c.all_to_all(b[:-1], out=b[1:])), V, ALIAS),
    "all_to_allv(out is x)": Case(
        lambda c: _on(f32(2 * c.size), lambda b: c.all_to_allv(b, [2] * c.size, [2] * c.size, out=b)), V, ALIAS),
    "all_to_allv(counts exchanged, out overlaps x)": Case(
        lambda c: _on(f32(2 * c.size + 1), lambda b: c.all_to_allv(b[:-1], [2] * c.size, None, out=b[1:])),
        V, ALIAS),
}
if _LONGDOUBLE:
    CASES["all_reduce(float128)"] = Case(lambda c: c.all_reduce(np.zeros(4, np.longdouble)), T, (DTYPE,))

SINGLE = [k for k, c in CASES.items() if c.where == "any"]


def _needs_torch(case_id):
    if case_id.startswith("torch"):
        pytest.importorskip("torch")


def outcome_of(case_id, comm):
    """Make the call; (exception MRO names, message) or None when nothing was raised."""
    try:
        CASES[case_id].call(comm)
    except Exception as exc:
        return tuple(c.__name__ for c in type(exc).__mro__), str(exc)
    return None


def check_outcome(case_id, outcome, where):
    case = CASES[case_id]
    assert outcome is not None, f"{case_id} on {where}: no exception raised"
    mro, message = outcome
    names = [t.__name__ for t in case.raises]
    assert any(n in mro for n in names), f"{case_id} on {where}: raised {mro[0]}({message!r}), want one of {names}"
    for pattern in case.says:
        assert re.search(pattern, message, re.IGNORECASE), \
            f"{case_id} on {where}: message {message!r} does not match {pattern!r}"


def _valid_all_reduce(comm, tag):
    """A distinct-data float32 SUM and int32 MAX; the failures as text."""
    n, me = comm.size, comm.rank
    failures = []
    for dtype, op in (("float32", "SUM"), ("int32", "MAX")):
        datas = [rank_data(case_seed(tag, dtype), r, (1001,), dtype, op) for r in range(n)]
        x = datas[me].copy()
        comm.all_reduce(x, op=getattr(ncl, op))
        if (bad := mismatch(f"valid all_reduce {dtype} {op} after {tag!r} rank={me}/{n}", x,
                            reference_reduce(datas, op))):
            failures.append(bad)
    return failures


# ---- size 1, in this process -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def comm1():
    uid = ncl.get_unique_id()
    comm = ncl.init(rank=0, size=1, unique_id=uid)
    yield comm
    comm.close()
    import glob
    assert not glob.glob(f"/dev/shm/ncl-{uid[:12]}*"), "the size-1 communicator left shared memory behind"


@pytest.mark.parametrize("case_id", SINGLE)
def test_bad_argument_size_1(comm1, case_id):
    _needs_torch(case_id)
    check_outcome(case_id, outcome_of(case_id, comm1), "size 1")


def test_recv_from_any_source_alone_is_an_error(comm1):
    """src=None (any source) is valid with peers; a communicator of one has none to hear from."""
    with pytest.raises(ValueError, match=r"\bsrc\b"):
        comm1.recv(f32(), None)


def test_size_1_still_works_after_the_table(comm1):
    for case_id in SINGLE:
        if not case_id.startswith("torch"):
            outcome_of(case_id, comm1)
    assert not _valid_all_reduce(comm1, "after table")


def test_the_cores_all_reduce_entry_refuses_an_overlap_before_anything_moves(comm1):
    """all_reduce's fast path leaves out's overlap with x to the core (ncl_all_reduce_checked): every
    overlap but send itself is refused, nothing written and no call begun; in place, buffers that touch
    without overlapping and empty ones run (one rank: a copy)."""
    from ncl import flight
    from ncl._native import ffi, lib, last_error
    backend = comm1._backend

    def run(b, send, recv, count):
        p = ffi.from_buffer(b)
        return lib.ncl_all_reduce_checked(backend.handle, p + 4 * send, p + 4 * recv, count, lib.NCL_FLOAT32,
                                          lib.NCL_SUM, lib.NCL_ALGO_AUTO)
    newest = flight.entries(backend)[-1]["seq"] if flight.entries(backend) else None
    for send, recv in ((0, 1), (1, 0), (0, 7), (7, 0)):  # by 7 elements down to 1, either way
        b = f32(16)
        assert run(b, send, recv, 8) == lib.NCL_ERR_ARGUMENT and "overlaps" in last_error()
        assert np.array_equal(b, f32(16)), (send, recv)
    assert (flight.entries(backend)[-1]["seq"] if flight.entries(backend) else None) == newest
    for send, recv, count in ((0, 8, 8), (8, 0, 8), (3, 3, 8), (0, 1, 0)):
        b = f32(16)
        assert run(b, send, recv, count) == lib.NCL_OK, (send, recv, count)
        assert np.array_equal(b[recv:recv + count], f32(16)[send:send + count])


def test_read_only_input_is_fine_out_of_place(comm1):
    """A read-only x is legal wherever ncl only reads it."""
    x = read_only(8)
    out = np.empty(8, np.float32)
    assert comm1.all_reduce(x, out=out) is out and np.array_equal(out, x)
    assert np.array_equal(comm1.all_gather(x), x)
    assert np.array_equal(comm1.reduce_scatter(x), x)
    assert np.array_equal(comm1.all_to_all(x), x)
    res = comm1.broadcast(x, root=0)  # the root's buffer is only read
    assert res is None or res is x


def test_closed_communicator_refuses_use():
    comm = ncl.init(rank=0, size=1)
    with comm:
        comm.all_reduce(f32())
    for call in (lambda: comm.all_reduce(f32()), lambda: comm.barrier(), lambda: comm.all_gather(f32()),
                 lambda: comm.all_reduce(f32(), async_op=True)):
        with pytest.raises((ncl.NclError, ValueError)) as info:
            call()
        assert "closed" in str(info.value).lower(), str(info.value)
    comm.close()  # closing twice is harmless


# ---- 2 ranks: nobody communicates ------------------------------------------------------------------
def _bad_call_then_valid(comm, case_id, everyone):
    """The bad call on every rank (everyone=True) or on the last rank only, then a valid
    all_reduce on every rank; (outcome on this rank or None if it made no call, failures)."""
    outcome = "skipped"
    if everyone or comm.rank == comm.size - 1:
        outcome = outcome_of(case_id, comm)
    return outcome, _valid_all_reduce(comm, case_id)


POOL_CASES = [(k, everyone) for k, c in CASES.items() for everyone in (False, True) if everyone <= c.everyone]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case_id,everyone", POOL_CASES,
                         ids=[f"{k}-{'all' if e else 'last'}" for k, e in POOL_CASES])
def test_bad_argument_2_ranks(pool_factory, case_id, everyone):
    _needs_torch(case_id)
    pool = pool_factory(2, SMALL_STAGING)
    results = pool.run(_bad_call_then_valid, case_id, everyone, timeout=30)
    for r, (outcome, failures) in enumerate(results):
        assert not failures, failures
        if outcome != "skipped":
            check_outcome(case_id, outcome, f"rank {r} of 2")


def _all_to_allv_wrong_out_on_last_rank(comm):
    """recv_counts=None: the counts are exchanged first, so a wrong out on one rank is found
    only after that exchange; the library then aborts the communicator."""
    n = comm.size
    out_rows = 2 * n - (1 if comm.rank == n - 1 else 0)
    return comm.all_to_allv(f32(2 * n), [2] * n, None, out=np.empty(out_rows, np.float32))


@pytest.mark.timeout(60)
def test_all_to_allv_exchanged_counts_wrong_out_fails_the_group(pool_factory):
    """The one malformed call that cannot be caught before communicating: the bad rank raises
    ValueError naming out, and its peers fail promptly with an NclError instead of hanging."""
    pool = pool_factory(2, SMALL_STAGING + (("NCL_TIMEOUT", "30"),))  # its own pool: this one dies
    errors = pool.run_expect_error(_all_to_allv_wrong_out_on_last_rank, timeout=20)
    bad, peer = errors[1], errors[0]
    assert bad.is_a("ValueError") and re.search(OUT, bad.message), str(bad)
    assert peer.is_a("NclError"), str(peer)


def _allowed_in_place_layouts(comm):
    """Every overlap the aliasing rules allow, against numpy; the failures as text."""
    n, me, k = comm.size, comm.rank, 5
    datas = [rank_data(case_seed("in place", "float32"), r, (n * k,), "float32", "SUM") for r in range(n)]
    failures = []

    def expect(what, got, want):
        if (bad := mismatch(f"{what} rank={me}/{n}", got, want)):
            failures.append(bad)

    x = datas[me].copy()
    expect("all_reduce out=x", comm.all_reduce(x, out=x), reference_reduce(datas, "SUM"))
    x = datas[me].copy()
    expect("all_to_all out=x", comm.all_to_all(x, out=x),
           np.concatenate([d[me * k:(me + 1) * k] for d in datas]))
    for root in range(n):
        x = datas[me].copy()
        expect(f"broadcast out=x root={root}", comm.broadcast(x, root, out=x), datas[root])
        out = np.zeros(n * k, np.float32)
        out[me * k:(me + 1) * k] = datas[me][:k]
        got = comm.gather(out[me * k:(me + 1) * k], root, out=out if me == root else None)
        if me == root:
            expect(f"gather x=own block root={root}", got, np.concatenate([d[:k] for d in datas]))
        x = datas[me].copy()
        got = comm.scatter(x, root, out=x[me * k:(me + 1) * k] if me == root else np.empty(k, np.float32))
        expect(f"scatter out=own block root={root}", got, datas[root][me * k:(me + 1) * k])
    x = datas[me].copy()
    expect("reduce_scatter out=own block", comm.reduce_scatter(x, out=x[me * k:(me + 1) * k]),
           reference_reduce(datas, "SUM")[me * k:(me + 1) * k])
    out = np.zeros(n * k, np.float32)
    out[me * k:(me + 1) * k] = datas[me][:k]
    expect("all_gather x=own block", comm.all_gather(out[me * k:(me + 1) * k], out=out),
           np.concatenate([d[:k] for d in datas]))
    return failures


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", [1, 3])
def test_allowed_in_place_layouts_give_the_right_answer(pool_factory, size):
    """What the aliasing checks let through really works: out=x for the element-wise calls and
    all_to_all, x as this rank's block of out for all_gather / gather, out as this rank's block
    of x for reduce_scatter / scatter."""
    failures = pool_factory(size, SMALL_STAGING).run(_allowed_in_place_layouts, timeout=30)
    assert not sum(failures, []), sum(failures, [])
