"""The seam between the Communicator and its backend (ncl/call.py, ncl/backend.py): every public
call is validated once and handed over as exactly one Call whose fields say what the caller
asked; a bad argument hands over none; the wrappers (emulation, tracing) read the Call, and the
Call's count agrees with what the C core's flight recorder saw of the same call."""
import logging

import numpy as np
import pytest

import ncl
from ncl import emulation, flight, log
from ncl._native import ffi, lib
from ncl.call import Call
from ncl.comm import Communicator
from ncl.shm import SharedMemoryBackend
from ncl.topology import load_topology
from ncl.tuning import options
from ncl.work import Work


class Recording:
    """A backend that runs nothing and keeps every Call (rank `rank` of `size`)."""

    def __init__(self, rank=1, size=3, inner=None):
        self.rank, self.size, self.label = rank, size, "fake"
        self.options, self.recorder, self.inner = None, None, inner
        self.calls, self.closed = [], False

    def run(self, call):
        self.calls.append(call)
        if self.inner is not None:
            self.inner.run(call)

    def last_call(self):
        return self.inner.last_call() if self.inner is not None else None

    def window(self, nbytes):
        return ffi.buffer(ffi.new("char[]", nbytes))

    def abort(self, reason=None):
        pass

    def close(self):
        self.closed = True


def _address(a) -> int:
    return a.ctypes.data


def _ptr(p) -> int:
    return int(ffi.cast("uintptr_t", p))


def test_each_public_call_hands_over_one_call_with_what_was_asked():
    backend = Recording(rank=1, size=3)
    comm = Communicator(backend)
    x = np.arange(6, dtype=np.float32)
    out = np.empty(2, np.float32)
    cases = [  # (the call, collective, count, dtype, op, root, send, recv)
        (lambda: comm.all_reduce(x, ncl.MAX), "all_reduce", 6, lib.NCL_FLOAT32, lib.NCL_MAX, -1, x, x),
        (lambda: comm.reduce(x, root=2), "reduce", 6, lib.NCL_FLOAT32, lib.NCL_SUM, 2, x, None),
        (lambda: comm.reduce_scatter(x, out=out), "reduce_scatter", 2, lib.NCL_FLOAT32, lib.NCL_SUM, -1, x, out),
        (lambda: comm.broadcast(x, root=0), "broadcast", 6, lib.NCL_FLOAT32, -1, 0, x, x),
        (lambda: comm.all_gather(x), "all_gather", 6, lib.NCL_FLOAT32, -1, -1, x, None),
        (lambda: comm.gather(x, root=1), "gather", 6, lib.NCL_FLOAT32, -1, 1, x, None),
        (lambda: comm.scatter(x, root=0, out=out), "scatter", 2, lib.NCL_FLOAT32, -1, 0, None, out),
        (lambda: comm.all_to_all(x), "all_to_all", 2, lib.NCL_FLOAT32, -1, -1, x, None),
        (lambda: comm.send(x, 2), "send", 6, lib.NCL_FLOAT32, -1, 2, x, None),
        (lambda: comm.recv(x, 0), "recv", 6, lib.NCL_FLOAT32, -1, 0, None, x),
        (lambda: comm.barrier(), "barrier", 0, -1, -1, -1, None, None),
    ]
    for run, collective, count, dtype, op, root, send, recv in cases:
        before = len(backend.calls)
        run()
        assert len(backend.calls) == before + 1, collective
        c = backend.calls[-1]
        assert (c.collective, c.count, c.dtype, c.op, c.root) == (collective, count, dtype, op, root), c
        if send is not None:
            assert _ptr(c.send) == _address(send), collective
        if recv is not None:
            assert _ptr(c.recv) == _address(recv), collective
        assert c.nbytes == count * (4 if dtype >= 0 else 0)


def test_all_to_allv_hands_over_its_counts_in_elements():
    backend = Recording(rank=0, size=3)
    comm = Communicator(backend)
    x = np.arange(12, dtype=np.int64).reshape(6, 2)
    comm.all_to_allv(x, [1, 2, 3], [3, 0, 1])
    c = backend.calls[-1]
    assert (c.collective, c.count, c.dtype, c.row) == ("all_to_allv", 12, lib.NCL_INT64, 2)
    assert c.send_counts == (2, 4, 6) and c.recv_counts == (6, 0, 2) and c.matrix is None
    matrix = np.array([[1, 2, 3], [0, 0, 0], [5, 5, 5]])
    comm.all_to_allv(x, [1, 2, 3], all_counts=matrix)
    c = backend.calls[-1]
    assert c.recv_counts == (2, 0, 10) and c.matrix.tolist() == matrix.tolist() and c.row == 2
    assert len(backend.calls) == 2


@pytest.mark.parametrize("bad", [
    lambda comm, x: comm.all_reduce(x, op="sum"),
    lambda comm, x: comm.all_reduce(x, out=np.empty(5, np.float32)),
    lambda comm, x: comm.reduce(x, root=3),
    lambda comm, x: comm.reduce_scatter(x[:5]),
    lambda comm, x: comm.broadcast(x[::2]),
    lambda comm, x: comm.all_to_allv(x, [1, 2]),
    lambda comm, x: comm.send(x, 1),  # to itself
    lambda comm, x: comm.recv(x.astype(np.complex64), 0),
])
def test_a_bad_argument_hands_over_no_call(bad):
    backend = Recording(rank=1, size=3)
    with pytest.raises((ValueError, TypeError)):
        bad(Communicator(backend), np.arange(6, dtype=np.float32))
    assert backend.calls == []


def test_async_calls_reach_the_backend_once_in_program_order():
    backend = Recording()
    comm = Communicator(backend)
    x = np.ones(3, np.float32)
    works = [comm.all_reduce(x, async_op=True), comm.all_gather(x, async_op=True)]
    comm.barrier()
    assert works[0].wait() is x and works[1].wait().shape == (9,)
    assert [c.collective for c in backend.calls] == ["all_reduce", "all_gather", "barrier"]
    comm.close()
    assert backend.closed and comm.closed


def test_emulation_costs_the_calls_bytes():
    topology = load_topology("pcie-gen5-8card")
    emulator = emulation.Emulator(topology, "account", 3, keep=8)
    comm = Communicator(Recording(size=3), emulator=emulator)
    x = np.ones(1000, np.float64)
    comm.all_reduce(x)
    assert emulator.last["bytes"] == 8000 and emulator.last["emulated_us"] == pytest.approx(
        topology.predict("all_reduce", 8000, 3, emulator.last["target_algorithm"]) * 1e6)
    comm.all_gather(x[:10])
    assert emulator.last["collective"] == "all_gather" and emulator.last["bytes"] == 80
    assert emulator.totals["calls"] == 2


def test_tracing_logs_the_call_and_what_the_core_decided(caplog):
    with _solo() as backend:
        logger = logging.LoggerAdapter(logging.getLogger("ncl.test"), {})
        traced = flight.Traced(backend, logger)
        x = np.arange(4, dtype=np.float32)
        with caplog.at_level(1, logger="ncl.test"):
            traced.run(Call.of("all_reduce", ffi.from_buffer(x), ffi.from_buffer(x), 4, lib.NCL_FLOAT32, lib.NCL_SUM))
        assert "all_reduce #1 4 x float32 (16 B), sum -> local, steps 0" in caplog.text  # one rank: a copy


class _solo:
    """A real one-rank shared-memory backend."""

    def __enter__(self):
        self.backend = SharedMemoryBackend.create("world", "world", 0, 1, ncl.get_unique_id(), options(1))
        return self.backend

    def __exit__(self, *exc):
        self.backend.close()


def test_the_calls_count_is_what_the_flight_recorder_saw():
    """Emulation and tracing take a call's bytes from the Call: they must be the core's."""
    with _solo() as inner:
        backend = Recording(rank=0, size=1, inner=inner)
        comm = Communicator(backend)
        x = np.arange(12, dtype=np.float32).reshape(6, 2)
        calls = [lambda: comm.all_reduce(x), lambda: comm.reduce(x), lambda: comm.broadcast(x),
                 lambda: comm.all_gather(x), lambda: comm.gather(x), lambda: comm.reduce_scatter(x),
                 lambda: comm.scatter(x), lambda: comm.all_to_all(x), lambda: comm.all_to_allv(x, [6], [6]),
                 lambda: comm.all_to_allv(x, [6], all_counts=[[6]]), lambda: comm.barrier()]
        for run in calls:
            run()
        record = flight.entries(inner)
        assert len(record) == len(calls)
        assert [e["collective"] for e in record] == [c.collective for c in backend.calls]
        assert [(e["count"], e["bytes"]) for e in record] == [(c.count, c.nbytes) for c in backend.calls]


class InPlace(Recording):
    """A Recording backend that also offers the in-place all_reduce's fast path, and keeps what it got
    there as (address, count, dtype, op, algo); `fail`: the exception it raises instead."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.in_place, self.fail, self.aborted = [], None, []

    def all_reduce_in_place(self, buf, count, dtype, op, algo):
        if self.fail is not None:
            raise self.fail
        self.in_place.append((_ptr(buf), count, dtype, int(op), algo))

    def abort(self, reason=None):
        self.aborted.append(reason)


def test_an_in_place_numpy_all_reduce_skips_the_call_with_the_same_arguments():
    backend = InPlace(rank=1, size=3)
    comm = Communicator(backend)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert comm.all_reduce(x) is x and comm.all_reduce(x, ncl.MAX) is x
    assert backend.in_place == [(_address(x), 6, lib.NCL_FLOAT32, lib.NCL_SUM, lib.NCL_ALGO_AUTO),
                                (_address(x), 6, lib.NCL_FLOAT32, lib.NCL_MAX, lib.NCL_ALGO_AUTO)]
    assert backend.calls == []
    # everything else still goes as a Call (or fails as before): out=, a subclass, a view of another dtype
    out = np.empty_like(x)
    comm.all_reduce(x, out=out)
    comm.all_reduce(x.view(np.recarray))
    comm.all_reduce(x.view(np.int32))
    assert [(c.collective, c.dtype, _ptr(c.recv)) for c in backend.calls] == [
        ("all_reduce", lib.NCL_FLOAT32, _address(out)), ("all_reduce", lib.NCL_FLOAT32, _address(x))]
    assert backend.in_place[2:] == [(_address(x), 6, lib.NCL_INT32, lib.NCL_SUM, lib.NCL_ALGO_AUTO)]  # a plain view


@pytest.mark.parametrize("bad, error, message", [
    (lambda x: x[:, ::2], ValueError, "must be C-contiguous"),
    (lambda x: np.broadcast_to(x[:1], x.shape), ValueError, "C-contiguous"),  # (read-only and strided)
    (lambda x: x.astype(np.complex64), TypeError, "unsupported dtype complex64"),
    (lambda x: x.astype(">f4"), TypeError, "unsupported dtype >f4"),
    (lambda x: [1.0, 2.0], TypeError, "must be a numpy array"),
])
def test_the_fast_path_refuses_what_the_call_path_refuses(bad, error, message):
    backend = InPlace(rank=1, size=3)
    with pytest.raises(error, match=message):
        Communicator(backend).all_reduce(bad(np.ones((2, 4), np.float32)))
    assert backend.in_place == [] and backend.calls == []


def test_a_read_only_array_is_refused_before_the_fast_path():
    backend = InPlace(rank=1, size=3)
    x = np.ones(4, np.float32)
    x.setflags(write=False)
    with pytest.raises(ValueError, match="x is read-only, but this call writes into it"):
        Communicator(backend).all_reduce(x)
    assert backend.in_place == [] and backend.calls == []


def test_the_fast_path_steps_aside_while_anything_reads_calls(caplog):
    x = np.ones(3, np.float32)
    backend = InPlace()
    comm = Communicator(backend)
    comm.all_reduce(x)
    with comm.group():
        work = comm.all_reduce(x)  # queued
    assert isinstance(work, Work) and work.wait() is x
    comm.all_reduce(x)  # the worker the group started keeps program order: Calls from here on
    assert [c.collective for c in backend.calls] == ["all_reduce"] * 2 and len(backend.in_place) == 1
    comm = Communicator(backend)
    comm.all_reduce(x, async_op=True).wait()
    comm.all_reduce(x)
    assert len(backend.calls) == 4 and len(backend.in_place) == 1
    comm.close()
    with pytest.raises(ncl.NclStateError, match="closed"):
        comm.all_reduce(x)
    emulator = emulation.Emulator(load_topology("pcie-gen5-8card"), "account", 3, keep=8)
    Communicator(backend, emulator=emulator).all_reduce(x)
    assert emulator.totals["calls"] == 1
    with caplog.at_level(log.TRACE, logger="ncl"):
        Communicator(backend).all_reduce(x)
    assert "all_reduce 3 x float32 (12 B), sum done" in caplog.text
    assert len(backend.calls) == 6 and len(backend.in_place) == 1


def test_the_fast_paths_failures_are_the_call_paths(caplog):
    backend = InPlace(rank=1, size=3)
    comm = Communicator(backend)
    x = np.ones(3, np.float32)
    backend.fail = ncl.NclPeerError("rank 2 died")
    with caplog.at_level(logging.WARNING, logger="ncl"), pytest.raises(ncl.NclPeerError, match="rank 2 died"):
        comm.all_reduce(x)
    assert "all_reduce failed: NclPeerError: rank 2 died" in caplog.text and backend.aborted == []
    backend.fail = ValueError("the core refused it")
    with pytest.raises(ValueError, match="the core refused it"):
        comm.all_reduce(x)
    assert backend.aborted == []  # the core's own error: nothing to tell the peers
    backend.fail = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        comm.all_reduce(x)
    assert backend.aborted == ["it failed with KeyboardInterrupt"]
    backend.fail = None
    comm.all_reduce(x)  # the entry was left: the next call runs
    assert len(backend.in_place) == 1
