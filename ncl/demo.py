"""A tour of every collective on the local ranks, verified and timed: the README's main job
until the inference benchmark lands.  Run it under the launcher:

    ncl-run -n 4 python -m ncl.demo

Each rank fills its buffers with data derived from its rank, runs each collective, checks
the result against numpy, and rank 0 prints time and bus bandwidth (nccl-tests factors).
"""
import sys
import time

import numpy as np

import ncl

SIZES = (8, 64 << 10, 1 << 20, 16 << 20)  # bytes per rank's buffer
ITERS = 5


def _timed(comm, fn):
    fn()  # warm-up (and the result that is checked)
    comm.barrier()
    start = time.perf_counter()
    for _ in range(ITERS):
        fn()
    comm.barrier()
    return (time.perf_counter() - start) / ITERS


def _cases(comm, count):
    """(name, run, check, busbw factor) for each collective at `count` float32 per rank."""
    n, r = comm.size, comm.rank
    x = np.arange(count, dtype=np.float32) % 251 + r
    expect_sum = sum(np.arange(count, dtype=np.float32) % 251 + q for q in range(n))
    blocks = np.arange(count * n, dtype=np.float32).reshape(n, count) % 97 + r
    ar_out, ag_out = np.empty_like(x), np.empty(n * count, np.float32)
    rs_out, a2a_out = np.empty(count, np.float32), np.empty(n * count, np.float32)
    bc = np.empty_like(x)
    return [
        ("all_reduce", lambda: comm.all_reduce(x, out=ar_out), lambda: np.array_equal(ar_out, expect_sum),
         2 * (n - 1) / n),
        ("all_gather", lambda: comm.all_gather(x, out=ag_out),
         lambda: all(np.array_equal(ag_out[q * count:(q + 1) * count], x - r + q) for q in range(n)), (n - 1) / n),
        ("reduce_scatter", lambda: comm.reduce_scatter(blocks.reshape(-1), out=rs_out),
         lambda: np.array_equal(rs_out, sum(blocks[r] - r + q for q in range(n))), (n - 1) / n),
        ("all_to_all", lambda: comm.all_to_all(blocks.reshape(-1), out=a2a_out),
         lambda: all(np.array_equal(a2a_out[q * count:(q + 1) * count], blocks[r] - r + q) for q in range(n)),
         (n - 1) / n),
        ("broadcast", lambda: (bc.__setitem__(slice(None), x), comm.broadcast(bc, root=0)),
         lambda: np.array_equal(bc, x - r), 1.0),
    ]


def main() -> int:
    comm = ncl.init()
    rows = []
    for size in SIZES:
        count = max(1, size // 4)
        for name, run, check, factor in _cases(comm, count):
            seconds = _timed(comm, run)
            ok = np.array([1 if check() else 0], np.int32)
            comm.all_reduce(ok, op=ncl.MIN)
            algbw = count * 4 * (comm.size if name in ("all_gather", "reduce_scatter", "all_to_all") else 1) / seconds
            rows.append((name, count * 4, seconds * 1e6, algbw * factor / 1e9, "ok" if ok[0] else "WRONG"))
    if comm.rank == 0:
        print(f"ncl {ncl.__version__}: {comm.size} local ranks over shared memory, kernels: {ncl.kernel_isa()}")
        print(f"{'collective':<15}{'bytes':>12}{'time (us)':>12}{'busbw (GB/s)':>14}  result")
        for name, nbytes, us, busbw, verdict in rows:
            print(f"{name:<15}{nbytes:>12}{us:>12.1f}{busbw:>14.2f}  {verdict}")
    comm.close()
    return 0 if all(row[-1] == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
