"""The emulated interconnect under ncl-run (test_emulation.py): every call's emulated time must
be what the link model (ncl.topology) gives for that call's traffic, computed here by hand from
nccl-tests' size convention; pace mode must make each call last at least its emulated time.
Writes OUT_DIR/rank<r>.json with the failures."""
import json
import math
import os
import sys
import time

import numpy as np

import ncl
from ncl.topology import load_topology

out_dir = sys.argv[1]
comm = ncl.init()
n, me = comm.size, comm.rank
topo = load_topology(os.environ["NCL_TOPOLOGY"])
failures = []


def expect(name, size):
    algorithm = topo.best_algorithm(name, size, n)
    return algorithm, topo.predict(name, size, n, algorithm) * 1e6


calls = [  # (what to run, model's collective, nccl-tests size)
    (lambda: comm.all_reduce(np.ones(1000, np.float32)), "all_reduce", 4000),
    (lambda: comm.all_reduce(np.ones(1 << 20, np.float32)), "all_reduce", 4 << 20),
    (lambda: comm.all_gather(np.ones(300, np.float64)), "all_gather", 2400 * n),
    (lambda: comm.reduce_scatter(np.ones(64 * n, np.float32)), "reduce_scatter", 256 * n),
    (lambda: comm.all_to_all(np.ones(50 * n, np.int32)), "all_to_all", 200 * n),
    (lambda: comm.broadcast(np.ones(777, np.int8), root=n - 1), "broadcast", 777),
    (lambda: comm.all_to_allv(np.ones((3 * n, 2), np.float32), [3] * n, [3] * n), "all_to_all", 24 * n),
    (lambda: comm.barrier(), "all_reduce", 0),
]
total = 0.0
comm.emulated_totals(reset=True)
for run, name, size in calls:
    run()
    stats = comm.last_stats()
    algorithm, us = expect(name, size)
    total += us
    if stats["target_algorithm"] != algorithm or not math.isclose(stats["emulated_us"], us, rel_tol=1e-12):
        failures.append(f"{name} of {size} B: emulated {stats['target_algorithm']} {stats['emulated_us']} us, "
                        f"the model {algorithm} {us} us")
totals = comm.emulated_totals()
if totals["calls"] != len(calls) or not math.isclose(totals["emulated_s"] * 1e6, total, rel_tol=1e-9):
    failures.append(f"totals {totals} != {len(calls)} calls, {total} us")
record = comm.flight_record()[-len(calls):]
if [r.get("emulated_us") is not None for r in record] != [True] * len(calls):
    failures.append(f"flight record without emulated times: {record}")
if os.environ.get("NCL_EMULATE") == "pace":  # each call lasts at least its emulated time
    x = np.ones(1 << 16, np.float32)
    for _ in range(3):
        start = time.perf_counter()
        comm.all_reduce(x)
        wall = (time.perf_counter() - start) * 1e6
        want = comm.last_stats()["emulated_us"]
        if wall < want:
            failures.append(f"pace: all_reduce took {wall:.0f} us, less than its emulated {want:.0f} us")
with open(os.path.join(out_dir, f"rank{me}.json"), "w") as f:
    json.dump({"rank": me, "failures": failures}, f)
comm.close()
