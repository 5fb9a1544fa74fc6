"""Each collective once: what it takes, how its buffers relate, how its count is counted, and how
the link model and nccl-tests size and rate it.  The emulator (ncl/emulation.py), ncl-perf's
specs, the topology model's BUS_FACTOR and the models' cost model (BLOCK_COUNTED) read it here.

shape: how the receive buffer relates to the send buffer, which is also the one in-place layout
the Communicator allows (ncl/comm.py):
    SAME      as large as each other (in place: out is x)
    GATHERS   recv holds every rank's block, send is one (in place: x is this rank's block of out)
    SCATTERS  send holds every rank's block, recv is one (in place: out is x's block of this rank)
    VARIES    all_to_allv: blocks of any size (no overlap allowed); barrier and send/recv: one buffer
block_counted: the Call's count (and the flight record's) is one rank's block, so nccl-tests'
size (the link model's) is the group size times the bytes; otherwise it is the bytes themselves.
model: the collective the link model prices it as (barrier: an all_reduce of 0 bytes; all_to_allv:
an all_to_all of what this rank sends); bus_factor: nccl-tests' busbw = algbw * bus_factor(n).
"""
from typing import Callable, Dict, NamedTuple, Optional

SAME, GATHERS, SCATTERS, VARIES = "same", "gathers", "scatters", "varies"


class Collective(NamedTuple):
    name: str
    reduces: bool
    rooted: bool
    shape: str
    block_counted: bool
    model: str
    bus_factor: Optional[Callable[[int], float]]


def _ring(n: int) -> float:
    return (n - 1) / n


def _twice_ring(n: int) -> float:
    return 2 * (n - 1) / n


def _one(n: int) -> float:
    return 1.0


COLLECTIVES: Dict[str, Collective] = {c.name: c for c in (
    Collective("all_reduce", True, False, SAME, False, "all_reduce", _twice_ring),
    Collective("reduce", True, True, SAME, False, "reduce", _one),
    Collective("broadcast", False, True, SAME, False, "broadcast", _one),
    Collective("all_gather", False, False, GATHERS, True, "all_gather", _ring),
    Collective("gather", False, True, GATHERS, True, "gather", _ring),
    Collective("reduce_scatter", True, False, SCATTERS, True, "reduce_scatter", _ring),
    Collective("scatter", False, True, SCATTERS, True, "scatter", _ring),
    Collective("all_to_all", False, False, SAME, True, "all_to_all", _ring),  # count: one peer's block
    Collective("all_to_allv", False, False, VARIES, False, "all_to_all", None),  # count: all this rank sends
    Collective("send", False, False, VARIES, False, "send_recv", _one),
    Collective("recv", False, False, VARIES, False, "send_recv", _one),
    Collective("barrier", False, False, VARIES, False, "all_reduce", None),
    # ncl.moe's small dispatch and combine, one step each (native/moe.c); count: the bytes this rank sends
    Collective("moe_dispatch", False, False, VARIES, False, "all_to_all", None),
    Collective("moe_combine", False, False, VARIES, False, "all_to_all", None),
)}
BLOCK_COUNTED = frozenset(c.name for c in COLLECTIVES.values() if c.block_counted)
# calls whose count is all this rank sends, in blocks of any size: priced from every rank's total
SENDS_TOTAL = frozenset(c.name for c in COLLECTIVES.values() if c.model == "all_to_all" and c.shape == VARIES)
# the link model's collectives and their factors (send and recv are its send_recv)
BUS_FACTOR: Dict[str, Callable[[int], float]] = {c.model: c.bus_factor for c in COLLECTIVES.values()
                                                 if c.bus_factor is not None}


def nccl_bytes(collective: str, nbytes: int, nranks: int) -> int:
    """nccl-tests' size (what the link model takes) of a call of `nbytes` (its count in bytes)."""
    return nbytes * nranks if collective in BLOCK_COUNTED else nbytes
