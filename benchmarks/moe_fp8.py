"""What ncl.moe's fp8 dispatch (DeepEP's convention: e4m3 codes, a float32 scale per 128 values of a row)
costs in accuracy and saves in bytes, for a round trip: dispatch, experts, combine in bfloat16.

    ncl-run -n 8 python benchmarks/moe_fp8.py --out benchmarks/results/moe_fp8.md

Each rank routes its tokens (gpt-oss-120b's shape: hidden 2880, 128 experts, top-4, softmax over the
chosen four) holding random rows with outliers (normal values times a lognormal scale, one in a thousand
times 100), in bfloat16.  Every expert is the identity, so combine must give each token its row times its
total weight (1): the round trip's error is the wire's and the roundings'.  Errors against the exact
float64 result, as compress.py's benchmark states them: the largest error as a share of the largest
|exact| value, and RMS error over RMS exact value, per row and over all rows of all ranks; for fp8 rows
received dequantized to bfloat16, and for plain bfloat16 rows (the roundings alone).
"""
import argparse
import sys

import numpy as np
import torch

import ncl
from ncl import compress, moe

HIDDEN, EXPERTS, TOP_K = 2880, 128, 4


def tokens_of(rank: int, tokens: int):
    g = torch.Generator().manual_seed(4242 + rank)
    x = torch.randn(tokens, HIDDEN, generator=g) * torch.exp(torch.randn(tokens, HIDDEN, generator=g))
    x[torch.rand(tokens, HIDDEN, generator=g) < 1e-3] *= 100
    top, idx = torch.randn(tokens, EXPERTS, generator=g).topk(TOP_K, dim=-1)
    return x.to(torch.bfloat16), idx, top.softmax(-1)


def round_trip(buffer, x, idx, w, **wire):
    recv_x, recv_idx, recv_w, handle = buffer.dispatch(x, idx, w, num_experts=EXPERTS, **wire)
    local = (recv_w * (recv_idx >= 0)).sum(1, keepdim=True)  # identity experts, weighted
    return buffer.combine((recv_x.float() * local).to(torch.bfloat16), handle)


def errors(y: torch.Tensor, exact: np.ndarray):
    err = y.double().numpy() - exact
    return np.abs(err).max(axis=1), np.abs(exact).max(axis=1), (err ** 2).sum(axis=1), (exact ** 2).sum(axis=1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=128, help="tokens per rank")
    p.add_argument("--out", help="write the table (markdown) here (rank 0)")
    args = p.parse_args()
    with ncl.init() as comm, moe.Buffer(comm) as buffer, torch.no_grad():
        x, idx, w = tokens_of(comm.rank, args.tokens)
        exact = x.double().numpy() * w.double().sum(1, keepdim=True).numpy()
        rows = []
        for name, wire in (("fp8 (e4m3, scale per 128)", dict(fp8=True, dequantize=True)), ("bfloat16", {})):
            parts = [comm.all_gather(np.ascontiguousarray(a)) for a in errors(round_trip(buffer, x, idx, w, **wire),
                                                                                exact)]
            err_max, ref_max, err_sq, ref_sq = parts
            per_row = err_max / ref_max
            row_bytes = compress.fp8_row_bytes(HIDDEN) if wire else HIDDEN * 2
            rows.append((name, row_bytes, err_max.max() / ref_max.max(), np.sqrt(err_sq.sum() / ref_sq.sum()),
                         per_row.max(), np.median(per_row)))
    if comm.rank == 0:
        lines = [f"# MoE round trip (dispatch, identity experts, combine in bfloat16), {comm.size} ranks x "
                 f"{args.tokens} tokens, hidden {HIDDEN}, {EXPERTS} experts, top-{TOP_K}; random rows with outliers",
                 "", f"command: ncl-run -n {comm.size} python {' '.join(sys.argv)}", "",
                 "| rows sent as | bytes a row | max error / largest exact | RMS error / RMS exact "
                 "| worst row (max/max) | median row (max/max) |", "|---|---|---|---|---|---|"]
        lines += [f"| {n} | {b} | {m:.2e} | {r:.2e} | {wr:.2e} | {mr:.2e} |" for n, b, m, r, wr, mr in rows]
        text = "\n".join(lines) + "\n"
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
