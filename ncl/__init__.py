"""ncl: collective communication for NPU servers, over shared memory (and MPI between hosts).

    import ncl
    comm = ncl.init()            # under ncl-run, or alone as one rank
    comm.all_reduce(x)           # numpy arrays or torch CPU tensors, in place
"""
from . import log
from ._native import kernel_isa
from .bootstrap import init
from .buffers import ReduceOp
from .comm import Communicator
from .errors import (NclError, NclMismatchError, NclPeerError, NclStateError, NclSystemError,
                     NclTimeoutError)
from .job import get_unique_id
from .work import Work

SUM, PROD, MIN, MAX, AVG = ReduceOp.SUM, ReduceOp.PROD, ReduceOp.MIN, ReduceOp.MAX, ReduceOp.AVG
__version__ = "0.1.0"
log.configure()

__all__ = ["init", "get_unique_id", "Communicator", "Work", "ReduceOp", "SUM", "PROD", "MIN", "MAX", "AVG",
           "NclError", "NclTimeoutError", "NclPeerError", "NclMismatchError", "NclStateError", "NclSystemError",
           "kernel_isa"]
