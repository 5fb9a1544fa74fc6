"""Mixture-of-experts expert parallelism: dispatch tokens to the ranks holding their chosen
experts, combine the weighted expert outputs back (DeepEP's conventions), over all_to_allv.

Experts are split over ranks in contiguous blocks: rank r holds experts r*E/N ... (r+1)*E/N - 1.
A token goes once to each rank that holds at least one of its top-k experts (not once per
expert); the receiver gets the token's row, its top-k expert ids (global ids; -1 where that
expert lives on another rank) and routing weights.  After the local experts ran, each received
row holds the sum of its local experts' outputs, each already multiplied by its routing weight;
combine() sends the rows back and sums them on the token's rank in rank order, so the result
does not depend on timing.  dispatch and combine are each other's backward, so MoE layers train.

A `Buffer` (DeepEP's name and shape) owns the memory a group's exchanges reuse from call to
call; the caller creates one per group, uses it for every MoE layer, and closes it:

    with Buffer(comm) as buffer:
        layout = buffer.get_dispatch_layout(topk_idx, num_experts)
        recv_x, recv_idx, recv_w, handle = buffer.dispatch(x, topk_idx, topk_weights, layout)
        y = buffer.combine(expert_out, handle)
        # decode: fixed slots, no count exchange, rows with their ids and weights in one exchange
        recv_x, recv_idx, recv_w, handle = buffer.low_latency_dispatch(x, topk_idx, topk_weights, M, num_experts=E)
        y = buffer.low_latency_combine(expert_out, handle)

The functions dispatch() and combine() are those methods on a Buffer made for the call (or the
Buffer passed as the group), which the handle keeps until it goes: nothing is registered or
reused between calls unless a Buffer is passed.
"""
from typing import NamedTuple, Optional

import numpy as np
import torch

from . import buffers, compress, moe_step, scratch
from .errors import NclStateError
from .group import Group


class Layout(NamedTuple):
    """Where the tokens go, and what each rank receives."""
    num_tokens_per_rank: torch.Tensor     # (N,) tokens this rank sends to each rank
    num_tokens_per_expert: torch.Tensor   # (E,) this rank's tokens routed to each expert
    is_token_in_rank: torch.Tensor        # (T, N) bool: token t goes to rank r
    num_recv_per_rank: torch.Tensor       # (N,) tokens this rank receives from each rank (exchanged)
    rank_matrix: Optional[np.ndarray] = None  # (N, N) tokens rank i sends rank j (ncl groups; None: not known)


class Handle(NamedTuple):
    """What combine needs to send the rows back: which token each sent row was, and the counts."""
    buffer: Optional["Buffer"]  # whose exchanges dispatched (None: a handle for sum_by_token alone)
    send_token: torch.Tensor   # (S,) the token of each sent row, grouped by destination rank
    send_counts: list          # rows sent to each rank
    recv_counts: list          # rows received from each rank
    num_tokens: int
    hidden: int
    dropped: int = 0           # top-k choices dropped by the capacity factor on this rank
    recv_x: Optional[torch.Tensor] = None  # what dispatch returned (combine keeps the autograd graph whole)
    slots: int = 0             # low-latency mode: rows reserved per rank pair (max_tokens_per_rank); 0: normal
    rank_matrix: Optional[np.ndarray] = None  # (N, N) rows rank i sent rank j in dispatch, when known

    @property
    def group(self) -> Group:
        return self.buffer.group


class Route(NamedTuple):
    """The rows a dispatch sends: one per (token, rank holding one of its experts), grouped by
    rank, tokens in order within each."""
    token: np.ndarray    # (S,) the token of each row
    dest: np.ndarray     # (S,) the rank it goes to
    send_counts: list    # rows to each rank
    ids: np.ndarray      # (S, k) the token's top-k ids, -1 where dest does not hold that expert


def _experts_per_rank(num_experts: int, nranks: int) -> int:
    if num_experts % nranks:
        raise ValueError(f"num_experts ({num_experts}) must divide by the number of ranks ({nranks})")
    return num_experts // nranks


def _check_routing(topk_idx: torch.Tensor, num_experts: int, ids: bool = True) -> Optional[np.ndarray]:
    """topk_idx checked, as an int64 numpy array (the routing bookkeeping runs in numpy: a few µs
    where the same torch ops cost tens of µs).  ids=False: its shape and dtype only (None), for
    the one-step path, whose core checks the ids before anything moves (native/moe.c)."""
    if topk_idx.dim() != 2 or topk_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_idx must be an int tensor of shape (tokens, k), not {topk_idx.dtype} "
                         f"{tuple(topk_idx.shape)}")
    if not ids:
        return None
    idx = topk_idx.detach().numpy().astype(np.int64, copy=False)
    if idx.size and (idx.min() < -1 or idx.max() >= num_experts):
        raise ValueError(f"topk_idx holds expert ids outside 0..{num_experts - 1} (or -1 for none)")
    return idx


def apply_capacity(topk_idx: torch.Tensor, num_experts: int, capacity_factor: float):
    """(topk_idx with dropped choices set to -1, how many were dropped): each expert takes at
    most ceil(capacity_factor * tokens * k / num_experts) of this rank's tokens, the first ones
    in token order (GShard's per-group capacity; no communication)."""
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0, not {capacity_factor}")
    _check_routing(topk_idx, num_experts)
    tokens, k = topk_idx.shape
    capacity = -(-int(capacity_factor * tokens * k * 1000) // (num_experts * 1000))  # ceil, float-safe
    flat = topk_idx.long().reshape(-1)  # token-major: token t's choices before token t+1's
    kept = flat.clone()
    valid = flat >= 0
    order = torch.zeros_like(flat)
    for e in flat[valid].unique().tolist():  # position of each choice in its expert's queue
        where = (flat == e).nonzero()[:, 0]
        order[where] = torch.arange(len(where))
    drop = valid & (order >= capacity)
    kept[drop] = -1
    return kept.view_as(topk_idx).to(topk_idx.dtype), int(drop.sum())




def _is_in(idx: np.ndarray, per: int, n: int) -> np.ndarray:
    """(N, T) bool: rank r holds at least one of token t's experts (experts in blocks of `per`;
    -1 choices go nowhere)."""
    is_in = np.zeros((n, idx.shape[0]), dtype=bool)
    token, j = np.nonzero(idx >= 0)
    is_in[idx[token, j] // per, token] = True
    return is_in


def _route(idx: np.ndarray, is_in: np.ndarray, per: int) -> Route:
    dest, token = np.nonzero(is_in)
    ids = idx[token]
    # a row keeps the ids its rank holds (-1 // per is -1, never a rank)
    return Route(token, dest, np.count_nonzero(is_in, axis=1).tolist(), np.where(ids // per == dest[:, None], ids, -1))


def route(topk_idx: torch.Tensor, num_experts: int, nranks: int) -> Route:
    """The rows this rank's dispatch sends for a routing over nranks ranks (no communication):
    what another transport needs to move the same rows."""
    per = _experts_per_rank(num_experts, nranks)
    idx = _check_routing(topk_idx, num_experts)
    return _route(idx, _is_in(idx, per, nranks), per)


def get_dispatch_layout(topk_idx: torch.Tensor, num_experts: int, group) -> Layout:
    """Tokens per rank and per expert, which ranks each token goes to, and (one exchange of
    N counts) how many tokens each rank will receive from every other."""
    group = _group(group)
    per = _experts_per_rank(num_experts, group.size)
    idx = _check_routing(topk_idx, num_experts)
    is_in = _is_in(idx, per, group.size)
    per_rank = np.count_nonzero(is_in, axis=1)
    recv, matrix = _exchange_counts(group, per_rank)
    per_expert = np.bincount(idx[idx >= 0], minlength=num_experts)
    return Layout(torch.from_numpy(per_rank), torch.from_numpy(per_expert), torch.from_numpy(is_in.T),
                  torch.tensor(recv), matrix)


def _exchange_counts(group: Group, counts: np.ndarray):
    """What this rank sends to each rank -> (what each rank sends to this one, the whole
    (N, N) matrix [sender, receiver] or None).  An ncl group gathers the matrix (as cheap as an
    all_to_all of N counts): with it every rank sizes the shared send buffer alike, and the
    exchanges skip their own exchange of counts."""
    counts = np.ascontiguousarray(counts, dtype=np.int64)
    if group.size == 1:
        return counts.tolist(), counts.reshape(1, 1)
    if group.is_ncl:
        matrix = group.group.all_gather(counts).reshape(group.size, group.size)
        return matrix[:, group.rank].tolist(), matrix
    import torch.distributed as dist
    out = torch.empty(group.size, dtype=torch.int64)
    dist.all_to_all_single(out, torch.from_numpy(counts), group=group.group)
    return out.tolist(), None


PACKED_MAX_BYTES = 256 << 10       # dispatches whose largest send is smaller: rows, ids and weights in one exchange
ONE_STEP = True                    # small batches in one step of the core (ncl/moe_step.py); tests turn it off
SEND_BUFFER_MIN_BYTES = 64 << 10   # from here up the rows are gathered into the registered send buffer


def _all_to_allv(group: Group, rows: torch.Tensor, send: list, recv: list,
                 pool: Optional[scratch.OutputPool] = None, matrix: Optional[np.ndarray] = None) -> torch.Tensor:
    """Rows grouped by destination -> rows grouped by source (ncl communicator or torch group),
    into a tensor of pool when given; matrix: every rank's send counts, when every rank has it."""
    shape = (sum(recv),) + tuple(rows.shape[1:])
    out = pool.empty(shape, rows.dtype) if pool is not None else torch.empty(shape, dtype=rows.dtype)
    if group.is_ncl:
        return group.group.all_to_allv(rows.contiguous(), send, recv, out=out, all_counts=matrix)
    import torch.distributed as dist
    dist.all_to_all_single(out, rows.contiguous(), recv, send, group=group.group)
    return out


def _exchange_packed(group: Group, x, r: Route, topk_weights, recv_counts, matrix):
    """Small dispatches: each row travels with its ids and weights in one exchange of byte rows
    [x row | k ids | k weights (float64)], one exchange (and at 8 ranks on 2 CPUs, a scheduling
    round of every rank) fewer than sending them apart."""
    k, hb = r.ids.shape[1], x.shape[1] * x.element_size()
    packed = np.empty((len(r.token), hb + 16 * k), np.uint8)
    if len(r.token):  # (an empty x may have stride 0, which no byte view takes)
        packed[:, :hb] = x.detach().contiguous().view(torch.uint8).numpy()[r.token]
    meta = packed[:, hb:].view(np.float64)  # [rows, 2k]
    meta[:, :k] = r.ids
    meta[:, k:] = _weights_array(topk_weights)[r.token]
    got = group.group.all_to_allv(packed, r.send_counts, recv_counts, all_counts=matrix)
    recv_x = torch.empty((got.shape[0], x.shape[1]), dtype=x.dtype)
    recv_x.view(torch.uint8).numpy()[...] = got[:, :hb]
    recv_meta = got[:, hb:].view(np.float64)
    return recv_x, torch.from_numpy(recv_meta[:, :k].astype(np.int64)), _weights_tensor(recv_meta[:, k:], topk_weights)


def _weights_array(topk_weights: torch.Tensor) -> np.ndarray:
    """The routing weights in numpy (float64 for a dtype numpy lacks, bfloat16)."""
    w = topk_weights.detach()
    return w.double().numpy() if w.dtype == torch.bfloat16 else w.numpy()


_NUMPY_FLOATS = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


def _weights_tensor(received: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """Received float64 weights as a contiguous tensor of like's dtype."""
    if like.dtype in _NUMPY_FLOATS:
        return torch.from_numpy(received.astype(_NUMPY_FLOATS[like.dtype]))
    return torch.from_numpy(np.ascontiguousarray(received)).to(like.dtype)


def sum_by_token(back: torch.Tensor, handle: Handle, pool: Optional[scratch.OutputPool] = None) -> torch.Tensor:
    """The rows each rank returned, summed per token in rank order, so every run adds in the
    same order (in the C core, buffers.sum_rows).  Rank r's rows start at the running count, or
    at r * slots in the low-latency mode.  pool: where the result's memory comes from."""
    shape = (handle.num_tokens, handle.hidden)
    y = pool.empty(shape, back.dtype) if pool is not None else torch.empty(shape, dtype=back.dtype)
    n = len(handle.send_counts)
    index = np.full((handle.num_tokens, n), -1, dtype=np.int64)  # [token, rank]: its row from that rank
    rank = np.repeat(np.arange(n), handle.send_counts)  # the rank each sent row went to
    row = np.arange(len(rank))
    if handle.slots:  # rank r's rows start at r * slots
        row = row + rank * handle.slots - np.repeat(np.cumsum([0] + handle.send_counts[:-1]), handle.send_counts)
    index[handle.send_token.numpy(), rank] = row
    back = back.contiguous()
    if not buffers.sum_rows(y, back, index):  # a dtype the core has no kernel for: the same sum, in torch
        y.zero_()
        for r in range(n):
            has = np.flatnonzero(index[:, r] >= 0)
            y[has] += back[index[has, r]]
    return y


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_idx, topk_weights, buffer, num_experts, layout):
        recv_x, recv_idx, recv_w, handle = buffer._dispatch(x, topk_idx, topk_weights, num_experts, layout)
        ctx.handle = handle
        ctx.mark_non_differentiable(recv_idx)
        return recv_x, recv_idx, recv_w, handle

    @staticmethod
    def backward(ctx, grad_x, grad_idx, grad_w, grad_handle):
        # each copy of a token was a read of x: the gradients of the copies add up (a combine)
        grad = None if grad_x is None else ctx.handle.buffer._combine(grad_x.contiguous(), ctx.handle)
        return grad, None, None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, expert_out, handle):
        ctx.handle = handle
        return handle.buffer._combine(expert_out, handle)

    @staticmethod
    def backward(ctx, grad_y):
        h = ctx.handle  # each received row contributed once to its token: send the token's gradient back
        return _all_to_allv(h.group, grad_y.contiguous()[h.send_token], h.send_counts, h.recv_counts), None


def _fixed_exchange(group: Group, send: torch.Tensor, recv: torch.Tensor) -> torch.Tensor:
    """All-to-all of equal blocks, one per rank: no counts travel first."""
    if group.is_ncl:
        return group.group.all_to_all(send, out=recv)
    import torch.distributed as dist
    dist.all_to_all_single(recv, send, group=group.group)
    return recv


def _num_experts(num_experts: Optional[int], layout: Optional[Layout]) -> int:
    if num_experts is not None:
        return num_experts
    if layout is None:
        raise ValueError("dispatch needs num_experts, or the layout get_dispatch_layout made")
    return len(layout.num_tokens_per_expert)


def _checked(group: Group, x, topk_idx, topk_weights, num_experts: int, capacity_factor, ids: bool = True):
    """(topk_idx after the capacity factor, choices dropped): the arguments of a dispatch checked
    (ids=False: not the expert ids, which the one-step path's core checks)."""
    if x.dim() != 2:
        raise ValueError(f"x must be (tokens, hidden), not {tuple(x.shape)}")
    _experts_per_rank(num_experts, group.size)
    _check_routing(topk_idx, num_experts, ids)
    shape = topk_idx.shape
    if topk_weights.shape != shape or shape[0] != x.shape[0]:
        raise ValueError(f"topk_idx {tuple(topk_idx.shape)} and topk_weights {tuple(topk_weights.shape)} must both "
                         f"be (tokens, k) with tokens = x.shape[0] = {x.shape[0]}")
    if capacity_factor is None:
        return topk_idx, 0
    return apply_capacity(topk_idx, num_experts, capacity_factor)


def _check_fp8(x: torch.Tensor, fp8, dequantize) -> None:
    if not isinstance(fp8, bool) or not isinstance(dequantize, bool):
        raise TypeError(f"fp8 and dequantize must be bools, not {fp8!r} and {dequantize!r}")
    if dequantize and not fp8:
        raise ValueError("dequantize=True needs fp8=True")
    if fp8 and x.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"an fp8 dispatch takes bfloat16 or float32 rows, not {x.dtype}")
    if fp8 and torch.is_grad_enabled() and x.requires_grad:
        raise ValueError("an fp8 dispatch has no gradient: run it under torch.no_grad(), or on x.detach()")


def _fp8_rows(x: torch.Tensor) -> torch.Tensor:
    """x's rows as fp8 rows (ncl.compress.quantize_fp8_rows), the bytes the dispatch moves."""
    return torch.from_numpy(compress.quantize_fp8_rows(x.detach().float().numpy()))


def _fp8_received(rows: torch.Tensor, hidden: int, dequantize: bool):
    """What an fp8 dispatch returns for the fp8 rows it received: (codes (R, hidden) float8_e4m3fn,
    scales (R, blocks) float32), or with dequantize the rows in bfloat16 (code * scale, rounded once)."""
    packed = rows.numpy()
    if dequantize:
        return torch.from_numpy(compress.dequantize_fp8_rows(packed, hidden)).to(torch.bfloat16)
    codes, scales = compress.fp8_row_parts(packed, hidden)
    return torch.from_numpy(codes.copy()).view(torch.float8_e4m3fn), torch.from_numpy(scales.copy())


class Buffer:
    """The memory one group's MoE exchanges reuse between calls (DeepEP's Buffer): over an ncl
    communicator on one host (`single_host`), a registered send buffer that receivers copy from
    in place and pools for the outputs; over any ncl communicator, the registered slots of the
    low-latency mode, one pair per (shape, dtype).  Over a torch group, or across hosts (where
    the send buffer would not reach the other hosts), the normal mode allocates per call.

    Nothing is allocated up front: memory comes at the first exchange that needs it, and
    registering it is collective, so every rank of the group makes the same calls on its Buffer.
    Two Buffers on one group are independent.  close() (or leaving a `with` block) frees what the
    Buffer holds; tensors it returned stay valid, and their memory goes when they do.
    reuse=False: a Buffer for one call (the functions dispatch/combine), which keeps and registers
    nothing (registering is collective and costs more than one call saves)."""

    def __init__(self, group, *, reuse: bool = True):
        self.group = Group(group)
        self._register = reuse and self.group.is_ncl
        keep = self._register and self.group.group.single_host
        self._one_step = self.group.is_ncl and self.group.group.single_host  # small batches: ncl/moe_step.py
        self._send = scratch.SendBuffer(self.group.group) if keep else None
        self._outputs = scratch.OutputPool() if keep else None
        self._back = scratch.OutputPool(1) if keep else None  # combine's received rows, dropped at its end
        self._slots = {}  # low-latency: (shape, dtype) -> (send, recv) registered tensors
        self._closed = False

    def __repr__(self) -> str:
        return f"<ncl.moe.Buffer rank {self.group.rank} of {self.group.size}{', closed' if self._closed else ''}>"

    def __enter__(self) -> "Buffer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Free the registered send buffer, the pools' idle memory and the low-latency slots (idempotent)."""
        for owned in (self._send, self._outputs, self._back):
            if owned is not None:
                owned.close()
        self._slots.clear()
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise NclStateError("this MoE Buffer is closed")

    def _in_one_step(self) -> bool:
        """Small batches go through ncl/moe_step.py (the same answer on every rank)."""
        return self._one_step and ONE_STEP

    def _pooled(self):
        """Where the one-step path's large outputs come from: the pool, when this Buffer keeps one."""
        return self._outputs.empty if self._outputs is not None else None

    def _output(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """A tensor for the one-step path's result: a large one from the pool when this Buffer keeps one."""
        return moe_step.output(shape, dtype, self._pooled())

    def _check_handle(self, handle: Handle, low_latency: bool) -> None:
        self._check_open()
        if handle.buffer is not self:
            raise ValueError("this handle comes from another Buffer's dispatch: combine it there")
        if bool(handle.slots) != low_latency:
            raise ValueError("combine a handle of low_latency_dispatch with low_latency_combine, and one of "
                             "dispatch with combine")

    # ---- normal mode ----------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> Layout:
        """get_dispatch_layout over this Buffer's group."""
        return get_dispatch_layout(topk_idx, num_experts, self.group)

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                 layout: Optional[Layout] = None, *, num_experts: Optional[int] = None,
                 capacity_factor: Optional[float] = None, fp8: bool = False, dequantize: bool = False):
        """(recv_x, recv_topk_idx, recv_topk_weights, handle): the tokens this rank's experts must
        process, grouped by source rank (token order within each), with their top-k global expert
        ids (-1 where the expert is on another rank) and weights.  Collective over the group.
        The routing weights are not differentiated through (as DeepEP's dispatch).
        num_experts: needed unless a layout (get_dispatch_layout) is given.
        capacity_factor: drop the choices beyond each expert's capacity (apply_capacity) first;
        handle.dropped says how many; a layout passed in must then come from the kept choices.
        fp8: send the rows (bfloat16 or float32, no gradient) as e4m3 codes with one float32 scale
        per 128 values of a row (DeepEP's convention; ncl.compress.quantize_fp8_rows): recv_x is
        then (codes (R, hidden) float8_e4m3fn, scales (R, ceil(hidden / 128)) float32), or with
        dequantize=True the rows in bfloat16; combine takes bfloat16 rows as usual."""
        self._check_open()
        num_experts = _num_experts(num_experts, layout)
        topk_idx, dropped = _checked(self.group, x, topk_idx, topk_weights, num_experts, capacity_factor,
                                     ids=layout is not None or not self._in_one_step())
        _check_fp8(x, fp8, dequantize)
        if fp8:
            recv, recv_idx, recv_w, handle = self._dispatch(_fp8_rows(x), topk_idx, topk_weights, num_experts, layout)
            return (_fp8_received(recv, x.shape[1], dequantize), recv_idx, recv_w,
                    handle._replace(hidden=x.shape[1], dropped=dropped, recv_x=None))
        if not (torch.is_grad_enabled() and x.requires_grad):  # inference: no autograd node (saves ~20 µs)
            return self._dispatch(x, topk_idx, topk_weights, num_experts, layout, dropped)
        recv_x, recv_idx, recv_w, handle = _Dispatch.apply(x, topk_idx, topk_weights.detach(), self, num_experts,
                                                           layout)
        return recv_x, recv_idx, recv_w, handle._replace(recv_x=recv_x, dropped=dropped)

    def combine(self, expert_out: torch.Tensor, handle: Handle) -> torch.Tensor:
        """y (tokens, hidden) on each token's own rank: the sum, in rank order, of the rows the
        ranks holding its experts send back (each the weighted sum of that rank's experts)."""
        self._check_handle(handle, low_latency=False)
        if expert_out.dim() != 2 or expert_out.shape[0] != sum(handle.recv_counts):
            raise ValueError(f"expert_out must have one row per received token ({sum(handle.recv_counts)}), not "
                             f"{tuple(expert_out.shape)}")
        recv_x = handle.recv_x
        if torch.is_grad_enabled() and recv_x is not None and recv_x.requires_grad and not expert_out.requires_grad:
            # no local expert touched the rows (this rank received nothing for them): the backward
            # must still run here, since its exchanges are collective; an empty sum keeps the graph
            expert_out = expert_out + recv_x[:0].sum()
        if not (torch.is_grad_enabled() and expert_out.requires_grad):
            return self._combine(expert_out, handle)
        return _Combine.apply(expert_out, handle)

    def _dispatch(self, x, topk_idx, topk_weights, num_experts: int, layout: Optional[Layout], dropped: int = 0):
        """(recv_x, recv_idx, recv_w, handle), the handle holding recv_x and dropped (what dispatch returns
        outside autograd: no _replace, a µs saved)."""
        if layout is None and self._in_one_step():  # one step: the counts, and the rows when they fit it
            d = moe_step.dispatch(self.group.group, x, topk_idx, topk_weights, num_experts, pool=self._pooled())
            if d.moved:
                return d.recv_x, d.recv_idx, d.recv_w, Handle(self, d.send_token, d.send_counts, d.recv_counts,
                                                              x.shape[0], x.shape[1], dropped, d.recv_x,
                                                              rank_matrix=d.matrix)
            return self._dispatch_rows(x, topk_idx, topk_weights, num_experts, None, d, dropped)
        return self._dispatch_rows(x, topk_idx, topk_weights, num_experts, layout, None, dropped)

    def _dispatch_rows(self, x, topk_idx, topk_weights, num_experts: int, layout: Optional[Layout],
                       counted: Optional[moe_step.Dispatched], dropped: int):
        """The rows through all_to_allv, the counts taken from the layout, from the one step that counted
        them, or exchanged first."""
        group = self.group
        per = num_experts // group.size
        idx = topk_idx.detach().numpy().astype(np.int64, copy=False)  # checked by dispatch()
        if layout is None:
            r = _route(idx, _is_in(idx, per, group.size), per)
            if counted is None:
                recv_counts, matrix = _exchange_counts(group, np.asarray(r.send_counts))
            else:
                recv_counts, matrix = counted.recv_counts, counted.matrix
        else:
            r = _route(idx, layout.is_token_in_rank.t().numpy(), per)
            recv_counts, matrix = layout.num_recv_per_rank.tolist(), layout.rank_matrix
        send_token = torch.from_numpy(r.token)
        largest_rows = max(map(sum, matrix.tolist())) if matrix is not None else None  # of any sender
        largest = largest_rows * x.shape[1] * x.element_size() if matrix is not None else None
        if group.is_ncl and largest is not None and largest < PACKED_MAX_BYTES:
            recv_x, recv_idx, recv_w = _exchange_packed(group, x, r, topk_weights, recv_counts, matrix)
        else:
            if self._send is not None and largest is not None and largest >= SEND_BUFFER_MIN_BYTES:
                # gathered where peers read them in place (one copy); the output's memory reused
                rows = self._send.rows(len(r.token), x.shape[1], x.dtype, largest_rows)
                torch.index_select(x.detach(), 0, send_token, out=rows)
            else:
                rows = x.detach().index_select(0, send_token)
            recv_x = _all_to_allv(group, rows, r.send_counts, recv_counts, self._outputs, matrix)
            k = r.ids.shape[1]
            meta = np.empty((len(r.token), 2 * k))  # ids are exact in float64: one exchange for ids and weights
            meta[:, :k] = r.ids
            meta[:, k:] = _weights_array(topk_weights)[r.token]
            recv_meta = _all_to_allv(group, torch.from_numpy(meta), r.send_counts, recv_counts, matrix=matrix)
            recv_idx = recv_meta[:, :k].long()
            recv_w = recv_meta[:, k:].to(topk_weights.dtype)
        handle = Handle(self, send_token, r.send_counts, recv_counts, x.shape[0], x.shape[1], dropped, recv_x,
                        rank_matrix=matrix)
        return recv_x, recv_idx, recv_w, handle

    def _combine(self, expert_out: torch.Tensor, handle: Handle) -> torch.Tensor:
        """Rows back to their tokens' ranks, summed per token in rank order."""
        if self._in_one_step() and handle.rank_matrix is not None:
            y = self._output((handle.num_tokens, handle.hidden), expert_out.dtype)
            if moe_step.combine(self.group.group, expert_out, handle.send_token, handle.rank_matrix, y,
                                back=self._back.empty if self._back is not None else None):
                return y
        matrix = None if handle.rank_matrix is None else handle.rank_matrix.T  # the rows go back the way they came
        back = _all_to_allv(self.group, expert_out, handle.recv_counts, handle.send_counts, self._back, matrix)
        return sum_by_token(back, handle, self._outputs)

    # ---- low-latency mode -----------------------------------------------------------------------
    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                             max_tokens_per_rank: int, *, num_experts: int, capacity_factor: Optional[float] = None,
                             fp8: bool = False, dequantize: bool = False):
        """dispatch for decode (inference, no autograd): every rank sends every rank exactly
        max_tokens_per_rank=M rows, so no count travels before the data, through fixed slots
        (registered memory over an ncl communicator).  recv_x has N*M rows, block s from rank
        s, its first handle.recv_counts[s] real and the rest zero with recv_topk_idx -1.
        fp8, dequantize: as dispatch's (padding rows: zero codes and scales)."""
        self._check_open()
        topk_idx, dropped = _checked(self.group, x, topk_idx, topk_weights, num_experts, capacity_factor,
                                     ids=not self._in_one_step())
        if isinstance(max_tokens_per_rank, bool) or not isinstance(max_tokens_per_rank, int) or max_tokens_per_rank < 1:
            raise ValueError(f"max_tokens_per_rank must be a positive int, not {max_tokens_per_rank!r}")
        if x.shape[0] > max_tokens_per_rank:
            raise ValueError(f"{x.shape[0]} tokens exceed max_tokens_per_rank={max_tokens_per_rank}")
        _check_fp8(x, fp8, dequantize)
        # no autograd: from detached tensors (as cheap as no_grad is dear, ~4 µs a call here)
        recv_x, recv_idx, recv_w, handle = self._dispatch_low_latency(_fp8_rows(x) if fp8 else _detached(x), topk_idx,
                                                                      _detached(topk_weights), num_experts,
                                                                      max_tokens_per_rank, dropped)
        if fp8:
            return _fp8_received(recv_x, x.shape[1], dequantize), recv_idx, recv_w, handle._replace(hidden=x.shape[1])
        return recv_x, recv_idx, recv_w, handle

    def low_latency_combine(self, expert_out: torch.Tensor, handle: Handle) -> torch.Tensor:
        """combine for a handle of low_latency_dispatch: expert_out has the N*M rows it returned."""
        self._check_handle(handle, low_latency=True)
        rows = self.group.size * handle.slots
        if expert_out.dim() != 2 or expert_out.shape[0] != rows:
            raise ValueError(f"expert_out must have the {rows} rows dispatch returned, not {tuple(expert_out.shape)}")
        expert_out = _detached(expert_out)  # no autograd (as in dispatch)
        if self._in_one_step() and handle.rank_matrix is not None:
            y = self._output((handle.num_tokens, handle.hidden), expert_out.dtype)
            if moe_step.combine(self.group.group, expert_out, handle.send_token, handle.rank_matrix, y,
                                handle.slots, self._back.empty if self._back is not None else None):
                return y
        send, recv = self._slot_pair(tuple(expert_out.shape), expert_out.dtype)
        send.copy_(expert_out)
        return sum_by_token(_fixed_exchange(self.group, send, recv), handle)  # block r: rank r's rows, first real

    def _slot_pair(self, shape: tuple, dtype: torch.dtype):
        """(send, recv) of a fixed-size exchange: over an ncl communicator, registered tensors that
        peers read in place, allocated once per shape (collective: every rank reaches its first
        exchange of a shape together); over a torch group or for one call, new tensors."""
        if not self._register:
            return torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
        key = (shape, dtype)
        if key not in self._slots:
            self._slots[key] = tuple(self.group.group.empty(shape, dtype, like="torch") for _ in range(2))
        return self._slots[key]

    def _dispatch_low_latency(self, x, topk_idx, topk_weights, num_experts: int, slots: int, dropped: int):
        """One fixed-size exchange of a block per rank pair: `slots` rows, then their meta rows
        [k ids | k weights | flag (1: a real row)] in float64, written straight into the
        registered send slots (each destination's rows gathered into its block in one pass,
        only the unused rows cleared) and read out of the received blocks in one copy each.
        (The handle holds dropped and x's width.)"""
        group = self.group
        n, per, k, hidden = group.size, num_experts // group.size, topk_idx.shape[1], x.shape[1]
        if self._in_one_step():  # one call of the core, in as many steps as the largest block needs
            d = moe_step.dispatch(group.group, x, topk_idx, topk_weights, num_experts, slots, self._pooled())
            if d.moved:
                handle = Handle(self, d.send_token, d.send_counts, d.recv_counts, x.shape[0], hidden, dropped,
                                slots=slots, rank_matrix=d.matrix)
                return d.recv_x, d.recv_idx, d.recv_w, handle
            # they did not (a record larger than a piece of staging: only the counts moved): the fixed exchange
        idx = topk_idx.detach().numpy().astype(np.int64, copy=False)
        r = _route(idx, _is_in(idx, per, n), per)
        payload = slots * hidden * x.element_size()
        rows_bytes = -(-payload // 8) * 8  # the meta rows start 8-byte aligned
        send, recv = self._slot_pair((n, rows_bytes + slots * (2 * k + 1) * 8), torch.uint8)
        rows = send[:, :payload].view(x.dtype).view(n, slots, hidden)
        xs, send_token = x.detach().contiguous(), torch.from_numpy(r.token)
        at = 0
        for dest, count in enumerate(r.send_counts):
            torch.index_select(xs, 0, send_token[at:at + count], out=rows[dest, :count])
            if count < slots:
                rows[dest, count:].zero_()
            at += count
        meta = send.numpy()[:, rows_bytes:].view(np.float64).reshape(n, slots, 2 * k + 1)
        meta[..., :k], meta[..., k:] = -1, 0
        slot = np.arange(len(r.token)) - np.repeat(np.cumsum([0] + r.send_counts[:-1]), r.send_counts)
        meta[r.dest, slot, :k] = r.ids
        meta[r.dest, slot, k:2 * k] = _weights_array(topk_weights)[r.token]
        meta[r.dest, slot, 2 * k] = 1.0
        got = _fixed_exchange(group, send, recv)
        # copies (the next exchange overwrites the slots): block s of recv_x is rank s's rows
        recv_x = torch.empty((n, slots, hidden), dtype=x.dtype)
        recv_x.copy_(got[:, :payload].view(x.dtype).view(n, slots, hidden))
        recv_meta = got.numpy()[:, rows_bytes:].view(np.float64).reshape(n * slots, 2 * k + 1)
        recv_counts = np.count_nonzero(recv_meta[:, 2 * k].reshape(n, slots), axis=1).tolist()
        handle = Handle(self, send_token, r.send_counts, recv_counts, x.shape[0], hidden, dropped, slots=slots)
        return (recv_x.view(n * slots, hidden), torch.from_numpy(recv_meta[:, :k].astype(np.int64)),
                _weights_tensor(recv_meta[:, k:2 * k].copy(), topk_weights), handle)


def _detached(t: torch.Tensor) -> torch.Tensor:
    """t outside autograd (detach() costs half a µs; a tensor that needs no gradient is already)."""
    return t.detach() if t.requires_grad else t


def _group(group) -> Group:
    return group.group if isinstance(group, Buffer) else Group(group)


def dispatch(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, group,
             layout: Optional[Layout] = None, *, num_experts: Optional[int] = None,
             capacity_factor: Optional[float] = None, max_tokens_per_rank: Optional[int] = None, fp8: bool = False,
             dequantize: bool = False):
    """Buffer.dispatch, or with max_tokens_per_rank=M Buffer.low_latency_dispatch, on group: a
    Buffer, or an ncl communicator or torch group (then on a Buffer made for this call, which
    the handle keeps for combine)."""
    buffer = group if isinstance(group, Buffer) else Buffer(group, reuse=False)
    if max_tokens_per_rank is None:
        return buffer.dispatch(x, topk_idx, topk_weights, layout, num_experts=num_experts,
                               capacity_factor=capacity_factor, fp8=fp8, dequantize=dequantize)
    return buffer.low_latency_dispatch(x, topk_idx, topk_weights, max_tokens_per_rank,
                                       num_experts=_num_experts(num_experts, layout),
                                       capacity_factor=capacity_factor, fp8=fp8, dequantize=dequantize)


def combine(expert_out: torch.Tensor, handle: Handle) -> torch.Tensor:
    """combine (or low_latency_combine) on the Buffer the handle's dispatch ran on."""
    if handle.slots:
        return handle.buffer.low_latency_combine(expert_out, handle)
    return handle.buffer.combine(expert_out, handle)


class Grouped(NamedTuple):
    """Received rows regrouped by local expert, for grouped matrix multiplies."""
    x: torch.Tensor             # (sum(counts), H): expert 0's rows, then expert 1's, ... (padding rows zero)
    counts: list                # rows per local expert, each rounded up to expert_alignment
    real: list                  # rows per local expert before the padding
    row: torch.Tensor           # (sum(counts),): the received row each grouped row came from (-1: padding)
    weight: torch.Tensor        # (sum(counts),): its routing weight for that expert (0: padding)


def group_by_expert(recv_x: torch.Tensor, recv_idx: torch.Tensor, recv_w: torch.Tensor, num_experts: int, group,
                    *, expert_alignment: int = 1) -> Grouped:
    """One row per (received token, local expert it chose), grouped by local expert in received
    order, each expert's group padded with zero rows to a multiple of expert_alignment."""
    g = _group(group)
    per = _experts_per_rank(num_experts, g.size)
    if isinstance(expert_alignment, bool) or not isinstance(expert_alignment, int) or expert_alignment < 1:
        raise ValueError(f"expert_alignment must be a positive int, not {expert_alignment!r}")
    rows, weights, counts, real = [], [], [], []
    for e in range(g.rank * per, (g.rank + 1) * per):
        r, j = (recv_idx == e).nonzero(as_tuple=True)
        pad = -len(r) % expert_alignment
        rows.append(torch.cat([r, torch.full((pad,), -1, dtype=r.dtype)]))
        weights.append(torch.cat([recv_w[r, j], torch.zeros(pad, dtype=recv_w.dtype)]))
        counts.append(len(r) + pad)
        real.append(len(r))
    row, weight = torch.cat(rows), torch.cat(weights)
    x = torch.where((row >= 0).unsqueeze(1), recv_x[row.clamp(min=0)], torch.zeros((), dtype=recv_x.dtype))
    return Grouped(x, counts, real, row, weight)


def ungroup(expert_y: torch.Tensor, grouped: Grouped, num_rows: int) -> torch.Tensor:
    """Per received row, the weighted sum of its local experts' outputs (what combine takes)."""
    out = torch.zeros(num_rows, expert_y.shape[1], dtype=expert_y.dtype)
    keep = grouped.row >= 0
    return out.index_add(0, grouped.row[keep], expert_y[keep] * grouped.weight[keep].unsqueeze(1).to(expert_y.dtype))


__all__ = ["Buffer", "Layout", "Handle", "Route", "Grouped", "apply_capacity", "route", "get_dispatch_layout",
           "dispatch", "combine", "sum_by_token",
           "group_by_expert", "ungroup"]
