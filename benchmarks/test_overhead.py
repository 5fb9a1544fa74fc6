"""Per-call cost of the Python layer on a single-rank communicator, where the collective itself
is nearly free: `comm.all_reduce` on 8 bytes (numpy, torch, out=) next to the bare C call
with the same arguments.  The gap between them is the Python overhead (argument checks,
dtype lookup, algorithm choice, launch) that must stay small next to a collective's latency.
The same pair for `barrier`.  One rank needs no peers, so plain `benchmark()` calibration works.
"""
import numpy as np
import pytest

from ncl._native import ffi, lib

ALL_REDUCE_GROUP = "all_reduce 8 B, 1 rank"
BARRIER_GROUP = "barrier, 1 rank"


@pytest.mark.benchmark(group=ALL_REDUCE_GROUP)
def test_all_reduce_numpy(benchmark, solo_comm):
    x = np.array([1.5, -2.0], np.float32)
    result = benchmark(solo_comm.all_reduce, x)
    assert result is x and x.tolist() == [1.5, -2.0]  # a sum over one rank is the identity


@pytest.mark.benchmark(group=ALL_REDUCE_GROUP)
def test_all_reduce_torch(benchmark, solo_comm):
    torch = pytest.importorskip("torch")
    x = torch.tensor([1.5, -2.0], dtype=torch.float32)
    result = benchmark(solo_comm.all_reduce, x)
    assert result is x and x.tolist() == [1.5, -2.0]


@pytest.mark.benchmark(group=ALL_REDUCE_GROUP)
def test_all_reduce_numpy_out(benchmark, solo_comm):
    x = np.array([1.5, -2.0], np.float32)
    out = np.zeros_like(x)
    result = benchmark(solo_comm.all_reduce, x, out=out)
    assert result is out and out.tolist() == [1.5, -2.0]


@pytest.mark.benchmark(group=ALL_REDUCE_GROUP)
def test_all_reduce_c_baseline(benchmark, solo_comm):
    """The floor: ncl_all_reduce through cffi with every argument precomputed."""
    x = np.array([1.5, -2.0], np.float32)
    ptr = ffi.cast("void *", x.ctypes.data)
    status = benchmark(lib.ncl_all_reduce, solo_comm._backend.handle, ptr, ptr, x.size, lib.NCL_FLOAT32, lib.NCL_SUM,
                       lib.NCL_ALGO_AUTO)
    assert status == lib.NCL_OK and x.tolist() == [1.5, -2.0]


@pytest.mark.benchmark(group=BARRIER_GROUP)
def test_barrier(benchmark, solo_comm):
    assert benchmark(solo_comm.barrier) is None


@pytest.mark.benchmark(group=BARRIER_GROUP)
def test_barrier_c_baseline(benchmark, solo_comm):
    assert benchmark(lib.ncl_barrier, solo_comm._backend.handle) == lib.NCL_OK
