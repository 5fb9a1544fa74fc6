"""Issue 21's per-call overhead: an 8-byte in-place all_reduce of a numpy array, best of 7 rounds of
20 000 calls, on the ranks this runs on (one rank: the core only copies, so what is timed is the
Python layer and the C entry).  Target: <= 1.5 µs on one rank.  Run it next to another install's
ncl in the same minutes: the host's speed drifts (benchmarks/results/call_overhead.md).

    ncl-run -n 1 python benchmarks/call_overhead.py
"""
import os
import time

import numpy as np

import ncl

ROUNDS, CALLS = 7, 20_000


def main() -> None:
    with ncl.init() as comm:
        x = np.zeros(2, np.float32)
        for _ in range(2000):  # warm up
            comm.all_reduce(x)
        best = float("inf")
        for _ in range(ROUNDS):
            comm.barrier()
            t = time.perf_counter()
            for _ in range(CALLS):
                comm.all_reduce(x)
            best = min(best, (time.perf_counter() - t) / CALLS)
        if comm.rank == 0:
            where = os.path.dirname(os.path.dirname(os.path.abspath(ncl.__file__)))
            print(f"{where}: {comm.size} rank(s), all_reduce 8 B: {best * 1e6:.2f} us per call")


if __name__ == "__main__":
    main()
