"""A stack's published collective times (`measured:` in a topology file), used in place of the link model.

The link model prices the wires: latency plus bytes over the most loaded link at its payload rate.  A
communication library on real chips also pays for its kernel launches, synchronisation and the channels it
chooses at each size, which is why an 8-GPU all_reduce reaches half its large-message bus bandwidth at
8 MiB.  Where the file gives a stack's own measurement (nccl-tests / rccl-tests output, every row with its
source), a call of that collective on that many ranks takes the measured time: linear between the two
measured sizes around it, the first row's time below it, and beyond the last row the last row's time plus
what the link model adds from there (the wires' bandwidth).  Every other call, and every explicit
algorithm, keeps the link model.  A smaller message never takes longer than a larger one (it could be
padded to the larger size), so each row's time is capped by the times of the larger rows: published
sweeps' warm-up outliers (rccl-tests' first rows) do not set the small-message latency.
"""
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import numpy as np

MAX_POINTS = 64      # a sweep from 8 B to 16 GiB by factors of 2 has 32 rows


@dataclass(frozen=True)
class Curve:
    collective: str
    ranks: int
    sizes: Tuple[int, ...]       # nccl-tests' size column, bytes, increasing
    seconds: Tuple[float, ...]   # the time column
    source: str

    def time(self, nbytes: float, link: Callable[[float], float]) -> float:
        """Seconds for nbytes; link(n): the link model's seconds, used beyond the last row."""
        s, t = self.sizes, self.seconds
        if nbytes <= s[-1]:
            return float(np.interp(nbytes, s, t))
        return t[-1] + link(nbytes) - link(s[-1])


def parse(entries, ck, collectives, num_chips: int) -> Dict[Tuple[str, int], Curve]:
    """The `measured` list of a topology file; ck is the schema's checker (errors name the file)."""
    if not isinstance(entries, list):
        ck.fail("measured", f"must be a list, not {entries!r}")
    out: Dict[Tuple[str, int], Curve] = {}
    for k, e in enumerate(entries):
        where = f"measured[{k}]"
        ck.keys(e, where, ("collective", "ranks", "source", "times_us"), ())
        kind = e["collective"]
        if kind not in collectives:
            ck.fail(f"{where}.collective", f"must be one of {', '.join(collectives)}, not {kind!r}")
        ranks = e["ranks"]
        if not isinstance(ranks, int) or isinstance(ranks, bool) or not 2 <= ranks <= num_chips:
            ck.fail(f"{where}.ranks", f"must be an integer from 2 to the file's {num_chips} chips, not {ranks!r}")
        source = ck.string(e, "source", where)
        rows = e["times_us"]
        if not isinstance(rows, dict) or not 2 <= len(rows) <= MAX_POINTS:
            ck.fail(f"{where}.times_us", f"must map 2 to {MAX_POINTS} sizes (bytes) to times (us), not {rows!r}")
        for size in rows:
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                ck.fail(f"{where}.times_us", f"sizes must be positive integers (bytes), not {size!r}")
            ck.number(rows, size, f"{where}.times_us")
        if (kind, ranks) in out:
            ck.fail(where, f"repeats {kind} on {ranks} ranks")
        sizes = tuple(sorted(rows))
        capped = np.minimum.accumulate([float(rows[s]) * 1e-6 for s in reversed(sizes)])[::-1]
        out[(kind, ranks)] = Curve(kind, ranks, sizes, tuple(float(x) for x in capped), source)
    return out
