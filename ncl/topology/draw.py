"""A PNG drawing of a topology with matplotlib alone: chips on a circle per host, switches and NICs
inside, links as lines whose width follows their bandwidth, the chosen ring as arrows."""
import math
from typing import Dict, List, Optional, Tuple

COLOURS = {"chip": "#4c78a8", "switch": "#f58518", "nic": "#54a24b"}


def _layout(spec) -> Dict[str, Tuple[float, float]]:
    """Each host a circle of chips; its switches inside, towards the chips they serve (a switch that
    serves all of them, or only other switches, at the centre); NICs beside their switch; switches
    between hosts in a row above."""
    pos: Dict[str, Tuple[float, float]] = {}
    nbrs: Dict[str, List[str]] = {}
    for lk in spec.links:
        nbrs.setdefault(lk.a, []).append(lk.b)
        nbrs.setdefault(lk.b, []).append(lk.a)
    switches = {s.name for s in spec.switches}
    if spec.scale.get("kind") == "torus" and not switches:  # a torus: chips on its grid (chip 4y + x)
        side = max(a for a in range(1, math.isqrt(len(spec.chips)) + 1) if len(spec.chips) % a == 0)
        width = len(spec.chips) // side
        return {c.name: (1.2 * (i % width), -1.2 * (i // width)) for i, c in enumerate(spec.chips)}
    cols = math.ceil(math.sqrt(len(spec.hosts)))
    for k, h in enumerate(spec.hosts):
        cx, cy = 3.2 * (k % cols), -3.2 * (k // cols)
        unit: Dict[str, Tuple[float, float]] = {}
        for i, c in enumerate(h.chips):
            a = 2 * math.pi * i / max(len(h.chips), 1) + math.pi / 2
            unit[c] = (math.cos(a), math.sin(a))
            pos[c] = (cx + unit[c][0], cy + unit[c][1])
        mine, todo = set(), list(h.chips)  # the host's switches: reached from its chips, not through NICs
        while todo:
            for m in nbrs.get(todo.pop(), []):
                if m in switches and m not in mine:
                    mine.add(m)
                    todo.append(m)
        centre = 0
        for sw in sorted(mine):
            dirs = [unit[c] for c in nbrs.get(sw, []) if c in unit]
            dx, dy = (sum(d[0] for d in dirs) / len(dirs), sum(d[1] for d in dirs) / len(dirs)) if dirs else (0, 0)
            if math.hypot(dx, dy) < 0.2:
                dx, dy = 0.0, 0.25 * centre - 0.1
                centre += 1
            else:
                dx, dy = 0.55 * dx / math.hypot(dx, dy), 0.55 * dy / math.hypot(dx, dy)
            pos[sw] = (cx + dx, cy + dy)
        for j, nic in enumerate(h.nics):
            at = next((pos[m] for m in nbrs.get(nic, []) if m in pos), (cx, cy))
            pos[nic] = (at[0] + 0.3, at[1] - 0.25)
    rest = [s.name for s in spec.switches if s.name not in pos]
    for i, s in enumerate(rest):
        pos[s] = (1.6 * (cols - 1) + 0.8 * (i - (len(rest) - 1) / 2), 1.8)
    return pos


def draw(spec, path: str, ring: Optional[List[str]] = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pos = _layout(spec)
    kind = {c.name: "chip" for c in spec.chips}
    kind.update({s.name: "switch" for s in spec.switches})
    for h in spec.hosts:
        kind.update({n: "nic" for n in h.nics})
    fig, ax = plt.subplots(figsize=(8, 8))
    top = max(lk.bandwidth_gbps for lk in spec.links)
    for lk in spec.links:
        (x0, y0), (x1, y1) = pos[lk.a], pos[lk.b]
        ax.plot([x0, x1], [y0, y1], color="#999999", lw=0.5 + 3.5 * lk.bandwidth_gbps / top, zorder=1)
    if ring and len(ring) > 1:
        for i, a in enumerate(ring):
            b = ring[(i + 1) % len(ring)]
            (x0, y0), (x1, y1) = pos[a], pos[b]
            ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                        arrowprops=dict(arrowstyle="->", color="#e45756", lw=1.5, connectionstyle="arc3,rad=0.15"))
    for name, (x, y) in pos.items():
        k = kind[name]
        ax.scatter([x], [y], s=500 if k == "chip" else 300, c=COLOURS[k], marker="o" if k == "chip" else "s",
                   zorder=2)
        if len(pos) <= 80:
            ax.annotate(name, (x, y), fontsize=7, ha="center", va="center", color="white" if k == "chip" else "k",
                        zorder=3)
    bw = sorted({lk.bandwidth_gbps for lk in spec.links})
    ax.set_title(f"{spec.name}: {len(spec.chips)} chips, links {', '.join(f'{b:g}' for b in bw)} GB/s per direction"
                 + ("\nred arrows: the ring chosen" if ring else ""), fontsize=10)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
