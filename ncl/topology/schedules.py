"""Collective schedules: each a list of phases; a phase is a set of concurrent transfers (source node,
destination node, fraction of the message size S) plus reductions (chip, fraction of S it reads),
repeated some number of times.  S is nccl-tests' size column: the whole buffer for all_gather,
reduce_scatter, gather and scatter; one rank's send buffer for all_to_all.

On a topology with a staging switch (shared memory: chips copy into it and out of it) the names are
ncl's own algorithms (native/all_reduce.c, broadcast.c, all_to_all.c): `one_shot` and `two_shot` go
through the staging memory in slot-sized chunks, `cma` reads peers' buffers directly; and when the chips
outnumber the host's CPUs one_shot runs centrally (the last rank to arrive reduces for all).  Elsewhere
`one_shot` means every chip reads every peer, `two_shot` a direct reduce-scatter then all-gather."""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

Transfer = Tuple[str, str, float]


@dataclass(frozen=True)
class Phase:
    transfers: Tuple[Transfer, ...]
    local: Tuple[Tuple[str, float], ...] = ()   # (chip, fraction of S its reduction reads)
    repeat: int = 1
    pipelined: bool = False                     # a chain or tree: pays its longest chain of route latencies
    chunked: float = 0.0                        # staging: once per slot-sized chunk of this fraction of S


@dataclass
class Context:
    chips: List[str]                 # in rank order
    ring: List[str]
    rings: List[List[str]]           # the rings ring algorithms share the bytes over (ring among them)
    parent: Dict[str, Optional[str]]
    depth: int
    staging: Optional[str]           # the staging switch, if any
    central: bool                    # chips outnumber CPUs: one_shot reduces centrally

    @property
    def n(self) -> int:
        return len(self.chips)


RING_OR_TREE_ACROSS_HOSTS = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce")
COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce", "all_to_all", "gather",
               "scatter", "send_recv")


def algorithms(collective: str, staging: bool) -> Tuple[str, ...]:
    table = {
        "all_reduce": ("ring", "tree", "one_shot", "two_shot") + (("cma",) if staging else ()),
        "reduce_scatter": ("ring", "direct"),
        "all_gather": ("ring", "direct") + (("cma",) if staging else ()),
        "broadcast": ("ring", "tree", "direct"),
        "reduce": ("ring", "tree", "direct"),
        "all_to_all": ("direct",) + (("cma",) if staging else ()),
        "gather": ("direct",),
        "scatter": ("direct",),
        "send_recv": ("direct",),
    }
    if collective not in table:
        raise ValueError(f"unknown collective {collective!r}; choose one of {', '.join(COLLECTIVES)}")
    return table[collective]


def _pairs(chips: Sequence[str], frac: float) -> Tuple[Transfer, ...]:
    return tuple((a, b, frac) for a in chips for b in chips if a != b)


def _ring_steps(ctx: Context, reduce: bool) -> Phase:
    n, k = ctx.n, len(ctx.rings)
    hops = tuple((r[i], r[(i + 1) % n], 1.0 / n / k) for r in ctx.rings for i in range(n))
    local = tuple((c, 2.0 / n) for c in ctx.chips) if reduce else ()
    return Phase(hops, local, repeat=n - 1)


def _tree_edges(ctx: Context, up: bool, frac: float = 1.0) -> Tuple[Transfer, ...]:
    return tuple(((c, p, frac) if up else (p, c, frac)) for c, p in ctx.parent.items() if p is not None)


def _root_of(ctx: Context) -> str:
    return next(c for c, p in ctx.parent.items() if p is None)


def build(collective: str, algorithm: str, ctx: Context) -> List[Phase]:
    """The phases of one collective on ctx's chips (rank 0 is the root of rooted ones)."""
    n, chips, sw = ctx.n, ctx.chips, ctx.staging
    root = chips[0]
    if n == 1:
        return []
    if collective == "all_reduce":
        if algorithm == "ring":
            return [_ring_steps(ctx, True), _ring_steps(ctx, False)]
        if algorithm == "tree":  # pipelined: every tree edge busy at once, the latency of the depth
            up = Phase(_tree_edges(ctx, True), tuple((c, 1.0 + sum(p == c for p in ctx.parent.values()))
                                                     for c in chips), pipelined=True)
            return [up, Phase(_tree_edges(ctx, False), pipelined=True)]
        if algorithm == "cma" or (algorithm == "two_shot" and not sw):
            # reduce-scatter reading the peers' blocks, then all-gather reading the owners' blocks
            return [Phase(_pairs(chips, 1.0 / n), tuple((c, 1.0) for c in chips)), Phase(_pairs(chips, 1.0 / n))]
        if algorithm == "one_shot" and not sw:
            return [Phase(_pairs(chips, 1.0), tuple((c, float(n)) for c in chips))]
        # Through staging memory the reduction's reads are the copies out of the slots: no extra pass.
        if algorithm == "one_shot" and ctx.central:
            last = chips[-1]
            return [Phase(tuple((c, sw, 1.0) for c in chips), chunked=1.0),
                    Phase(((sw, last, float(n)), (last, sw, 1.0)), chunked=1.0),
                    Phase(tuple((sw, c, 1.0) for c in chips if c != last), chunked=1.0)]
        if algorithm == "one_shot":
            return [Phase(tuple((c, sw, 1.0) for c in chips), chunked=1.0),
                    Phase(tuple((sw, c, float(n)) for c in chips), chunked=1.0)]
        if algorithm == "two_shot":
            return [Phase(tuple((c, sw, 1.0) for c in chips), chunked=1.0),
                    Phase(tuple((sw, c, 1.0) for c in chips) + tuple((c, sw, 1.0 / n) for c in chips), chunked=1.0),
                    Phase(tuple((sw, c, 1.0) for c in chips), chunked=1.0)]
    if collective == "reduce_scatter":
        if algorithm == "ring":
            return [_ring_steps(ctx, True)]
        if sw:
            return [Phase(tuple((c, sw, 1.0) for c in chips), chunked=1.0),  # reads are the reduction
                    Phase(tuple((sw, c, 1.0) for c in chips), chunked=1.0)]
        return [Phase(_pairs(chips, 1.0 / n), tuple((c, 1.0) for c in chips))]
    if collective == "all_gather":
        if algorithm == "ring":
            return [_ring_steps(ctx, False)]
        if algorithm == "direct" and sw:
            return [Phase(tuple((c, sw, 1.0 / n) for c in chips), chunked=1.0 / n),
                    Phase(tuple((sw, c, 1.0) for c in chips), chunked=1.0 / n)]
        return [Phase(_pairs(chips, 1.0 / n) + tuple((c, c, 1.0 / n) for c in chips if sw))]
    if collective in ("broadcast", "reduce"):
        up = collective == "reduce"
        red = tuple((c, 2.0) for c in chips) if up else ()
        if algorithm == "ring":  # a pipelined chain from the root around the ring
            i = ctx.ring.index(root)
            order = ctx.ring[i:] + ctx.ring[:i]
            hops = tuple((order[k], order[k + 1], 1.0) for k in range(n - 1))
            hops = tuple((b, a, f) for a, b, f in hops) if up else hops
            return [Phase(hops, red, pipelined=True)]
        if algorithm == "tree":
            return [Phase(_tree_edges(_rooted(ctx, root), up), red, pipelined=True)]
        if sw and not up:
            return [Phase(((root, sw, 1.0),), chunked=1.0),
                    Phase(tuple((sw, c, 1.0) for c in chips if c != root), chunked=1.0)]
        if sw:
            return [Phase(tuple((c, sw, 1.0) for c in chips), chunked=1.0),
                    Phase(((sw, root, float(n)),), chunked=1.0)]
        pairs = tuple(((c, root, 1.0) if up else (root, c, 1.0)) for c in chips if c != root)
        return [Phase(pairs, ((root, float(n)),) if up else ())]
    if collective == "all_to_all":
        if algorithm == "direct" and sw:
            return [Phase(tuple((c, sw, 1.0) for c in chips), chunked=1.0),
                    Phase(tuple((sw, c, 1.0) for c in chips), chunked=1.0)]
        return [Phase(_pairs(chips, 1.0 / n) + tuple((c, c, 1.0 / n) for c in chips if sw))]
    if collective in ("gather", "scatter"):
        out = collective == "scatter"
        if sw:
            src = ((root, sw, 1.0),) if out else tuple((c, sw, 1.0 / n) for c in chips)
            dst = tuple((sw, c, 1.0 / n) for c in chips) if out else ((sw, root, 1.0),)
            return [Phase(src, chunked=1.0 if out else 1.0 / n), Phase(dst, chunked=1.0 if out else 1.0 / n)]
        return [Phase(tuple(((root, c, 1.0 / n) if out else (c, root, 1.0 / n)) for c in chips if c != root))]
    if collective == "send_recv":
        if sw:
            return [Phase(((chips[0], sw, 1.0),), chunked=1.0), Phase(((sw, chips[1], 1.0),), chunked=1.0)]
        return [Phase(((chips[0], chips[1], 1.0),))]
    raise ValueError(f"{collective} has no algorithm {algorithm!r}; choose one of "
                     f"{', '.join(algorithms(collective, bool(sw)))}")


def _rooted(ctx: Context, root: str) -> Context:
    """ctx with its tree re-rooted at `root` (edges reversed along the path to the old root)."""
    parent = dict(ctx.parent)
    prev, node = None, root
    while node is not None:
        nxt = parent[node]
        parent[node] = prev
        prev, node = node, nxt
    return Context(ctx.chips, ctx.ring, ctx.rings, parent, ctx.depth, ctx.staging, ctx.central)
