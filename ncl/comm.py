"""The Communicator: the public API of a group of ranks.

Every method follows the same path: validate every argument (ValueError/TypeError before
any rank communicates), allocate the output, build one Call (ncl/call.py) and hand it to
`_launch`, which runs it on the communicator's backend (ncl/backend.py: shared memory, or
shared memory plus MPI across hosts) now or, with async_op=True, on the communicator's
worker thread (ncl/work.py; calls stay in program order: a synchronous call waits for the
queued ones first).  NCL_DEBUG=TRACE and emulation on a topology wrap the backend's run
(flight.Traced, emulation.Emulated).  The C core releases the GIL while it waits and copies.
One thread at a time may call a communicator: a second thread entering while a call is in
progress gets NclStateError at once (one lock, tried without waiting), never calls paired
wrongly across ranks.  A call that writes a torch tensor bumps its autograd version counter,
as torch's own in-place ops do.
The commonest call, an all_reduce of a plain numpy array or torch tensor (in place or into out=),
skips the Buffer and the Call while nothing reads Calls (`_refresh_fast_path`): the same checks,
C entry and failures, in half the time (the overlap of out with x is tested by the core's entry,
before anything moves).  ncl.moe's one-step dispatch and combine (`_moe`) skip the Call the same way.
"""
import contextlib
import math
import threading
from typing import Any, NoReturn, Optional, Sequence

import numpy as np

from . import dtypes, elastic, emulation, env, log, tuning
from ._native import ffi
from .buffers import Buffer, ReduceOp, as_buffer, bump_version, check_aliasing, check_counts, check_op, check_rank, \
    output, plain, plain_pair, rows
from .call import Call
from .errors import NclError, NclMismatchError, NclPeerError, NclStateError, NclTimeoutError
from .shm import SharedMemoryBackend
from .work import Work, Worker, wait_for

# (ncl.flight is imported where used: only failures, tracing and explicit dumps need it)
# Failures of the group (not of this rank's arguments): each is logged and flight-recorded.
_GROUP_FAILURES = (NclTimeoutError, NclPeerError, NclMismatchError)
# Raised without leaving the group behind: the core's own errors (it already told the peers
# what it had to) and arguments refused before anything moved.  Anything else raised inside a
# call (Ctrl-C, a signal handler's exception) aborts the group, so that peers stop waiting.
_LEFT_AS_IS = (NclError, ValueError, TypeError)


def failure_reason(exc: BaseException) -> str:
    """What peers are told when an exception ends this rank's part in the group."""
    text = str(exc)
    return f"it failed with {type(exc).__name__}{': ' + text if text else ''}"


_IN_PLACE = "only out=x itself (in place)"
_NDARRAY = np.ndarray  # (a global: the fast path's type test skips an attribute lookup)
_OWN_BLOCK = "only x = this rank's block of out (in place)"
_UINT8 = dtypes.CODES["uint8"]


def _refused_out(x, out) -> None:
    """all_reduce's fast path left the overlap of out with x to the backend, which refused the call
    before anything moved: raise what the Call path's check says of it (nothing, if the refusal
    was for another reason)."""
    try:
        check_aliasing(as_buffer(x, "x", writable=False), as_buffer(out, "out", writable=True), "all_reduce", 0,
                       _IN_PLACE)
    except ValueError as overlap:
        raise overlap from None


def _ptr(buf: Optional[Buffer]):
    return buf.ptr if buf is not None else ffi.NULL


class Communicator:
    """A group of ranks; see the README for the API tour."""
    _emulator: Optional[emulation.Emulator] = None
    _shrinks = 0  # shrinks of this communicator so far: part of each new group's name

    def __init__(self, backend, *, emulator: Optional[emulation.Emulator] = None):
        self._backend = backend
        self._rank, self._size, self._label = backend.rank, backend.size, backend.label
        self._options = backend.options
        self._log = log.for_rank(self._rank, self._size, self._label)
        self._forced_algo = tuning.forced_all_reduce_algorithm()
        self._splits = 0
        self._worker: Optional[Worker] = None
        self._entry = threading.Lock()  # held by the thread inside a call (tried, never waited for)
        self._closed = False
        self._run = backend.run  # the backend, or a wrapper reading each Call before and after it
        if self._log.isEnabledFor(log.TRACE):  # every call logged with what the backend decided
            from .flight import Traced
            self._run = Traced(backend, self._log).run
        elif emulator is not None:  # every call costed on the emulated interconnect (ncl/emulation.py)
            self._emulator = emulator
            self._run = emulation.Emulated(backend, emulator).run
        self._refresh_fast_path()

    @classmethod
    def _create(cls, name: str, label: str, rank: int, size: int, unique_id: str, options) -> "Communicator":
        """A communicator over shared memory; name: the group's within the job `unique_id`."""
        return cls._shared_memory(lambda: SharedMemoryBackend.create(name, label, rank, size, unique_id, options),
                                  size, options)

    @classmethod
    def _shared_memory(cls, create, size: int, options) -> "Communicator":
        """A communicator over the shared-memory backend create() makes, emulated if asked."""
        emulator = emulation.for_communicator(size, options.flight_entries)  # bad knobs fail before any rank waits
        if emulator is not None and not options.flight_entries:
            raise ValueError("NCL_EMULATE / NCL_TOPOLOGY cost calls through the flight recorder: NCL_TRACE_BUFFER "
                             "must be at least 1")
        comm = cls(create(), emulator=emulator)
        if comm._log.isEnabledFor(log.logging.INFO):
            comm._log.info("%s", comm._backend.describe())
        return comm

    @classmethod
    def from_mpi(cls, mpi_comm, *, timeout: Optional[float] = None) -> "Communicator":
        """A communicator over the ranks of an mpi4py communicator (collective over it).  Ranks
        of one host (hostname plus boot id; NCL_HOSTS splits hosts further) share memory;
        hosts talk over MPI.  All on one host: a plain shared-memory communicator."""
        from .hierarchical import from_mpi
        return from_mpi(mpi_comm, timeout=timeout)

    # ---- identity and lifetime -------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def single_host(self) -> bool:
        """True when every rank maps every rank's registered memory (`empty`), so that collectives
        on it read peers' buffers in place; False across hosts."""
        return self._backend.single_host

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<ncl.Communicator rank {self._rank} of {self._size}, {state}>"

    def __enter__(self) -> "Communicator":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:  # peers are told this rank failed, and how, not that it closed
            self.abort(failure_reason(exc))
        self.close()

    def close(self) -> None:
        """Finish outstanding async work and release the communicator (idempotent)."""
        if self._closed:
            return
        if self._worker is not None:
            self._worker.stop()
            self._worker = None
        self._backend.close()
        self._closed = True
        self._refresh_fast_path()

    def abort(self, reason: Optional[str] = None) -> None:
        """Give up the group: peers waiting for this rank fail at once with NclPeerError, quoting
        `reason` when given."""
        if not self._closed:
            self._backend.abort(reason)

    def _check_open(self) -> None:
        if self._closed:
            raise NclStateError(f"this communicator (rank {self._rank} of {self._size}) is closed")

    def _launch(self, call: Call, result: Any, async_op: bool, written: bool = True) -> Any:
        """Run one call on the backend, now or queued behind earlier async work; returns result
        (or a Work that will).  written: result is a buffer the call writes (a torch tensor's
        version counter is bumped)."""
        if type(result) is not _NDARRAY and written and result is not None:
            bump_version(result)
        entry = self._entry
        if not entry.acquire(False):
            raise self._busy()
        if not async_op and self._worker is None:  # run it here, now
            try:
                if self._closed:
                    self._check_open()
                self._run(call)
            except BaseException as exc:
                self._raise_failure(call, exc)
            finally:
                entry.release()
            return result
        try:
            self._check_open()
            if self._worker is None:
                self._worker = Worker(f"ncl-rank{self._rank}", self._execute, self._translate,
                                      getattr(self._backend, "p2p_batch", None))
                self._refresh_fast_path()
            elif not async_op and self._worker.idle:  # nothing queued: run it here
                self._execute(call)
                return result
            future = self._worker.submit(call, result)
        finally:
            entry.release()
        if async_op:
            return Work(future, call.collective, interrupted=self._interrupted)
        return wait_for(future, self._interrupted)

    def _busy(self) -> NclStateError:
        return NclStateError(f"another thread is inside a call on this communicator (rank {self._rank}): "
                             "use one communicator per thread")

    def _raise_failure(self, call: Call, exc: BaseException) -> NoReturn:
        """Raise what the exception `call` raised becomes: a failure of the group logged (and its
        flight record left in NCL_TRACE_DIR); anything but an argument refused or the core's own
        error aborts the group first, so that peers stop waiting."""
        if isinstance(exc, _GROUP_FAILURES):
            raise self._group_failed(call, exc) from None
        if not isinstance(exc, _LEFT_AS_IS):
            self.abort(failure_reason(exc))
        raise exc

    def _refresh_fast_path(self) -> None:
        """all_reduce's fast path (a plain numpy array or torch tensor, in place or out=: no Buffer, no
        Call) is the backend's all_reduce, and that of ncl.moe's one-step calls the backend's moe, while
        nothing stands between a call and the backend: no wrapper reading Calls (tracing, emulation), no
        worker (queued calls keep their order), no group block, the communicator open; None otherwise.
        Called whenever one of those changes."""
        clear = self._run == self._backend.run and self._worker is None and not self._closed and not self._grouped
        self._all_reduce_direct = getattr(self._backend, "all_reduce", None) if clear else None
        self._moe_direct = getattr(self._backend, "moe", None) if clear else None

    def _interrupted(self, exc: BaseException) -> None:
        """This rank's wait for its worker was interrupted (Ctrl-C): the group is aborted with the reason."""
        self.abort(failure_reason(exc))

    def _compressed(self, collective: str, compress: str, async_op: bool, x, *args, out=None):
        """A block-scaled collective (ncl/compress.py): its codes move through this communicator's own
        all_to_all and all_gather, from this thread, after any queued work."""
        from . import compress as mx
        mx.check_format(compress)
        if async_op or self._grouped:
            raise ValueError(f"compress runs {collective} in this thread: not with async_op=True or inside "
                             "comm.group()")
        self._after_pending()
        return getattr(mx, collective)(self, x, compress, *args, out=out)

    @contextlib.contextmanager
    def group(self):
        """Calls issued inside `with comm.group():` are queued as with async_op=True and return
        their Work; leaving the block waits for all of them (raising the first error), as
        ncclGroupStart/End.  Sends and recvs inside progress together, whatever their order
        and size.  (The block swaps in _launch_grouped for this instance, so calls outside a
        group pay nothing for it.)"""
        if self._grouped:
            raise NclStateError("comm.group() blocks do not nest")
        works: list = []
        self._launch = lambda call, result, async_op, written=True: self._launch_grouped(works, call, result, written)
        self._refresh_fast_path()
        try:
            yield self
        finally:
            del self._launch
            self._refresh_fast_path()
        for work in works:
            work.wait()

    @property
    def _grouped(self) -> bool:
        return "_launch" in self.__dict__

    def _launch_grouped(self, works: list, call: Call, result: Any, written: bool) -> Work:
        work = Communicator._launch(self, call, result, True, written)
        works.append(work)
        return work

    def _execute(self, call: Call) -> None:
        try:
            self._run(call)
        except BaseException as exc:
            self._raise_failure(call, exc)

    def _translate(self, call: Call, exc: BaseException) -> BaseException:
        return self._group_failed(call, exc) if isinstance(exc, _GROUP_FAILURES) else exc

    def _after_pending(self) -> None:
        """Let queued async work finish first (its errors stay with its Work)."""
        self._check_open()
        if self._worker is not None:
            self._worker.drain()

    def _group_failed(self, call: Call, exc: Exception) -> Exception:
        """A failure of the group, logged and, with NCL_TRACE_DIR set, with this rank's flight
        record left there (the returned exception names the file)."""
        from . import flight
        recorder = self._backend.recorder
        directory = env.get("NCL_TRACE_DIR")
        if directory and recorder is not None and not recorder.closed:
            try:
                path = flight.dump(recorder, directory, f"{type(exc).__name__}: {exc}", self._emulator)
            except OSError as dump_error:
                self._log.warning("cannot write the flight record into %s: %s", directory, dump_error)
            else:
                exc = type(exc)(f"{exc} (flight record: {path})")
        self._log.warning("%s failed: %s: %s", call.collective, type(exc).__name__, exc)
        return exc

    def last_stats(self) -> Optional[dict]:
        """The last completed call: collective, bytes, the algorithm taken here (host_algorithm),
        wall_us, and with a topology (NCL_TOPOLOGY) the algorithm the link model picks on the target
        and its emulated_us.  None before the first call."""
        if self._emulator is not None:
            return dict(self._emulator.last) if self._emulator.last else None
        calls = self.flight_record()[-1:]
        if not calls:
            return None
        c = calls[0]
        return {"collective": c["collective"], "bytes": c["bytes"], "host_algorithm": c["algorithm"],
                "target_algorithm": None, "wall_us": c["duration_us"], "emulated_us": None, "topology": None,
                "mode": "off"}

    def emulated_totals(self, reset: bool = False) -> Optional[dict]:
        """Calls, wall seconds and emulated seconds since the communicator began (or the last
        reset), in all and per collective; None without a topology."""
        if self._emulator is None:
            return None
        totals = {**self._emulator.totals, "by_collective": {k: dict(v) for k, v in
                                                             self._emulator.totals["by_collective"].items()}}
        if reset:
            self._emulator.reset()
        return totals

    @property
    def topology(self):
        """The emulated interconnect's Topology (ncl.topology), or None."""
        return self._emulator.topology if self._emulator is not None else None

    # ---- flight recorder ------------------------------------------------------------------------
    def flight_record(self) -> list:
        """This rank's last calls on this communicator (NCL_TRACE_BUFFER of them), oldest first:
        collective, sizes, algorithm taken (and all_reduce's stores: "streaming" or "ordinary"),
        state, steps done, duration.  Across hosts: the
        intra-host steps of each collective."""
        from . import flight
        recorder = self._backend.recorder
        return flight.entries(recorder, self._emulator) if recorder is not None and not self._closed else []

    def dump_flight_record(self, directory: str, reason: str = "") -> str:
        """Write the flight record as Chrome trace JSON into directory (what a failure does
        by itself when NCL_TRACE_DIR is set); returns the file's path."""
        from . import flight
        self._check_open()
        return flight.dump(self._backend.recorder, directory, reason, self._emulator)

    # ---- registered memory --------------------------------------------------------------------
    def empty(self, shape, dtype=np.float32, *, like: str = "numpy"):
        """A new uninitialised array (like="torch": a tensor) in registered memory: every rank
        maps every rank's copy, so collectives on it (at the same place on every rank) read
        peers' data in place instead of through staging copies.  Collective: every rank calls
        it with the same shape and dtype.  The memory is released when the array is."""
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
        if any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0 for d in shape):
            raise ValueError(f"shape must be non-negative ints, not {shape}")
        if like not in ("numpy", "torch"):
            raise ValueError(f"like must be 'numpy' or 'torch', not {like!r}")
        np_dtype = dtypes.numpy_dtype(dtype)
        nbytes = math.prod(shape) * np_dtype.itemsize
        self._after_pending()
        raw = self._backend.window(nbytes)
        if like == "torch":
            import torch
            torch_dtype = getattr(torch, np_dtype.name)
            if nbytes == 0:
                return torch.empty(shape, dtype=torch_dtype)
            return torch.frombuffer(raw, dtype=torch_dtype).view(shape)
        return np.frombuffer(raw, dtype=np_dtype).reshape(shape)

    # ---- reductions ---------------------------------------------------------------------------
    def all_reduce(self, x, op: ReduceOp = ReduceOp.SUM, *, out=None, async_op: bool = False,
                   compress: Optional[str] = None):
        """Reduce x over all ranks (in rank order); the result lands in x, or in out if given.
        compress="fp8" | "int8" | "mxfp4": block-scaled on the wire (ncl/compress.py, SUM and AVG)."""
        direct = self._all_reduce_direct
        if direct is not None and type(op) is ReduceOp and not async_op and compress is None:
            if out is None:
                fast = plain(x, True)
                if fast is not None:
                    send, code, count = fast
                    recv, result = send, x
            else:
                fast = plain_pair(x, out)
                if fast is not None:
                    send, recv, code, count = fast
                    result = out
            if fast is not None:  # the fast path: what the Call would carry, straight to the backend
                if type(result) is not _NDARRAY:
                    bump_version(result)
                entry = self._entry
                if not entry.acquire(False):
                    raise self._busy()
                try:
                    direct(send, recv, count, code, op, self._forced_algo)
                except BaseException as exc:
                    if out is not None and type(exc) is ValueError:
                        _refused_out(x, out)
                    self._raise_failure(Call.of("all_reduce", send, recv, count, code, op, -1, self._forced_algo), exc)
                finally:
                    entry.release()
                return result
        if compress is not None:
            return self._compressed("all_reduce", compress, async_op, x, op, out=out)
        if type(op) is not ReduceOp:  # (the check's call costs more than the test, on every call)
            check_op(op)
        src = as_buffer(x, "x", writable=out is None)
        dst = src if out is None else output(out, src, src.shape)
        if out is not None:
            check_aliasing(src, dst, "all_reduce", 0, _IN_PLACE)
        # algo NCL_ALGO_AUTO (unless NCL_ALGO forces one): the core applies tuning's thresholds
        call = Call.of("all_reduce", src.ptr, dst.ptr, src.count, src.dtype, op, -1, self._forced_algo)
        return self._launch(call, dst.obj, async_op)

    def reduce(self, x, root: int = 0, op: ReduceOp = ReduceOp.SUM, *, out=None, async_op: bool = False):
        """Reduce x over all ranks into root's x (or out); other ranks' buffers are untouched."""
        if type(op) is not ReduceOp:
            check_op(op)
        root = check_rank(root, "root", self._size)
        is_root = root == self._rank
        src = as_buffer(x, "x", writable=is_root and out is None)
        dst = (src if out is None else output(out, src, src.shape)) if is_root else None
        if dst is not None and out is not None:
            check_aliasing(src, dst, "reduce", 0, _IN_PLACE)
        call = Call.of("reduce", src.ptr, _ptr(dst), src.count, src.dtype, op, root)
        return self._launch(call, dst.obj if is_root else x, async_op, written=is_root)

    def reduce_scatter(self, x, op: ReduceOp = ReduceOp.SUM, out=None, *, async_op: bool = False,
                       compress: Optional[str] = None):
        """Reduce x over all ranks; rank r gets block r of dim 0 (compress: as all_reduce)."""
        if compress is not None:
            return self._compressed("reduce_scatter", compress, async_op, x, op, out=out)
        if type(op) is not ReduceOp:
            check_op(op)
        src = as_buffer(x, "x", writable=False)
        n = rows(src, "x")
        if n % self._size:
            raise ValueError(f"x.shape[0] = {n} is not divisible by the communicator size {self._size}")
        dst = output(out, src, (n // self._size,) + src.shape[1:])
        if out is not None:
            check_aliasing(dst, src, "reduce_scatter", self._rank * dst.nbytes, "only out = x[rank block] (in place)")
        return self._launch(Call.of("reduce_scatter", src.ptr, dst.ptr, dst.count, src.dtype, op), dst.obj, async_op)

    # ---- data movement ------------------------------------------------------------------------
    def broadcast(self, x, root: int = 0, *, out=None, async_op: bool = False):
        """Copy root's x into every rank's x (or into out, when given; on the root x is then
        only read)."""
        root = check_rank(root, "root", self._size)
        src = as_buffer(x, "x", writable=out is None and root != self._rank)
        dst = src if out is None else output(out, src, src.shape)
        if out is not None:
            check_aliasing(src, dst, "broadcast", 0, _IN_PLACE)
        call = Call.of("broadcast", src.ptr, dst.ptr, src.count, src.dtype, -1, root)
        return self._launch(call, dst.obj, async_op)

    def _stacked_shape(self, src: Buffer):
        return (self._size * src.shape[0],) + src.shape[1:] if src.shape else (self._size,)

    def all_gather(self, x, out=None, *, async_op: bool = False, compress: Optional[str] = None):
        """Concatenate every rank's x along dim 0 (rank order; compress: as all_reduce)."""
        if compress is not None:
            return self._compressed("all_gather", compress, async_op, x, out=out)
        src = as_buffer(x, "x", writable=False)
        dst = output(out, src, self._stacked_shape(src))
        if out is not None:
            check_aliasing(src, dst, "all_gather", self._rank * src.nbytes, _OWN_BLOCK)
        return self._launch(Call.of("all_gather", src.ptr, dst.ptr, src.count, src.dtype), dst.obj, async_op)

    def gather(self, x, root: int = 0, out=None, *, async_op: bool = False):
        """Like all_gather, but only root receives (others get None)."""
        root = check_rank(root, "root", self._size)
        src = as_buffer(x, "x", writable=False)
        dst = output(out, src, self._stacked_shape(src)) if root == self._rank else None
        if dst is not None and out is not None:
            check_aliasing(src, dst, "gather", self._rank * src.nbytes, _OWN_BLOCK)
        call = Call.of("gather", src.ptr, _ptr(dst), src.count, src.dtype, -1, root)
        return self._launch(call, dst.obj if dst is not None else None, async_op)

    def scatter(self, x, root: int = 0, out=None, *, async_op: bool = False):
        """Split root's x into `size` blocks along dim 0; rank r gets block r.  On other ranks x
        only gives the shape (it may be None when out is given)."""
        root = check_rank(root, "root", self._size)
        if x is None and (root == self._rank or out is None):
            raise ValueError("scatter needs x on the root, and x or out on the other ranks")
        src = as_buffer(x, "x", writable=False) if x is not None else None
        if src is not None:
            n = rows(src, "x")
            if n % self._size:
                raise ValueError(f"x.shape[0] = {n} is not divisible by the communicator size {self._size}")
            dst = output(out, src, (n // self._size,) + src.shape[1:])
        else:
            dst = as_buffer(out, "out", writable=True)
        send = src if root == self._rank else None
        if send is not None and out is not None:  # in place: out is the root's own block of x
            check_aliasing(dst, send, "scatter", self._rank * dst.nbytes, "only out = x[rank block] (in place)")
        return self._launch(Call.of("scatter", _ptr(send), dst.ptr, dst.count, dst.dtype, -1, root), dst.obj, async_op)

    def all_to_all(self, x, out=None, *, async_op: bool = False, compress: Optional[str] = None):
        """Block j of x (along dim 0) goes to rank j; block i of the result came from rank i
        (compress: as all_reduce)."""
        if compress is not None:
            return self._compressed("all_to_all", compress, async_op, x, out=out)
        src = as_buffer(x, "x", writable=False)
        n = rows(src, "x")
        if n % self._size:
            raise ValueError(f"x.shape[0] = {n} is not divisible by the communicator size {self._size}")
        dst = output(out, src, src.shape)
        if out is not None:
            check_aliasing(src, dst, "all_to_all", 0, _IN_PLACE)
        call = Call.of("all_to_all", src.ptr, dst.ptr, src.count // self._size, src.dtype)
        return self._launch(call, dst.obj, async_op)

    def all_to_allv(self, x, send_counts: Sequence[int], recv_counts: Optional[Sequence[int]] = None, out=None,
                    *, all_counts=None, async_op: bool = False):
        """Rows send_counts[j] of x (consecutive, in peer order) go to rank j.  recv_counts, when
        None, are learned from the peers first; the result stacks the received rows by source.
        all_counts: the whole matrix of rows [sender, receiver] when every rank already holds it
        (say from an all_gather of send_counts), the same on every rank: small exchanges then
        skip the core's exchange of counts (one step fewer); recv_counts may be left out."""
        src = as_buffer(x, "x", writable=False)
        n = rows(src, "x")
        send = check_counts(send_counts, "send_counts", self._size)
        if sum(send) != n:
            raise ValueError(f"send_counts sum to {sum(send)} rows but x has {n} rows")
        if out is not None:  # before any exchange of counts: peers must not be left waiting
            dst = output(out, src, (0,) + src.shape[1:], rows_known=False)
            check_aliasing(src, dst, "all_to_allv", None, "x and out must not share memory")
        known = None
        if all_counts is not None:  # checked against send_counts and recv_counts in the core
            known = self._all_counts(all_counts)
            if recv_counts is None:
                recv_counts = known[:, self._rank].tolist()
        if recv_counts is not None:
            recv = check_counts(recv_counts, "recv_counts", self._size)
        elif self._grouped:
            raise ValueError("inside comm.group(), all_to_allv needs recv_counts (or all_counts)")
        else:
            exchanged = self.all_to_all(np.asarray(send, dtype=np.int64))
            recv = tuple(int(c) for c in exchanged)
        dst_shape = (sum(recv),) + src.shape[1:]
        if out is None:
            dst = output(None, src, dst_shape)
        elif dst.shape[0] != dst_shape[0]:
            if recv_counts is None:
                self.abort()  # the peers already expect this rank in the exchange
                raise ValueError(f"out has shape {dst.shape} but the exchanged recv_counts need {dst_shape}; "
                                 "this communicator was aborted")
            raise ValueError(f"out has shape {dst.shape} but must have shape {dst_shape}")
        row = math.prod(src.shape[1:])
        call = Call.of("all_to_allv", src.ptr, dst.ptr, n * row, src.dtype, -1, -1, 0, tuple(c * row for c in send),
                    tuple(c * row for c in recv), known, row)
        return self._launch(call, dst.obj, async_op)

    def _all_counts(self, all_counts) -> np.ndarray:
        """all_counts as a C-contiguous (N, N) int64 array (its values are the core's to check)."""
        known = all_counts
        if not (isinstance(known, np.ndarray) and known.dtype == np.int64 and known.flags.c_contiguous):
            known = np.asarray(all_counts)
            if known.dtype.kind not in "iu":
                raise ValueError(f"all_counts must hold ints, not {known.dtype}")
            known = np.ascontiguousarray(known, dtype=np.int64)
        if known.shape != (self._size, self._size):
            raise ValueError(f"all_counts must be a ({self._size}, {self._size}) matrix, not {known.shape}")
        return known

    def _moe(self, collective: str, args, nbytes: int) -> None:
        """ncl.moe's small dispatch or combine, one step of the core (native/moe.c) from the argument
        struct ncl/moe.py filled and checked ("moe_dispatch" or "moe_combine"; nbytes: about what this
        rank sends, for the emulator): run as any call, after queued work, traced, costed, failing alike.
        A dispatch whose rows moved is taken (ncl_moe_take) by _moe_take, next."""
        direct = self._moe_direct
        if direct is None:
            self._launch(Call.of(collective, args, ffi.NULL, nbytes, _UINT8), None, False, written=False)
            return
        entry = self._entry  # the fast path (as all_reduce's): nothing reads Calls, nothing is queued
        if not entry.acquire(False):
            raise self._busy()
        try:
            direct(collective, args)
        except BaseException as exc:
            self._raise_failure(Call.of(collective, args, ffi.NULL, nbytes, _UINT8), exc)
        finally:
            entry.release()

    def _moe_take(self, args) -> None:
        """This rank's rows of the moe_dispatch that just ran, into the outputs args now points to."""
        self._backend.moe_take(args)

    def _moe_combine_steps(self, args) -> int:
        """The steps the moe_combine these args describe would take (1, more: it needs room, 0: none)."""
        return self._backend.moe_combine_steps(args)

    # ---- point to point and synchronisation ------------------------------------------------------
    def send(self, x, dst: int, *, async_op: bool = False):
        """Send x to rank dst (returns once x may be reused)."""
        dst = check_rank(dst, "dst", self._size, other_than=self._rank)
        buf = as_buffer(x, "x", writable=False)
        return self._launch(Call.of("send", buf.ptr, ffi.NULL, buf.count, buf.dtype, -1, dst), None, async_op)

    def recv(self, x, src: Optional[int], *, async_op: bool = False):
        """Receive from rank src into x (same count and dtype as the matching send); returns x.
        src None: from whichever rank sends first (MPI_ANY_SOURCE); returns that rank instead."""
        if src is None:
            return self._recv_any(x, async_op)
        src = check_rank(src, "src", self._size, other_than=self._rank)
        buf = as_buffer(x, "x", writable=True)
        return self._launch(Call.of("recv", ffi.NULL, buf.ptr, buf.count, buf.dtype, -1, src), x, async_op)

    def _recv_any(self, x, async_op: bool):
        buf = as_buffer(x, "x", writable=True)
        if self._size < 2 or getattr(self._backend, "p2p_batch", None) is None:
            raise ValueError("recv with src=None (from any source) needs a single-host communicator of two ranks "
                             "or more")
        if buf.is_torch:
            bump_version(x)
        sender = ffi.new("int[1]", [-1])  # the core writes the sender's rank here
        call = Call.of("recv", sender, buf.ptr, buf.count, buf.dtype, -1, -1)
        got = self._launch(call, sender, async_op, written=False)
        return got.map(lambda s: int(s[0])) if isinstance(got, Work) else int(got[0])

    def barrier(self, *, async_op: bool = False):
        """Return once every rank has entered the barrier."""
        return self._launch(Call.of("barrier", ffi.NULL, ffi.NULL, 0, -1), None, async_op)

    def _split_args(self, color, key):
        """split's arguments, checked (key defaults to this rank), on an open communicator."""
        if color is not None:
            if isinstance(color, bool) or not isinstance(color, (int, np.integer)):
                raise TypeError(f"color must be an int >= 0 or None, not {type(color).__name__}")
            if color < 0:
                raise ValueError(f"color must be >= 0 or None, not {color}")
        key = self._rank if key is None else key
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)):
            raise TypeError(f"key must be an int, not {type(key).__name__}")
        self._check_open()
        return (None if color is None else int(color)), int(key)

    def split(self, color: Optional[int], key: Optional[int] = None) -> Optional["Communicator"]:
        """Like MPI_Comm_split: ranks with the same color form a new communicator, ordered by
        (key, old rank).  color None (MPI_UNDEFINED) joins none and returns None."""
        color, key = self._split_args(color, key)
        if self._grouped:
            raise NclStateError("split inside comm.group(): leave the block first")
        table = self.all_gather(np.array([-1 if color is None else color, key], dtype=np.int64)).reshape(-1, 2)
        self._splits += 1
        if color is None:
            return None
        members = sorted((int(k), r) for r, (c, k) in enumerate(table.tolist()) if c == color)
        new_rank = members.index((int(key), self._rank))
        return Communicator._shared_memory(
            lambda: self._backend.split(self._splits, color, new_rank, len(members)), len(members), self._options)

    # ---- elastic groups (ncl/elastic.py) -----------------------------------------------------------
    def revoke(self) -> None:
        """Make every pending and future call on this communicator fail at once, here and on every
        peer (NclPeerError quoting the revoke, then NclStateError naming it), as ncclCommRevoke;
        the survivors may then shrink() it."""
        if not self._closed:
            elastic.revoke(self._backend)

    def failed_ranks(self) -> list:
        """Ranks of this group whose process died or that closed their communicator (what shrink
        excludes by default); [] once this communicator is closed."""
        if self._closed or not isinstance(self._backend, SharedMemoryBackend):
            return []
        return elastic.failed_ranks(self._backend)

    def shrink(self, exclude: Optional[Sequence[int]] = None) -> Optional["Communicator"]:
        """A new communicator of the survivors, ranks renumbered in order, as ncclCommShrink:
        collective over the ranks of this group not in `exclude` and not failed (failed_ranks()),
        with no word from the others, so it works after a failure or a revoke().  Every survivor
        passes the same exclude.  This communicator is closed once the new one is ready (its
        segment released); an excluded rank gets None and keeps it."""
        excluded = elastic.check_exclude(exclude, self._size)
        if not isinstance(self._backend, SharedMemoryBackend):
            raise NotImplementedError("shrink() needs a communicator on one host, or a multi-host one "
                                      "(HierarchicalCommunicator.shrink)")
        self._after_pending()
        self._shrinks += 1
        backend = elastic.shrink(self._backend, self._shrinks, excluded)
        if backend is None:
            return None
        self.close()
        return Communicator._shared_memory(lambda: backend, backend.size, backend.options)


__all__ = ["Communicator"]
