"""Registered buffers (comm.empty): every collective that has a direct path, against numpy.

Pools run with NCL_DIRECT_MIN_BYTES=1 so that even one-element messages take the direct
path (peers' buffers read in place, no staging), and once with the cost model's own
thresholds, where small messages on registered buffers go through staging instead.  Also:
what happens when ranks disagree about registration, freeing, closing, torch tensors.
"""
import gc

import numpy as np
import pytest

from harness import (DTYPES, FLOATS, OPS, SMALL_STAGING, as_numpy, case_seed, mismatch, rank_data, reference_reduce,
                     report)

DIRECT = SMALL_STAGING + (("NCL_DIRECT_MIN_BYTES", "1"),)
COUNTS = (1, 7, 1001, 50_000)


def _op(name):
    import ncl
    return getattr(ncl, name)


def _registered(comm, data):
    x = comm.empty(data.shape, data.dtype)
    x[...] = data
    return x


def _sweep(comm, tag, dtypes, ops=OPS):
    """Every direct collective on registered buffers, in place and out of place."""
    n, me = comm.size, comm.rank
    failures = []

    def check(label, got, want):
        if (bad := mismatch(f"{label} rank={me}/{n}", got, want)):
            failures.append(bad)

    for dtype in dtypes:
        for count in COUNTS:
            for op in ops if dtype in FLOATS else [o for o in ops if o != "AVG"]:
                datas = [rank_data(case_seed(tag, dtype, op, count), r, (count,), dtype, op) for r in range(n)]
                want = reference_reduce(datas, op)
                x = _registered(comm, datas[me])
                out = comm.empty(count, dtype)
                check(f"all_reduce {dtype} {op} count={count} out", comm.all_reduce(x, _op(op), out=out), want)
                check(f"all_reduce {dtype} {op} count={count} (x changed)", x, datas[me])
                comm.all_reduce(x, _op(op))
                check(f"all_reduce {dtype} {op} count={count} in place", x, want)

                rows = count
                full = [rank_data(case_seed(tag, "rs", dtype, op, count), r, (n * rows,), dtype, op) for r in range(n)]
                x = _registered(comm, full[me])
                want = reference_reduce(full, op)[me * rows:(me + 1) * rows]
                check(f"reduce_scatter {dtype} {op} rows={rows}", comm.reduce_scatter(x, _op(op)), want)
                check(f"reduce_scatter {dtype} {op} rows={rows} in place",
                      comm.reduce_scatter(x, _op(op), out=x[me * rows:(me + 1) * rows]), want)

            datas = [rank_data(case_seed(tag, "ag", dtype, count), r, (count,), dtype) for r in range(n)]
            x = _registered(comm, datas[me])
            check(f"all_gather {dtype} count={count}", comm.all_gather(x), np.concatenate(datas))
            stacked = comm.empty(n * count, dtype)
            stacked[me * count:(me + 1) * count] = datas[me]
            comm.all_gather(stacked[me * count:(me + 1) * count], out=stacked)
            check(f"all_gather {dtype} count={count} in place", stacked, np.concatenate(datas))

            full = [rank_data(case_seed(tag, "a2a", dtype, count), r, (n * count,), dtype) for r in range(n)]
            x = _registered(comm, full[me])
            want = np.concatenate([d[me * count:(me + 1) * count] for d in full])
            check(f"all_to_all {dtype} count={count}", comm.all_to_all(x), want)
            check(f"all_to_all {dtype} count={count} in place (staged)", comm.all_to_all(x, out=x), want)

            for root in range(n):
                datas = [rank_data(case_seed(tag, "bc", dtype, count, root), r, (count,), dtype) for r in range(n)]
                x = _registered(comm, datas[me])
                check(f"broadcast {dtype} count={count} root={root}", comm.broadcast(x, root), datas[root])
                x = _registered(comm, datas[me])
                out = np.zeros_like(datas[me])
                check(f"broadcast {dtype} count={count} root={root} out", comm.broadcast(x, root, out=out),
                      datas[root])
                check(f"broadcast {dtype} count={count} root={root} (x changed)", x, datas[me])
    return failures


@pytest.mark.timeout(240)
@pytest.mark.parametrize("size", (1, 2, 3, 4, 8))
def test_registered_collectives(pool_factory, size):
    dtypes = ("float32", "bfloat16", "int32") if size != 8 else ("float32",)
    failures = pool_factory(size, DIRECT).run(_sweep, "registered", dtypes, timeout=220)
    assert not sum(failures, []), report(sum(failures, []))


@pytest.mark.timeout(200)
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_registered_every_dtype(pool_factory, dtype):
    failures = pool_factory(3, DIRECT).run(_sweep, "dtypes", (dtype,), timeout=180)
    assert not sum(failures, []), report(sum(failures, []))


@pytest.mark.timeout(120)
def test_registered_with_model_thresholds(pool_factory):
    """Without the override, small registered messages go through staging and large ones are
    direct; both give the reference."""
    failures = pool_factory(4, SMALL_STAGING).run(_sweep, "model", ("float32",), ("SUM", "MAX"), timeout=100)
    assert not sum(failures, []), report(sum(failures, []))


def _forced_direct(comm, count):
    x = comm.empty(count, np.float32)
    x[:] = comm.rank + 1
    comm.all_reduce(x)
    result = x.copy()
    try:
        comm.all_reduce(np.ones(count, np.float32))
    except ValueError as exc:
        return result, str(exc)
    return result, None


@pytest.mark.timeout(60)
def test_forced_direct_needs_registered_buffers(pool_factory):
    pool = pool_factory(3, SMALL_STAGING + (("NCL_ALGO", "direct"),))
    for result, error in pool.run(_forced_direct, 4099):
        np.testing.assert_array_equal(result, np.full(4099, 6, np.float32))
        assert error and "comm.empty" in error


def _half_registered(comm):
    x = comm.empty(5000, np.float32)  # collective: every rank allocates ...
    comm.all_reduce(x if comm.rank == 0 else np.ones(5000, np.float32))  # ... but rank 1 passes private memory


@pytest.mark.timeout(60)
def test_registered_on_some_ranks_only_is_a_mismatch(pool_factory):
    """Rank 0 would read rank 1's buffer in place, rank 1 would stage: caught, on both ranks."""
    errors = pool_factory(2, DIRECT).run_expect_error(_half_registered)
    assert all(e.is_a("NclMismatchError") and "send in registered window" in e.message for e in errors)


def _sizes_differ(comm):
    comm.empty(100 + comm.rank, np.uint8)


@pytest.mark.timeout(60)
def test_empty_with_different_sizes_is_a_mismatch(pool_factory):
    errors = pool_factory(2, DIRECT).run_expect_error(_sizes_differ)
    assert all(e.is_a("NclMismatchError") and "comm.empty(uint8, count=101" in e.message for e in errors), errors


def _lifetimes(comm):
    """Arrays outlive a freed sibling and the communicator; torch tensors work too."""
    import torch
    a = comm.empty((3, 4), np.float64)
    b = comm.empty((3, 4), "float64")
    a[...] = comm.rank
    del b
    gc.collect()
    comm.all_reduce(a)
    t = comm.empty((2, 3), torch.bfloat16, like="torch")
    t.fill_(comm.rank + 1)
    comm.all_reduce(t)
    z = comm.empty(0, np.int8)
    comm.all_reduce(z)
    return as_numpy(a).copy(), t.float().numpy().copy(), z.shape, type(t).__name__


@pytest.mark.timeout(60)
def test_registered_lifetimes_and_torch(pool_factory):
    n = 3
    for a, t, zshape, kind in pool_factory(n, DIRECT).run(_lifetimes):
        np.testing.assert_array_equal(a, np.full((3, 4), sum(range(n)), np.float64))
        np.testing.assert_array_equal(t, np.full((2, 3), sum(range(1, n + 1)), np.float32))
        assert zshape == (0,) and kind == "Tensor"


def test_empty_rejects_bad_arguments():
    import ncl
    with ncl.init() as comm:
        for bad, exc in (((-1,), ValueError), ((2.5,), ValueError), (("3",), ValueError)):
            with pytest.raises(exc):
                comm.empty(bad)
        with pytest.raises(TypeError):
            comm.empty(3, np.complex64)
        with pytest.raises(ValueError):
            comm.empty(3, like="jax")
        x = comm.empty((2, 2), np.int64)
        x[...] = 7
    assert (x == 7).all()  # still mapped after the communicator closed
