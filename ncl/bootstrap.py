"""Creating the world communicator: from ncl-run's environment, from explicit arguments
(as ncclCommInitRank with a unique id), or alone as a group of one."""
import numbers
import os
import string
from typing import Optional

from . import env
from .comm import Communicator
from .job import get_unique_id
from .tuning import options


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
    return Communicator._create("world", "world", rank, size, unique_id, options(size, timeout))
