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


class Direct(Recording):
    """A Recording backend that also offers all_reduce's fast path (the backend's all_reduce), and keeps
    what it got there as (send address, recv address, count, dtype, op, algo), what a Call would carry;
    `fail`: the exception it raises instead.  Like the core's entry (ncl_all_reduce_checked), it refuses
    a recv that overlaps send other than as send itself, keeping nothing."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.direct, self.fail, self.aborted = [], None, []

    def all_reduce(self, send, recv, count, dtype, op, algo):
        if self.fail is not None:
            raise self.fail
        s, r, n = _ptr(send), _ptr(recv), count * lib.ncl_dtype_size(dtype)
        if s != r and s < r + n and r < s + n:
            raise ValueError("recv overlaps send")
        self.direct.append((s, r, count, dtype, int(op), algo))

    def abort(self, reason=None):
        self.aborted.append(reason)


def _carried(call):
    return (_ptr(call.send), _ptr(call.recv), call.count, call.dtype, int(call.op), call.algo)


def _torch():
    return pytest.importorskip("torch")


def _tensor(a):
    """A torch tensor sharing a's memory (bfloat16 included)."""
    torch = _torch()
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _data(a) -> int:
    return a.data_ptr() if hasattr(a, "data_ptr") else _address(a)


def _same_calls(kinds, call):
    """call(comm, x, out) on a Direct backend and on a Recording one (no fast path: Calls), x and out made
    fresh by kinds() for each: what the fast path got and what the Calls carried, with addresses as
    "x", "out" (or "x and out": the same memory), and the results."""
    fast, slow = Direct(rank=1, size=3), Recording(rank=1, size=3)
    got, carried = [], []
    for backend, kept in ((fast, fast.direct), (slow, slow.calls)):
        x, out = kinds()
        got.append((x, out, call(Communicator(backend), x, out)))
        names = {_data(out): "out"} if out is not None else {}
        names[_data(x)] = "x and out" if _data(x) in names else "x"
        carried.append([(names[send], names[recv], *rest) for send, recv, *rest in
                        (entry if backend is fast else _carried(entry) for entry in kept)])
    return carried[0], carried[1], got


BF16 = ncl.dtypes.numpy_dtype("bfloat16")
# what all_reduce's fast path takes: (label, the call), each on x, out made fresh for either backend
FAST_CASES = [
    ("numpy in place", lambda: (np.arange(6, dtype=np.float32).reshape(2, 3), None)),
    ("numpy out=", lambda: (np.arange(6, dtype=np.float32), np.empty(6, np.float32))),
    ("numpy out=x", lambda: (x := np.arange(6, dtype=np.int32), x)),
    ("numpy out=x's own memory", lambda: (x := np.arange(6, dtype=np.int32), x.reshape(2, 3).reshape(6))),
    ("numpy out= next to x", lambda: (b := np.arange(12, dtype=np.float32), b[:6], b[6:])[1:]),
    ("numpy read-only x, out=", lambda: (_read_only(np.ones(4)), np.empty(4))),
    ("numpy 0-d", lambda: (np.array(3, np.int64), None)),
    ("numpy empty out=", lambda: (np.empty(0, np.float32), np.empty(0, np.float32))),
    ("numpy bfloat16", lambda: (np.ones(5, BF16), None)),
    ("numpy bfloat16 out=", lambda: (np.ones(5, BF16), np.empty(5, BF16))),
    ("torch bfloat16", lambda: (_tensor(np.ones(5, BF16)), None)),
    ("torch bfloat16 out=", lambda: (_tensor(np.ones(5, BF16)), _tensor(np.empty(5, BF16)))),
    ("torch float32 out=x", lambda: (x := _tensor(np.ones(4, np.float32)), x)),
    ("torch out= numpy", lambda: (_tensor(np.ones(4, np.float32)), np.empty(4, np.float32))),
]


@pytest.mark.parametrize("kinds", [k for _, k in FAST_CASES], ids=[label for label, _ in FAST_CASES])
def test_the_fast_path_passes_what_the_call_would_carry(kinds):
    """The backend's all_reduce gets exactly the fields of the Call the slow path would build, and the
    call returns the same thing (x in place, else out)."""
    def call(comm, x, out):
        return comm.all_reduce(x, ncl.MAX) if out is None else comm.all_reduce(x, ncl.MAX, out=out)
    fast, slow, got = _same_calls(kinds, call)
    assert len(fast) == 1 and fast == slow
    for x, out, result in got:
        assert result is (x if out is None else out)


def test_the_fast_path_bumps_a_written_tensors_version_as_the_call_path_does():
    def call(comm, x, out):
        before = x._version, out._version if out is not None else None
        comm.all_reduce(x) if out is None else comm.all_reduce(x, out=out)
        return x._version - before[0], out._version - before[1] if out is not None else None
    for kinds in (lambda: (_tensor(np.ones(3, np.float32)), None),
                  lambda: (_tensor(np.ones(3, np.float32)), _tensor(np.ones(3, np.float32)))):
        fast, slow, ((*_, bumped), (*_, bumped_slow)) = _same_calls(kinds, call)
        assert fast == slow and bumped == bumped_slow and 1 in bumped


def test_everything_else_takes_the_call_path():
    """Subclasses (np.recarray, a torch Parameter) as x or out: no fast path, the Call they took before;
    a plain view of another dtype is a plain array."""
    torch = _torch()
    backend = Direct(rank=1, size=3)
    comm = Communicator(backend)
    x = np.arange(6, dtype=np.float32)
    comm.all_reduce(x.view(np.recarray))
    comm.all_reduce(x, out=np.empty(6, np.float32).view(np.recarray))
    comm.all_reduce(x.reshape(2, 3), out=np.empty((2, 3), np.float32).view(np.recarray))
    comm.all_reduce(torch.nn.Parameter(torch.ones(2), requires_grad=False))
    comm.all_reduce(torch.ones(2), out=torch.nn.Parameter(torch.ones(2), requires_grad=False))
    assert backend.direct == [] and len(backend.calls) == 5
    comm.all_reduce(x.view(np.int32))  # a plain view: fast
    assert backend.direct == [(_address(x), _address(x), 6, lib.NCL_INT32, lib.NCL_SUM, lib.NCL_ALGO_AUTO)]


def _swapped_bfloat16(x):
    return np.ones(4, BF16.newbyteorder(">"))


@pytest.mark.parametrize("bad, error, message", [
    (lambda x: x[:, ::2], ValueError, "must be C-contiguous"),
    (lambda x: np.broadcast_to(x[:1], x.shape), ValueError, "C-contiguous"),  # (read-only and strided)
    (lambda x: x.astype(np.complex64), TypeError, "unsupported dtype complex64"),
    (lambda x: x.astype(">f4"), TypeError, "unsupported dtype >f4"),
    (_swapped_bfloat16, TypeError, "unsupported dtype >V2"),  # (named bfloat16, but byte-swapped)
    (lambda x: [1.0, 2.0], TypeError, "must be a numpy array"),
])
def test_the_fast_path_refuses_what_the_call_path_refuses(bad, error, message):
    backend = Direct(rank=1, size=3)
    with pytest.raises(error, match=message):
        Communicator(backend).all_reduce(bad(np.ones((2, 4), np.float32)))
    assert backend.direct == [] and backend.calls == []


def _read_only(a):
    a.setflags(write=False)
    return a


# (x, out) -> the error the Call path raises; x and out made from a float32 (2, 4) array
BAD_OUTS = [
    (lambda a: (a, a.astype(np.float64)), TypeError, "out has dtype float64 but must match the input's float32"),
    (lambda a: (a, a.reshape(8)), ValueError, r"out has shape \(8,\) but must have shape \(2, 4\)"),
    (lambda a: (a, _read_only(a.copy())), ValueError, "out is read-only"),
    (lambda a: (a, np.empty((2, 8), np.float32)[:, ::2]), ValueError, "out must be C-contiguous"),
    (lambda a: (a, [0.0] * 8), TypeError, "out must be a numpy array"),
    (lambda a: (b := np.ones(12, np.float32), b[:8].reshape(2, 4), b[4:].reshape(2, 4))[1:], ValueError,
     "out overlaps x, which all_reduce does not allow"),
    (lambda a: (b := np.ones(12, np.float32), b[4:].reshape(2, 4), b[:8].reshape(2, 4))[1:], ValueError,
     "out overlaps x"),
    (lambda a: (a.reshape(8)[1:], a.reshape(8)[:7]), ValueError, "out overlaps x"),  # by one element
    (lambda a: (_tensor(a), _tensor(a.astype(np.float64))), TypeError, "out has dtype torch.float64"),
    (lambda a: (_tensor(a), _tensor(a)[:, ::2]), ValueError, "out must be a contiguous dense tensor"),
    (lambda a: (_tensor(a).t(), None), ValueError, "x must be a contiguous dense tensor"),
    (lambda a: (_tensor(a).to_sparse(), None), ValueError, "x must be a contiguous dense tensor"),
    (lambda a: (_tensor(a).to_mkldnn(), None), RuntimeError, "Cannot access data pointer"),  # torch's own
    (lambda a: (_tensor(a.astype(np.complex64)), None), TypeError, "x has unsupported dtype torch.complex64"),
    (lambda a: (_tensor(a).to("meta"), None), ValueError, "x is on device meta"),
    (lambda a: (_tensor(a.reshape(8)[1:]), _tensor(a.reshape(8)[:7])), ValueError, "out overlaps x"),
]


@pytest.mark.parametrize("make, error, message", BAD_OUTS)
def test_odd_outs_and_tensors_get_the_call_paths_errors(make, error, message):
    backend = Direct(rank=1, size=3)
    x, out = make(np.ones((2, 4), np.float32))
    with pytest.raises(error, match=message):
        Communicator(backend).all_reduce(x, out=out)
    assert backend.direct == [] and backend.calls == []


def test_a_read_only_array_is_refused_before_the_fast_path():
    backend = Direct(rank=1, size=3)
    x = _read_only(np.ones(4, np.float32))
    with pytest.raises(ValueError, match="x is read-only, but this call writes into it"):
        Communicator(backend).all_reduce(x)
    assert backend.direct == [] and backend.calls == []


# what the off-switches are tried on: in place, out=, a torch tensor
SWITCHED = {"numpy in place": lambda: (np.ones(3, np.float32), None),
            "numpy out=": lambda: (np.ones(3, np.float32), np.empty(3, np.float32)),
            "torch out=": lambda: (_tensor(np.ones(3, np.float32)), _tensor(np.empty(3, np.float32)))}


@pytest.mark.parametrize("kinds", SWITCHED.values(), ids=SWITCHED.keys())
def test_the_fast_path_steps_aside_while_anything_reads_calls(caplog, kinds):
    x, out = kinds()
    result = x if out is None else out

    def all_reduce(comm, **kw):
        return comm.all_reduce(x, **kw) if out is None else comm.all_reduce(x, out=out, **kw)
    backend = Direct()
    comm = Communicator(backend)
    all_reduce(comm)
    with comm.group():
        work = all_reduce(comm)  # queued
    assert isinstance(work, Work) and work.wait() is result
    all_reduce(comm)  # the worker the group started keeps program order: Calls from here on
    assert [c.collective for c in backend.calls] == ["all_reduce"] * 2 and len(backend.direct) == 1
    comm = Communicator(backend)
    all_reduce(comm, async_op=True).wait()
    all_reduce(comm)
    assert len(backend.calls) == 4 and len(backend.direct) == 1
    comm.close()
    with pytest.raises(ncl.NclStateError, match="closed"):
        all_reduce(comm)
    emulator = emulation.Emulator(load_topology("pcie-gen5-8card"), "account", 3, keep=8)
    all_reduce(Communicator(backend, emulator=emulator))
    assert emulator.totals["calls"] == 1
    with caplog.at_level(log.TRACE, logger="ncl"):
        all_reduce(Communicator(backend))
    assert "all_reduce 3 x float32 (12 B), sum done" in caplog.text
    assert len(backend.calls) == 6 and len(backend.direct) == 1


@pytest.mark.parametrize("kinds", SWITCHED.values(), ids=SWITCHED.keys())
def test_the_fast_paths_failures_are_the_call_paths(caplog, kinds):
    x, out = kinds()
    backend = Direct(rank=1, size=3)
    comm = Communicator(backend)
    kw = {} if out is None else {"out": out}
    backend.fail = ncl.NclPeerError("rank 2 died")
    with caplog.at_level(logging.WARNING, logger="ncl"), pytest.raises(ncl.NclPeerError, match="rank 2 died"):
        comm.all_reduce(x, **kw)
    assert "all_reduce failed: NclPeerError: rank 2 died" in caplog.text and backend.aborted == []
    backend.fail = ValueError("the core refused it")
    with pytest.raises(ValueError, match="the core refused it"):
        comm.all_reduce(x, **kw)
    assert backend.aborted == []  # the core's own error: nothing to tell the peers
    backend.fail = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        comm.all_reduce(x, **kw)
    assert backend.aborted == ["it failed with KeyboardInterrupt"]
    backend.fail = None
    comm.all_reduce(x, **kw)  # the entry was left: the next call runs
    assert len(backend.direct) == 1 and backend.calls == []


@pytest.mark.parametrize("kinds", SWITCHED.values(), ids=SWITCHED.keys())
def test_the_fast_path_takes_the_entry_lock(kinds):
    x, out = kinds()
    backend = Direct(rank=1, size=3)
    comm = Communicator(backend)
    with comm._entry, pytest.raises(ncl.NclStateError, match="another thread is inside a call"):
        comm.all_reduce(x) if out is None else comm.all_reduce(x, out=out)
    assert backend.direct == [] and backend.calls == []


class MoeDirect(Recording):
    """A Recording backend that also offers ncl.moe's fast path (the backend's moe), keeping the
    (collective, argument struct) it got there; `fail`: the exception it raises instead."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.direct, self.fail, self.aborted = [], None, []

    def moe(self, collective, args):
        if self.fail is not None:
            raise self.fail
        self.direct.append((collective, args))

    def abort(self, reason=None):
        self.aborted.append(reason)


def test_moe_steps_take_the_fast_path_only_while_nothing_reads_calls(caplog):
    args = ffi.new("ncl_moe_combine_args *")
    backend = MoeDirect()
    comm = Communicator(backend)
    comm._moe("moe_combine", args, 24)
    assert backend.direct == [("moe_combine", args)] and backend.calls == []
    with comm.group():  # queued work (and after it the worker): Calls that carry the struct
        comm.all_reduce(np.ones(3, np.float32))
    comm._moe("moe_dispatch", args, 24)
    with caplog.at_level(log.TRACE, logger="ncl"):
        Communicator(backend)._moe("moe_combine", args, 24)
    assert [(c.collective, c.send, c.count) for c in backend.calls[1:]] == [("moe_dispatch", args, 24),
                                                                           ("moe_combine", args, 24)]
    assert "moe_combine 24 x uint8" in caplog.text and len(backend.direct) == 1


def test_the_moe_fast_paths_failures_are_the_call_paths(caplog):
    args = ffi.new("ncl_moe_dispatch_args *")
    backend = MoeDirect()
    comm = Communicator(backend)
    backend.fail = ncl.NclPeerError("rank 2 died")
    with caplog.at_level(logging.WARNING, logger="ncl"), pytest.raises(ncl.NclPeerError, match="rank 2 died"):
        comm._moe("moe_dispatch", args, 8)
    assert "moe_dispatch failed: NclPeerError: rank 2 died" in caplog.text and backend.aborted == []
    backend.fail = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        comm._moe("moe_dispatch", args, 8)
    assert backend.aborted == ["it failed with KeyboardInterrupt"]
    backend.fail = None
    with comm._entry, pytest.raises(ncl.NclStateError, match="another thread is inside a call"):
        comm._moe("moe_dispatch", args, 8)
    comm._moe("moe_dispatch", args, 8)  # the entry was left: the next call runs
    assert backend.direct == [("moe_dispatch", args)] and backend.calls == []
