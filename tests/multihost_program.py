"""Every collective across emulated hosts, checked against numpy: the program that
test_multihost.py runs under `mpiexec -n N` (NCL_HOSTS=K) and `ncl-run -n N --hosts K`.

Each rank writes OUT_DIR/rank<r>.json (argv[1]): its failures, and a digest of every result
that all ranks must share bit for bit.  The reference for reductions is the hierarchical order ncl promises
(each host reduces its ranks in rank order, then the hosts are reduced in host order), so
the comparison is exact.
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ncl  # noqa: E402
from harness import DTYPES, OPS, case_seed, digest, mismatch, rank_data, reference_reduce  # noqa: E402

_WIDE = {"float16": np.float32, "bfloat16": np.float32, "float32": np.float64, "float64": np.float64,
         "float8_e4m3fn": np.float32, "float8_e5m2": np.float32}


def hier_reduce(datas, op, members):
    """The reduction as ranks grouped into hosts compute it: within each host in rank order,
    then across hosts in host order; AVG sums in a wider type and divides once."""
    dt = datas[0].dtype
    if len(members) == 1:  # one host: the flat shared-memory communicator
        return reference_reduce(datas, op)
    if op != "AVG":
        return reference_reduce([reference_reduce([datas[r] for r in m], op) for m in members], op)
    wide = np.int64 if dt.kind in "iu" else _WIDE[dt.name]
    total = reference_reduce([reference_reduce([datas[r].astype(wide) for r in m], "SUM") for m in members], "SUM")
    n = len(datas)
    if dt.kind in "iu":
        return np.where(total < 0, -(np.abs(total) // n), np.abs(total) // n).astype(dt)
    return (total / n).astype(dt)


class Checks:
    def __init__(self, comm, members, tag):
        self.comm, self.members, self.tag = comm, members, tag
        self.failures, self.digests = [], {}

    def check(self, label, got, want, shared=False):
        label = f"{self.tag} {label}"
        if (bad := mismatch(f"{label} rank={self.comm.rank}/{self.comm.size}", got, want)):
            self.failures.append(bad)
        if shared:
            self.digests[label] = digest(got)


def run_all(comm, members, tag, dtypes=tuple(DTYPES), counts=(1, 7, 1001)):
    """Every collective on `comm`, whose ranks sit on hosts `members` (lists of comm ranks)."""
    c = Checks(comm, members, tag)
    n, me = comm.size, comm.rank
    for dtype in dtypes:
        for op in OPS:
            for count in counts:
                datas = [rank_data(case_seed(tag, dtype, op, count), r, (count,), dtype, op) for r in range(n)]
                x = datas[me].copy()
                comm.all_reduce(x, op=getattr(ncl, op))
                c.check(f"all_reduce {dtype} {op} {count}", x, hier_reduce(datas, op, members), shared=True)
            datas = [rank_data(case_seed(tag, "rs", dtype, op), r, (3 * n, 2), dtype, op) for r in range(n)]
            c.check(f"reduce_scatter {dtype} {op}", comm.reduce_scatter(datas[me], op=getattr(ncl, op)),
                    hier_reduce(datas, op, members)[3 * me:3 * me + 3])
            root = n - 1
            out = comm.reduce(datas[me].copy(), root=root, op=getattr(ncl, op))
            if me == root:
                c.check(f"reduce {dtype} {op} root={root}", out, hier_reduce(datas, op, members))
        datas = [rank_data(case_seed(tag, "move", dtype), r, (5, 3), dtype) for r in range(n)]
        c.check(f"all_gather {dtype}", comm.all_gather(datas[me]), np.concatenate(datas), shared=True)
        for root in sorted({0, n - 1}):
            x = datas[me].copy()
            comm.broadcast(x, root=root)
            c.check(f"broadcast {dtype} root={root}", x, datas[root], shared=True)
            got = comm.gather(datas[me], root=root)
            if me == root:
                c.check(f"gather {dtype} root={root}", got, np.concatenate(datas))
            big = [rank_data(case_seed(tag, "scatter", dtype), r, (2 * n, 3), dtype) for r in range(n)]
            c.check(f"scatter {dtype} root={root}", comm.scatter(big[me], root=root), big[root][2 * me:2 * me + 2])
        blocks = [rank_data(case_seed(tag, "a2a", dtype), r, (3 * n, 2), dtype) for r in range(n)]
        c.check(f"all_to_all {dtype}", comm.all_to_all(blocks[me]),
                np.concatenate([b[3 * me:3 * me + 3] for b in blocks]))
        rng = np.random.default_rng(case_seed(tag, "a2av", dtype))
        counts_matrix = rng.integers(0, 4, (n, n))
        rows = [rank_data(case_seed(tag, "a2av rows", dtype), r, (int(counts_matrix[r].sum()), 2), dtype)
                for r in range(n)]
        starts = [np.concatenate([[0], np.cumsum(counts_matrix[r])]) for r in range(n)]
        want = np.concatenate([rows[r][starts[r][me]:starts[r][me + 1]] for r in range(n)])
        c.check(f"all_to_allv {dtype}", comm.all_to_allv(rows[me], counts_matrix[me].tolist()), want)
        c.check(f"all_to_allv {dtype} recv_counts", comm.all_to_allv(rows[me], counts_matrix[me].tolist(),
                                                                    counts_matrix[:, me].tolist()), want)
    ring = rank_data(case_seed(tag, "ring"), me, (11,), "float32")
    got = np.empty_like(ring)
    right, left = (me + 1) % n, (me - 1) % n
    if n > 1:
        if me % 2 == 0:
            comm.send(ring, right)
            comm.recv(got, left)
        else:
            comm.recv(got, left)
            comm.send(ring, right)
        c.check("send/recv ring", got, rank_data(case_seed(tag, "ring"), left, (11,), "float32"))
    comm.barrier()
    return c


def main():
    comm = ncl.init()
    n, me = comm.size, comm.rank
    hosts = int(os.environ.get("NCL_HOSTS", "1"))
    per = n // hosts
    members = [list(range(h * per, (h + 1) * per)) for h in range(hosts)]
    results = [run_all(comm, members, "world")]
    # sub-communicators: one that spans hosts (every other rank), one inside each host
    odd_even = comm.split(me % 2)
    sub_members = [[i for i, r in enumerate(range(me % 2, n, 2)) if r in m] for m in members]
    results.append(run_all(odd_even, [m for m in sub_members if m], f"split(rank%2) color={me % 2}",
                           dtypes=("float32", "bfloat16", "int32"), counts=(5,)))
    per_host = comm.split(me // per)
    results.append(run_all(per_host, [list(range(per))], f"split(host) color={me // per}",
                           dtypes=("float32", "int64"), counts=(5,)))
    if hosts > 1:  # from_mpi on an mpi4py communicator the program made itself
        from mpi4py import MPI
        reversed_world = ncl.Communicator.from_mpi(MPI.COMM_WORLD.Split(0, n - 1 - me))
        rev_members = [sorted(n - 1 - r for r in m) for m in reversed(members)]
        results.append(run_all(reversed_world, rev_members, "from_mpi(reversed ranks)", dtypes=("float64",),
                               counts=(9,)))
    try:
        import torch
        t = torch.arange(6, dtype=torch.bfloat16) * (me + 1)
        comm.all_reduce(t)
        want = sum(np.arange(6, dtype=np.float32) * (r + 1) for r in range(n))
        if not torch.equal(t, torch.tensor(want, dtype=torch.bfloat16)):
            results[0].failures.append(f"torch bfloat16 all_reduce rank={me}: {t.tolist()} != {want.tolist()}")
    except ImportError:
        pass
    with open(os.path.join(sys.argv[1], f"rank{me}.json"), "w") as f:
        json.dump({"rank": me, "size": n, "type": type(comm).__name__,
                   "failures": [f for r in results for f in r.failures],
                   "digests": {k: v for r in results for k, v in r.digests.items()}}, f)
    comm.close()


if __name__ == "__main__":
    main()
