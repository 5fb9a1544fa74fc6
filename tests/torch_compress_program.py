"""The torch backend's compressed groups (ncl.torch.Options(compress=...), ncl.torch.set_compress),
checked on every rank: the program test_torch_backend.py runs under `ncl-run -n N`.

Each compressed torch call is compared bit for bit with the same data through an ncl
communicator's own `compress=` call (a second, exact group of the same ranks), and the all_reduce
with float64 within the bound of tests/test_compress.py; async_op=True gives the same bits; what
stays exact (int64, MAX, the object collectives, a group switched back) equals the exact group's
result.  Each rank writes OUT_DIR/rank<r>.json with its failures.
"""
import json
import os
import sys
import warnings

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ncl.torch  # noqa: E402
from harness import as_numpy, as_torch  # noqa: E402
from ncl import compress  # noqa: E402
from test_compress import _all_reduce_bound, _data  # noqa: E402

COUNT = 1000  # not a multiple of a block nor of the group size: padding on every path
BF16_ROUNDING = 2.0 ** -8  # the last rounding into bfloat16, relative


def run(me, n):
    failures = []

    def same(label, got, want):
        got, want = as_numpy(got), as_numpy(want)
        if got.dtype != want.dtype or got.shape != want.shape or got.tobytes() != want.tobytes():
            failures.append(f"{label} rank={me}/{n}: differs from ncl's own (max diff "
                            f"{np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))):.3g})")

    exact = dist.new_group(backend="ncl")  # the same ranks, uncompressed: ncl's own compress= calls
    comm = exact.comm
    datas = [_data(7, r, COUNT) for r in range(n)]
    for name in sorted(compress.FORMATS):
        ncl.torch.set_compress(None, name)
        for dtype in (torch.float32, torch.bfloat16):
            label = f"{name} {str(dtype)[6:]}"
            for op, ncl_op in ((dist.ReduceOp.SUM, ncl.SUM), (dist.ReduceOp.AVG, ncl.AVG)):
                x = as_torch(datas[me]).to(dtype)
                t = x.clone()
                dist.all_reduce(t, op=op)
                want = comm.all_reduce(x.clone(), ncl_op, compress=name)
                same(f"all_reduce {label} {op}", t, want)
                t = x.clone()
                work = dist.all_reduce(t, op=op, async_op=True)
                work.wait()
                same(f"all_reduce async {label} {op}", work.get_future().wait()[0], want)
                ref, bound = _all_reduce_bound([as_numpy(as_torch(d).to(dtype)).astype(np.float32) for d in datas],
                                               name, avg=op == dist.ReduceOp.AVG)
                if dtype == torch.bfloat16:
                    bound = bound + BF16_ROUNDING * (np.abs(ref) + bound)
                if (bad := np.abs(as_numpy(t).astype(np.float64) - ref) > bound).any():
                    i = int(np.argmax(bad))
                    failures.append(f"all_reduce {label} {op} rank={me}: element {i} {float(t[i])} vs float64 "
                                    f"{ref[i]}, bound {bound[i]}")
            rows = as_torch(datas[me][:COUNT // n * n]).to(dtype).reshape(n, -1)
            for fn in (dist.reduce_scatter_single, dist.reduce_scatter_tensor):
                out = torch.empty(rows.shape[1], dtype=dtype)
                fn(out, rows)
                same(f"{fn.__name__} {label}", out, comm.reduce_scatter(rows.clone(), compress=name).reshape(-1))
            for fn in (dist.all_gather_single, dist.all_gather_into_tensor):
                out = torch.empty((n, 37), dtype=dtype)
                fn(out, x[:37])
                same(f"{fn.__name__} {label}", out.reshape(-1), comm.all_gather(x[:37].clone(), compress=name))
            out = torch.empty_like(rows)
            dist.all_to_all_single(out, rows)
            same(f"all_to_all_single {label}", out, comm.all_to_all(rows.clone(), compress=name))
    # what stays exact on a compressed group
    ints = torch.arange(10, dtype=torch.int64) * (me + 1)
    dist.all_reduce(ints)
    same("int64 all_reduce", ints, torch.arange(10, dtype=torch.int64) * (n * (n + 1) // 2))
    t, want = as_torch(datas[me].copy()), as_torch(datas[me].copy())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    dist.all_reduce(want, op=dist.ReduceOp.MAX, group=exact)
    same("MAX all_reduce", t, want)
    objects = [None] * n
    dist.all_gather_object(objects, {"rank": me})
    if objects != [{"rank": r} for r in range(n)]:
        failures.append(f"all_gather_object rank={me}: {objects}")
    ncl.torch.set_compress(None, None)
    t, want = as_torch(datas[me].copy()), as_torch(datas[me].copy())
    dist.all_reduce(t)
    dist.all_reduce(want, group=exact)
    same("all_reduce after set_compress(None)", t, want)
    # bad input: clear errors before any rank communicates
    for bad, kind in ((lambda: ncl.torch.Options("fp6"), ValueError),
                      (lambda: ncl.torch.set_compress(None, "e4m3"), ValueError),
                      (lambda: dist.new_group(backend="ncl", pg_options={"compress": "fp8"}), TypeError)):
        try:
            bad()
            failures.append(f"rank={me}: no {kind.__name__}")
        except kind:
            pass
    # new_group with pg_options
    group = dist.new_group(backend="ncl", pg_options=ncl.torch.Options(compress="int8"))
    t = as_torch(datas[me].copy())
    dist.all_reduce(t, group=group)
    same("new_group(pg_options=int8) all_reduce", t, comm.all_reduce(as_torch(datas[me].copy()), compress="int8"))
    return failures


def main():
    warnings.filterwarnings("ignore", category=FutureWarning)  # the *_tensor names torch 2.13 deprecates
    dist.init_process_group("ncl", pg_options=ncl.torch.Options(compress="mxfp4"))
    n, me = dist.get_world_size(), dist.get_rank()
    failures = []
    if dist.distributed_c10d._get_default_group().options.compress != "mxfp4":
        failures.append("init_process_group's pg_options did not reach the group")
    failures += run(me, n)
    with open(os.path.join(sys.argv[1], f"rank{me}.json"), "w") as f:
        json.dump({"rank": me, "failures": failures}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
