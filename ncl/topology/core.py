"""Topology: a loaded topology file with the cost model behind it (the public API)."""
import os
from typing import Dict, List, Optional, Sequence, Tuple

from ..collectives import BUS_FACTOR  # noqa: F401 (nccl-tests' bus factors, per collective of the model)
from . import graph, model, schedules
from .schema import Spec, load

DEFAULT = "pcie-gen5-8card"


class Topology:
    """Chips, links, switches and hosts of one file, and what collectives cost on them.

    >>> topo = load_topology("pcie-gen5-8card")
    >>> topo.predict("all_reduce", 1 << 20, 8)           # seconds
    >>> topo.best_algorithm("all_reduce", 1 << 20, 8)    # e.g. "ring"
    """

    def __init__(self, spec: Spec):
        self.spec = spec
        self.model = model.Model(spec)
        self._compiled: Dict[Tuple[str, int, str], List[model.Cost]] = {}
        self._best: Dict[Tuple[str, int, int], str] = {}

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def num_chips(self) -> int:
        return len(self.spec.placement)

    def chips_of(self, nranks: int) -> List[str]:
        """The chips ranks 0..nranks-1 run on (the file's placement, in order)."""
        if not isinstance(nranks, int) or isinstance(nranks, bool) or nranks < 1:
            raise ValueError(f"nranks must be a positive integer, not {nranks!r}")
        if nranks > self.num_chips:
            raise ValueError(f"{nranks} ranks do not fit topology {self.name!r} of {self.num_chips} chips "
                             f"(use scaled({nranks}) for a larger one)")
        return self.spec.placement[:nranks]

    def algorithms(self, collective: str, nranks: Optional[int] = None) -> Tuple[str, ...]:
        """The schedules of `collective`; across hosts only rings and trees for the reductions and
        gathers (as NCCL: one-shot and all-pairs algorithms stay inside a server)."""
        algos = schedules.algorithms(collective, self.model.staging is not None)
        if nranks and collective in schedules.RING_OR_TREE_ACROSS_HOSTS:
            hosts = {self.model.host[c].name for c in self.chips_of(nranks)}
            if len(hosts) > 1:
                algos = tuple(a for a in algos if a in ("ring", "tree"))
        return algos

    def costs(self, collective: str, nranks: int, algorithm: str) -> List[model.Cost]:
        key = (collective, nranks, algorithm)
        if key not in self._compiled:
            if algorithm not in self.algorithms(collective, nranks):
                raise ValueError(f"{collective} has no algorithm {algorithm!r} on {nranks} chips of {self.name}; "
                                 f"choose one of {', '.join(self.algorithms(collective, nranks))}")
            self._compiled[key] = model.compile_schedule(self.model, collective, algorithm, self.chips_of(nranks))
        return self._compiled[key]

    def predict(self, collective: str, nbytes: int, nranks: int, algorithm: Optional[str] = None) -> float:
        """Seconds one `collective` of `nbytes` (nccl-tests' size column) takes on `nranks` ranks,
        with `algorithm`, or else the stack's measured time where the file gives one (measured.py), or
        else the cheapest algorithm by the model."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, not {nbytes}")
        if algorithm is None and (collective, nranks) in self.spec.measured:
            return self.spec.measured[(collective, nranks)].time(
                nbytes, lambda n: self.predict(collective, n, nranks, self.best_algorithm(collective, n, nranks)))
        if algorithm is None:
            algorithm = self.best_algorithm(collective, nbytes, nranks)
        costs = self.costs(collective, nranks, algorithm)
        cached = bool(costs) and self.model.cached(nbytes, self.spec.placement[:nranks])
        return sum(c.seconds(nbytes, self.model.slot, cached) for c in costs)

    def best_algorithm(self, collective: str, nbytes: int, nranks: int) -> str:
        key = (collective, nbytes, nranks)
        if key not in self._best:
            if len(self._best) > 1 << 16:  # callers with ever-new sizes: keep the memory bounded
                self._best.clear()
            algos = self.algorithms(collective, nranks)
            self._best[key] = min(algos, key=lambda a: self.predict(collective, nbytes, nranks, a))
        return self._best[key]

    def predict_transfers(self, transfers: Sequence[Tuple[int, int, int]]) -> float:
        """Seconds one phase of concurrent transfers (src rank, dst rank, bytes) takes."""
        items = []
        for k, t in enumerate(transfers):
            if len(t) != 3:
                raise ValueError(f"transfers[{k}] must be (src_rank, dst_rank, nbytes), not {t!r}")
            src, dst, nbytes = t
            if nbytes < 0:
                raise ValueError(f"transfers[{k}] moves a negative byte count {nbytes}")
            for rank in (src, dst):
                if not 0 <= rank < self.num_chips:
                    raise ValueError(f"transfers[{k}] names rank {rank}, but topology {self.name!r} has "
                                     f"{self.num_chips} chips")
            if nbytes and src != dst:
                items.append((self.spec.placement[src], self.spec.placement[dst], float(nbytes)))
        if not items:
            return 0.0
        return model.transfers_cost(self.model, items).seconds(1.0, 0, False)

    def ring(self, nranks: Optional[int] = None) -> List[str]:
        return graph.ring(self.model.g, self.chips_of(nranks or self.num_chips))

    def rings(self, nranks: Optional[int] = None) -> List[List[str]]:
        """The rings ring algorithms split their bytes over (one inside a host; one per NIC across hosts)."""
        return graph.rings(self.model.g, self.chips_of(nranks or self.num_chips))

    def tree(self, nranks: Optional[int] = None) -> Dict[str, Optional[str]]:
        return graph.tree(self.model.g, self.chips_of(nranks or self.num_chips))

    def busbw(self, collective: str, nbytes: int, nranks: int, seconds: float) -> float:
        """nccl-tests' bus bandwidth in GB/s."""
        return nbytes / seconds / 1e9 * BUS_FACTOR[collective](nranks) if seconds > 0 else 0.0

    def scaled(self, nchips: int) -> "Topology":
        """The topology grown to nchips: more servers joined by the same NICs, or a larger ring/torus."""
        from .scale import scale
        return Topology(scale(self.spec, nchips))

    def __repr__(self) -> str:
        return f"Topology({self.name!r}, {self.num_chips} chips)"


def uniform_matrix(totals: Sequence[int], members: Sequence[int]) -> List[Tuple[int, int, int]]:
    """Transfers (src, dst, bytes) between world ranks when group rank i sends totals[i] bytes spread
    evenly over the group (its own share stays local): an all_to_allv under balanced routing."""
    n = len(members)
    return [(members[i], members[j], totals[i] // n) for i in range(n) for j in range(n)
            if i != j and totals[i] // n > 0]


_LOADED: Dict[str, Topology] = {}


def load_topology(name_or_path: str) -> Topology:
    """A shipped topology by name (pcie-gen5-8card) or a YAML file by path."""
    key = os.path.abspath(name_or_path) if os.path.exists(name_or_path) else name_or_path
    if key not in _LOADED:
        _LOADED[key] = Topology(load(name_or_path))
    return _LOADED[key]


def default_topology() -> Topology:
    """NCL_TOPOLOGY if set, else the 8-card PCIe Gen5 server."""
    try:
        from .. import env
        name = env.get("NCL_TOPOLOGY")
    except KeyError:  # a tree whose knob table does not declare it yet
        name = os.environ.get("NCL_TOPOLOGY")
    return load_topology(name or DEFAULT)
