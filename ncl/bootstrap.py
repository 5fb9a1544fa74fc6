"""Creating the world communicator: from ncl-run's environment, from explicit arguments
(as ncclCommInitRank with a unique id), or alone as a group of one."""
import numbers
import os
import secrets
import string
from typing import Optional

from . import env, tuning
from ._native import ffi
from .comm import Communicator, segment_name


def get_unique_id() -> str:
    """A fresh secret id for a new job (128 random bits, hex); share it with every rank."""
    return secrets.token_hex(16)


def options(nranks: int, timeout: Optional[float] = None, host_ranks: Optional[int] = None):
    """The C core's options, from the NCL_* knobs and the cost model; every rank must use the
    same sizes.  host_ranks: processes of the job on this machine (default: NCL_LOCAL_WORLD_SIZE
    from ncl-run, else nranks); more than the CPUs means no spinning."""
    opts = ffi.new("ncl_options *")
    opts.host_ranks = max(nranks, host_ranks or env.get("NCL_LOCAL_WORLD_SIZE") or nranks)
    opts.one_shot_max_bytes, opts.direct_min_bytes, opts.cma_all_reduce_min_bytes = tuning.thresholds(nranks)
    opts.cma_min_bytes = env.get("NCL_CMA_MIN_BYTES") if env.get("NCL_CMA") else 0
    opts.staging_bytes = env.get("NCL_BUFFSIZE")
    opts.p2p_bytes = env.get("NCL_P2P_BUFFSIZE")
    opts.timeout_s = env.get("NCL_TIMEOUT") if timeout is None else timeout
    opts.spin_us = env.get("NCL_SPIN_US")
    opts.yield_us = env.get("NCL_YIELD_US")
    opts.flight_entries = env.get("NCL_TRACE_BUFFER")
    opts.verify_calls = env.get("NCL_CHECK_CALLS")
    for field, minimum in (("staging_bytes", 4096), ("p2p_bytes", 4096)):
        if getattr(opts, field) < minimum:
            knob = "NCL_BUFFSIZE" if field == "staging_bytes" else "NCL_P2P_BUFFSIZE"
            raise ValueError(f"{knob} must be at least {minimum} bytes, not {getattr(opts, field)}")
    if not opts.timeout_s > 0:
        raise ValueError(f"NCL_TIMEOUT (or timeout=) must be > 0 seconds, not {opts.timeout_s}")
    return opts


def _check_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    return int(value)


# Set by MPI launchers (MPICH's hydra, Open MPI, PMIx) in every rank's environment.
_MPI_LAUNCH_VARS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")


def launched_by_mpi() -> bool:
    return any(v in os.environ for v in _MPI_LAUNCH_VARS)


def init(rank: Optional[int] = None, size: Optional[int] = None, unique_id: Optional[str] = None, *,
         timeout: Optional[float] = None) -> Communicator:
    """The world communicator.  Arguments override NCL_RANK, NCL_WORLD_SIZE and NCL_UNIQUE_ID
    (which ncl-run sets); under mpiexec (and no NCL_RANK), the ranks of MPI_COMM_WORLD
    (Communicator.from_mpi); with none of these, a communicator of one rank."""
    if rank is None and size is None and env.get("NCL_RANK") is None and launched_by_mpi():
        if timeout is not None and not (isinstance(timeout, numbers.Real) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        from .transport.mpi import import_mpi
        return Communicator.from_mpi(import_mpi().COMM_WORLD, timeout=timeout)
    rank = env.get("NCL_RANK") if rank is None else rank
    size = env.get("NCL_WORLD_SIZE") if size is None else size
    unique_id = env.get("NCL_UNIQUE_ID") if unique_id is None else unique_id
    if rank is None and size is None:
        rank, size = 0, 1
    if rank is None or size is None:
        raise ValueError("give both rank and size (or neither, for a single-rank communicator)")
    rank, size = _check_int(rank, "rank"), _check_int(size, "size")
    if size < 1:
        raise ValueError(f"size must be >= 1, not {size}")
    if not 0 <= rank < size:
        raise ValueError(f"rank={rank} is out of range for size {size}")
    if unique_id is None:
        if size > 1:
            raise ValueError("a communicator of several ranks needs the job's unique_id "
                             "(ncl.get_unique_id() on one rank, shared with the others; ncl-run sets NCL_UNIQUE_ID)")
        unique_id = get_unique_id()
    if not isinstance(unique_id, str) or len(unique_id) < 16 or not set(unique_id) <= set(string.hexdigits):
        raise ValueError("unique_id must be a hex string of at least 16 characters, as ncl.get_unique_id() returns")
    if timeout is not None and not (isinstance(timeout, numbers.Real) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
    name = segment_name(unique_id, "world")
    return Communicator._create(name, "world", rank, size, unique_id, options(size, timeout))
