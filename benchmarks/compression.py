"""What block-scaled compressed collectives (ncl/compress.py) cost in accuracy and buy in bytes and time.

    ncl-run -n 8 python benchmarks/compression.py --out benchmarks/results/compression

Rank 0 writes accuracy.md and cost.md (and .json):
- accuracy: a compressed all_reduce over the ranks against the exact float64 sum of what they hold, per
  format: the largest and the RMS error, as shares of the largest |sum| (and RMS error over RMS sum), on
  (a) random data with outliers: normal values times a lognormal scale, one in a thousand times 100;
  (b) the partial sums of a Llama-3.1-405B-shaped row-parallel MLP down projection at TP = ranks
      (53248 -> 16384; weights N(0, 1/53248) as at initialisation, inputs SiLU(gate) * up of normal
      activations; random weights, so these are shaped like the 405B layer's, not its trained values)
      for 1 and 32 tokens.
- cost: the TP all-reduce of a 405B decode step, bf16 activations of 1 and 32 tokens (32 KiB and 1 MiB):
  bytes each rank sends (a ring all-reduce: 2 (n-1)/n x B; compressed: its all_to_all and all_gather of
  codes, (n-1)/n x the chunk codes each), the time the link model gives on pcie-gen5-8card, and the time
  measured here (median of --repeat rounds; the plain and the compressed calls alternate in each round).
The effect on a real model's logits and greedy tokens is `python -m ncl.bench.accuracy --tp 1,3 --variants
bf16,ar-fp8,ar-int8,ar-mxfp4` (SmolLM2-135M at TP 3, its all-reduces compressed).
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

import ncl
from ncl import compress
from ncl.collectives import nccl_bytes

HIDDEN, FFN = 16384, 53248     # Llama-3.1-405B (ncl/models/configs.py)


def random_partials(rank, size, count=1 << 16):
    rng = np.random.default_rng(1000 + rank)
    v = rng.standard_normal(count) * np.exp(rng.standard_normal(count))
    v[rng.random(count) < 1e-3] *= 100
    return v.astype(np.float32)


def down_projection_partials(rank, size, tokens):
    """This rank's partial sums of the MLP down projection: its FFN / size inputs times its weight columns."""
    shard = FFN // size
    rng = np.random.default_rng(2000 + rank)
    gate = rng.standard_normal((tokens, shard), dtype=np.float32)
    up = rng.standard_normal((tokens, shard), dtype=np.float32)
    h = gate / (1 + np.exp(-gate)) * up
    w = rng.standard_normal((shard, HIDDEN), dtype=np.float32) * np.float32(FFN ** -0.5)
    return (h @ w).reshape(-1)


def errors(got, exact):
    err = got.astype(np.float64) - exact
    top = np.abs(exact).max()
    return {"max_err_of_max": float(np.abs(err).max() / top), "rms_err_of_max": float(np.sqrt(np.mean(err ** 2)) / top),
            "rms_err_of_rms": float(np.sqrt(np.mean(err ** 2) / np.mean(exact ** 2)))}


def accuracy(comm):
    cases = [("random, outliers", random_partials)] + [
        (f"405B down projection, {t} token{'s' * (t > 1)}", lambda r, n, t=t: down_projection_partials(r, n, t))
        for t in (1, 32)]
    rows = []
    for label, make in cases:
        mine = make(comm.rank, comm.size)
        exact = None
        if comm.rank == 0:  # the exact sum: every rank's data again, in float64
            exact = np.sum([make(r, comm.size).astype(np.float64) for r in range(comm.size)], axis=0)
        plain = comm.all_reduce(mine.copy())
        if comm.rank == 0:
            rows.append(dict(data=label, format="none (fp32)", values=int(mine.size), **errors(plain, exact)))
        for name in compress.FORMATS:
            got = compress.all_reduce(comm, mine.copy(), name)
            if comm.rank == 0:
                rows.append(dict(data=label, format=name, values=int(mine.size), **errors(got, exact)))
    return rows


def sent_bytes(kind, nbytes, n):
    """Bytes one rank sends in a call (the bandwidth-optimal count)."""
    if kind == "all_reduce":
        return 2 * (n - 1) / n * nbytes
    return (n - 1) / n * nccl_bytes(kind, nbytes, n)


def cost(comm, repeat):
    import ml_dtypes
    from ncl.topology import load_topology
    topo = load_topology("pcie-gen5-8card")
    n = comm.size
    rows = []
    for tokens in (1, 32):
        count = tokens * HIDDEN
        x = np.random.default_rng(3000 + comm.rank).standard_normal(count).astype(ml_dtypes.bfloat16)
        variants = [("none (bf16)", [("all_reduce", count * 2)])] + [
            (name, compress.wire_calls(count, n, name)) for name in compress.FORMATS]
        times = {name: [] for name, _ in variants}
        for _ in range(repeat):
            for name, _ in variants:
                y = x.copy()
                comm.barrier()
                start = time.perf_counter()
                if name.startswith("none"):
                    comm.all_reduce(y)
                else:
                    compress.all_reduce(comm, y, name)
                times[name].append(time.perf_counter() - start)
        for name, calls in variants:
            emulated = sum(topo.predict(kind, nccl_bytes(kind, nbytes, n), n) for kind, nbytes in calls)
            rows.append(dict(tokens=tokens, bytes=count * 2, format=name,
                             sent_bytes=int(sum(sent_bytes(kind, nbytes, n) for kind, nbytes in calls)),
                             emulated_us=emulated * 1e6, measured_us=statistics.median(times[name]) * 1e6))
    return rows


def markdown(rows, columns, title, command):
    from tabulate import tabulate
    body = [[(f"{r[c]:.3g}" if isinstance(r[c], float) else r[c]) for c in columns] for r in rows]
    return f"# {title}\n\nCommand: `{command}`\n\n" + tabulate(body, headers=columns, tablefmt="github") + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for accuracy.md/.json and cost.md/.json")
    p.add_argument("--repeat", type=int, default=15, help="rounds of the timed calls (default 15)")
    args = p.parse_args()
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    comm = ncl.init()
    acc, spent = accuracy(comm), cost(comm, args.repeat)
    if comm.rank == 0:
        os.makedirs(args.out, exist_ok=True)
        command = f"ncl-run -n {comm.size} python benchmarks/compression.py --out {args.out} --repeat {args.repeat}"
        for name, rows, columns, title in (
                ("accuracy", acc, ["data", "format", "values", "max_err_of_max", "rms_err_of_max", "rms_err_of_rms"],
                 f"Compressed all_reduce on {comm.size} ranks against the exact sum"),
                ("cost", spent, ["tokens", "bytes", "format", "sent_bytes", "emulated_us", "measured_us"],
                 f"A 405B decode step's TP all-reduce on {comm.size} ranks: bytes sent per rank, the link model's "
                 "time on pcie-gen5-8card, the time measured here")):
            with open(os.path.join(args.out, name + ".json"), "w") as f:
                json.dump({"command": command, "rows": rows}, f, indent=1)
            text = markdown(rows, columns, title, command)
            with open(os.path.join(args.out, name + ".md"), "w") as f:
                f.write(text)
            sys.stdout.write(text + "\n")
    comm.close()


if __name__ == "__main__":
    main()
