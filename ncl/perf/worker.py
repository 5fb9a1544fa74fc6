"""One rank of an ncl-perf sweep (started by ncl-perf under ncl-run or mpiexec).

For every size, out-of-place then in-place (nccl-tests' two column groups): fill the buffers
with the test data, run once and count wrong elements against the numpy reference, warm up,
then time `iters` back-to-back calls between barriers.  The reported time is the largest of
the ranks' mean times.  With --min-time, small sizes repeat more so that each measurement lasts
long enough to rise above timer noise (all ranks agree on the count from the slowest warm-up).

Across hosts (ncl-perf --hosts K) the ncl rows also say how much of each call went to the
shared-memory steps and how much to MPI between hosts (waiting included), per call.

With a topology (ncl-perf --topology) the ncl rows also carry the emulated time of the same
call on that interconnect and the algorithm the link model picks there.

For all_reduce the worker also times a plain memcpy of the same size on every rank at once: an
all-reduce must at least read each input once and write each output once, which is the traffic
of that copy, so copy time / all-reduce time is the fraction of the memory-traffic bound reached.

Rank 0 prints one JSON object per line on stdout; nothing else goes to stdout.
"""
import argparse
import json
import math
import sys
import time

import numpy as np

from . import backends, lockstep, specs

IN_PLACE_FORMS = {"all_reduce", "reduce", "broadcast", "all_gather", "reduce_scatter", "all_to_all"}
MAX_ITERS = 1_000_000
SETTLE_S = 0.5  # barriers before the first timing: freshly started ranks run slow for a while


def _settle(backend):
    """Barriers for SETTLE_S seconds (the slowest rank's clock decides, so all stop together)."""
    start = time.perf_counter()
    while backend.max_over_ranks(time.perf_counter() - start) < SETTLE_S:
        for _ in range(20):
            backend.barrier()


def _buffers(backend, spec, in_place, count, dtype):
    """(send, recv) numpy buffers; in place they alias as nccl-tests does."""
    n, rank = backend.size, backend.rank
    nin, nout = spec.in_count(count, n), spec.out_count(count, n)
    if not in_place:
        return backend.alloc(nin, dtype), backend.alloc(nout, dtype)
    if spec.name == "all_gather":
        recv = backend.alloc(nout, dtype)
        return recv[rank * nin:(rank + 1) * nin], recv
    if spec.name == "reduce_scatter":
        send = backend.alloc(nin, dtype)
        return send, send[rank * nout:(rank + 1) * nout]
    buf = backend.alloc(nout, dtype)
    return buf, buf


def _fill(backend, spec, send, recv, count, root, dtype, in_place):
    data = specs.send_data(spec, backend.rank, backend.size, count, root, dtype)
    target = recv if in_place and spec.name in ("all_reduce", "reduce", "broadcast", "all_to_all") else send
    if data is not None:
        target[...] = data
    if not in_place:
        recv[...] = 0


def _time_calls(backend, call, iters, on_start=None, on_end=None):
    backend.barrier()
    if on_start:
        on_start()
    t0 = time.perf_counter()
    for _ in range(iters):
        call()
    local = (time.perf_counter() - t0) / iters
    if on_end:  # before the bookkeeping all_reduce below
        on_end()
    return backend.max_over_ranks(local)


def measure(backend, cfg, spec, size, in_place):
    """One (size, placement) measurement; a dict for the report."""
    dtype = specs.numpy_dtype(cfg.dtype)
    n = backend.size
    count = specs.element_count(spec, size, dtype.itemsize, n)
    row = dict(size=count * dtype.itemsize, count=count, in_place=in_place)
    why = backend.unsupported(spec.name, in_place, cfg.op, dtype)
    if in_place and spec.name not in IN_PLACE_FORMS:
        why = f"no in-place form of {spec.name}"
    if why:
        return dict(row, unsupported=why)
    send, recv = _buffers(backend, spec, in_place, count, dtype)
    root = cfg.root % n
    wsend, wrecv = backend.wrap(send), backend.wrap(recv)

    def call():
        backend.run(spec.name, wsend, wrecv, cfg.op, root, in_place)

    wrong = 0
    if cfg.check:
        _fill(backend, spec, send, recv, count, root, dtype, in_place)
        call()
        want = specs.expected(spec, backend.rank, n, count, root, cfg.op, dtype)
        wrong = backend.sum_over_ranks(specs.wrong(recv, want))
    for _ in range(cfg.warmup):
        call()
    iters = cfg.iters
    if cfg.min_time > 0:
        guess = _time_calls(backend, call, max(1, min(cfg.warmup, 5)))
        iters = max(iters, min(MAX_ITERS, math.ceil(cfg.min_time / max(guess, 1e-9))))
    phases = getattr(backend.comm, "phase_times", None) if hasattr(backend, "comm") else None
    emulated = getattr(backend.comm, "emulated_totals", None) if backend.name == "ncl" else None
    if emulated is not None and emulated() is None:
        emulated = None  # no topology

    def on_start():
        if phases:
            phases(reset=True)
        if emulated:
            emulated(reset=True)
    totals = {}
    seconds = _time_calls(backend, call, iters, on_start, lambda: totals.update(emulated() if emulated else {}))
    row.update(time_us=seconds * 1e6, wrong=wrong, iters=iters)
    if emulated:  # the same calls on the emulated interconnect (every rank computes the same cost)
        row.update(emulated_us=totals["emulated_s"] / iters * 1e6,
                   # not last_stats(): the last call was the bookkeeping all_reduce of the timing
                   target_algorithm=backend.comm.topology.best_algorithm(spec.name, row["size"], n))
    if phases:  # across hosts: where the time went (the slowest rank's share of each phase)
        spent = phases()
        row.update(intra_us=backend.max_over_ranks(spent["intra-host"] / iters) * 1e6,
                   inter_us=backend.max_over_ranks(spent["inter-host"] / iters) * 1e6)
    if spec.name == "all_reduce" and not in_place and cfg.memcpy:
        src, dst = backend.alloc(count, dtype), backend.alloc(count, dtype)
        src[...] = 1
        np.copyto(dst, src)
        row["memcpy_us"] = _time_calls(backend, lambda: np.copyto(dst, src), iters) * 1e6
    return row


def _emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def worker_args(prog: str, written_by: str, argv=None):
    """(args, cfg) of a sweep's rank: --backend, --config (the sweep's settings as JSON, written by the
    command that started it) and --rendezvous-file; cfg is the settings as attributes."""
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--backend", required=True)
    p.add_argument("--config", required=True, help=f"JSON of the sweep settings (written by {written_by})")
    p.add_argument("--rendezvous-file", default="")
    args = p.parse_args(argv)
    return args, argparse.Namespace(**json.loads(args.config))


def main(argv=None):
    args, cfg = worker_args("python -m ncl.perf.worker", "ncl-perf", argv)
    backend = backends.create(args.backend, registered=cfg.registered, rendezvous_file=args.rendezvous_file)
    spec = specs.SPECS[cfg.collective]
    # --interleave size: each size `rounds` times in a row, each time when ncl-perf gives the turn
    turns = lockstep.Turns(cfg.gate, backend.rank) if getattr(cfg, "gate", None) else None
    rounds = getattr(cfg, "rounds", 1)
    try:
        if turns is not None:
            backend.barrier()
            lockstep.say_ready(backend.rank)
        settled = False
        for size in specs.sweep_sizes(cfg):
            for round_ in range(rounds):
                if turns is not None and not turns.next():
                    return
                if not settled:  # just before the first timing: the settling is what it is for
                    _settle(backend)
                    settled = True
                for in_place in (False, True):
                    row = measure(backend, cfg, spec, size, in_place)
                    if backend.rank == 0:
                        _emit(dict(row, backend=args.backend, nranks=backend.size, round=round_))
    finally:
        if turns is not None:
            turns.close()
        backend.close()


if __name__ == "__main__":
    main()
