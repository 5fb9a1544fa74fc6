"""Check issue 3's performance targets against the sweeps in benchmarks/results/ (compare.sh).

    python benchmarks/targets.py [benchmarks/results]

Reads each sweep's JSON (the medians over its interleaved rounds) and prints one row per
target and size: the measured ratio, the bound and whether it is met.  Ratios are ncl time /
peer time on the same placement (out of place where the peer has it), as ncl-perf prints them.
"""
import glob
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

from tabulate import tabulate

MiB = 1 << 20
Key = Tuple[str, str, int, int, bool]  # collective, backend, ranks, size, in_place


def load(folder: str) -> List[Dict[Key, dict]]:
    """Each sweep's median rows by key, the acceptance sweeps (issue 3's commands) first: a
    ratio is always taken within one sweep, where both sides ran interleaved, from the first
    sweep that has both; the every-power-of-two sweep fills the sizes the others skip."""
    sweeps = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json")), key=lambda p: ("pow2" in p, p)):
        with open(path) as f:
            data = json.load(f)
        registered = bool(data["settings"].get("registered"))
        rows: Dict[Key, dict] = {}
        for r in data["summary"]:
            if "time_us" in r:
                backend = r["backend"] + ("+registered" if registered and r["backend"] == "ncl" else "")
                rows[(r["collective"], backend, r["nranks"], r["size"], r["in_place"])] = r
        sweeps.append(rows)
    return sweeps


def ratio(sweeps, coll: str, peer: str, n: int, size: int, mine: str = "ncl") -> Optional[float]:
    """ncl time / peer time, out of place where both have it, else in place."""
    for rows in sweeps:
        for in_place in (False, True):
            a, b = rows.get((coll, mine, n, size, in_place)), rows.get((coll, peer, n, size, in_place))
            if a and b:
                return a["time_us"] / b["time_us"]
    return None


def sizes(sweeps, coll: str, n: int, backend: str = "ncl") -> List[int]:
    return sorted({k[3] for rows in sweeps for k in rows if k[0] == coll and k[1] == backend and k[2] == n
                   and k[3] > 0})


def point(sweeps, key: Key) -> Optional[dict]:
    return next((rows[key] for rows in sweeps if key in rows), None)


def main(folder: str) -> int:
    rows = load(folder)  # a list of sweeps
    out = []

    def check(target: str, size: int, value: Optional[float], bound: float, below: bool = True):
        if value is None:
            return
        met = value <= bound if below else value >= bound
        bound_text = ("<= " if below else ">= ") + f"{bound:g}"
        out.append([target, size, f"{value:.3g}", bound_text, "met" if met else "MISSED"])

    for s in (8, 64 << 10):
        check("all_reduce np=2 time / MPICH", s, ratio(rows, "all_reduce", "mpi", 2, s), 1.0 if s == 8 else 0.5)
    for s in (MiB, 16 * MiB, 64 * MiB):
        r = ratio(rows, "all_reduce", "mpi", 2, s)
        check("all_reduce np=2 busbw / MPICH", s, 1 / r if r else None, 2.0, below=False)
    for n in (4, 8):
        for s in sizes(rows, "all_reduce", n):
            check(f"all_reduce np={n} time / MPICH", s, ratio(rows, "all_reduce", "mpi", n, s), 0.5)
    for coll in ("all_gather", "reduce_scatter", "all_to_all", "broadcast"):
        for n in (2, 8):
            for s in sizes(rows, coll, n):
                check(f"{coll} np={n} time / MPICH", s, ratio(rows, coll, "mpi", n, s), 0.5 if s >= MiB else 1.0)
    for coll in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast"):
        for n in (2, 8):
            for s in sizes(rows, coll, n):
                r = ratio(rows, coll, "gloo", n, s)
                if s < 64 << 10:
                    check(f"{coll} np={n} speed-up over gloo", s, 1 / r if r else None, 20.0, below=False)
                elif s >= MiB:
                    check(f"{coll} np={n} speed-up over gloo", s, 1 / r if r else None, 3.0, below=False)
    bound = point(rows, ("all_reduce", "ncl+registered", 2, 64 * MiB, False))
    if bound and "memcpy_us" in bound:
        check("all_reduce np=2 registered, 64 MiB: memory-traffic bound reached", 64 * MiB,
              bound["memcpy_us"] / bound["time_us"], 0.5, below=False)
    print(tabulate(out, ["target", "size (B)", "measured", "bound", ""]))
    missed = sum(r[-1] == "MISSED" for r in out)
    print(f"\n{len(out) - missed} of {len(out)} met")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "results")))
