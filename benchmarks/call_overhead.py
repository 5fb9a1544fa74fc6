"""Per-call overhead of small all_reduces, best of 7 rounds of 20 000 calls each, on the ranks this runs
on (one rank: the core only copies, so what is timed is the Python layer and the C entry).  Issue 21's
case, an 8-byte in-place all_reduce of a float32 numpy array (target <= 1.5 µs on one rank), comes
first; issue 24's small calls follow: out of place (out=), and 8-byte bfloat16 buffers as numpy arrays
(ml_dtypes, what ncl-perf -d bfloat16 passes) and as torch tensors, in place and out of place (the
CASES below; all of them when none is named).  Run it
next to another install's ncl in the same minutes: the host's speed drifts
(benchmarks/results/call_overhead.md, small_calls.md).

    ncl-run -n 1 python benchmarks/call_overhead.py [CASE ...]
"""
import os
import sys
import time

import numpy as np

import ncl

ROUNDS, CALLS = 7, 20_000


def _numpy(dtype: str):
    return lambda: np.zeros(8 // ncl.dtypes.numpy_dtype(dtype).itemsize, ncl.dtypes.numpy_dtype(dtype))


def _torch(dtype: str):
    def make():
        import torch
        return torch.zeros(8 // torch.tensor([], dtype=getattr(torch, dtype)).element_size(),
                           dtype=getattr(torch, dtype))
    return make


# case -> (the buffer's maker, out of place?)
CASES = {
    "numpy-float32": (_numpy("float32"), False),
    "numpy-float32-out": (_numpy("float32"), True),
    "numpy-bfloat16": (_numpy("bfloat16"), False),
    "numpy-bfloat16-out": (_numpy("bfloat16"), True),
    "torch-bfloat16": (_torch("bfloat16"), False),
    "torch-bfloat16-out": (_torch("bfloat16"), True),
    "torch-float32": (_torch("float32"), False),
}


def per_call(comm, x, out) -> float:
    """Seconds per all_reduce(x[, out=out]): the best round's mean."""
    run = (lambda: comm.all_reduce(x)) if out is None else (lambda: comm.all_reduce(x, out=out))
    for _ in range(2000):  # warm up
        run()
    best = float("inf")
    for _ in range(ROUNDS):
        comm.barrier()
        t = time.perf_counter()
        for _ in range(CALLS):
            run()
        best = min(best, (time.perf_counter() - t) / CALLS)
    return best


def main(names) -> None:
    with ncl.init() as comm:
        where = os.path.dirname(os.path.dirname(os.path.abspath(ncl.__file__)))
        for name in names or CASES:
            make, out_of_place = CASES[name]
            best = per_call(comm, make(), make() if out_of_place else None)
            if comm.rank == 0:
                print(f"{where}: {comm.size} rank(s), all_reduce 8 B, {name:18}: {best * 1e6:.2f} us per call",
                      flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
