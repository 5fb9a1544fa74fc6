"""One rank of an `ncl-perf moe` sweep: MoE dispatch and combine through ncl, MPI or gloo.

Each rank routes its own tokens (seeded by rank and token count: random logits, top-k, softmax
over the chosen k) and times the exchange as a user of each library would write it:
- ncl: `dispatch` / `combine` of an `ncl.moe.Buffer` over the communicator (the count exchange
  included), and for decode sizes also `low_latency_dispatch` / `low_latency_combine` (fixed
  registered slots, no count exchange), and with --fp8 `dispatch(fp8=True, dequantize=True)` (rows
  sent as e4m3 codes with a float32 scale per 128 values, received as bfloat16; combine in bfloat16);
- gloo: the same `ncl.moe` code over a gloo process group, so the exchange is torch's
  `all_gather_into_tensor` for the counts and `all_to_all_single` for the rows;
- mpi: the same steps written with mpi4py (the same routing code, ncl.moe's): `Alltoall` of the
  counts, `Alltoallv` of the rows and of their ids and weights, `Alltoallv` back and a
  rank-ordered sum.

Each rank plays the experts once, on the first dispatch's rows: a received row times the sum of
its local routing weights, so combine must give back every token times its total weight (1 with
softmax routing).  That is checked on every rank, on the first call and on the last timed one
(rows off by more than the dtype's rounding are counted as wrong).  The timed loop is dispatch,
then combine of that same expert output (the routing is the same every call, so is the layout):
the exchanges alone, as DeepEP's own benchmark times them (tests/test_low_latency.py combines a
`simulated_gemm_x` computed once).  With the experts in the loop, on a host whose ranks
oversubscribe the CPUs a peer's expert work lands in the time of the exchange a rank is waiting in.

Rank 0 prints one JSON object per line on stdout.
"""
import math
import sys
import time

import numpy as np
import torch

from . import backends
from .. import compress
from .worker import _emit, _settle, worker_args

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
TOLERANCE = {torch.bfloat16: 3e-2, torch.float32: 1e-5}   # relative, per element
MAX_ITERS = 100_000


def routing(rank: int, tokens: int, cfg, dtype):
    """(x, topk_idx, topk_weights) of one rank: the same on every backend."""
    g = torch.Generator().manual_seed(7919 * rank + tokens)
    x = torch.randn(tokens, cfg.hidden, generator=g).to(dtype)
    top, idx = torch.randn(tokens, cfg.experts, generator=g).topk(cfg.topk, dim=-1)
    return x, idx, top.softmax(-1)


def play_experts(recv_x, recv_idx, recv_w):
    """Every local expert is the identity: the row times the sum of its local weights (a
    low-latency block's padding rows have none: they stay zero)."""
    return recv_x * (recv_w * (recv_idx >= 0)).sum(1, keepdim=True).to(recv_x.dtype)


class NclMoe:
    def __init__(self, comm, low_latency: bool, fp8: bool = False):
        from ncl import moe
        self.buffer, self.low_latency = moe.Buffer(comm), low_latency  # reused by every call, as a user would
        self.wire = dict(fp8=True, dequantize=True) if fp8 else {}  # fp8 rows, received as bfloat16

    def dispatch(self, x, idx, w, experts):
        if self.low_latency:
            return self.buffer.low_latency_dispatch(x, idx, w, max(1, x.shape[0]), num_experts=experts, **self.wire)
        return self.buffer.dispatch(x, idx, w, num_experts=experts, **self.wire)

    def combine(self, out, handle):
        if self.low_latency:
            return self.buffer.low_latency_combine(out, handle)
        return self.buffer.combine(out, handle)


class MpiMoe:
    """DeepEP-style dispatch/combine written directly with mpi4py (what an MPI user would write)."""

    def __init__(self, comm):
        from mpi4py import MPI
        from ncl import moe
        self.MPI, self.comm, self.moe = MPI, comm, moe
        self.n, self.rank = comm.Get_size(), comm.Get_rank()

    def _alltoallv(self, rows: torch.Tensor, send: list, recv: list) -> torch.Tensor:
        width = rows[0].numel() * rows.element_size() if rows.dim() > 1 else rows.element_size()
        out = torch.empty((sum(recv),) + tuple(rows.shape[1:]), dtype=rows.dtype)
        src = rows.contiguous().view(torch.uint8).numpy().reshape(-1)
        dst = out.view(torch.uint8).numpy().reshape(-1)
        sc, rc = np.array(send) * width, np.array(recv) * width
        sd, rd = np.concatenate([[0], np.cumsum(sc)[:-1]]), np.concatenate([[0], np.cumsum(rc)[:-1]])
        self.comm.Alltoallv([src, (sc, sd), self.MPI.BYTE], [dst, (rc, rd), self.MPI.BYTE])
        return out

    def dispatch(self, x, idx, w, experts):
        k, route = idx.shape[1], self.moe.route(idx, experts, self.n)
        send = route.send_counts
        recv = np.empty(self.n, np.int64)
        self.comm.Alltoall(np.asarray(send, np.int64), recv)
        recv = recv.tolist()
        send_token = torch.from_numpy(route.token)
        recv_x = self._alltoallv(x.index_select(0, send_token), send, recv)
        meta = np.empty((len(route.token), 2 * k))
        meta[:, :k] = route.ids
        meta[:, k:] = w.double().numpy()[route.token]
        recv_meta = self._alltoallv(torch.from_numpy(meta), send, recv)
        return recv_x, recv_meta[:, :k].long(), recv_meta[:, k:].to(w.dtype), (send_token, send, recv, x.shape[0])

    def combine(self, out, handle):
        token, send, recv, tokens = handle
        back = self._alltoallv(out, recv, send)
        # the same rank-ordered sum as ncl's: the comparison is of the transports
        return self.moe.sum_by_token(back, self.moe.Handle(None, token, send, recv, tokens, out.shape[1]))


def exchanges(backend, cfg, tokens):
    """(mode, exchange object) pairs this backend runs at this token count."""
    if backend.name == "ncl":
        modes = [("normal", NclMoe(backend.comm, False))]
        if tokens <= cfg.low_latency_max:
            modes.append(("low_latency", NclMoe(backend.comm, True)))
        if cfg.fp8:
            modes.append(("fp8", NclMoe(backend.comm, False, fp8=True)))
        return modes
    if backend.name == "gloo":
        return [("normal", NclMoe(backend.dist.group.WORLD, False))]
    return [("normal", MpiMoe(backend.comm))]


def _wrong_rows(x, y, w, fp8: bool = False) -> int:
    want = x.float() * w.sum(1, keepdim=True)
    bound = TOLERANCE[x.dtype] * (want.abs() + 1e-2)
    if fp8:  # and each value off by up to 1/16 of the largest in its row (e4m3: 3 mantissa bits), then weighted
        bound = bound + x.float().abs().amax(1, keepdim=True) * w.abs().sum(1, keepdim=True) * (1 / 16 + 1 / 128)
    return int(((y.float() - want).abs() > bound).any(1).sum())


def measure(backend, cfg, tokens: int, mode: str, ex, dtype) -> dict:
    x, idx, w = routing(backend.rank, tokens, cfg, dtype)
    recv_x, recv_idx, recv_w, handle = ex.dispatch(x, idx, w, cfg.experts)
    received = recv_x.shape[0]
    out = play_experts(recv_x, recv_idx, recv_w)  # a tensor of its own: the next dispatch may reuse recv_x's memory

    def once():
        t0 = time.perf_counter()
        handle = ex.dispatch(x, idx, w, cfg.experts)[3]
        t1 = time.perf_counter()
        return ex.combine(out, handle), t1 - t0, time.perf_counter() - t1

    wrong = _wrong_rows(x, ex.combine(out, handle), w, fp8=mode == "fp8")
    for _ in range(cfg.warmup):
        once()
    backend.barrier()
    start = time.perf_counter()
    once()
    guess = backend.max_over_ranks(time.perf_counter() - start)
    iters = max(cfg.iters, min(MAX_ITERS, math.ceil(cfg.min_time / max(guess, 1e-9))))
    backend.barrier()
    dispatch_s = combine_s = 0.0
    for _ in range(iters):
        y, d, c = once()
        dispatch_s += d
        combine_s += c
    wrong = backend.sum_over_ranks(wrong + _wrong_rows(x, y, w, fp8=mode == "fp8"))
    # rows that leave this rank (the token's own rank is a local copy), averaged over ranks
    is_in = torch.zeros(tokens, backend.size, dtype=torch.bool)
    if tokens:
        is_in[torch.arange(tokens).unsqueeze(1), idx // (cfg.experts // backend.size)] = True
    sent = int(is_in.sum()) - int(is_in[:, backend.rank].sum())
    row_bytes = compress.fp8_row_bytes(cfg.hidden) if mode == "fp8" else cfg.hidden * x.element_size()
    sent_bytes = backend.sum_over_ranks(sent * row_bytes) / backend.size
    d_us = backend.max_over_ranks(dispatch_s / iters) * 1e6
    c_us = backend.max_over_ranks(combine_s / iters) * 1e6
    return dict(tokens=tokens, mode=mode, dispatch_us=d_us, combine_us=c_us, bytes=sent_bytes,
                dispatch_gbps=sent_bytes / d_us / 1e3 if d_us else 0.0,
                combine_gbps=sent_bytes / c_us / 1e3 if c_us else 0.0,
                received_rows=backend.max_over_ranks(received), wrong=wrong, iters=iters)


def main(argv=None):
    args, cfg = worker_args("python -m ncl.perf.moe_worker", "ncl-perf moe", argv)
    torch.set_num_threads(1)  # every backend alike: one core per rank, as the transports assume
    backend = backends.create(args.backend, rendezvous_file=args.rendezvous_file)
    dtype = TORCH_DTYPES[cfg.dtype]
    try:
        _settle(backend)
        for tokens in cfg.tokens:
            for mode, ex in exchanges(backend, cfg, tokens):
                row = measure(backend, cfg, tokens, mode, ex, dtype)
                if backend.rank == 0:
                    _emit(dict(row, backend=args.backend, nranks=backend.size))
    finally:
        backend.close()


if __name__ == "__main__":
    sys.exit(main())
