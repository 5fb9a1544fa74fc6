"""Backend: what runs a Call (ncl/call.py) for a Communicator.  A new transport (a device's DMA
engine, say) implements this and nothing else; the Communicator validates, builds the Call,
and wraps the backend with async execution, tracing and emulation.

Two exist: ncl/shm.py (the C core over one shared-memory segment, the only code that maps a
Call to lib.ncl_* arguments) and ncl/hierarchical.py (a shared-memory backend per host composed
with MPI between hosts).
"""
from typing import Optional, Protocol, Tuple

from .call import Call


class Backend(Protocol):
    rank: int
    size: int
    label: str          # names the group in logs and flight records: "world", "world.split1.color0"
    options: object     # the ncl_options every rank created its group with (timeout, flight entries, ...)
    # the shared-memory backend whose C flight recorder keeps this group's calls (a hierarchical
    # backend: its host's, which records the intra-host steps), or None
    recorder: Optional[object]
    single_host: bool   # every rank maps every rank's registered memory (window), so calls may read it in place

    def run(self, call: Call) -> None:
        """Run one call to completion on this rank; raise on failure (ValueError for arguments the
        Communicator could not check, an NclError for a failure of the group)."""

    def last_call(self) -> Optional[Tuple[int, Optional[str], int, float]]:
        """What the backend decided for the call run last: (seq, algorithm, steps, seconds), or
        None when it keeps no record."""

    def window(self, nbytes: int):
        """Registered memory (collective: every rank asks for the same bytes): a cffi buffer of
        nbytes that collectives on it read in place, freed when it is garbage."""

    def abort(self, reason: Optional[str] = None) -> None:
        """Give up the group: peers waiting for this rank fail at once, quoting `reason` (what
        happened on this rank, e.g. "it failed with ValueError: ...")."""

    def close(self) -> None:
        """Release the group (idempotent); no run after it."""

    # Optional: all_reduce(send, recv, count, dtype, op, algo), as run(Call.of("all_reduce", send, recv,
    # count, dtype, op, -1, algo)) but without the Call, for the Communicator's fast path (ncl/comm.py:
    # an all_reduce of a plain numpy array or torch tensor, taken only while no wrapper reads Calls).
