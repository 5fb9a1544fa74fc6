"""Flight-record entries → measured and emulated communication time, split by time window.

The C core records each call's `count` as the collective's own count argument (native/*.c):
the whole buffer for all_reduce, reduce and broadcast, one rank's block for all_gather,
gather, reduce_scatter, scatter and all_to_all, and the total sent by this rank for
all_to_allv.  The topology model takes nccl-tests' size column (the whole buffer for all of
them), so blocks are multiplied by the group size here.

all_to_allv: the recorder keeps only this rank's total, so the exchanged byte matrix is
rebuilt from every rank's total (exact) split evenly over the destinations (an assumption:
routed tokens spread over experts uniformly on average) and priced as one phase of concurrent
transfers.
"""
from typing import Dict, Optional, Sequence, Tuple

from ncl.topology.arch import BLOCK_COUNTED
from ncl.topology.core import uniform_matrix

NOT_PRICED = {"barrier"}


def nccl_bytes(entry: dict, nranks: int) -> int:
    """nccl-tests' size (bytes) of one recorded call on a group of nranks."""
    if entry["collective"] in BLOCK_COUNTED:
        return entry["bytes"] * nranks
    return entry["bytes"]


class Emulator:
    """Prices recorded calls on a topology; caches identical calls (decode repeats them)."""

    def __init__(self, topology):
        self.topology = topology
        self.cache: Dict[tuple, float] = {}

    def call(self, entry: dict, nranks: int, members: Sequence[int], a2av_totals: Optional[Sequence[int]] = None):
        coll = entry["collective"]
        if nranks < 2 or coll in NOT_PRICED or self.topology is None:
            return 0.0
        if coll == "all_to_allv":
            key = (coll, tuple(a2av_totals or ()), tuple(members))
            if key not in self.cache:
                if a2av_totals and hasattr(self.topology, "predict_transfers"):
                    self.cache[key] = float(self.topology.predict_transfers(uniform_matrix(a2av_totals, members)))
                else:  # the largest sender's total, as an equal all_to_all
                    size = max(a2av_totals) if a2av_totals else entry["bytes"]
                    self.cache[key] = float(self.topology.predict("all_to_all", size, nranks))
            return self.cache[key]
        name = {"send": "send_recv", "recv": "send_recv"}.get(coll, coll)
        key = (name, nccl_bytes(entry, nranks), nranks)
        if key not in self.cache:
            self.cache[key] = float(self.topology.predict(name, key[1], nranks))
        return self.cache[key]


def window_of(t: float, windows: Sequence[Tuple[float, float]]) -> int:
    """Index of the [begin, end) window holding time t, or -1 (windows sorted, disjoint)."""
    lo, hi = 0, len(windows)
    while lo < hi:
        mid = (lo + hi) // 2
        if windows[mid][1] <= t:
            lo = mid + 1
        else:
            hi = mid
    return lo if lo < len(windows) and windows[lo][0] <= t else -1
