"""MoE dispatch/combine against the dense single-process layer: the program test_moe.py runs
under `ncl-run -n N`.  Every rank generates every rank's tokens (seeded), so it can compute the
dense reference of the whole batch: each token through its top-k experts, weighted.  Checked:
this rank's output, the gradient of its tokens, and the gradient of its local experts' weights
(which sees every rank's tokens), for each routing.  Writes OUT_DIR/rank<r>.json.
"""
import json
import math
import os
import sys
import zlib

import torch

import ncl
from ncl import moe

E, H, K = 8, 6, 2
TOL = dict(rtol=1e-5, atol=1e-6)


def tokens_of(rank):
    return 3 + rank  # ranks hold different numbers of tokens


def routing(kind, rank, n):
    """(x, topk_idx, topk_weights) of `rank` for a routing kind."""
    g = torch.Generator().manual_seed(100 * rank + zlib.crc32(kind.encode()) % 97)  # not hash(): salted per process
    t = tokens_of(rank)
    x = torch.randn(t, H, generator=g)
    logits = torch.randn(t, E, generator=g)
    if kind == "zipf":  # skewed: low expert ids much more likely
        logits = logits - 3.0 * torch.log(torch.arange(1, E + 1, dtype=torch.float32))
    if kind == "one expert":
        logits = torch.zeros(t, E)
        logits[:, 0], logits[:, 1] = 10.0, 5.0
    if kind == "last rank receives nothing":  # every token to experts outside the last rank's block
        logits[:, E - E // n:] = -1e9
    top, idx = logits.topk(K, dim=-1)
    return x, idx, top.softmax(-1)  # softmax over the chosen k (gpt-oss style)


def experts():
    g = torch.Generator().manual_seed(7)
    return [torch.randn(H, H, generator=g, requires_grad=True) for _ in range(E)]


def run_expert(w, x):
    return torch.tanh(x @ w)


def dense(xs, idxs, ws, weights):
    """Every token through its experts, weighted: the reference of every rank's batch."""
    out = []
    for x, idx, w in zip(xs, idxs, ws):
        y = torch.zeros_like(x)
        for j in range(K):
            for e in range(E):
                chosen = idx[:, j] == e
                if chosen.any():
                    y = y.index_add(0, chosen.nonzero()[:, 0], w[chosen, j:j + 1] * run_expert(weights[e], x[chosen]))
        out.append(y)
    return out


def drop_beyond_capacity(idx, factor):
    """The reference dropping rule, written independently: walk the tokens in order, each
    expert accepts until it holds ceil(factor * tokens * K / E) choices."""
    capacity = math.ceil(factor * idx.shape[0] * K / E)
    held, kept, dropped = [0] * E, idx.clone(), 0
    for t in range(idx.shape[0]):
        for j in range(K):
            e = int(idx[t, j])
            if held[e] >= capacity:
                kept[t, j], dropped = -1, dropped + 1
            else:
                held[e] += 1
    return kept, dropped


def local_experts(recv_x, recv_idx, recv_w, weights, me, per):
    """Each received row: the weighted sum of this rank's experts among its top-k."""
    out = torch.zeros_like(recv_x)
    for j in range(K):
        for e in range(me * per, (me + 1) * per):
            chosen = recv_idx[:, j] == e
            if chosen.any():
                out = out.index_add(0, chosen.nonzero()[:, 0], recv_w[chosen, j:j + 1] * run_expert(weights[e],
                                                                                                   recv_x[chosen]))
    return out


def check(comm, buffer, kind, failures, capacity=None):
    """The layer through the functional API on `buffer` (a moe.Buffer passed as the group)."""
    n, me = comm.size, comm.rank
    per = E // n
    data = [routing(kind, r, n) for r in range(n)]
    if capacity is not None:  # the reference drops by its own rule; dispatch must drop the same
        kept = [drop_beyond_capacity(d[1], capacity) for d in data]
        reference_data = [(d[0], k[0], d[2]) for d, k in zip(data, kept)]
        kind = f"{kind}, capacity {capacity}"
    else:
        kept, reference_data = None, data
    grads_out = [torch.randn(tokens_of(r), H, generator=torch.Generator().manual_seed(r)) for r in range(n)]
    # the reference, over every rank's tokens
    ref_weights = experts()
    xs = [d[0].clone().requires_grad_() for d in data]
    ys = dense(xs, [d[1] for d in reference_data], [d[2] for d in reference_data], ref_weights)
    sum((y * g).sum() for y, g in zip(ys, grads_out)).backward()
    # expert parallel: this rank's tokens, its experts only
    weights = experts()
    x = data[me][0].clone().requires_grad_()
    if capacity is None:
        layout = moe.get_dispatch_layout(data[me][1], E, buffer)
        recv_x, recv_idx, recv_w, handle = moe.dispatch(x, data[me][1], data[me][2], buffer, layout)
    else:
        recv_x, recv_idx, recv_w, handle = moe.dispatch(x, data[me][1], data[me][2], buffer, num_experts=E,
                                                        capacity_factor=capacity)
        layout = moe.get_dispatch_layout(kept[me][0], E, buffer)
        if handle.dropped != kept[me][1]:
            failures.append(f"{kind}: rank {me} dropped {handle.dropped}, the reference {kept[me][1]}")
    y = moe.combine(local_experts(recv_x, recv_idx, recv_w, weights, me, per), handle)
    (y * grads_out[me]).sum().backward()

    def close(label, got, want):
        if got is None and want is None:
            return
        if got is None or want is None or not torch.allclose(got, want, **TOL):
            diff = "missing" if got is None or want is None else f"max diff {float((got - want).abs().max()):.3g}"
            failures.append(f"{kind}: {label} rank={me}/{n}: {diff}")
    close("output", y.detach(), ys[me].detach())
    close("token gradient", x.grad, xs[me].grad)
    for e in range(me * per, (me + 1) * per):
        close(f"expert {e} weight gradient", weights[e].grad, ref_weights[e].grad)
    if capacity is None:  # the experts run grouped (aligned to 4 rows): the same outputs
        with torch.no_grad():
            grouped = moe.group_by_expert(recv_x, recv_idx, recv_w, E, buffer, expert_alignment=4)
            parts, at = [], 0
            for i, count in enumerate(grouped.counts):
                parts.append(run_expert(weights[me * per + i], grouped.x[at:at + count]))
                at += count
            expert_y = torch.cat(parts) if parts else grouped.x
            if any(c % 4 for c in grouped.counts) or grouped.real != [int((recv_idx == e).sum())
                                                                       for e in range(me * per, (me + 1) * per)]:
                failures.append(f"{kind}: grouped counts {grouped.counts} / {grouped.real} (rank {me})")
            close("grouped experts", moe.ungroup(expert_y, grouped, recv_x.shape[0]),
                  local_experts(recv_x, recv_idx, recv_w, weights, me, per).detach())
    if capacity is None:  # the low-latency mode: fixed slots, no count exchange, forward only
        slots = tokens_of(n - 1)
        with torch.no_grad():
            lx, lidx, lw, lh = moe.dispatch(data[me][0], data[me][1], data[me][2], buffer, num_experts=E,
                                            max_tokens_per_rank=slots)
            close("low-latency output", moe.combine(local_experts(lx, lidx, lw, weights, me, per), lh),
                  ys[me].detach())
        padding = torch.ones(n * slots, dtype=torch.bool)
        for s, count in enumerate(lh.recv_counts):
            padding[s * slots:s * slots + count] = False
        if lh.recv_counts != layout.num_recv_per_rank.tolist() or (lidx[padding] != -1).any():
            failures.append(f"{kind}: low-latency counts {lh.recv_counts} != {layout.num_recv_per_rank.tolist()} "
                            f"or padding rows carry experts (rank {me})")
    if kind == "last rank receives nothing" and me == n - 1 and recv_x.shape[0] != 0:
        failures.append(f"{kind}: the last rank received {recv_x.shape[0]} tokens")
    sent = layout.num_tokens_per_rank.sum().item()
    routed = reference_data[me][1]
    want_sent = int(sum(((routed >= 0) & (routed // per == r)).any(1).sum() for r in range(n)))
    if sent != want_sent:  # once per rank holding an expert, not once per expert
        failures.append(f"{kind}: rank {me} sent {sent} rows, want {want_sent}")


def main():
    comm = ncl.init()
    failures = []
    from ncl import scratch
    # ways dispatch moves rows: these tiny batches take one step of the core (ncl/moe_step.py) unless
    # told otherwise; with it off, apart and staged, and apart from the registered send buffer with
    # pooled outputs (the packed exchange is reached by test_moe's small-staging case)
    for path, packed_max, send_buffer_min, pool_min in (("one step", None, None, None), ("apart", 0, 1 << 40, None),
                                                        ("registered", 0, 0, 0)):
        saved = moe.ONE_STEP, moe.PACKED_MAX_BYTES, moe.SEND_BUFFER_MIN_BYTES, scratch.POOL_MIN_BYTES
        moe.ONE_STEP = packed_max is None  # the other paths only with the one step off
        moe.PACKED_MAX_BYTES = saved[1] if packed_max is None else packed_max
        moe.SEND_BUFFER_MIN_BYTES = saved[2] if send_buffer_min is None else send_buffer_min
        scratch.POOL_MIN_BYTES = saved[3] if pool_min is None else pool_min
        mine = []
        with moe.Buffer(comm) as buffer:  # the memory every path reuses (registered where it pays)
            for kind in ("uniform", "zipf", "one expert", "last rank receives nothing"):
                check(comm, buffer, kind, mine)
            for kind, factor in (("zipf", 1.0), ("one expert", 1.5), ("uniform", 0.5)):
                check(comm, buffer, kind, mine, capacity=factor)
        failures += [f"[{path}] {f}" for f in mine]
        moe.ONE_STEP, moe.PACKED_MAX_BYTES, moe.SEND_BUFFER_MIN_BYTES, scratch.POOL_MIN_BYTES = saved
    with open(os.path.join(sys.argv[1], f"rank{comm.rank}.json"), "w") as f:
        json.dump({"rank": comm.rank, "failures": failures}, f)
    comm.close()


if __name__ == "__main__":
    main()
