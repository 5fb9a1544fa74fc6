"""The link cost model: a collective's emulated time on a topology.

A phase's transfers are routed (graph.py) and each link direction carries the sum of the bytes routed
over it; a switch with an aggregate bandwidth carries the sum of the bytes passing through or ending in
it.  A phase takes
    latency (the slowest route's, times the pipeline depth)
    + max over link directions and switches of (bytes carried / bandwidth)
    combined with the reductions' time (bytes read / the chip's memory bandwidth): overlapped with the
    transfers (max) on accelerators, added to them on a host whose chips are processes sharing CPUs
    (the same cores copy and reduce), where more chips than CPUs stretch the latency (busy_latency_factor
    with all the host's chips busy, linear in between).
A collective is the sum of its phases, each phase repeated (ring steps; staging chunks).  Everything
is linear in the message size, so each (collective, ranks, algorithm) compiles once to a few numbers and
predict() is a few multiplications."""
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from . import graph, schedules
from .schema import Spec


@dataclass(frozen=True)
class Cost:
    """One phase: seconds of latency, seconds per byte of S (out of and in the cache), repeats."""
    latency: float
    per_byte: float
    per_byte_cached: float
    repeat: int
    chunked: float

    def seconds(self, nbytes: float, slot: float, cached: bool) -> float:
        times = self.repeat * (max(1, math.ceil(nbytes * self.chunked / slot)) if self.chunked and slot else 1)
        return times * self.latency + self.repeat * nbytes * (self.per_byte_cached if cached else self.per_byte)


class Model:
    def __init__(self, spec: Spec):
        self.spec = spec
        self.g = graph.Graph(spec)
        self.chip = {c.name: c for c in spec.chips}
        self.switch_bw = {s.name: s.bandwidth_gbps * 1e9 for s in spec.switches if s.bandwidth_gbps}
        staging = [s for s in spec.switches if s.staging]
        self.staging = staging[0].name if staging else None
        self.slot = (staging[0].slot_mib or 0) * (1 << 20) if staging else 0
        self.host = {c: h for h in spec.hosts for c in h.chips}

    def phase_cost(self, ph: schedules.Phase) -> Cost:
        loads: Dict[int, float] = {}
        sw_loads: Dict[str, float] = {}
        local: Dict[str, float] = dict()
        latency = 0.0
        active = set()
        fan: Dict[str, Dict[str, float]] = {}  # sources sending to many: summed over their route tree
        for src, dst, frac in ph.transfers:
            for end in (src, dst):
                if end in self.chip:
                    active.add(end)
            if src == dst and not self.staging:  # a copy inside one chip's memory
                local[src] = local.get(src, 0.0) + frac
                continue
            if src != dst:
                fan.setdefault(src, {})
                fan[src][dst] = fan[src].get(dst, 0.0) + frac
                continue
            # processes sharing memory: a copy in memory is a copy through it
            up, down = self.g.path(src, self.staging), self.g.path(self.staging, dst)
            latency = max(latency, up[2] + down[2])
            for d in up[0] + down[0]:
                loads[d] = loads.get(d, 0.0) + frac
            if self.staging in self.switch_bw:
                sw_loads[self.staging] = sw_loads.get(self.staging, 0.0) + frac
        for src, dsts in fan.items():
            latency = max(latency, self._spread(src, dsts, loads, sw_loads))
        if ph.pipelined:  # the first bytes travel the whole chain or tree before the last hop starts
            latency = self._longest_chain(fan)
        for c, frac in ph.local:
            local[c] = local.get(c, 0.0) + frac
            active.add(c)
        wire = max([f / self.g.bw[d] for d, f in loads.items()] + [f / self.switch_bw[s] for s, f in sw_loads.items()],
                   default=0.0)
        compute, shared, stretch = 0.0, False, 1.0
        by_host: Dict[str, List[float]] = {}
        for c, frac in local.items():
            t = frac / (self.chip[c].memory_bandwidth_gbps * 1e9)
            compute = max(compute, t)
            by_host.setdefault(self.host[c].name, []).append(t)
        for h in self.spec.hosts:
            if h.cpus:
                shared = shared or bool(active & set(h.chips))
                compute = max(compute, sum(by_host.get(h.name, [])) / h.cpus)
                k, full = len(active & set(h.chips)), len(h.chips)
                if k > h.cpus:  # time-shared CPUs: every step waits for descheduled peers
                    stretch = max(stretch, 1 + (h.busy_latency_factor - 1) * (k - h.cpus) / max(full - h.cpus, 1))
        per_byte = wire + compute if shared else max(wire, compute)
        speedup = max((h.cache_speedup for h in self.spec.hosts if h.cache_mib and active & set(h.chips)), default=1.0)
        return Cost(latency * stretch, per_byte, per_byte / speedup, ph.repeat, ph.chunked)

    def _spread(self, src: str, dsts: Dict[str, float], loads: Dict[int, float], sw_loads: Dict[str, float]) -> float:
        """Add src's transfers (bytes per destination) to the link and switch loads along its shortest-path
        tree (each link carries what goes to the nodes beyond it); returns the slowest route's latency."""
        if len(dsts) <= 4:  # a few routes: walk them (cheaper than the whole tree)
            worst = 0.0
            for dst, f in dsts.items():
                dirs, via, lat_ = self.g.path(src, dst)
                worst = max(worst, lat_)
                for d in dirs:
                    loads[d] = loads.get(d, 0.0) + f
                for node in {src, dst, *via} & self.switch_bw.keys():
                    sw_loads[node] = sw_loads.get(node, 0.0) + f
            return worst
        prev, order, lat = self.g.source_tree(src)
        acc = dict(dsts)
        if src in self.switch_bw:
            sw_loads[src] = sw_loads.get(src, 0.0) + sum(dsts.values())
        for node in reversed(order):
            f = acc.get(node)
            if not f or node == src:
                continue
            if node in self.switch_bw:
                sw_loads[node] = sw_loads.get(node, 0.0) + f
            u, d = prev[node]
            loads[d] = loads.get(d, 0.0) + f
            acc[u] = acc.get(u, 0.0) + f
        return max(lat[d] for d in dsts)

    def _longest_chain(self, fan: Dict[str, Dict[str, float]]) -> float:
        """The largest sum of route latencies along a path of the phase's transfers (a chain or tree:
        taken in topological order; nodes on a cycle, which no schedule makes, are left out)."""
        indegree: Dict[str, int] = {}
        for src, dsts in fan.items():
            indegree.setdefault(src, 0)
            for dst in dsts:
                indegree[dst] = indegree.get(dst, 0) + 1
        arrive = {n: 0.0 for n in indegree}
        ready = [n for n, k in indegree.items() if k == 0]
        while ready:
            src = ready.pop()
            for dst in fan.get(src, ()):
                arrive[dst] = max(arrive[dst], arrive[src] + self.g.path(src, dst)[2])
                indegree[dst] -= 1
                if indegree[dst] == 0:
                    ready.append(dst)
        return max(arrive.values(), default=0.0)

    def cached(self, nbytes: float, chips: Sequence[str]) -> bool:
        """Whether the ranks' send and receive buffers (nbytes each) fit the cache of their host."""
        hosts = {self.host[c].name: self.host[c] for c in chips}
        return all(h.cache_mib and 2 * nbytes * len([c for c in chips if self.host[c] is h]) <= h.cache_mib * (1 << 20)
                   for h in hosts.values())


def compile_schedule(m: Model, collective: str, algorithm: str, chips: List[str]) -> List[Cost]:
    ring = graph.ring(m.g, chips)
    parent = graph.tree(m.g, chips)
    central = any(h.cpus and len(set(h.chips) & set(chips)) > h.cpus for h in m.spec.hosts)
    ctx = schedules.Context(chips, ring, graph.rings(m.g, chips), parent, graph.depth(parent), m.staging, central)
    return [m.phase_cost(ph) for ph in schedules.build(collective, algorithm, ctx)]


def transfers_cost(m: Model, transfers: Sequence[Tuple[str, str, float]]) -> Optional[Cost]:
    """One phase of concurrent transfers given in bytes (the Cost is per byte of 1)."""
    ph = schedules.Phase(tuple(transfers))
    return m.phase_cost(ph)
