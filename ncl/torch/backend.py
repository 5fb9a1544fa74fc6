"""The torch.distributed backend "ncl": a Python ProcessGroup whose collectives are ncl's.

torch hands the backend's creator a store (prefixed per group), this rank and the group size;
rank 0 of the group puts a fresh ncl job id in the store and every rank builds an ncl
communicator from it, so `init_process_group("ncl")` works with env://, file:// or a store,
and `new_group` builds a new communicator the same way.  Each call runs at once (ncl's own
argument checks apply) and returns a completed Work, whose wait() and get_future() behave as
torch documents.  What ncl cannot do (another reduce op, a tensor on another device) raises
an error naming the call.
"""
import datetime
import functools
from typing import List, Optional

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import _create_work_from_future

import ncl

_OPS = {dist.ReduceOp.SUM: ncl.SUM, dist.ReduceOp.PRODUCT: ncl.PROD, dist.ReduceOp.MIN: ncl.MIN,
        dist.ReduceOp.MAX: ncl.MAX, dist.ReduceOp.AVG: ncl.AVG}
_UID_KEY = "ncl_unique_id"


def _op(opts):
    op = opts.reduceOp
    for torch_op, ncl_op in _OPS.items():
        if op == torch_op:
            return ncl_op
    name = next((n for n in ("BAND", "BOR", "BXOR", "PREMUL_SUM", "UNUSED") if op == getattr(dist.ReduceOp, n, None)),
                str(getattr(op, "op", op)))
    raise ValueError(f"supported reduce ops are SUM, PRODUCT, MIN, MAX and AVG, not {name}")


def _done(result) -> dist.Work:
    future = torch.futures.Future()
    future.set_result(result)
    return _create_work_from_future(future)


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

    def __init__(self, comm: "ncl.Communicator"):
        super().__init__(comm.rank, comm.size)
        self.comm = comm
        self._group_name = self._group_desc = ""

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

    # ---- collectives -------------------------------------------------------------------------------
    @_named
    def allreduce(self, tensors: List[torch.Tensor], opts=None) -> dist.Work:
        op = _op(opts) if opts is not None else ncl.SUM
        for t in tensors:
            self.comm.all_reduce(t, op)
        return _done(tensors)

    @_named
    def allreduce_coalesced(self, tensors: List[torch.Tensor], opts=None) -> dist.Work:
        return self.allreduce(tensors, opts)

    @_named
    def reduce(self, tensors: List[torch.Tensor], opts) -> dist.Work:
        for t in tensors:
            self.comm.reduce(t, opts.rootRank, _op(opts))
        return _done(tensors)

    @_named
    def broadcast(self, tensors: List[torch.Tensor], opts) -> dist.Work:
        for t in tensors:
            self.comm.broadcast(t, opts.rootRank)
        return _done(tensors)

    @_named
    def allgather(self, output_lists: List[List[torch.Tensor]], inputs: List[torch.Tensor], opts=None) -> dist.Work:
        for outs, x in zip(output_lists, inputs):
            gathered = self.comm.all_gather(x.reshape(-1).contiguous())
            for r, out in enumerate(outs):
                out.copy_(gathered[r * x.numel():(r + 1) * x.numel()].view(out.shape))
        return _done(output_lists)

    @_named
    def all_gather_single(self, out: torch.Tensor, x: torch.Tensor, opts=None) -> dist.Work:
        self.comm.all_gather(x.reshape(-1).contiguous(), out=out.view(-1))
        return _done([out])

    _allgather_base = all_gather_single

    @_named
    def all_gather_single_coalesced(self, outs, inputs, opts=None) -> dist.Work:
        for out, x in zip(outs, inputs):
            self.all_gather_single(out, x, opts)
        return _done(outs)

    @_named
    def allgather_into_tensor_coalesced(self, outs, inputs, opts=None) -> dist.Work:
        return self.all_gather_single_coalesced(outs, inputs, opts)

    @_named
    def reduce_scatter(self, outs: List[torch.Tensor], input_lists: List[List[torch.Tensor]], opts) -> dist.Work:
        op = _op(opts)
        for out, inputs in zip(outs, input_lists):
            whole = torch.cat([t.reshape(-1) for t in inputs])
            self.comm.reduce_scatter(whole, op, out=out.view(-1))
        return _done(outs)

    @_named
    def reduce_scatter_single(self, out: torch.Tensor, x: torch.Tensor, opts) -> dist.Work:
        self.comm.reduce_scatter(x.reshape(-1).contiguous(), _op(opts), out=out.view(-1))
        return _done([out])

    _reduce_scatter_base = reduce_scatter_single

    @_named
    def reduce_scatter_single_coalesced(self, outs, inputs, opts) -> dist.Work:
        for out, x in zip(outs, inputs):
            self.reduce_scatter_single(out, x, opts)
        return _done(outs)

    @_named
    def reduce_scatter_tensor_coalesced(self, outs, inputs, opts) -> dist.Work:
        return self.reduce_scatter_single_coalesced(outs, inputs, opts)

    @_named
    def all_to_all_single(self, out: torch.Tensor, x: torch.Tensor, out_splits: List[int], in_splits: List[int],
                          opts=None) -> dist.Work:
        rows_in, rows_out = _rows(x.contiguous()), _rows(out)
        if not in_splits and not out_splits:
            self.comm.all_to_all(rows_in, out=rows_out)
        else:
            n = self.comm.size
            send = list(in_splits) or [rows_in.shape[0] // n] * n
            recv = list(out_splits) or [rows_out.shape[0] // n] * n
            self.comm.all_to_allv(rows_in, send, recv, out=rows_out)
        return _done([out])

    alltoall_base = all_to_all_single

    @_named
    def alltoall(self, outs: List[torch.Tensor], inputs: List[torch.Tensor], opts=None) -> dist.Work:
        whole = torch.cat([t.reshape(-1) for t in inputs])
        got = torch.empty(sum(t.numel() for t in outs), dtype=whole.dtype)
        self.comm.all_to_allv(whole, [t.numel() for t in inputs], [t.numel() for t in outs], out=got)
        at = 0
        for t in outs:
            t.copy_(got[at:at + t.numel()].view(t.shape))
            at += t.numel()
        return _done(outs)

    @_named
    def gather(self, output_lists: List[List[torch.Tensor]], inputs: List[torch.Tensor], opts) -> dist.Work:
        x = inputs[0]
        got = self.comm.gather(x.reshape(-1).contiguous(), opts.rootRank)
        if self.comm.rank == opts.rootRank:
            for r, out in enumerate(output_lists[0]):
                out.copy_(got[r * x.numel():(r + 1) * x.numel()].view(out.shape))
        return _done(output_lists)

    @_named
    def scatter(self, outs: List[torch.Tensor], input_lists: List[List[torch.Tensor]], opts) -> dist.Work:
        out = outs[0]
        whole = torch.cat([t.reshape(-1) for t in input_lists[0]]) if self.comm.rank == opts.rootRank else None
        self.comm.scatter(whole, opts.rootRank, out=out.view(-1))
        return _done(outs)

    @_named
    def send(self, tensors: List[torch.Tensor], dst: int, tag: int = 0) -> dist.Work:
        for t in tensors:
            self.comm.send(t, dst)
        return _done(tensors)

    @_named
    def recv(self, tensors: List[torch.Tensor], src: int, tag: int = 0) -> dist.Work:
        for t in tensors:
            self.comm.recv(t, src)
        return _done(tensors)

    @_named
    def recv_anysource(self, tensors, tag=0):
        raise NotImplementedError("the ncl backend has no recv from any source: give src")

    @_named
    def barrier(self, opts=None) -> dist.Work:
        self.comm.barrier()
        return _done(None)


def _create(store: dist.Store, rank: int, size: int, timeout: Optional[datetime.timedelta] = None) -> ProcessGroupNcl:
    """torch's entry point: one ncl communicator for this group, its job id through the store."""
    if rank == 0:
        store.set(_UID_KEY, ncl.get_unique_id())
    uid = store.get(_UID_KEY).decode()
    seconds = timeout.total_seconds() if timeout is not None else None
    return ProcessGroupNcl(ncl.init(rank=rank, size=size, unique_id=uid, timeout=seconds))


def register() -> None:
    """Register "ncl" with torch.distributed (idempotent)."""
    if "ncl" not in dist.Backend.backend_list:
        dist.Backend.register_backend("ncl", _create, devices=["cpu"])
