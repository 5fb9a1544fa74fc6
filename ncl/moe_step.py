"""MoE dispatch and combine of a small batch in one step of the C core each (native/moe.c says
how): the routing, the packing of rows with their ids and weights, the unpacking and the
rank-ordered sum all run there, so that a decode step's dispatch is one exchange and a few µs of
Python.  ncl/moe.py takes this path over an ncl communicator on one host.  When a batch does not
fit one step, the normal dispatch has still exchanged the counts (the whole matrix, alike on
every rank), and ncl/moe.py moves the rows the ordinary way with it; the low-latency dispatch
(whose outputs' size is known before) and combine take more steps of the same call instead.
"""
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch

from ._native import ffi
from .buffers import torch_dtype_code


class Dispatched(NamedTuple):
    moved: bool                  # the rows moved (else only the counts: matrix is still right)
    send_token: torch.Tensor     # (S,) the token of each row sent, grouped by destination rank
    send_counts: list            # rows sent to each rank
    recv_counts: list            # rows received from each rank
    matrix: np.ndarray           # (N, N) rows [sender, receiver]
    recv_x: Optional[torch.Tensor] = None    # packed by source, or N * slots rows (low-latency)
    recv_idx: Optional[torch.Tensor] = None  # int64 ids, -1 where this rank lacks the expert
    recv_w: Optional[torch.Tensor] = None    # the routing weights, topk_weights' dtype


_DISPATCH_ARGS, _COMBINE_ARGS = ffi.typeof("ncl_moe_dispatch_args *"), ffi.typeof("ncl_moe_combine_args *")
_VOID, _INT64, _UINT64 = ffi.typeof("void *"), ffi.typeof("int64_t *"), ffi.typeof("uint64_t *")


def _ptr(t: torch.Tensor):
    return ffi.cast(_VOID, t.data_ptr())


def dispatch(comm, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
             slots: int = 0, pool: Optional[Callable[[tuple, torch.dtype], torch.Tensor]] = None) -> Dispatched:
    """One step: this rank's tokens to the ranks holding their experts (arguments checked by the
    caller, which also keeps autograd away: only pointers are taken here; slots: the low-latency
    mode's rows per source block, in as many steps as it takes, 0: packed by source, in one step
    or only the counts; pool(shape, dtype): where a large recv_x comes from, torch.empty if not given)."""
    n, (tokens, k) = comm.size, topk_idx.shape
    x, idx, w = x.contiguous(), topk_idx.contiguous(), topk_weights.contiguous()
    # one array for what the call writes: send_counts (n) | matrix (n * n) | send_token (what dispatch sends at most)
    nn = n + n * n
    ints = np.empty(nn + max(tokens * min(k, n), 1), np.int64)
    at = ffi.from_buffer("int64_t[]", ints)
    row_bytes = x.shape[1] * x.element_size()
    # (the fields in declaration order, in one go: a µs less than one by one)
    args = ffi.new(_DISPATCH_ARGS, (_ptr(x), _ptr(idx), _ptr(w), tokens, row_bytes, k, idx.element_size(),
                                    w.element_size(), num_experts, slots, ffi.NULL, ffi.NULL, ffi.NULL,
                                    ffi.cast(_UINT64, at), at + nn, at + n))
    if slots:  # the outputs' size is known before: the call fills them (native/moe.c)
        recv_x, recv_idx, recv_w = _outputs(n * slots, x, k, w.dtype, args, pool)
    comm._moe("moe_dispatch", args, tokens * row_bytes)
    counts, recv_counts = ints[:n].tolist(), ints[n + comm.rank:nn:n].tolist()
    matrix, token = ints[n:nn].reshape(n, n), torch.from_numpy(ints[nn:nn + sum(counts)])
    if not args.moved:
        return Dispatched(False, token, counts, recv_counts, matrix)
    if not slots:
        recv_x, recv_idx, recv_w = _outputs(sum(recv_counts), x, k, w.dtype, args, pool)
        comm._moe_take(args)
    return Dispatched(True, token, counts, recv_counts, matrix, recv_x, recv_idx, recv_w)


def output(shape: tuple, dtype: torch.dtype, pool: Optional[Callable[[tuple, torch.dtype], torch.Tensor]]):
    """An output tensor: from pool(shape, dtype) when given (scratch.OutputPool: a large one reuses memory);
    shape has at least one dimension."""
    if pool is not None:
        return pool(shape, dtype)
    return torch.empty(*shape, dtype=dtype)  # (sizes as arguments: torch parses them faster than a tuple)


def _outputs(rows: int, x: torch.Tensor, k: int, weight_dtype: torch.dtype, args, pool):
    """(recv_x, recv_idx, recv_w) of rows rows, args pointed at them (sizes as arguments, not a
    tuple: torch parses them faster), a large recv_x from the pool."""
    recv_x = output((rows, x.shape[1]), x.dtype, pool)
    recv_idx = torch.empty(rows, k, dtype=torch.int64)
    recv_w = torch.empty(rows, k, dtype=weight_dtype)
    args.recv_x, args.recv_idx, args.recv_w = _ptr(recv_x), ffi.cast(_INT64, recv_idx.data_ptr()), _ptr(recv_w)
    return recv_x, recv_idx, recv_w


def combine(comm, rows: torch.Tensor, send_token: torch.Tensor, matrix: np.ndarray, y: torch.Tensor,
            slots: int = 0, back: Optional[Callable[[tuple, torch.dtype], torch.Tensor]] = None) -> bool:
    """Rows (laid out as the dispatch's recv_x) back to their tokens' ranks, summed per token in
    rank order into y (tokens, hidden): in one step, or, when a block does not fit one, in more,
    the returning rows gathered in a tensor of back(shape, dtype) (torch.empty if not given).
    False: nothing moved (a row larger than a piece of staging, or a dtype the core has no
    kernel for; the same on every rank), y untouched."""
    code = torch_dtype_code(rows.dtype)
    if code is None:
        return False
    rows, send_token = rows.contiguous(), send_token.contiguous()  # (np.nonzero's columns are strided)
    args = ffi.new(_COMBINE_ARGS, (_ptr(rows), rows.shape[1], code, 0, slots, ffi.from_buffer("int64_t[]", matrix),
                                   ffi.cast(_INT64, send_token.data_ptr()), y.shape[0], _ptr(y)))  # (as dispatch's)
    steps = comm._moe_combine_steps(args)  # decided alike on every rank, from the matrix
    if steps == 0:
        return False
    if steps > 1:  # room for the rows that come back
        shape = (max(send_token.shape[0], 1), rows.shape[1])  # (never NULL: every rank passes it alike)
        room = back(shape, rows.dtype) if back is not None else torch.empty(shape, dtype=rows.dtype)
        args.back = _ptr(room)
    comm._moe("moe_combine", args, send_token.shape[0] * rows.shape[1] * rows.element_size())
    return bool(args.moved)
