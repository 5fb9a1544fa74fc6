"""The same collectives through four transports: ncl, MPI (mpi4py), torch.distributed's gloo and
DeepSpeed's CPU shared-memory all-reduce (deepspeed.comm.inference_all_reduce, over a gloo group).

Each backend is driven with numpy buffers that the worker allocates (`wrap` turns them into
what the transport takes, sharing memory) and runs one call as a user of that library would
write it.  A (collective, placement) pair a library has no call for is reported unsupported
rather than emulated with extra copies:
- MPI has no out-of-place broadcast, and its in-place reduce_scatter puts the result at the
  start of the buffer (not at the rank's block, as NCCL and ncl do);
- gloo's all_reduce, reduce and broadcast work in place only, and it has no in-place forms of
  the gathering collectives;
- DeepSpeed's shared-memory op is an in-place sum over bfloat16, float16 and float32 only (it
  hands anything else to gloo, which would not be DeepSpeed's number).
"""
import contextlib
import glob
import os
import sys
import zlib
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


class DeepSpeedBackend(GlooBackend):
    """deepspeed.comm.inference_all_reduce on the gloo group (barriers and bookkeeping stay gloo's).

    Its op is a C++ extension that DeepSpeed builds with g++ at first use; where DeepSpeed is
    missing or the op cannot build, every measurement is unsupported with the reason (printed
    once), so a sweep still runs ncl and the other peers.  The op names its shared memory after
    MASTER_ADDR and MASTER_PORT and never unlinks it (64 MiB per rank): each sweep gets its own
    name from its rendezvous file, and close() removes this rank's segment."""
    name, library, calls = "deepspeed", "DeepSpeed's shm all-reduce", {("all_reduce", True)}
    DTYPES = ("bfloat16", "float16", "float32")
    SHM_GLOB = "/dev/shm/deepspeed_allreduce_buffer_*_{addr}_{port}_{rank}"

    def __init__(self, rendezvous_file: str):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(20000 + zlib.crc32(rendezvous_file.encode()) % 40000))
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        super().__init__(rendezvous_file)
        self.ops, self.why_not = {}, None
        if self.size > (os.cpu_count() or 1):
            self.why_not = (f"DeepSpeed's shm all-reduce spins in its waits: {self.size} ranks on {os.cpu_count()} "
                            "CPUs take minutes per size, so it is not run oversubscribed")
        elif os.environ.get("LOCAL_SIZE") != str(self.size):  # the op segfaults without it
            self.why_not = f"LOCAL_SIZE must be the local rank count {self.size} (ncl-perf sets it)"
        else:
            self.why_not = self._load_op()
        if self.why_not is None:
            self.ops = {"sum": None}
        elif self.rank == 0:
            print(f"# deepspeed: not measured: {self.why_not}", flush=True)

    def _load_op(self) -> Optional[str]:
        """None when the shared-memory op is ready, else why not."""
        try:
            with contextlib.redirect_stdout(sys.stderr):  # stdout carries the rows; DeepSpeed prints there
                import deepspeed.comm as dc
                dc.init_distributed(dist_backend="gloo")
                backend = dc.comm.cdb
        except Exception as exc:  # ImportError, or anything its accelerator probe or build raises
            return f"DeepSpeed is not usable here ({type(exc).__name__}: {exc}); pip install 'ncl[peers]'"
        if getattr(backend, "shm_comm_op", None) is None:
            return "DeepSpeed's ShareMemCommBuilder op did not build (g++ and the torch headers are needed)"
        if getattr(backend, "shm_vector_kernel_level", 0) < 2:
            return "DeepSpeed's shm kernels need avx512bw for bfloat16 and float16 (it would fall back to gloo)"
        self.all_reduce = dc.inference_all_reduce
        return None

    def unsupported(self, coll, in_place, op, dtype):
        if self.why_not:
            return self.why_not
        why = super().unsupported(coll, in_place, op, dtype)
        if why is None and dtype.name not in self.DTYPES:
            why = f"{self.library} has no {dtype.name} kernel (only {', '.join(self.DTYPES)})"
        return why

    def run(self, coll, send, recv, op, root, in_place):
        self.all_reduce(recv)

    def close(self):
        self.dist.barrier()  # nobody maps a peer's segment any more
        for path in glob.glob(self.SHM_GLOB.format(addr=os.environ["MASTER_ADDR"], port=os.environ["MASTER_PORT"],
                                                   rank=self.rank)):
            os.unlink(path)
        super().close()


def create(name: str, *, registered: bool = False, rendezvous_file: str = "") -> Backend:
    if name == "ncl":
        return NclBackend(registered)
    if name == "mpi":
        return MpiBackend()
    if name == "gloo":
        return GlooBackend(rendezvous_file)
    if name == "deepspeed":
        return DeepSpeedBackend(rendezvous_file)
    raise ValueError(f"unknown backend {name!r}: choose ncl, mpi, gloo or deepspeed")
