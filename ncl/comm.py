"""The Communicator: the public API of a group of ranks.

Every method follows the same path: validate every argument (ValueError/TypeError before
any rank communicates), allocate the output, then hand one native call to `_launch`, which
runs it now or, with async_op=True, on the communicator's single worker thread (so calls
stay in program order).  The C core releases the GIL while it waits and copies.
A communicator is not safe to use from several threads at once (as in NCCL).
"""
import concurrent.futures
import math
import time
import weakref
from typing import Any, Callable, Optional, Sequence

import numpy as np

from . import emulation, env, log, tuning
from ._native import check, error, ffi, lib
from .buffers import (SUPPORTED, Buffer, ReduceOp, as_buffer, check_aliasing, check_counts, check_op, check_rank,
                      output, rows)
from .errors import NclStateError
from .job import segment_name
from .work import Work

# (ncl.flight is imported where used: only failures, tracing and explicit dumps need it)
# Failures of the group (not of this rank's arguments): each is logged and flight-recorded.
_GROUP_FAILURES = (lib.NCL_ERR_TIMEOUT, lib.NCL_ERR_PEER, lib.NCL_ERR_MISMATCH)


def _dtypes(dtype):
    """The numpy dtype of a numpy or torch dtype (or its name) that ncl supports."""
    text = str(dtype).removeprefix("torch.")
    if text in ("bfloat16", "<class 'ml_dtypes.bfloat16'>") or getattr(dtype, "__name__", "") == "bfloat16":
        import ml_dtypes
        np_dtype = np.dtype(ml_dtypes.bfloat16)
    else:
        try:
            np_dtype = np.dtype(dtype if not text.startswith(("float", "int", "uint")) else text)
        except TypeError:
            raise TypeError(f"dtype {dtype!r} is not supported; supported: {SUPPORTED}") from None
    if np_dtype.name not in SUPPORTED.replace(",", " ").split():
        raise TypeError(f"dtype {dtype!r} is not supported; supported: {SUPPORTED}")
    return np_dtype


_IN_PLACE = "only out=x itself (in place)"
_OWN_BLOCK = "only x = this rank's block of out (in place)"


def _ptr(buf: Optional[Buffer]):
    return buf.ptr if buf is not None else ffi.NULL


class Communicator:
    """A group of ranks; see the README for the API tour."""
    _emulator: Optional[emulation.Emulator] = None

    def __init__(self, handle, rank: int, size: int, *, unique_id: str, name: str, label: str, options,
                 emulator: Optional[emulation.Emulator] = None):
        self._handle = handle
        self._rank = rank
        self._size = size
        self._unique_id = unique_id
        self._name = name
        self._label = label  # "world", "world.split1.color0": names it in logs and flight records
        self._options = options
        self._log = log.for_rank(rank, size, label)
        self._forced_algo = tuning.forced_all_reduce_algorithm()
        self._splits = 0
        self._windows = 0
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._last_future: Optional[concurrent.futures.Future] = None
        self._destroy = weakref.finalize(self, lib.ncl_comm_destroy, handle)
        self._closed = False  # mirrors `closed` for the per-call fast path
        if self._log.isEnabledFor(log.TRACE):  # every call logged: an instance attribute shadows the method
            self._launch = self._launch_traced
        elif emulator is not None:  # every call costed on the emulated interconnect (ncl/emulation.py)
            self._emulator = emulator
            self._newest = ffi.new("ncl_flight_entry[1]")
            self._launch = self._launch_emulated

    @classmethod
    def _create(cls, name: str, label: str, rank: int, size: int, unique_id: str, options) -> "Communicator":
        emulator = emulation.for_communicator(size, options.flight_entries)  # bad knobs fail before any rank waits
        if emulator is not None and not options.flight_entries:
            raise ValueError("NCL_EMULATE / NCL_TOPOLOGY cost calls through the flight recorder: NCL_TRACE_BUFFER "
                             "must be at least 1")
        out = ffi.new("ncl_comm **")
        check(lib.ncl_comm_create(name.encode(), rank, size, options, out))
        comm = cls(out[0], rank, size, unique_id=unique_id, name=name, label=label, options=options,
                   emulator=emulator)
        if comm._log.isEnabledFor(log.logging.INFO):
            comm._log.info("%s", comm._setup_text())
        return comm

    @classmethod
    def from_mpi(cls, mpi_comm, *, timeout: Optional[float] = None) -> "Communicator":
        """A communicator over the ranks of an mpi4py communicator (collective over it).  Ranks
        of one host (hostname plus boot id; NCL_HOSTS splits hosts further) share memory;
        hosts talk over MPI.  All on one host: a plain shared-memory communicator."""
        from .hierarchical import from_mpi
        return from_mpi(mpi_comm, timeout=timeout)

    def _setup_text(self) -> str:
        """What this communicator decided at setup, for NCL_DEBUG=INFO."""
        info, o = ffi.new("ncl_comm_info *"), self._options
        check(lib.ncl_comm_get_info(self._handle, info))

        def at(nbytes: int, never: str = "never") -> str:
            return never if nbytes >= tuning.NEVER else log.size_text(nbytes)
        waiting = ("oversubscribed: no spinning, steps meet at one shared word" if info.central_sync else
                   "spin, then yield, then sleep")
        cma = (f"on from {log.size_text(o.cma_min_bytes)} per peer block" if info.cma else
               "off (NCL_CMA=0)" if not o.cma_min_bytes else "not needed (one rank)" if self._size == 1 else
               "unavailable: the kernel refused process_vm_readv between the ranks (ptrace scope?)")
        forced = f", forced {env.get('NCL_ALGO')}" if self._forced_algo else ""
        cma_from = at(o.cma_all_reduce_min_bytes) if info.cma else "never"
        return (f"ready: segment {log.size_text(info.segment_bytes)} (staging 2 x {log.size_text(info.slot_bytes)}"
                f" per rank, send/recv 2 x {log.size_text(info.p2p_slot_bytes)} per pair); {self._size} ranks on "
                f"{info.cpus} CPUs: {waiting}; single-copy reads: {cma}; all_reduce: one_shot up to "
                f"{at(o.one_shot_max_bytes, 'any size')}, cma from {cma_from}, "
                f"registered direct from {at(o.direct_min_bytes)}{forced}; "
                f"timeout {o.timeout_s:g} s; flight recorder {o.flight_entries} calls; "
                f"fingerprint checks {'on' if o.verify_calls else 'OFF'}")

    # ---- identity and lifetime -------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    @property
    def closed(self) -> bool:
        return not self._destroy.alive

    @property
    def single_host(self) -> bool:
        """True when every rank maps every rank's registered memory (`empty`), so that collectives
        on it read peers' buffers in place; False across hosts."""
        return True

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<ncl.Communicator rank {self._rank} of {self._size}, {state}>"

    def __enter__(self) -> "Communicator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Finish outstanding async work and release the communicator (idempotent)."""
        if self.closed:
            return
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._destroy()
        self._closed = True

    def abort(self) -> None:
        """Give up the group: peers waiting for this rank fail at once with NclPeerError."""
        if not self.closed:
            lib.ncl_comm_abort(self._handle)

    def _check_open(self) -> None:
        if self.closed:
            raise NclStateError(f"this communicator (rank {self._rank} of {self._size}) is closed")

    def _launch(self, name: str, fn: Callable[..., int], args: tuple, result: Any, async_op: bool) -> Any:
        """Run fn(*args), one native call, now or queued behind earlier async work."""
        if not async_op and self._last_future is None:  # the fast path: ~0.1 µs
            if self._closed:
                self._check_open()
            rc = fn(*args)
            if rc:
                self._fail(name, rc)
            return result
        self._check_open()
        if not async_op and self._last_future.done():
            self._last_future = None
            rc = fn(*args)
            if rc:
                self._fail(name, rc)
            return result
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"ncl-rank{self._rank}")

        def run():
            rc = fn(*args)
            if rc:
                self._fail(name, rc)
            return result

        future = self._executor.submit(run)
        self._last_future = future
        return Work(future, name) if async_op else future.result()

    def _launch_traced(self, name: str, fn: Callable[..., int], args: tuple, result: Any, async_op: bool) -> Any:
        """_launch, logging each call with what the flight recorder saw of it (NCL_DEBUG=TRACE)."""
        from . import flight
        out = Communicator._launch(self, name, fn, args, result, async_op)
        calls = [] if async_op else flight.entries(self)[-1:]
        if calls:
            c = calls[0]
            what = f"{c['count']} x {c['dtype']} ({log.size_text(c['bytes'])})" if c["dtype"] else ""
            self._log.log(log.TRACE, "%s #%d %s%s -> %s, steps %d, %.1f us", name, c["seq"], what,
                          f", {c['op']}" if c["op"] else "", c["algorithm"], c["steps"], c["duration_us"])
        else:
            self._log.log(log.TRACE, "%s %s", name, "queued (async_op)" if async_op else "done")
        return out

    def _launch_emulated(self, name: str, fn: Callable[..., int], args: tuple, result: Any, async_op: bool) -> Any:
        """_launch, then the call costed on the emulated interconnect (and, in pace mode, waited
        out to its emulated time).  Async calls are costed when they are queued, without wall time."""
        start = time.perf_counter()
        out = Communicator._launch(self, name, fn, args, result, async_op)
        wall = 0.0 if async_op else time.perf_counter() - start
        e = self._newest[0]
        if lib.ncl_flight_entries(self._handle, self._newest, 1) == 1:
            nbytes = e.count * lib.ncl_dtype_size(e.dtype) if e.dtype >= 0 else 0
            host_algorithm = ffi.string(e.algorithm).decode() if e.algorithm else None
            rest = self._emulator.record(e.seq, name, nbytes, host_algorithm, wall)
            if rest > 0:
                emulation.wait(rest)
        return out

    def last_stats(self) -> Optional[dict]:
        """The last completed call: collective, bytes, the algorithm taken here (host_algorithm),
        wall_us, and with a topology (NCL_TOPOLOGY) the algorithm the link model picks on the target
        and its emulated_us.  None before the first call."""
        if self._emulator is not None:
            return dict(self._emulator.last) if self._emulator.last else None
        from . import flight
        calls = flight.entries(self)[-1:]
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

    def _fail(self, name: str, rc: int) -> None:
        """Raise the error of a failed call; a failure of the group is logged and, with
        NCL_TRACE_DIR set, leaves this rank's flight record there."""
        from . import flight
        exc = error(rc)
        if rc in _GROUP_FAILURES and not self.closed:
            directory = env.get("NCL_TRACE_DIR")
            if directory:
                try:
                    path = flight.dump(self, directory, f"{type(exc).__name__}: {exc}")
                except OSError as dump_error:
                    self._log.warning("cannot write the flight record into %s: %s", directory, dump_error)
                else:
                    exc = type(exc)(f"{exc} (flight record: {path})")
            self._log.warning("%s failed: %s: %s", name, type(exc).__name__, exc)
        raise exc

    # ---- flight recorder ------------------------------------------------------------------------
    def flight_record(self) -> list:
        """This rank's last calls on this communicator (NCL_TRACE_BUFFER of them), oldest first:
        collective, sizes, algorithm taken, state, steps done, duration."""
        from . import flight
        return flight.entries(self)

    def dump_flight_record(self, directory: str, reason: str = "") -> str:
        """Write the flight record as Chrome trace JSON into directory (what a failure does
        by itself when NCL_TRACE_DIR is set); returns the file's path."""
        from . import flight
        self._check_open()
        return flight.dump(self, directory, reason)

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
        np_dtype = _dtypes(dtype)
        nbytes = math.prod(shape) * np_dtype.itemsize
        self._windows += 1
        name = segment_name(self._unique_id, f"{self._name}/window{self._windows}").encode()
        out = ffi.new("ncl_window **")
        self._launch("empty", lib.ncl_window_create, (self._handle, name, nbytes, out), None, False)
        win = out[0]
        memory = ffi.gc(ffi.cast("char *", lib.ncl_window_ptr(win)), lambda _p: lib.ncl_window_free(win), nbytes)
        raw = ffi.buffer(memory, nbytes)
        if like == "torch":
            import torch
            torch_dtype = getattr(torch, np_dtype.name)
            if nbytes == 0:
                return torch.empty(shape, dtype=torch_dtype)
            return torch.frombuffer(raw, dtype=torch_dtype).view(shape)
        return np.frombuffer(raw, dtype=np_dtype).reshape(shape)

    # ---- reductions ---------------------------------------------------------------------------
    def all_reduce(self, x, op: ReduceOp = ReduceOp.SUM, *, out=None, async_op: bool = False):
        """Reduce x over all ranks (in rank order); the result lands in x, or in out if given."""
        op = check_op(op)
        src = as_buffer(x, "x", writable=out is None)
        dst = src if out is None else output(out, src, src.shape)
        if out is not None:
            check_aliasing(src, dst, "all_reduce", 0, _IN_PLACE)
        algo = self._forced_algo  # NCL_ALGO_AUTO: the core applies tuning's thresholds
        args = (self._handle, _ptr(src), _ptr(dst), src.count, src.dtype, op, algo)
        return self._launch("all_reduce", lib.ncl_all_reduce, args, dst.obj, async_op)

    def reduce(self, x, root: int = 0, op: ReduceOp = ReduceOp.SUM, *, out=None, async_op: bool = False):
        """Reduce x over all ranks into root's x (or out); other ranks' buffers are untouched."""
        op = check_op(op)
        root = check_rank(root, "root", self._size)
        is_root = root == self._rank
        src = as_buffer(x, "x", writable=is_root and out is None)
        dst = (src if out is None else output(out, src, src.shape)) if is_root else None
        if dst is not None and out is not None:
            check_aliasing(src, dst, "reduce", 0, _IN_PLACE)
        args = (self._handle, _ptr(src), _ptr(dst), src.count, src.dtype, op, root)
        return self._launch("reduce", lib.ncl_reduce, args, dst.obj if is_root else x, async_op)

    def reduce_scatter(self, x, op: ReduceOp = ReduceOp.SUM, out=None, *, async_op: bool = False):
        """Reduce x over all ranks; rank r gets block r of dim 0."""
        op = check_op(op)
        src = as_buffer(x, "x", writable=False)
        n = rows(src, "x")
        if n % self._size:
            raise ValueError(f"x.shape[0] = {n} is not divisible by the communicator size {self._size}")
        dst = output(out, src, (n // self._size,) + src.shape[1:])
        if out is not None:
            check_aliasing(dst, src, "reduce_scatter", self._rank * dst.nbytes, "only out = x[rank block] (in place)")
        args = (self._handle, _ptr(src), _ptr(dst), dst.count, src.dtype, op)
        return self._launch("reduce_scatter", lib.ncl_reduce_scatter, args, dst.obj, async_op)

    # ---- data movement ------------------------------------------------------------------------
    def broadcast(self, x, root: int = 0, *, out=None, async_op: bool = False):
        """Copy root's x into every rank's x (or into out, when given; on the root x is then
        only read)."""
        root = check_rank(root, "root", self._size)
        src = as_buffer(x, "x", writable=out is None and root != self._rank)
        dst = src if out is None else output(out, src, src.shape)
        if out is not None:
            check_aliasing(src, dst, "broadcast", 0, _IN_PLACE)
        args = (self._handle, _ptr(src), _ptr(dst), src.count, src.dtype, root)
        return self._launch("broadcast", lib.ncl_broadcast, args, dst.obj, async_op)

    def _stacked_shape(self, src: Buffer):
        return (self._size * src.shape[0],) + src.shape[1:] if src.shape else (self._size,)

    def all_gather(self, x, out=None, *, async_op: bool = False):
        """Concatenate every rank's x along dim 0 (rank order)."""
        src = as_buffer(x, "x", writable=False)
        dst = output(out, src, self._stacked_shape(src))
        if out is not None:
            check_aliasing(src, dst, "all_gather", self._rank * src.nbytes, _OWN_BLOCK)
        args = (self._handle, _ptr(src), _ptr(dst), src.count, src.dtype)
        return self._launch("all_gather", lib.ncl_all_gather, args, dst.obj, async_op)

    def gather(self, x, root: int = 0, out=None, *, async_op: bool = False):
        """Like all_gather, but only root receives (others get None)."""
        root = check_rank(root, "root", self._size)
        src = as_buffer(x, "x", writable=False)
        dst = output(out, src, self._stacked_shape(src)) if root == self._rank else None
        if dst is not None and out is not None:
            check_aliasing(src, dst, "gather", self._rank * src.nbytes, _OWN_BLOCK)
        args = (self._handle, _ptr(src), _ptr(dst), src.count, src.dtype, root)
        return self._launch("gather", lib.ncl_gather, args, dst.obj if dst is not None else None, async_op)

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
        args = (self._handle, _ptr(send), _ptr(dst), dst.count, dst.dtype, root)
        return self._launch("scatter", lib.ncl_scatter, args, dst.obj, async_op)

    def all_to_all(self, x, out=None, *, async_op: bool = False):
        """Block j of x (along dim 0) goes to rank j; block i of the result came from rank i."""
        src = as_buffer(x, "x", writable=False)
        n = rows(src, "x")
        if n % self._size:
            raise ValueError(f"x.shape[0] = {n} is not divisible by the communicator size {self._size}")
        dst = output(out, src, src.shape)
        if out is not None:
            check_aliasing(src, dst, "all_to_all", 0, _IN_PLACE)
        args = (self._handle, _ptr(src), _ptr(dst), src.count // self._size, src.dtype)
        return self._launch("all_to_all", lib.ncl_all_to_all, args, dst.obj, async_op)

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
        send_c = ffi.new("uint64_t[]", [c * row for c in send])
        recv_c = ffi.new("uint64_t[]", [c * row for c in recv])
        if known is not None:
            args = (self._handle, _ptr(src), send_c, _ptr(dst), recv_c, ffi.from_buffer("int64_t[]", known), row,
                    src.dtype)
            return self._launch("all_to_allv", lib.ncl_all_to_allv_known, args, dst.obj, async_op)
        args = (self._handle, _ptr(src), send_c, _ptr(dst), recv_c, src.dtype)
        return self._launch("all_to_allv", lib.ncl_all_to_allv, args, dst.obj, async_op)

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

    # ---- point to point and synchronisation ------------------------------------------------------
    def send(self, x, dst: int, *, async_op: bool = False):
        """Send x to rank dst (returns once x may be reused)."""
        dst = check_rank(dst, "dst", self._size, other_than=self._rank)
        buf = as_buffer(x, "x", writable=False)
        args = (self._handle, _ptr(buf), buf.count, buf.dtype, dst)
        return self._launch("send", lib.ncl_send, args, None, async_op)

    def recv(self, x, src: int, *, async_op: bool = False):
        """Receive from rank src into x (same count and dtype as the matching send)."""
        src = check_rank(src, "src", self._size, other_than=self._rank)
        buf = as_buffer(x, "x", writable=True)
        args = (self._handle, _ptr(buf), buf.count, buf.dtype, src)
        return self._launch("recv", lib.ncl_recv, args, x, async_op)

    def barrier(self, *, async_op: bool = False):
        """Return once every rank has entered the barrier."""
        return self._launch("barrier", lib.ncl_barrier, (self._handle,), None, async_op)

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
        table = self.all_gather(np.array([-1 if color is None else color, key], dtype=np.int64)).reshape(-1, 2)
        self._splits += 1
        if color is None:
            return None
        members = sorted((int(k), r) for r, (c, k) in enumerate(table.tolist()) if c == color)
        new_rank = members.index((int(key), self._rank))
        name = segment_name(self._unique_id, f"{self._name}/split{self._splits}/color{color}")
        options = ffi.new("ncl_options *", self._options[0])
        options.one_shot_max_bytes, options.direct_min_bytes, options.cma_all_reduce_min_bytes = \
            tuning.thresholds(len(members))
        label = f"{self._label}.split{self._splits}.color{color}"
        return Communicator._create(name, label, new_rank, len(members), self._unique_id, options)


__all__ = ["Communicator"]
