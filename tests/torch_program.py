"""Every supported torch.distributed call through the "ncl" backend, checked on every rank: the
program test_torch_backend.py runs under `ncl-run -n N`.

Reductions are compared with numpy in rank order (ncl's order; gloo's ring adds in another
order, so its float sums differ in the last bits); data movement is compared with the same
call through a gloo group of the same ranks, bit for bit.  Each rank writes OUT_DIR/rank<r>.json
with its failures.
"""
import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ncl.torch  # noqa: E402,F401  (registers the backend)
from harness import as_numpy, as_torch, case_seed, mismatch, rank_data, reference_reduce  # noqa: E402

OPS = {"SUM": dist.ReduceOp.SUM, "PROD": dist.ReduceOp.PRODUCT, "MIN": dist.ReduceOp.MIN,
       "MAX": dist.ReduceOp.MAX, "AVG": dist.ReduceOp.AVG}


def data(tag, rank, shape, dtype, op=None):
    return as_torch(rank_data(case_seed(tag, dtype, op), rank, shape, dtype, op).copy())


def run(gloo):
    n, me = dist.get_world_size(), dist.get_rank()
    failures = []

    def check(label, got, want):
        want = as_numpy(want) if isinstance(want, torch.Tensor) else want
        if (bad := mismatch(f"{label} rank={me}/{n}", got, want)):
            failures.append(bad)

    def both(label, call):
        """call(group) -> tensor(s): through ncl (the default group) and through gloo, equal bits."""
        mine, theirs = call(None), call(gloo)
        for i, (a, b) in enumerate(zip(mine, theirs)):
            check(f"{label}[{i}] vs gloo", a, as_numpy(b))

    for dtype in ("float32", "bfloat16"):
        for name, op in OPS.items():
            datas = [rank_data(case_seed("ar", dtype, name), r, (37,), dtype, name) for r in range(n)]
            t = as_torch(datas[me].copy())
            dist.all_reduce(t, op=op)
            check(f"all_reduce {dtype} {name}", t, reference_reduce(datas, name))
            t = as_torch(datas[me].copy())
            work = dist.all_reduce(t, op=op, async_op=True)
            work.wait()
            check(f"all_reduce async {dtype} {name}", work.get_future().wait()[0], reference_reduce(datas, name))
            t = as_torch(datas[me].copy())
            dist.reduce(t, dst=n - 1, op=op)
            if me == n - 1:
                check(f"reduce {dtype} {name}", t, reference_reduce(datas, name))
            whole = [rank_data(case_seed("rs", dtype, name), r, (4 * n,), dtype, name) for r in range(n)]
            want = reference_reduce(whole, name)[4 * me:4 * me + 4]
            for fn in (dist.reduce_scatter_tensor, dist.reduce_scatter_single):
                out = torch.empty(4, dtype=getattr(torch, dtype))
                fn(out, as_torch(whole[me].copy()), op=op)
                check(f"{fn.__name__} {dtype} {name}", out, want)
            out = torch.empty(4, dtype=getattr(torch, dtype))
            dist.reduce_scatter(out, list(as_torch(whole[me].copy()).chunk(n)), op=op)
            check(f"reduce_scatter {dtype} {name}", out, want)
        x = data("move", me, (3, 2), dtype)
        both(f"broadcast {dtype}", lambda g: [dist.broadcast(y := x.clone(), src=n - 1, group=g) or y])
        both(f"all_gather {dtype}", lambda g: (lambda outs: dist.all_gather(outs, x, group=g) or outs)(
            [torch.empty_like(x) for _ in range(n)]))
        for fn in (dist.all_gather_into_tensor, dist.all_gather_single):
            both(f"{fn.__name__} {dtype}", lambda g: (lambda out: fn(out, x, group=g) or [out])(
                torch.empty((3 * n, 2), dtype=x.dtype)))
        both(f"all_to_all_single even {dtype}", lambda g: (lambda out: dist.all_to_all_single(
            out, data("a2a", me, (2 * n, 3), dtype), group=g) or [out])(torch.empty((2 * n, 3), dtype=x.dtype)))
        send_splits = [(me + j) % 3 for j in range(n)]           # uneven: rank i sends (i + j) % 3 rows to j
        recv_splits = [(i + me) % 3 for i in range(n)]
        rows = data("a2av", me, (sum(send_splits), 2), dtype)
        both(f"all_to_all_single uneven {dtype}", lambda g: (lambda out: dist.all_to_all_single(
            out, rows, recv_splits, send_splits, group=g) or [out])(torch.empty((sum(recv_splits), 2), dtype=x.dtype)))
        ins = [data("a2a list", me * n + j, (2,), dtype) for j in range(n)]  # gloo wants equal sizes
        both(f"all_to_all {dtype}", lambda g: (lambda outs: dist.all_to_all(outs, ins, group=g) or outs)(
            [torch.empty(2, dtype=x.dtype) for _ in range(n)]))
        both(f"gather {dtype}", lambda g: (lambda outs: dist.gather(x, outs, dst=0, group=g) or (outs or []))(
            [torch.empty_like(x) for _ in range(n)] if me == 0 else None))
        chunks = [data("scatter", r, (2,), dtype) for r in range(n)]
        both(f"scatter {dtype}", lambda g: (lambda out: dist.scatter(out, chunks if me == 0 else None, src=0,
                                                                     group=g) or [out])(torch.empty(2, dtype=x.dtype)))
    # point to point, sync and async, across the ring
    right, left = (me + 1) % n, (me - 1) % n
    t, got = data("p2p", me, (5,), "float32"), torch.empty(5)
    reqs = [dist.isend(t, right), dist.irecv(got, left)]
    for r in reqs:
        r.wait()
    check("isend/irecv ring", got, data("p2p", left, (5,), "float32"))
    if me % 2 == 0 and me + 1 < n:
        dist.send(t, me + 1)
    elif me % 2 == 1:
        dist.recv(got, me - 1)
        check("send/recv pair", got, data("p2p", me - 1, (5,), "float32"))
    dist.barrier()
    # groups: new_group of the even ranks, new_subgroups of 2 (torch's helper)
    evens = list(range(0, n, 2))
    group = dist.new_group(evens)
    if me in evens:
        t = torch.full((3,), float(me))
        dist.all_reduce(t, group=group)
        check("new_group(evens) all_reduce", t, np.full(3, float(sum(evens)), np.float32))
    if n % 2 == 0:
        sub, _ = dist.new_subgroups(2)
        t = torch.full((2,), float(me))
        dist.all_reduce(t, group=sub)
        check("new_subgroups(2) all_reduce", t, np.full(2, float(me - me % 2 + me - me % 2 + 1), np.float32))
    # functional collectives (what torch.compile'd code calls)
    y = funcol.all_reduce(torch.full((4,), float(me + 1)), "sum", dist.group.WORLD)
    check("functional all_reduce", y, np.full(4, n * (n + 1) / 2, np.float32))
    y = funcol.all_gather_tensor(torch.full((2,), float(me)), 0, dist.group.WORLD)
    check("functional all_gather_tensor", y, np.repeat(np.arange(n, dtype=np.float32), 2))
    y = funcol.reduce_scatter_tensor(torch.arange(2.0 * n), "sum", 0, dist.group.WORLD)
    check("functional reduce_scatter_tensor", y, (np.arange(2.0 * n, dtype=np.float32) * n)[2 * me:2 * me + 2])
    # unsupported: a clear error naming the call
    try:
        dist.all_reduce(torch.ones(2, dtype=torch.int32), op=dist.ReduceOp.BAND)
        failures.append(f"all_reduce BAND rank={me}: no error")
    except Exception as exc:  # noqa: BLE001 - the message is what is checked
        if "allreduce" not in str(exc) or "BAND" not in str(exc):
            failures.append(f"all_reduce BAND rank={me}: unclear error {exc!r}")
    return failures


def ddp_steps(n, me):
    """3 SGD steps of DDP on each rank's shard equal 3 steps on the union in one process."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    reference = [p.detach().clone() for p in model.parameters()]
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4 * n, 6, generator=gen), torch.randn(4 * n, 1, generator=gen)) for _ in range(3)]
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x[4 * me:4 * me + 4]), y[4 * me:4 * me + 4]).backward()
        opt.step()
    single = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    with torch.no_grad():
        for p, r in zip(single.parameters(), reference):
            p.copy_(r)
    opt1 = torch.optim.SGD(single.parameters(), lr=0.1)
    for x, y in batches:
        opt1.zero_grad()
        torch.nn.functional.mse_loss(single(x), y).backward()
        opt1.step()
    return [f"DDP parameter {i} rank={me}: max diff {float((a - b).abs().max()):.3g}"
            for i, (a, b) in enumerate(zip(model.parameters(), single.parameters()))
            if not torch.allclose(a, b, rtol=1e-5, atol=1e-6)]


def main():
    dist.init_process_group("ncl")
    n, me = dist.get_world_size(), dist.get_rank()
    gloo = dist.new_group(backend="gloo")
    failures = run(gloo) + ddp_steps(n, me)
    if dist.get_backend() != "ncl":
        failures.append(f"the default group's backend is {dist.get_backend()!r}, not 'ncl'")
    with open(os.path.join(sys.argv[1], f"rank{me}.json"), "w") as f:
        json.dump({"rank": me, "backend": dist.get_backend(), "failures": failures}, f)
    dist.barrier(group=gloo)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # as in tp_program.py: torch's gloo teardown at exit aborts now and then under load
