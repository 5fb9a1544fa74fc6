"""Mixture-of-experts expert parallelism: dispatch tokens to the ranks holding their chosen
experts, combine the weighted expert outputs back (DeepEP's conventions), over all_to_allv.

Experts are split over ranks in contiguous blocks: rank r holds experts r*E/N ... (r+1)*E/N - 1.
A token goes once to each rank that holds at least one of its top-k experts (not once per
expert); the receiver gets the token's row, its top-k expert ids (global ids; -1 where that
expert lives on another rank) and routing weights.  After the local experts ran, each received
row holds the sum of its local experts' outputs, each already multiplied by its routing weight;
combine() sends the rows back and sums them on the token's rank in rank order, so the result
does not depend on timing.  dispatch and combine are each other's backward, so MoE layers train.

    layout = get_dispatch_layout(topk_idx, num_experts, comm)
    recv_x, recv_idx, recv_w, handle = dispatch(x, topk_idx, topk_weights, comm, layout)
    y = combine(expert_out, handle)
"""
import weakref
from typing import NamedTuple, Optional

import numpy as np
import torch

from . import buffers, scratch
from ._native import check, ffi, lib
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
    group: Group
    send_token: torch.Tensor   # (S,) the token of each sent row, grouped by destination rank
    send_counts: list          # rows sent to each rank
    recv_counts: list          # rows received from each rank
    num_tokens: int
    hidden: int
    dropped: int = 0           # top-k choices dropped by the capacity factor on this rank
    recv_x: Optional[torch.Tensor] = None  # what dispatch returned (combine keeps the autograd graph whole)
    slots: int = 0             # low-latency mode: rows reserved per rank pair (max_tokens_per_rank); 0: normal
    rank_matrix: Optional[np.ndarray] = None  # (N, N) rows rank i sent rank j in dispatch, when known


def _experts_per_rank(num_experts: int, group: Group) -> int:
    if num_experts % group.size:
        raise ValueError(f"num_experts ({num_experts}) must divide by the number of ranks ({group.size})")
    return num_experts // group.size


def _check_routing(topk_idx: torch.Tensor, num_experts: int) -> np.ndarray:
    """topk_idx checked, as an int64 numpy array (the routing bookkeeping runs in numpy: a few µs
    where the same torch ops cost tens of µs)."""
    if topk_idx.dim() != 2 or topk_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_idx must be an int tensor of shape (tokens, k), not {topk_idx.dtype} "
                         f"{tuple(topk_idx.shape)}")
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


def _route(is_in: np.ndarray):
    """(token, dest, send_counts): one row per (token, rank it goes to), grouped by rank, tokens in order."""
    dest, token = np.nonzero(is_in)
    return token, dest, np.count_nonzero(is_in, axis=1).tolist()


def _local_ids(idx: np.ndarray, token: np.ndarray, dest: np.ndarray, per: int) -> np.ndarray:
    """The top-k ids of the sent rows: kept where the row's rank holds the expert, else -1
    (-1 // per is -1, never a rank)."""
    ids = idx[token]
    return np.where(ids // per == dest[:, None], ids, -1)


def get_dispatch_layout(topk_idx: torch.Tensor, num_experts: int, group) -> Layout:
    """Tokens per rank and per expert, which ranks each token goes to, and (one exchange of
    N counts) how many tokens each rank will receive from every other."""
    group = Group(group)
    per = _experts_per_rank(num_experts, group)
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
SEND_BUFFER_MIN_BYTES = 64 << 10   # from here up the rows are gathered into the registered send buffer


class _Buffers(NamedTuple):
    send: scratch.SendBuffer
    outputs: scratch.OutputPool
    back: scratch.OutputPool  # combine's received rows, dropped before combine returns


_BUFFERS = weakref.WeakKeyDictionary()  # ncl communicator -> its _Buffers (None across hosts)


def _buffers(group: Group) -> Optional[_Buffers]:
    """The reused buffers of an ncl group's normal-mode exchanges (None over torch groups, and
    across hosts, where the shared-memory send buffer would not reach the other hosts)."""
    if not group.is_ncl:
        return None
    found = _BUFFERS.get(group.group, False)
    if found is False:
        from .hierarchical import HierarchicalCommunicator
        found = None if isinstance(group.group, HierarchicalCommunicator) else \
            _Buffers(scratch.SendBuffer(group.group), scratch.OutputPool(), scratch.OutputPool(1))
        _BUFFERS[group.group] = found
    return found


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


def _dispatch(x, topk_idx, topk_weights, group: Group, num_experts: int, layout: Optional[Layout]):
    per, k = num_experts // group.size, topk_idx.shape[1]
    idx = topk_idx.detach().numpy().astype(np.int64, copy=False)  # checked by dispatch()
    if layout is None:
        token, dest, send_counts = _route(_is_in(idx, per, group.size))
        recv_counts, matrix = _exchange_counts(group, np.asarray(send_counts))
    else:
        token, dest, send_counts = _route(layout.is_token_in_rank.t().numpy())
        recv_counts, matrix = layout.num_recv_per_rank.tolist(), layout.rank_matrix
    send_token = torch.from_numpy(token)
    largest_rows = max(map(sum, matrix.tolist())) if matrix is not None else None  # of any sender
    largest = largest_rows * x.shape[1] * x.element_size() if matrix is not None else None
    if group.is_ncl and largest is not None and largest < PACKED_MAX_BYTES:
        recv_x, recv_idx, recv_w = _exchange_packed(group, x, idx, topk_weights, token, dest, per,
                                                    send_counts, recv_counts, matrix)
    else:
        buffers = _buffers(group)
        if buffers is not None and largest is not None and largest >= SEND_BUFFER_MIN_BYTES:
            # gathered where peers read them in place (one copy); the output's memory reused
            rows = buffers.send.rows(len(token), x.shape[1], x.dtype, largest_rows)
            torch.index_select(x.detach(), 0, send_token, out=rows)
            recv_x = _all_to_allv(group, rows, send_counts, recv_counts, buffers.outputs, matrix)
        else:
            recv_x = _all_to_allv(group, x.detach().index_select(0, send_token), send_counts, recv_counts,
                                  buffers.outputs if buffers is not None else None, matrix)
        meta = np.empty((len(token), 2 * k))  # ids are exact in float64: one exchange for ids and weights
        meta[:, :k] = _local_ids(idx, token, dest, per)
        meta[:, k:] = _weights_array(topk_weights)[token]
        recv_meta = _all_to_allv(group, torch.from_numpy(meta), send_counts, recv_counts, matrix=matrix)
        recv_idx = recv_meta[:, :k].long()
        recv_w = recv_meta[:, k:].to(topk_weights.dtype)
    handle = Handle(group, send_token, send_counts, recv_counts, x.shape[0], x.shape[1], rank_matrix=matrix)
    return recv_x, recv_idx, recv_w, handle


def _exchange_packed(group: Group, x, idx, topk_weights, token, dest, per: int, send_counts, recv_counts, matrix):
    """Small dispatches: each row travels with its ids and weights in one exchange of byte rows
    [x row | k ids | k weights (float64)], one exchange (and at 8 ranks on 2 CPUs, a scheduling
    round of every rank) fewer than sending them apart."""
    k, hb = idx.shape[1], x.shape[1] * x.element_size()
    packed = np.empty((len(token), hb + 16 * k), np.uint8)
    packed[:, :hb] = x.detach().contiguous().view(torch.uint8).numpy()[token]
    meta = packed[:, hb:].view(np.float64)  # [rows, 2k]
    meta[:, :k] = _local_ids(idx, token, dest, per)
    meta[:, k:] = _weights_array(topk_weights)[token]
    got = group.group.all_to_allv(packed, send_counts, recv_counts, all_counts=matrix)
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


def _sum_by_token(back: torch.Tensor, handle: Handle, pool: Optional[scratch.OutputPool] = None) -> torch.Tensor:
    """The rows each rank returned, summed per token in rank order, so every run adds in the
    same order (in the C core: each row read once, each token written once; 16-bit floats
    add in float32 and round once, as ncl's all_reduce).  Rank r's rows start at the running
    count, or at r * slots in the low-latency mode."""
    shape = (handle.num_tokens, handle.hidden)
    y = pool.empty(shape, back.dtype) if pool is not None else torch.empty(shape, dtype=back.dtype)
    code = buffers.torch_dtype_code(back.dtype)
    n = len(handle.send_counts)
    index = np.full((handle.num_tokens, n), -1, dtype=np.int64)  # [token, rank]: its row from that rank
    rank = np.repeat(np.arange(n), handle.send_counts)  # the rank each sent row went to
    row = np.arange(len(rank))
    if handle.slots:  # rank r's rows start at r * slots
        row = row + rank * handle.slots - np.repeat(np.cumsum([0] + handle.send_counts[:-1]), handle.send_counts)
    index[handle.send_token.numpy(), rank] = row
    if code is None:  # a dtype the core has no kernel for: the same sum, in torch
        y.zero_()
        for r in range(n):
            has = np.flatnonzero(index[:, r] >= 0)
            y[has] += back[index[has, r]]
        return y
    back = back.contiguous()
    check(lib.ncl_sum_rows(ffi.cast("void *", y.data_ptr()), ffi.cast("const void *", back.data_ptr()),
                           back.shape[0], ffi.from_buffer("int64_t[]", index), handle.num_tokens, n,
                           handle.hidden, code))
    return y


def _combine(expert_out: torch.Tensor, handle: Handle) -> torch.Tensor:
    """Rows back to their tokens' ranks, summed per token in rank order."""
    buffers = _buffers(handle.group)
    matrix = None if handle.rank_matrix is None else handle.rank_matrix.T  # the rows go back the way they came
    if buffers is None:
        back = _all_to_allv(handle.group, expert_out, handle.recv_counts, handle.send_counts, matrix=matrix)
        return _sum_by_token(back, handle)
    back = _all_to_allv(handle.group, expert_out, handle.recv_counts, handle.send_counts, buffers.back, matrix)
    return _sum_by_token(back, handle, buffers.outputs)


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_idx, topk_weights, group, num_experts, layout):
        recv_x, recv_idx, recv_w, handle = _dispatch(x, topk_idx, topk_weights, group, num_experts, layout)
        ctx.handle = handle
        ctx.mark_non_differentiable(recv_idx)
        return recv_x, recv_idx, recv_w, handle

    @staticmethod
    def backward(ctx, grad_x, grad_idx, grad_w, grad_handle):
        # each copy of a token was a read of x: the gradients of the copies add up (a combine)
        grad = None if grad_x is None else _combine(grad_x.contiguous(), ctx.handle)
        return grad, None, None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, expert_out, handle):
        ctx.handle = handle
        return _combine(expert_out, handle)

    @staticmethod
    def backward(ctx, grad_y):
        h = ctx.handle  # each received row contributed once to its token: send the token's gradient back
        return _all_to_allv(h.group, grad_y.contiguous()[h.send_token], h.send_counts, h.recv_counts), None


_REGISTERED = weakref.WeakKeyDictionary()  # ncl communicator -> {(shape, dtype): (send, recv) registered tensors}


def _fixed_buffers(group: Group, shape: tuple, dtype: torch.dtype):
    """(send, recv) of a fixed-size exchange: over an ncl communicator, registered tensors that
    peers read in place, allocated once per shape (collective: every rank reaches its first
    exchange of a shape together); over a torch group, new tensors."""
    if not group.is_ncl:
        return torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
    buffers = _REGISTERED.setdefault(group.group, {})
    key = (tuple(shape), dtype)
    if key not in buffers:
        buffers[key] = tuple(group.group.empty(shape, dtype, like="torch") for _ in range(2))
    return buffers[key]


def _fixed_exchange(group: Group, send: torch.Tensor, recv: torch.Tensor) -> torch.Tensor:
    """All-to-all of equal blocks, one per rank: no counts travel first."""
    if group.is_ncl:
        return group.group.all_to_all(send, out=recv)
    import torch.distributed as dist
    dist.all_to_all_single(recv, send, group=group.group)
    return recv


def _dispatch_low_latency(x, topk_idx, topk_weights, group: Group, num_experts: int, slots: int):
    """Every rank sends every rank exactly `slots` rows (the first ones real, a flag says which),
    so nothing is exchanged before the data: one fixed-size exchange for the rows, one for their
    ids, weights and flags, written straight into the registered send buffers."""
    n, per, k = group.size, num_experts // group.size, topk_idx.shape[1]
    if x.shape[0] > slots:
        raise ValueError(f"{x.shape[0]} tokens exceed max_tokens_per_rank={slots}")
    idx = topk_idx.detach().numpy().astype(np.int64, copy=False)
    token, dest, send_counts = _route(_is_in(idx, per, n))
    starts = np.repeat(np.cumsum([0] + send_counts[:-1]), send_counts)
    at = dest * slots + np.arange(len(token)) - starts  # block of the destination, its next free slot
    rows, recv_rows = _fixed_buffers(group, (n * slots, x.shape[1]), x.dtype)
    meta, recv_meta = _fixed_buffers(group, (n * slots, 2 * k + 1), torch.float64)
    rows.zero_()
    send_token = torch.from_numpy(token)
    rows.index_copy_(0, torch.from_numpy(at), x.index_select(0, send_token))
    m = meta.numpy()
    m[:, :k], m[:, k:] = -1, 0
    m[at, :k] = _local_ids(idx, token, dest, per)
    m[at, k:2 * k] = topk_weights.double().numpy()[token]
    m[at, 2 * k] = 1.0
    recv_x = _fixed_exchange(group, rows, recv_rows).clone()
    got = _fixed_exchange(group, meta, recv_meta)
    recv_counts = got[:, 2 * k].view(n, slots).sum(1).long().tolist()
    handle = Handle(group, send_token, send_counts, recv_counts, x.shape[0], x.shape[1], slots=slots)
    return recv_x, got[:, :k].long(), got[:, k:2 * k].to(topk_weights.dtype), handle


def _combine_low_latency(expert_out: torch.Tensor, handle: Handle) -> torch.Tensor:
    send, recv = _fixed_buffers(handle.group, tuple(expert_out.shape), expert_out.dtype)
    send.copy_(expert_out)
    return _sum_by_token(_fixed_exchange(handle.group, send, recv), handle)  # block r: rank r's rows, first real


def dispatch(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, group,
             layout: Optional[Layout] = None, *, num_experts: Optional[int] = None,
             capacity_factor: Optional[float] = None, max_tokens_per_rank: Optional[int] = None):
    """(recv_x, recv_topk_idx, recv_topk_weights, handle): the tokens this rank's experts must
    process, grouped by source rank (token order within each), with their top-k global expert
    ids (-1 where the expert is on another rank) and weights.  Collective over the group.
    The routing weights are not differentiated through (as DeepEP's dispatch).
    capacity_factor: drop the choices beyond each expert's capacity (apply_capacity) first;
    handle.dropped says how many; a layout passed in must then come from the kept choices.
    max_tokens_per_rank=M: the low-latency mode for decode (inference, no autograd): no count
    exchange, fixed buffers of M rows per rank pair (registered memory over an ncl
    communicator); recv_x then has N*M rows, block s from rank s, its first
    handle.recv_counts[s] real and the rest zero with recv_topk_idx -1."""
    group = Group(group)
    if num_experts is None:
        if layout is None:
            raise ValueError("dispatch needs num_experts, or the layout get_dispatch_layout made")
        num_experts = len(layout.num_tokens_per_expert)
    if x.dim() != 2:
        raise ValueError(f"x must be (tokens, hidden), not {tuple(x.shape)}")
    _experts_per_rank(num_experts, group)
    _check_routing(topk_idx, num_experts)
    if topk_weights.shape != topk_idx.shape or topk_idx.shape[0] != x.shape[0]:
        raise ValueError(f"topk_idx {tuple(topk_idx.shape)} and topk_weights {tuple(topk_weights.shape)} must both "
                         f"be (tokens, k) with tokens = x.shape[0] = {x.shape[0]}")
    dropped = 0
    if capacity_factor is not None:
        topk_idx, dropped = apply_capacity(topk_idx, num_experts, capacity_factor)
    if max_tokens_per_rank is not None:
        if isinstance(max_tokens_per_rank, bool) or not isinstance(max_tokens_per_rank, int) or max_tokens_per_rank < 1:
            raise ValueError(f"max_tokens_per_rank must be a positive int, not {max_tokens_per_rank!r}")
        with torch.no_grad():
            recv_x, recv_idx, recv_w, handle = _dispatch_low_latency(x, topk_idx, topk_weights, group, num_experts,
                                                                     max_tokens_per_rank)
        return recv_x, recv_idx, recv_w, handle._replace(dropped=dropped)
    if not (torch.is_grad_enabled() and x.requires_grad):  # inference: no autograd node (saves ~20 µs)
        recv_x, recv_idx, recv_w, handle = _dispatch(x, topk_idx, topk_weights, group, num_experts, layout)
    else:
        recv_x, recv_idx, recv_w, handle = _Dispatch.apply(x, topk_idx, topk_weights.detach(), group, num_experts,
                                                           layout)
    return recv_x, recv_idx, recv_w, handle._replace(recv_x=recv_x, dropped=dropped)


def combine(expert_out: torch.Tensor, handle: Handle) -> torch.Tensor:
    """y (tokens, hidden) on each token's own rank: the sum, in rank order, of the rows the
    ranks holding its experts send back (each the weighted sum of that rank's experts)."""
    if handle.slots:
        rows = handle.group.size * handle.slots
        if expert_out.dim() != 2 or expert_out.shape[0] != rows:
            raise ValueError(f"expert_out must have the {rows} rows dispatch returned, not {tuple(expert_out.shape)}")
        with torch.no_grad():
            return _combine_low_latency(expert_out, handle)
    if expert_out.dim() != 2 or expert_out.shape[0] != sum(handle.recv_counts):
        raise ValueError(f"expert_out must have one row per received token ({sum(handle.recv_counts)}), not "
                         f"{tuple(expert_out.shape)}")
    recv_x = handle.recv_x
    if torch.is_grad_enabled() and recv_x is not None and recv_x.requires_grad and not expert_out.requires_grad:
        # no local expert touched the rows (this rank received nothing for them): the backward
        # must still run here, since its exchanges are collective; an empty sum keeps the graph
        expert_out = expert_out + recv_x[:0].sum()
    if not (torch.is_grad_enabled() and expert_out.requires_grad):
        return _combine(expert_out, handle)
    return _Combine.apply(expert_out, handle)


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
    g = Group(group)
    per = _experts_per_rank(num_experts, g)
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


__all__ = ["Layout", "Handle", "Grouped", "apply_capacity", "get_dispatch_layout", "dispatch", "combine",
           "group_by_expert", "ungroup"]
