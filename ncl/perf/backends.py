"""The same collectives through three transports: ncl, MPI (mpi4py) and torch.distributed's gloo.

Each backend is driven with numpy buffers that the worker allocates (`wrap` turns them into
what the transport takes, sharing memory) and runs one call as a user of that library would
write it.  A (collective, placement) pair a library has no call for is reported unsupported
rather than emulated with extra copies:
- MPI has no out-of-place broadcast, and its in-place reduce_scatter puts the result at the
  start of the buffer (not at the rank's block, as NCCL and ncl do);
- gloo's all_reduce, reduce and broadcast work in place only, and it has no in-place forms of
  the gathering collectives.
"""
import os
from typing import Any, Optional

import numpy as np

from .specs import SPECS

# (collective, in_place) pairs each peer library supports
_MPI_CALLS = {(c, False) for c in SPECS if c != "broadcast"} | {
    ("broadcast", True), ("all_reduce", True), ("reduce", True), ("all_gather", True), ("all_to_all", True)}
_GLOO_CALLS = {("all_reduce", True), ("reduce", True), ("broadcast", True), ("all_gather", False),
               ("gather", False), ("reduce_scatter", False), ("scatter", False), ("all_to_all", False)}


class Backend:
    name = ""
    library = ""            # how messages name it
    calls = None            # the (collective, in_place) pairs it has; None: all
    ops: dict = {}

    def unsupported(self, coll: str, in_place: bool, op: str, dtype: np.dtype) -> Optional[str]:
        """Why this backend cannot run the combination (None: it can)."""
        if self.calls is not None and (coll, in_place) not in self.calls:
            return f"{self.library} has no {'in-place' if in_place else 'out-of-place'} {coll} in this form"
        if SPECS[coll].reduces and op not in self.ops:
            return f"{self.library} has no {op} reduction"
        return None

    def alloc(self, count: int, dtype: np.dtype) -> np.ndarray:
        return np.empty(count, dtype)

    def wrap(self, array: Optional[np.ndarray]) -> Any:
        return array

    def close(self) -> None:
        pass


class NclBackend(Backend):
    name = library = "ncl"

    def __init__(self, registered: bool):
        import ncl
        self.ncl = ncl
        self.comm = ncl.init()
        self.rank, self.size = self.comm.rank, self.comm.size
        self.registered = registered
        self.ops = {"sum": ncl.SUM, "prod": ncl.PROD, "min": ncl.MIN, "max": ncl.MAX, "avg": ncl.AVG}
        # bookkeeping buffers: registered too, so that NCL_ALGO=direct sweeps can run
        self._float, self._int = self.alloc(1, np.float64), self.alloc(1, np.int64)

    def alloc(self, count, dtype):
        return self.comm.empty(count, dtype) if self.registered else np.empty(count, dtype)

    def barrier(self):
        self.comm.barrier()

    def max_over_ranks(self, value: float) -> float:
        self._float[0] = value
        return float(self.comm.all_reduce(self._float, self.ncl.MAX)[0])

    def sum_over_ranks(self, value: int) -> int:
        self._int[0] = value
        return int(self.comm.all_reduce(self._int)[0])

    def run(self, coll, send, recv, op, root, in_place):
        c, o = self.comm, self.ops.get(op)
        if coll == "all_reduce":
            c.all_reduce(recv, o) if in_place else c.all_reduce(send, o, out=recv)
        elif coll == "reduce":
            c.reduce(recv, root, o) if in_place else c.reduce(send, root, o, out=recv)
        elif coll == "broadcast":
            c.broadcast(recv, root) if in_place else c.broadcast(send if c.rank == root else recv, root, out=recv)
        elif coll == "all_gather":
            c.all_gather(send, out=recv)
        elif coll == "gather":
            c.gather(send, root, out=recv if c.rank == root else None)
        elif coll == "reduce_scatter":
            c.reduce_scatter(send, o, out=recv)
        elif coll == "scatter":
            c.scatter(send if c.rank == root else None, root, out=recv)
        elif coll == "all_to_all":
            c.all_to_all(send, out=recv)

    def close(self):
        self.comm.close()


class MpiBackend(Backend):
    name, library, calls = "mpi", "MPI", _MPI_CALLS

    def __init__(self):
        from mpi4py import MPI
        from mpi4py.util import dtlib
        self.MPI, self.dtlib, self.comm = MPI, dtlib, MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.ops = {"sum": MPI.SUM, "prod": MPI.PROD, "min": MPI.MIN, "max": MPI.MAX}

    def unsupported(self, coll, in_place, op, dtype):
        why = super().unsupported(coll, in_place, op, dtype)
        if why is None:
            try:
                self.dtlib.from_numpy_dtype(dtype)
            except (KeyError, ValueError, TypeError):
                why = f"MPI has no datatype for {dtype}"
        return why

    def barrier(self):
        self.comm.Barrier()

    def max_over_ranks(self, value):
        return self.comm.allreduce(value, self.MPI.MAX)

    def sum_over_ranks(self, value):
        return self.comm.allreduce(value, self.MPI.SUM)

    def run(self, coll, send, recv, op, root, in_place):
        c, o, IN_PLACE = self.comm, self.ops.get(op), self.MPI.IN_PLACE
        if coll == "all_reduce":
            c.Allreduce(IN_PLACE if in_place else send, recv, o)
        elif coll == "reduce":
            c.Reduce(IN_PLACE if in_place and self.rank == root else (recv if in_place else send), recv, o, root)
        elif coll == "broadcast":
            c.Bcast(recv, root)
        elif coll == "all_gather":
            c.Allgather(IN_PLACE if in_place else send, recv)
        elif coll == "gather":
            c.Gather(send, recv, root)
        elif coll == "reduce_scatter":
            c.Reduce_scatter_block(send, recv, o)
        elif coll == "scatter":
            c.Scatter(send, recv, root)
        elif coll == "all_to_all":
            c.Alltoall(IN_PLACE if in_place else send, recv)


class GlooBackend(Backend):
    name, library, calls = "gloo", "torch.distributed's gloo", _GLOO_CALLS

    def __init__(self, rendezvous_file: str):
        import torch
        import torch.distributed as dist
        self.torch, self.dist = torch, dist
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group("gloo", init_method=f"file://{rendezvous_file}", rank=rank, world_size=size)
        self.rank, self.size = rank, size
        R = dist.ReduceOp
        self.ops = {"sum": R.SUM, "prod": R.PRODUCT, "min": R.MIN, "max": R.MAX}

    def wrap(self, array):
        if array is None:
            return None
        if array.dtype.name == "bfloat16":
            return self.torch.from_numpy(array.view(np.uint16)).view(self.torch.bfloat16)
        return self.torch.from_numpy(array)

    def barrier(self):
        self.dist.barrier()

    def _scalar(self, value, dtype, op):
        t = self.torch.tensor([value], dtype=dtype)
        self.dist.all_reduce(t, op)
        return t.item()

    def max_over_ranks(self, value):
        return float(self._scalar(value, self.torch.float64, self.dist.ReduceOp.MAX))

    def sum_over_ranks(self, value):
        return int(self._scalar(value, self.torch.int64, self.dist.ReduceOp.SUM))

    def run(self, coll, send, recv, op, root, in_place):
        d, n = self.dist, self.size
        if coll == "all_reduce":
            d.all_reduce(recv, self.ops[op])
        elif coll == "reduce":
            d.reduce(recv, root, self.ops[op])
        elif coll == "broadcast":
            d.broadcast(recv, root)
        elif coll == "all_gather":
            d.all_gather_into_tensor(recv, send)
        elif coll == "gather":
            d.gather(send, list(recv.chunk(n)) if self.rank == root else None, dst=root)
        elif coll == "reduce_scatter":
            d.reduce_scatter_tensor(recv, send, self.ops[op])
        elif coll == "scatter":
            d.scatter(recv, list(send.chunk(n)) if self.rank == root else None, src=root)
        elif coll == "all_to_all":
            d.all_to_all_single(recv, send)

    def close(self):
        self.dist.destroy_process_group()


def create(name: str, *, registered: bool = False, rendezvous_file: str = "") -> Backend:
    if name == "ncl":
        return NclBackend(registered)
    if name == "mpi":
        return MpiBackend()
    if name == "gloo":
        return GlooBackend(rendezvous_file)
    raise ValueError(f"unknown backend {name!r}: choose ncl, mpi or gloo")
