"""The torch.distributed backend "ncl": a Python ProcessGroup whose collectives are ncl's.

torch hands the backend's creator a store (prefixed per group), this rank and the group size;
rank 0 of the group puts a fresh ncl job id in the store and every rank builds an ncl
communicator from it, so `init_process_group("ncl")` works with env://, file:// or a store,
and `new_group` builds a new communicator the same way.  Each call checks its arguments (ncl's
own checks, before any rank communicates) and starts on the communicator's worker thread
(ncl/work.py): the Work it returns completes in the background; its wait(), is_completed()
and get_future() behave as torch documents; sends and recvs queued together progress together
(batch_isend_irecv, pipelining); a recv without src takes whichever rank sends first.  The
coalesced calls start all their parts and return one Work.  The group lists the CPU as its
device, so torch finds it as the CPU backend (DCP's async save, state-dict loading from rank
0).  What ncl cannot do (another reduce op, a tensor on another device) raises an error naming
the call.

Compression (issue 23): a group made with `pg_options=ncl.torch.Options(compress="fp8")` (or
switched with `ncl.torch.set_compress(group, fmt)`) runs its float sums and data movement through
ncl's block-scaled path (ncl/compress.py), the same bits as `comm.all_reduce(x, compress=fmt)`:
all_reduce, reduce_scatter and all_gather (tensor, list and coalesced forms) and
all_to_all_single with equal blocks, for float32, bfloat16 and float16 tensors with SUM or AVG.
Everything else on the group stays exact: other dtypes (torch's object collectives, DDP's int
counters), MIN/MAX/PRODUCT (a block-scaled code keeps no order), uneven all_to_all splits and the
rooted collectives.  A compressed call runs in the caller's thread after the group's queued
calls (ncl's compressed collectives do), so its Work, async_op=True or not, is complete on
return.
"""
import dataclasses
import datetime
import functools
import threading
from typing import List, Optional

import torch
import torch.distributed as dist

import ncl
from ncl import compress as mx

_OPS = {dist.ReduceOp.SUM: ncl.SUM, dist.ReduceOp.PRODUCT: ncl.PROD, dist.ReduceOp.MIN: ncl.MIN,
        dist.ReduceOp.MAX: ncl.MAX, dist.ReduceOp.AVG: ncl.AVG}
_UID_KEY = "ncl_unique_id"
_COMPRESSIBLE = tuple(getattr(torch, name) for name in mx.FLOAT_DTYPES)


@dataclasses.dataclass
class Options:
    """torch's pg_options for an "ncl" group: `dist.init_process_group("ncl", pg_options=...)`,
    `dist.new_group(..., backend="ncl", pg_options=...)`.  compress: None or "fp8", "int8",
    "mxfp4" (see the module's docstring for what it covers)."""
    compress: Optional[str] = None

    def __post_init__(self):
        if self.compress is not None:
            mx.check_format(self.compress)


def _op(opts):
    op = opts.reduceOp
    for torch_op, ncl_op in _OPS.items():
        if op == torch_op:
            return ncl_op
    name = next((n for n in ("BAND", "BOR", "BXOR", "PREMUL_SUM", "UNUSED") if op == getattr(dist.ReduceOp, n, None)),
                str(getattr(op, "op", op)))
    raise ValueError(f"supported reduce ops are SUM, PRODUCT, MIN, MAX and AVG, not {name}")


def _future_exception(future: torch.futures.Future):
    """The error a torch Future completed with (waiting for it), or None."""
    try:
        future.wait()
    except BaseException as exc:  # noqa: B036
        return exc
    return None


class _Started(dist.Work):
    """A torch Work over a torch Future, whose wait() torch calls from Python: it waits in slices so that a
    Ctrl-C reaches this thread, and then aborts the group (interrupted) so that peers learn why at once."""

    def __init__(self, future: torch.futures.Future, interrupted=None):
        super().__init__()
        self._future, self._interrupted = future, interrupted
        self._done = threading.Event()
        future.add_done_callback(lambda _: self._done.set())

    def wait(self, timeout=None) -> bool:
        try:
            while not self._done.wait(0.05):
                pass
        except BaseException as exc:
            if self._interrupted is not None and not self._done.is_set():
                self._interrupted(exc)
            raise
        self._future.wait()  # raises the calls' error, if any
        return True

    def is_completed(self) -> bool:
        return self._future.done()

    def is_success(self) -> bool:
        return self._future.done() and _future_exception(self._future) is None

    def exception(self):
        return _future_exception(self._future)

    def get_future(self) -> torch.futures.Future:
        return self._future


def _work(works: list, result, then=None, keep=(), interrupted=None) -> dist.Work:
    """A torch Work that completes when every ncl Work in works has: then() runs first (copies
    out of temporaries, on the communicator's worker thread), errors pass on to wait().  keep:
    temporaries the calls read, alive until then; interrupted: what a Ctrl-C in wait() does."""
    future = torch.futures.Future()
    left = [len(works)]
    lock = threading.Lock()

    def finish(_work=None) -> None:
        with lock:
            left[0] -= 1
            if left[0] > 0:
                return
        try:
            for w in works:
                if (exc := w.exception()) is not None:
                    raise exc
            if then is not None:
                then()
        except BaseException as exc:  # noqa: B036  (it belongs to the caller's wait())
            future.set_exception(exc)
        else:
            future.set_result(result)
        nonlocal keep
        keep = ()  # the temporaries lived until here

    if not works:
        left[0] = 1
        finish()
    for w in works:
        w.add_done_callback(finish)
    return _Started(future, interrupted)


class _Ran:
    """A call that already ran in the caller's thread (a compressed one), seen as an ncl Work."""

    def exception(self):
        return None

    def add_done_callback(self, fn) -> None:
        fn(self)


_RAN = _Ran()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as rows along dim 0 (a 0-d tensor as one row)."""
    return t.reshape(1, -1) if t.dim() == 0 else t.reshape(t.shape[0], -1)


def _named(fn):
    """Argument errors say which torch.distributed call met them."""
    @functools.wraps(fn)
    def call(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"ncl backend, {fn.__name__}: {exc}") from None
    return call


class ProcessGroupNcl(dist.ProcessGroup):
    """A torch ProcessGroup over one ncl Communicator."""

    def __init__(self, comm: "ncl.Communicator", options: Optional[Options] = None):
        super().__init__(comm.rank, comm.size)
        self.comm = comm
        self.options = options if options is not None else Options()
        self._group_name = self._group_desc = ""
        self._coalesced: Optional[list] = None  # inside _start/_end_coalescing: the Works started
        # torch looks groups up by device (DCP's async save asks for the CPU's); this group's
        # collectives are its own Python methods, so the entry names the device and no C++ backend
        self._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.CUSTOM, None)

    # torch's bookkeeping (functional collectives look groups up by name)
    def getBackendName(self) -> str:
        return "ncl"

    def _set_group_name(self, name: str) -> None:
        self._group_name = name

    def setGroupName(self, name: str) -> None:
        self._group_name = name

    def getGroupName(self) -> str:
        return self._group_name

    @property
    def group_name(self) -> str:
        return self._group_name

    def setGroupDesc(self, desc: str) -> None:
        self._group_desc = desc

    def getGroupDesc(self) -> str:
        return self._group_desc

    def abort(self) -> None:
        """torch's abort of a group (dist.distributed_c10d._abort_process_group) revokes its communicator."""
        self.comm.revoke()

    def shutdown(self) -> None:
        """destroy_process_group: finish the queued calls and close the communicator."""
        self.comm.close()

    def _started(self, works: list, result, then=None, keep=()) -> dist.Work:
        """The torch Work of calls just started (remembered while coalescing)."""
        work = _work(works, result, then, keep, self.comm._interrupted)
        if self._coalesced is not None:
            self._coalesced.append(work)
        return work

    def _format(self, t: torch.Tensor, op=ncl.SUM) -> Optional[str]:
        """The compress format a call on t goes through, or None (exact)."""
        fmt = self.options.compress
        return fmt if fmt is not None and t.dtype in _COMPRESSIBLE and op in (ncl.SUM, ncl.AVG) else None

    @staticmethod
    def _start(fn, *args, compress: Optional[str] = None, **kwargs):
        """fn(*args) queued on the communicator's worker, or, compressed, run now in this thread."""
        if compress is None:
            return fn(*args, async_op=True, **kwargs)
        fn(*args, compress=compress, **kwargs)
        return _RAN

    def _start_coalescing(self, device=None) -> None:
        self._coalesced = []

    def _end_coalescing(self, device=None) -> dist.Work:
        """One Work for the calls since _start_coalescing (they were started in order already)."""
        works, self._coalesced = self._coalesced or [], None
        return _work([_TorchWork(w) for w in works], None)

    # ---- collectives -------------------------------------------------------------------------------
    @_named
    def allreduce(self, tensors: List[torch.Tensor], opts=None) -> dist.Work:
        op = _op(opts) if opts is not None else ncl.SUM
        return self._started([self._start(self.comm.all_reduce, t, op, compress=self._format(t, op)) for t in tensors],
                             tensors)

    @_named
    def allreduce_coalesced(self, tensors: List[torch.Tensor], opts=None) -> dist.Work:
        return self.allreduce(tensors, opts)

    @_named
    def reduce(self, tensors: List[torch.Tensor], opts) -> dist.Work:
        op = _op(opts)
        return self._started([self.comm.reduce(t, opts.rootRank, op, async_op=True) for t in tensors], tensors)

    @_named
    def broadcast(self, tensors: List[torch.Tensor], opts) -> dist.Work:
        return self._started([self.comm.broadcast(t, opts.rootRank, async_op=True) for t in tensors], tensors)

    def _gathered(self, outs: List[torch.Tensor], x: torch.Tensor, fn, *args, compress=None) -> tuple:
        """fn(x flat, *args, out=one flat tensor) started; then() copies its blocks into outs."""
        flat = x.reshape(-1).contiguous()
        got = torch.empty(len(outs) * x.numel(), dtype=x.dtype)
        work = self._start(fn, flat, *args, out=got, compress=compress)

        def then() -> None:
            for r, out in enumerate(outs):
                out.copy_(got[r * x.numel():(r + 1) * x.numel()].view(out.shape))
        return work, then, (flat, got)

    @_named
    def allgather(self, output_lists: List[List[torch.Tensor]], inputs: List[torch.Tensor], opts=None) -> dist.Work:
        started = [self._gathered(outs, x, self.comm.all_gather, compress=self._format(x))
                   for outs, x in zip(output_lists, inputs)]
        return self._started([w for w, _, _ in started], output_lists,
                             lambda: [then() for _, then, _ in started], [k for _, _, k in started])

    @_named
    def allgather_coalesced(self, output_lists: List[List[torch.Tensor]], inputs: List[torch.Tensor],
                            opts=None) -> dist.Work:
        """Rank r's inputs[i] into output_lists[r][i]."""
        flat = [x.reshape(-1).contiguous() for x in inputs]
        gots = [torch.empty(self.comm.size * x.numel(), dtype=x.dtype) for x in flat]
        works = [self._start(self.comm.all_gather, x, out=got, compress=self._format(x)) for x, got in zip(flat, gots)]

        def then() -> None:
            for i, (x, got) in enumerate(zip(flat, gots)):
                for r in range(self.comm.size):
                    output_lists[r][i].copy_(got[r * x.numel():(r + 1) * x.numel()].view(output_lists[r][i].shape))
        return self._started(works, output_lists, then, (flat, gots))

    @_named
    def all_gather_single(self, out: torch.Tensor, x: torch.Tensor, opts=None) -> dist.Work:
        flat = x.reshape(-1).contiguous()
        work = self._start(self.comm.all_gather, flat, out=out.view(-1), compress=self._format(x))
        return self._started([work], [out], keep=flat)

    _allgather_base = all_gather_single

    @_named
    def all_gather_single_coalesced(self, outs, inputs, opts=None) -> dist.Work:
        flats = [x.reshape(-1).contiguous() for x in inputs]
        works = [self._start(self.comm.all_gather, x, out=out.view(-1), compress=self._format(x))
                 for out, x in zip(outs, flats)]
        return self._started(works, outs, keep=flats)

    @_named
    def allgather_into_tensor_coalesced(self, outs, inputs, opts=None) -> dist.Work:
        return self.all_gather_single_coalesced(outs, inputs, opts)

    @_named
    def reduce_scatter(self, outs: List[torch.Tensor], input_lists: List[List[torch.Tensor]], opts) -> dist.Work:
        op = _op(opts)
        wholes = [torch.cat([t.reshape(-1) for t in inputs]) for inputs in input_lists]
        works = [self._start(self.comm.reduce_scatter, whole, op, out=out.view(-1), compress=self._format(whole, op))
                 for out, whole in zip(outs, wholes)]
        return self._started(works, outs, keep=wholes)

    @_named
    def reduce_scatter_single(self, out: torch.Tensor, x: torch.Tensor, opts) -> dist.Work:
        flat, op = x.reshape(-1).contiguous(), _op(opts)
        work = self._start(self.comm.reduce_scatter, flat, op, out=out.view(-1), compress=self._format(x, op))
        return self._started([work], [out], keep=flat)

    _reduce_scatter_base = reduce_scatter_single

    @_named
    def reduce_scatter_single_coalesced(self, outs, inputs, opts) -> dist.Work:
        op = _op(opts)
        flats = [x.reshape(-1).contiguous() for x in inputs]
        works = [self._start(self.comm.reduce_scatter, x, op, out=out.view(-1), compress=self._format(x, op))
                 for out, x in zip(outs, flats)]
        return self._started(works, outs, keep=flats)

    @_named
    def reduce_scatter_tensor_coalesced(self, outs, inputs, opts) -> dist.Work:
        return self.reduce_scatter_single_coalesced(outs, inputs, opts)

    @_named
    def all_to_all_single(self, out: torch.Tensor, x: torch.Tensor, out_splits: List[int], in_splits: List[int],
                          opts=None) -> dist.Work:
        rows_in, rows_out, n = _rows(x.contiguous()), _rows(out), self.comm.size
        send = list(in_splits) or [rows_in.shape[0] // n] * n
        recv = list(out_splits) or [rows_out.shape[0] // n] * n
        if not in_splits and not out_splits or len(set(send + recv)) == 1:  # equal blocks
            work = self._start(self.comm.all_to_all, rows_in, out=rows_out, compress=self._format(x))
        else:
            work = self.comm.all_to_allv(rows_in, send, recv, out=rows_out, async_op=True)
        return self._started([work], [out], keep=rows_in)

    alltoall_base = all_to_all_single

    @_named
    def alltoall(self, outs: List[torch.Tensor], inputs: List[torch.Tensor], opts=None) -> dist.Work:
        whole = torch.cat([t.reshape(-1) for t in inputs])
        got = torch.empty(sum(t.numel() for t in outs), dtype=whole.dtype)
        work = self.comm.all_to_allv(whole, [t.numel() for t in inputs], [t.numel() for t in outs], out=got,
                                     async_op=True)

        def then() -> None:
            at = 0
            for t in outs:
                t.copy_(got[at:at + t.numel()].view(t.shape))
                at += t.numel()
        return self._started([work], outs, then, (whole, got))

    @_named
    def gather(self, output_lists: List[List[torch.Tensor]], inputs: List[torch.Tensor], opts) -> dist.Work:
        x = inputs[0]
        if self.comm.rank == opts.rootRank:
            work, then, keep = self._gathered(output_lists[0], x, self.comm.gather, opts.rootRank)
            return self._started([work], output_lists, then, keep)
        flat = x.reshape(-1).contiguous()
        return self._started([self.comm.gather(flat, opts.rootRank, async_op=True)], output_lists, keep=flat)

    @_named
    def scatter(self, outs: List[torch.Tensor], input_lists: List[List[torch.Tensor]], opts) -> dist.Work:
        out = outs[0]
        whole = torch.cat([t.reshape(-1) for t in input_lists[0]]) if self.comm.rank == opts.rootRank else None
        return self._started([self.comm.scatter(whole, opts.rootRank, out=out.view(-1), async_op=True)], outs,
                             keep=whole)

    @_named
    def send(self, tensors: List[torch.Tensor], dst: int, tag: int = 0) -> dist.Work:
        return self._started([self.comm.send(t, dst, async_op=True) for t in tensors], tensors)

    @_named
    def recv(self, tensors: List[torch.Tensor], src: int, tag: int = 0) -> dist.Work:
        return self._started([self.comm.recv(t, src, async_op=True) for t in tensors], tensors)

    @_named
    def recv_anysource(self, tensors: List[torch.Tensor], tag: int = 0) -> dist.Work:
        if len(tensors) != 1:
            raise ValueError(f"recv from any source takes one tensor, not {len(tensors)}")
        return _FromAnySource(self.comm.recv(tensors[0], None, async_op=True), tensors)

    @_named
    def barrier(self, opts=None) -> dist.Work:
        return self._started([self.comm.barrier(async_op=True)], None)


class _FromAnySource(dist.Work):
    """A recv from any source: torch asks its Work for the sender (_source_rank)."""

    def __init__(self, work: "ncl.Work", tensors: List[torch.Tensor]):
        super().__init__()
        self._work, self._tensors = work, tensors

    def wait(self, timeout=None) -> bool:
        self._work.wait()
        return True

    def is_completed(self) -> bool:
        return self._work.is_completed()

    def _source_rank(self) -> int:
        return self._work.wait()

    def get_future(self) -> torch.futures.Future:
        return _work([self._work], self._tensors).get_future()


class _TorchWork:
    """A torch Work seen as an ncl Work (what _work waits for)."""

    def __init__(self, work: dist.Work):
        self._future = work.get_future()

    def exception(self):
        return _future_exception(self._future)

    def add_done_callback(self, fn) -> None:
        self._future.add_done_callback(lambda _: fn(self))


def _create(dist_options, options: Optional[Options] = None) -> ProcessGroupNcl:
    """torch's entry point (its extended API: the group's store, rank, size and timeout, then
    the pg_options given to init_process_group or new_group): one ncl communicator for this
    group, its job id through the store."""
    if options is not None and not isinstance(options, Options):
        raise TypeError(f"pg_options for backend ncl must be ncl.torch.Options, not {type(options).__name__}")
    store, rank, size, timeout = dist_options.store, dist_options.group_rank, dist_options.group_size, \
        dist_options.timeout
    if rank == 0:
        store.set(_UID_KEY, ncl.get_unique_id())
    uid = store.get(_UID_KEY).decode()
    seconds = timeout.total_seconds() if timeout is not None else None
    return ProcessGroupNcl(ncl.init(rank=rank, size=size, unique_id=uid, timeout=seconds), options)


def ncl_group(group: Optional[dist.ProcessGroup] = None) -> ProcessGroupNcl:
    """group (None: the default group) as an "ncl" group, or a TypeError."""
    pg = group if group is not None else dist.distributed_c10d._get_default_group()
    if not isinstance(pg, ProcessGroupNcl):
        raise TypeError(f"expected a process group of backend ncl, not {type(pg).__name__}")
    return pg


def set_compress(group: Optional[dist.ProcessGroup], fmt: Optional[str]) -> None:
    """Compress the group's later collectives with fmt ("fp8", "int8", "mxfp4"), or stop (None).
    Every rank of the group sets the same: the compressed and the exact calls do not match."""
    options = Options(fmt)  # checks fmt first
    ncl_group(group).options = options


def register() -> None:
    """Register "ncl" with torch.distributed (idempotent)."""
    if "ncl" not in dist.Backend.backend_list:
        dist.Backend.register_backend("ncl", _create, extended_api=True, devices=["cpu"])
