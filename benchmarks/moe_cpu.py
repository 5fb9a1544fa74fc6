"""Per-rank CPU time and wall time of each MoE dispatch and combine, in ncl-perf moe's loop
(dispatch, then combine of the stand-in experts' output computed once), normal and low-latency mode:

    T=1,16,128 MODES=normal,ll ITERS=300 ncl-run -n 8 python benchmarks/moe_cpu.py

At 8 ranks on 2 CPUs a call's wall time is mostly waiting for the peers to be scheduled; its
CPU time (time.process_time) is what the library itself costs each rank.  Prints, per point, the
slowest rank's mean wall µs and the ranks' mean CPU µs per call.
"""
import os
import time

import numpy as np
import torch

import ncl
from ncl import moe
from ncl.perf.moe_worker import play_experts

HIDDEN, EXPERTS, TOPK = 2880, 128, 4


def main():
    torch.set_num_threads(1)
    comm = ncl.init()
    tokens = [int(t) for t in os.environ.get("T", "1").split(",")]
    modes = os.environ.get("MODES", "normal,ll").split(",")
    iters = int(os.environ.get("ITERS", "1000"))
    for t in tokens:
        g = torch.Generator().manual_seed(7919 * comm.rank + t)
        x = torch.randn(t, HIDDEN, generator=g).to(torch.bfloat16)
        top, idx = torch.randn(t, EXPERTS, generator=g).topk(TOPK, dim=-1)
        w = top.softmax(-1)
        for mode in modes:
            with moe.Buffer(comm) as buf, torch.no_grad():
                if mode == "ll":
                    def dispatch():
                        return buf.low_latency_dispatch(x, idx, w, max(t, 1), num_experts=EXPERTS)
                    combine = buf.low_latency_combine
                else:
                    def dispatch():
                        return buf.dispatch(x, idx, w, num_experts=EXPERTS)
                    combine = buf.combine
                rx, ri, rw, h = dispatch()
                out = play_experts(rx, ri, rw)
                for _ in range(50):
                    combine(out, dispatch()[3])
                comm.barrier()
                spent = np.zeros(4)  # dispatch wall, dispatch cpu, combine wall, combine cpu
                for _ in range(iters):
                    c0, t0 = time.process_time(), time.perf_counter()
                    h = dispatch()[3]
                    c1, t1 = time.process_time(), time.perf_counter()
                    combine(out, h)
                    c2, t2 = time.process_time(), time.perf_counter()
                    spent += (t1 - t0, c1 - c0, t2 - t1, c2 - c1)
                every = comm.all_gather(spent / iters * 1e6).reshape(comm.size, 4)
                if comm.rank == 0:
                    wall, cpu = every.max(0), every.mean(0)
                    print(f"n={comm.size} T={t:4d} {mode:6s} dispatch wall {wall[0]:7.1f} cpu {cpu[1]:6.1f} | "
                          f"combine wall {wall[2]:7.1f} cpu {cpu[3]:6.1f}", flush=True)


if __name__ == "__main__":
    main()
