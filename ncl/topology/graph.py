"""The topology as a graph: routes between nodes, and rings and trees over the chips a job uses.

Routes are shortest paths where a link costs its latency plus the time to move 1 MiB over it, so a
route prefers fast links and few hops.  Every link has two directions (ids 2k: a->b, 2k+1: b->a), each
with the link's bandwidth.

Rings follow NCCL's graph search (src/graph/search.cc) in spirit: among the Hamiltonian cycles over
the chips, take the one whose slowest step, with all ring hops moving at once and sharing the links
they cross, is fastest; ties go to the lower total latency.  Up to 9 chips the search is exhaustive;
beyond, a depth-first walk over direct links (fastest first, Warnsdorff's rule among equals) closed into
a cycle by Posa rotations; chips on several hosts are ringed host by host, and with k NICs per host k
rotated rings share the bytes (NCCL's channels) when that is faster.  Trees are binary trees over the
ring order inside each host, joined by a binary tree across the hosts' first chips (NCCL's intra-node
chain + inter-node tree)."""
import heapq
import itertools
from typing import Dict, List, Optional, Sequence, Tuple

from .schema import Spec

REF_BYTES = 1 << 20


class Graph:
    def __init__(self, spec: Spec):
        self.spec = spec
        self.kind: Dict[str, str] = {c.name: "chip" for c in spec.chips}
        self.kind.update({s.name: "switch" for s in spec.switches})
        for h in spec.hosts:
            self.kind.update({n: "nic" for n in h.nics})
        self.adj: Dict[str, List[Tuple[str, int]]] = {n: [] for n in self.kind}
        self.bw: List[float] = []        # bytes per second, per link direction
        self.lat: List[float] = []       # seconds, per link direction
        for k, lk in enumerate(spec.links):
            self.adj[lk.a].append((lk.b, 2 * k))
            self.adj[lk.b].append((lk.a, 2 * k + 1))
            self.bw += [lk.bandwidth_gbps * 1e9] * 2
            self.lat += [lk.latency_us * 1e-6] * 2
        self.host_of = {c: h.name for h in spec.hosts for c in h.chips}
        self._trees: Dict[str, tuple] = {}
        self.host_rings: Dict[Tuple[str, ...], List[str]] = {}
        self.rings: Dict[Tuple[str, ...], List[str]] = {}
        self.multi_rings: Dict[Tuple[str, ...], List[List[str]]] = {}
        self._paths: Dict[Tuple[str, str], Tuple[Tuple[int, ...], Tuple[str, ...], float]] = {}

    def link_ends(self, d: int) -> Tuple[str, str]:
        lk = self.spec.links[d // 2]
        return (lk.a, lk.b) if d % 2 == 0 else (lk.b, lk.a)

    def source_tree(self, src: str, stop: Optional[str] = None):
        """Dijkstra from src: ({node: (previous node, link direction)}, nodes in order of distance,
        {node: latency of its route in seconds}); with `stop`, only until that node's route is final
        (not kept: a partial tree)."""
        if src in self._trees:
            return self._trees[src]
        prev: Dict[str, Tuple[str, int]] = {}
        dist = {src: 0.0}
        lat = {src: 0.0}
        order = []
        heap = [(0.0, src)]
        while heap:
            d, u = heapq.heappop(heap)
            if d > dist[u]:
                continue
            order.append(u)
            if u == stop:
                return prev, order, lat
            for v, ld in self.adj[u]:
                nd = d + self.lat[ld] + REF_BYTES / self.bw[ld]
                if nd < dist.get(v, float("inf")) - 1e-15:
                    dist[v] = nd
                    lat[v] = lat[u] + self.lat[ld]
                    prev[v] = (u, ld)
                    heapq.heappush(heap, (nd, v))
        self._trees[src] = (prev, order, lat)
        return self._trees[src]

    def path(self, src: str, dst: str) -> Tuple[Tuple[int, ...], Tuple[str, ...], float]:
        """(link directions, nodes passed through (excluding src and dst), latency in seconds)."""
        key = (src, dst)
        if key not in self._paths:
            prev = self.source_tree(src, None if src in self._trees else dst)[0]
            dirs, via = [], []
            node = dst
            while node != src:
                node, ld = prev[node]
                dirs.append(ld)
                if node != src:
                    via.append(node)
            dirs.reverse()
            via.reverse()
            self._paths[key] = (tuple(dirs), tuple(via), sum(self.lat[d] for d in dirs))
        return self._paths[key]

    def hop_cost(self, order: Sequence[str]) -> Tuple[float, float]:
        """(seconds per byte of the slowest link direction, total latency) when every chip of the cycle
        `order` sends one byte to the next at once."""
        load: Dict[int, int] = {}
        lat = 0.0
        for i, a in enumerate(order):
            dirs, _, lt = self.path(a, order[(i + 1) % len(order)])
            lat += lt
            for d in dirs:
                load[d] = load.get(d, 0) + 1
        per_byte = max((n / self.bw[d] for d, n in load.items()), default=0.0)
        return per_byte, lat


def ring(g: Graph, chips: Sequence[str]) -> List[str]:
    """A cycle visiting every chip once; see the module docstring."""
    key = tuple(chips)
    if key not in g.rings:
        g.rings[key] = _ring(g, list(chips))
    return list(g.rings[key])


def _ring(g: Graph, chips: List[str]) -> List[str]:
    if len(chips) <= 3:
        return chips
    hosts: Dict[str, List[str]] = {}
    for c in chips:
        hosts.setdefault(g.host_of.get(c, ""), []).append(c)
    if len(hosts) > 1:
        return [c for members in hosts.values() for c in _host_ring(g, members)]
    if len(chips) <= 9:
        return _exhaustive(g, chips)
    return _greedy(g, chips)


def rings(g: Graph, chips: Sequence[str]) -> List[List[str]]:
    """The rings a ring collective runs on at once, each carrying an equal share (NCCL's channels).
    Within a host, one.  Across hosts with k NICs each, also k rings whose host-by-host order is
    rotated by a k-th of a host, so that each leaves and enters the hosts through different chips
    (and so NICs); taken when they move more than the single ring."""
    key = tuple(chips)
    if key not in g.multi_rings:
        g.multi_rings[key] = _rings(g, chips)
    return [list(r) for r in g.multi_rings[key]]


def _rings(g: Graph, chips: Sequence[str]) -> List[List[str]]:
    one = ring(g, chips)
    hosts: Dict[str, List[str]] = {}
    for c in one:
        hosts.setdefault(g.host_of.get(c, ""), []).append(c)
    nics = {h.name: len(h.nics) for h in g.spec.hosts}
    k = min(nics.get(h, 0) for h in hosts) if len(hosts) > 1 else 0
    if k < 2:
        return [one]
    many = []
    for r in range(k):
        order = []
        for members in hosts.values():
            shift = r * len(members) // k
            order += members[shift:] + members[:shift]
        many.append(order)
    return many if _shared_cost(g, many) < _shared_cost(g, [one]) else [one]


def _shared_cost(g: Graph, cycles: List[List[str]]) -> Tuple[float, float]:
    """hop_cost of several cycles at once, each moving 1/len(cycles) of the bytes."""
    load: Dict[int, float] = {}
    lat = 0.0
    for order in cycles:
        for i, a in enumerate(order):
            dirs, _, lt = g.path(a, order[(i + 1) % len(order)])
            lat = max(lat, lt)
            for d in dirs:
                load[d] = load.get(d, 0.0) + 1.0 / len(cycles)
    return max((f / g.bw[d] for d, f in load.items()), default=0.0), lat


def _host_ring(g: Graph, members: List[str]) -> List[str]:
    """ring() of one host's chips; hosts a scaled topology repeats ("s3.npu0" is "npu0" of server 3)
    reuse the first such host's order."""
    local = tuple(m.split(".", 1)[-1] for m in members)
    prefix = members[0].split(".", 1)[0] + "." if "." in members[0] else ""
    if local not in g.host_rings:
        g.host_rings[local] = [c.split(".", 1)[-1] for c in ring(g, members)]
    return [prefix + c for c in g.host_rings[local]]


def _exhaustive(g: Graph, chips: List[str]) -> List[str]:
    best, best_cost = chips, g.hop_cost(chips)
    first, rest = chips[0], chips[1:]
    for perm in itertools.permutations(rest):
        if perm[0] > perm[-1]:  # a cycle and its reverse cost the same on symmetric links
            continue
        order = [first, *perm]
        cost = g.hop_cost(order)
        if cost < best_cost:
            best, best_cost = order, cost
    return best


def _greedy(g: Graph, chips: List[str], budget: int = 200000) -> List[str]:
    """Depth-first walk over direct chip-to-chip links, fastest first and, among equals, to the chip with
    the fewest unvisited neighbours left (Warnsdorff's rule, which keeps a walk from stranding chips),
    closing the cycle through a direct link when the start has any; where no direct link leads on, the
    nearest chip by route cost.  The first closed cycle wins; else the first complete walk."""
    want = set(chips)
    links: Dict[str, Dict[str, float]] = {c: {} for c in chips}  # chip -> {chip: seconds per MiB}
    for c in chips:
        for v, d in g.adj[c]:
            if v in want and v != c:
                cost = g.lat[d] + REF_BYTES / g.bw[d]
                links[c][v] = min(cost, links[c].get(v, cost))

    def options(u: str, seen: set) -> List[str]:
        free = [v for v in links[u] if v not in seen]
        if free:
            return sorted(free, key=lambda v: (round(links[u][v], 12), sum(w not in seen for w in links[v]), v))
        return [v for v in g.source_tree(u)[1] if v in want and v not in seen][:3]

    start = chips[0]
    closable = bool(links[start])
    walk, seen = [start], {start}
    stack = [options(start, seen)]
    fallback: Optional[List[str]] = None
    steps = 0
    while stack and steps < budget:
        steps += 1
        if len(walk) == len(chips):
            closed = list(walk) if not closable else _close(walk, links)
            if closed:
                return closed
            fallback = fallback or list(walk)
            stack[-1] = []
        if not stack[-1]:
            stack.pop()
            seen.discard(walk.pop())
            continue
        v = stack[-1].pop(0)
        walk.append(v)
        seen.add(v)
        stack.append(options(v, seen))
    return fallback or list(chips)


def _close(walk: List[str], links: Dict[str, Dict[str, float]]) -> Optional[List[str]]:
    """A Hamiltonian path turned into a cycle by Posa rotations: while the end has no link back to the
    start, pick a neighbour v_i of the end and reverse the path after it (v_0..v_i, v_end..v_i+1 is again
    a path over every chip); None after a bounded number of rotations."""
    import random
    path = list(walk)
    pick = random.Random(len(path))  # deterministic: the same topology gets the same ring
    for _ in range(50 * len(path)):
        end = path[-1]
        if path[0] in links[end]:
            return path
        at = {c: i for i, c in enumerate(path)}
        turns = [at[v] for v in links[end] if at[v] < len(path) - 2]
        if not turns:
            return None
        i = pick.choice(turns)
        path[i + 1:] = path[:i:-1]
    return None


def tree(g: Graph, chips: Sequence[str]) -> Dict[str, Optional[str]]:
    """{chip: parent chip (None at the root)}: a binary tree inside each host over its ring order,
    the hosts' first chips joined by a binary tree."""
    order = ring(g, chips)
    hosts: Dict[str, List[str]] = {}
    for c in order:
        hosts.setdefault(g.host_of.get(c, ""), []).append(c)
    parent: Dict[str, Optional[str]] = {}
    for members in hosts.values():
        for i, c in enumerate(members):
            parent[c] = members[(i - 1) // 2] if i else None
    leaders = [m[0] for m in hosts.values()]
    for i, c in enumerate(leaders):
        parent[c] = leaders[(i - 1) // 2] if i else None
    return parent


def depth(parent: Dict[str, Optional[str]]) -> int:
    """Edges on the longest root-to-leaf path."""
    best = 0
    for c in parent:
        d, p = 0, parent[c]
        while p is not None:
            d, p = d + 1, parent[p]
        best = max(best, d)
    return best
