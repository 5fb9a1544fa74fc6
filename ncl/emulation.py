"""Emulated time on the target interconnect: each call also costed on a topology's links.

With a topology (`ncl-run --topology FILE`, or NCL_TOPOLOGY=FILE|name) every call a
communicator completes is looked up in the link model (ncl/topology): the algorithm ncl would
run there (the model's cheapest: ring, tree, one-shot, ...) and the time the same traffic takes
on those links.  The call itself still runs over this host's shared memory with the algorithm
that is fastest here; the model only decides what is reported (and, in pace mode, waited for).

Modes (NCL_EMULATE):
- account (the default when a topology is given): the emulated time is reported beside the wall
  time: comm.last_stats(), comm.emulated_totals(), the flight record, ncl-perf's columns;
- pace: besides, every call lasts at least its emulated time (this rank waits out the rest), so
  end-to-end latencies (a model's decode step) follow the target hardware where it is slower
  than this host;
- off: nothing (the default without a topology).

Ranks map to chips in the topology's placement order (rank r on placement[r]).  A split
communicator of m ranks is costed on the first m chips of the placement (a simplification: its
members may sit elsewhere in the real placement).

Emulator costs calls as they run (each Call's bytes, ncl/call.py); Pricer costs calls recorded in
flight records after the fact (ncl-bench's phases).  Both size a call as ncl/collectives.py says.
"""
import time
from collections import OrderedDict
from typing import Dict, Optional, Sequence, Tuple

from . import env
from .collectives import COLLECTIVES, SENDS_TOTAL, nccl_bytes
SPIN_S = 50e-6  # pace: sleep for longer waits (a sleep overshoots by tens of µs here), spin for shorter


class Emulator:
    """One communicator's link-model costs, per (collective, bytes) cached, and its running totals."""

    def __init__(self, topology, mode: str, nranks: int, keep: int):
        if mode not in ("account", "pace"):
            raise ValueError(f"NCL_EMULATE must be off, account or pace, not {mode!r}")
        if nranks > topology.num_chips:
            raise ValueError(f"topology {topology.name} has {topology.num_chips} chips, fewer than the {nranks} "
                             f"ranks of this job; give a larger topology (ncl-topo predict shows scaled-out ones)")
        self.topology, self.mode, self.nranks = topology, mode, nranks
        self.pace = mode == "pace"
        self._costs: Dict[Tuple[str, int], Tuple[str, float]] = {}
        self._by_seq: "OrderedDict[int, Tuple[str, float]]" = OrderedDict()  # flight record seq -> cost
        self._keep = max(keep, 1)
        self.last: Optional[dict] = None
        self.reset()

    def reset(self) -> dict:
        """The totals so far (then zeroed)."""
        old = getattr(self, "totals", None)
        self.totals = {"calls": 0, "wall_s": 0.0, "emulated_s": 0.0, "by_collective": {}}
        return old

    def cost(self, collective: str, nbytes: int) -> Tuple[str, float]:
        """(algorithm on the target, seconds) of one call of `nbytes` (its count in bytes)."""
        key = (collective, nbytes)
        hit = self._costs.get(key)
        if hit is None:
            if self.nranks == 1:
                hit = ("local", 0.0)
            else:
                name = COLLECTIVES[collective].model
                size = nccl_bytes(collective, nbytes, self.nranks)
                algorithm = self.topology.best_algorithm(name, size, self.nranks)
                hit = (algorithm, self.topology.predict(name, size, self.nranks, algorithm))
            if len(self._costs) > 1 << 16:  # ever-new sizes: keep the memory bounded
                self._costs.clear()
            self._costs[key] = hit
        return hit

    def record(self, seq: int, collective: str, nbytes: int, host_algorithm: Optional[str], wall_s: float) -> float:
        """Account one completed call; the seconds pace mode must still wait."""
        algorithm, emulated = self.cost(collective, nbytes)
        self._by_seq[seq] = (algorithm, emulated)
        if len(self._by_seq) > self._keep:
            self._by_seq.popitem(last=False)
        t = self.totals
        t["calls"] += 1
        t["wall_s"] += wall_s
        t["emulated_s"] += emulated
        per = t["by_collective"].setdefault(collective, {"calls": 0, "wall_s": 0.0, "emulated_s": 0.0})
        per["calls"] += 1
        per["wall_s"] += wall_s
        per["emulated_s"] += emulated
        self.last = {"collective": collective, "bytes": nbytes, "host_algorithm": host_algorithm,
                     "target_algorithm": algorithm, "wall_us": wall_s * 1e6, "emulated_us": emulated * 1e6,
                     "topology": self.topology.name, "mode": self.mode}
        return emulated - wall_s if self.pace else 0.0

    def of_seq(self, seq: int) -> Optional[Tuple[str, float]]:
        return self._by_seq.get(seq)


class Emulated:
    """A backend whose every call is also costed on the emulated interconnect: its bytes from the
    Call, the call number and the algorithm taken here from what the backend decided."""

    def __init__(self, backend, emulator: Emulator):
        self.backend, self.emulator = backend, emulator

    def run(self, call) -> None:
        start = time.perf_counter()
        self.backend.run(call)
        wall = time.perf_counter() - start
        decided = self.backend.last_call()
        seq, host_algorithm = (decided[0], decided[1]) if decided is not None else (0, None)
        rest = self.emulator.record(seq, call.collective, call.nbytes, host_algorithm, wall)
        if rest > 0:
            wait(rest)


class Pricer:
    """Prices calls recorded in flight records (entries of ncl.flight.entries) on a topology;
    caches identical calls (decode repeats them).  Barriers are not priced (no payload).

    all_to_allv and ncl.moe's one-step calls (collectives.SENDS_TOTAL): the recorder keeps only this
    rank's total, so the exchanged byte matrix is rebuilt from every rank's total (exact) split evenly
    over the destinations (an assumption: routed tokens spread over experts uniformly on average) and
    priced as one phase of concurrent transfers."""

    def __init__(self, topology):
        self.topology = topology
        self.cache: Dict[tuple, float] = {}

    def call(self, entry: dict, nranks: int, members: Sequence[int],
             a2av_totals: Optional[Sequence[int]] = None) -> float:
        coll = entry["collective"]
        if nranks < 2 or coll == "barrier" or self.topology is None:
            return 0.0
        if coll in SENDS_TOTAL:
            key = (coll, tuple(a2av_totals or ()), tuple(members))
            if key not in self.cache:
                if a2av_totals and hasattr(self.topology, "predict_transfers"):
                    from .topology.core import uniform_matrix
                    self.cache[key] = float(self.topology.predict_transfers(uniform_matrix(a2av_totals, members)))
                else:  # the largest sender's total, as an equal all_to_all
                    size = max(a2av_totals) if a2av_totals else entry["bytes"]
                    self.cache[key] = float(self.topology.predict("all_to_all", size, nranks))
            return self.cache[key]
        key = (COLLECTIVES[coll].model, nccl_bytes(coll, entry["bytes"], nranks), nranks)
        if key not in self.cache:
            self.cache[key] = float(self.topology.predict(*key))
        return self.cache[key]


def wait(seconds: float) -> None:
    """Let `seconds` pass: sleep most of it, spin the last SPIN_S."""
    end = time.perf_counter() + seconds
    if seconds > 2 * SPIN_S:
        time.sleep(seconds - SPIN_S)
    while time.perf_counter() < end:
        pass


def for_communicator(nranks: int, keep: int) -> Optional[Emulator]:
    """The emulator NCL_TOPOLOGY and NCL_EMULATE ask for (None: off)."""
    name, mode = env.get("NCL_TOPOLOGY"), env.get("NCL_EMULATE")
    if mode == "off" or (not name and mode is None):
        return None
    from .topology import default_topology, load_topology
    topology = load_topology(name) if name else default_topology()
    return Emulator(topology, mode or "account", nranks, keep)
