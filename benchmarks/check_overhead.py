"""What the always-on safety costs per call: the fingerprint check (NCL_CHECK_CALLS) and the
flight recorder (NCL_TRACE_BUFFER), measured side by side in one job.

    ncl-run -n 2 python benchmarks/check_overhead.py [--rounds 15 --calls 2000 --out FILE]

Every rank builds four communicators over the same ranks (checks on/off x recorder on/off),
then times barrier and an 8-byte all_reduce on each, in interleaved rounds (variant order
rotates every round) so that the machine's drift hits every variant alike.  Rank 0 prints the
median per-call time of each variant and the difference from everything off, in µs.
Small calls are where the checks weigh most: a larger message adds copy time, not check time.
"""
import argparse
import os
import statistics
import sys
import time
from contextlib import contextmanager

import numpy as np

import ncl

VARIANTS = {  # name: (NCL_CHECK_CALLS, NCL_TRACE_BUFFER)
    "checks + recorder (default)": ("1", "1024"),
    "checks only": ("1", "0"),
    "recorder only": ("0", "1024"),
    "neither": ("0", "0"),
}


@contextmanager
def knobs(check: str, buffer: str):
    saved = {k: os.environ.get(k) for k in ("NCL_CHECK_CALLS", "NCL_TRACE_BUFFER")}
    os.environ.update(NCL_CHECK_CALLS=check, NCL_TRACE_BUFFER=buffer)
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def communicators(world):
    """One communicator per variant over the world's ranks (a fresh job id each, from rank 0)."""
    comms = {}
    for name, (check, buffer) in VARIANTS.items():
        uid = np.frombuffer(ncl.get_unique_id().encode(), np.uint8).copy()
        world.broadcast(uid, root=0)
        with knobs(check, buffer):
            comms[name] = ncl.init(world.rank, world.size, uid.tobytes().decode())
    return comms


def per_call_us(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=2000, help="calls per variant per round")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    world = ncl.init()
    comms = communicators(world)
    x = np.ones(2, np.float32)
    ops = {"barrier": lambda c: c.barrier, "all_reduce 8 B": lambda c: (lambda: c.all_reduce(x))}
    times = {(op, v): [] for op in ops for v in VARIANTS}
    names = list(VARIANTS)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for op, make in ops.items():
            for v in order:
                times[op, v].append(per_call_us(make(comms[v]), args.calls))
    for c in comms.values():
        c.close()
    if world.rank == 0:
        from tabulate import tabulate
        rows = []
        for op in ops:
            base = statistics.median(times[op, "neither"])
            for v in names:
                med = statistics.median(times[op, v])
                q1, _, q3 = statistics.quantiles(times[op, v], n=4)
                rows.append([op, v, f"{med:.2f}", f"{q1:.2f}-{q3:.2f}", f"{med - base:+.2f}",
                             f"{(med - base) / base * 100:+.1f}%"])
        cpus = len(os.sched_getaffinity(0))
        head = (f"{world.size} ranks on {cpus} CPUs; median of {args.rounds} interleaved rounds x {args.calls} calls; "
                f"command: {' '.join(sys.argv)}")
        table = tabulate(rows, headers=["call", "variant", "µs per call", "p25-p75", "vs neither (µs)", "vs neither"])
        print(head + "\n" + table)
        if args.out:
            with open(args.out, "w") as f:
                f.write(head + "\n" + table + "\n")
    world.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
