"""What a rank pays to resume after a wait: the CPU time of a fixed piece of Python work (the
kinds of steps a decode MoE dispatch takes in Python: a numpy array, ffi objects, a torch
tensor, a list) run right after a barrier, at 1 rank and at 8 ranks on 2 CPUs:

    for n in 1 8; do R=1,3,9 ncl-run -n $n python benchmarks/resume_cost.py; done

At 8 ranks each rank resumes after 3 others ran on its CPU, so the same work costs more
(cold caches and TLB); the difference at R=1 is the fixed part of that cost, which every
collective call at 8 ranks on 2 CPUs pays once per rank.  Prints, per R, the ranks' mean CPU
µs and the slowest rank's mean wall µs of the work.
"""
import os
import time

import numpy as np
import torch

import ncl
from ncl._native import ffi


def work(repeats: int) -> None:
    for _ in range(repeats):
        ints = np.empty(80, np.int64)
        at = ffi.from_buffer("int64_t[]", ints)
        args = ffi.new("ncl_moe_dispatch_args *")
        rows = torch.empty(1, 2880, dtype=torch.bfloat16)
        args.x, args.matrix = ffi.cast("void *", rows.data_ptr()), at + 8
        ints[:72].tolist(), torch.from_numpy(ints[72:]), ints[8:72].reshape(8, 8)


def main():
    torch.set_num_threads(1)
    comm = ncl.init()
    for repeats in [int(r) for r in os.environ.get("R", "1,3,9").split(",")]:
        for _ in range(300):
            comm.barrier()
            work(repeats)
        spent, iters = np.zeros(2), int(os.environ.get("ITERS", "2000"))
        for _ in range(iters):
            comm.barrier()
            c0, t0 = time.process_time(), time.perf_counter()
            work(repeats)
            spent += (time.process_time() - c0, time.perf_counter() - t0)
        every = comm.all_gather(spent / iters * 1e6).reshape(comm.size, 2)
        if comm.rank == 0:
            print(f"n={comm.size} R={repeats} work cpu {every[:, 0].mean():6.1f} | wall {every[:, 1].max():6.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
