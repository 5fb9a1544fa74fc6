"""Tensor-parallel layers against the single-process model: the program test_tensor_parallel.py
runs under `ncl-run -n N`.  Every rank builds the same full model (same seed), computes the
reference forward and backward alone, then the tensor-parallel version from the full weights,
with an ncl communicator and with a torch (gloo) process group, and compares the output and
every parameter's gradient with this rank's shard of the reference.  Writes OUT_DIR/rank<r>.json.
"""
import json
import math
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import ncl
from ncl.torch import tp

TOL = dict(rtol=1e-5, atol=1e-5)


class Attention(nn.Module):
    """Causal multi-head self-attention, heads of size hidden / heads."""

    def __init__(self, hidden=16, heads=4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden) for _ in range(4))

    def attend(self, x, q, k, v, heads):
        s, d = x.shape[0], q.shape[-1] // heads
        q, k, v = (t.view(s, heads, d).transpose(0, 1) for t in (q, k, v))      # (heads, s, d)
        scores = q @ k.transpose(1, 2) / math.sqrt(d)
        scores = scores.masked_fill(torch.triu(torch.ones(s, s, dtype=torch.bool), 1), float("-inf"))
        return (scores.softmax(-1) @ v).transpose(0, 1).reshape(s, heads * d)   # (s, heads*d)

    def forward(self, x):
        return self.o(self.attend(x, self.q(x), self.k(x), self.v(x), self.heads))


def mlp():
    return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))


class Checker:
    def __init__(self, rank, size):
        self.rank, self.size, self.failures = rank, size, []

    def close(self, label, got, want):
        if got is None or not torch.allclose(got, want, **TOL):
            diff = "missing" if got is None else f"max diff {float((got - want).abs().max()):.3g}"
            self.failures.append(f"{label} rank={self.rank}/{self.size}: {diff}")


def reference(model, x, w_out):
    x = x.clone().requires_grad_()
    y = model(x)
    (y * w_out).sum().backward()
    return y.detach(), x.grad


def run(kind, group, c):
    g = tp.Group(group)
    r, n = g.rank, g.size
    torch.manual_seed(0)
    full, x, w_out = mlp(), torch.randn(8, 8), torch.randn(8, 8)  # 8 rows: split 2 or 4 ways
    y_ref, gx_ref = reference(full, x, w_out)
    # MLP: column then row
    col, row = tp.ColumnParallelLinear.from_full(full[0], group), tp.RowParallelLinear.from_full(full[2], group)
    xt = x.clone().requires_grad_()
    y = row(F.gelu(col(xt)))
    (y * w_out).sum().backward()
    c.close(f"{kind} mlp output", y.detach(), y_ref)
    c.close(f"{kind} mlp input grad", xt.grad, gx_ref)
    c.close(f"{kind} mlp column weight grad", col.weight.grad, full[0].weight.grad.chunk(n, 0)[r])
    c.close(f"{kind} mlp column bias grad", col.bias.grad, full[0].bias.grad.chunk(n, 0)[r])
    c.close(f"{kind} mlp row weight grad", row.weight.grad, full[2].weight.grad.chunk(n, 1)[r])
    c.close(f"{kind} mlp row bias grad", row.bias.grad, full[2].bias.grad)
    # sequence parallel: x split along the sequence, gathered by the column layer, reduce-scattered by the row
    col_sp = tp.ColumnParallelLinear.from_full(full[0], group, sequence_parallel=True)
    row_sp = tp.RowParallelLinear.from_full(full[2], group, sequence_parallel=True)
    xs = x.chunk(n, 0)[r].clone().requires_grad_()
    ys = row_sp(F.gelu(col_sp(xs)))
    (ys * w_out.chunk(n, 0)[r]).sum().backward()
    c.close(f"{kind} sequence-parallel output", ys.detach(), y_ref.chunk(n, 0)[r])
    c.close(f"{kind} sequence-parallel input grad", xs.grad, gx_ref.chunk(n, 0)[r])
    c.close(f"{kind} sequence-parallel column weight grad", col_sp.weight.grad, full[0].weight.grad.chunk(n, 0)[r])
    c.close(f"{kind} sequence-parallel row weight grad", row_sp.weight.grad, full[2].weight.grad.chunk(n, 1)[r])
    c.close(f"{kind} sequence-parallel row bias grad (summed over ranks)", g.all_reduce(row_sp.bias.grad.clone()),
            full[2].bias.grad)
    # attention: heads split over ranks (q, k, v column-parallel, o row-parallel)
    torch.manual_seed(1)
    attn, x, w_out = Attention(), torch.randn(5, 16), torch.randn(5, 16)
    y_ref, gx_ref = reference(attn, x, w_out)
    q, k, v = (tp.ColumnParallelLinear.from_full(m, group) for m in (attn.q, attn.k, attn.v))
    o = tp.RowParallelLinear.from_full(attn.o, group)
    xt = x.clone().requires_grad_()
    y = o(attn.attend(xt, q(xt), k(xt), v(xt), attn.heads // n))
    (y * w_out).sum().backward()
    c.close(f"{kind} attention output", y.detach(), y_ref)
    c.close(f"{kind} attention input grad", xt.grad, gx_ref)
    for name, layer, dim in (("q", q, 0), ("k", k, 0), ("v", v, 0), ("o", o, 1)):
        c.close(f"{kind} attention {name} weight grad", layer.weight.grad,
                getattr(attn, name).weight.grad.chunk(n, dim)[r])
    # vocabulary-parallel embedding and LM head
    torch.manual_seed(2)
    emb, ids = nn.Embedding(12, 8), torch.randint(0, 12, (3, 5))
    pemb = tp.VocabParallelEmbedding.from_full(emb, group)
    c.close(f"{kind} embedding", pemb(ids), emb(ids).detach())
    hidden = torch.randn(7, 8)
    head = tp.ParallelLMHead.from_full(emb, group)
    logits = hidden @ emb.weight.detach().T
    c.close(f"{kind} lm head logits", head(hidden).detach(), logits)
    if not torch.equal(head.argmax(hidden), logits.argmax(-1)):
        c.failures.append(f"{kind} lm head argmax rank={r}: {head.argmax(hidden).tolist()} != "
                          f"{logits.argmax(-1).tolist()}")
    # parallelize() on a whole model, by plan
    torch.manual_seed(3)
    model, x = mlp(), torch.randn(4, 8)
    want = model(x).detach()
    tp.parallelize(model, {"0": "colwise", "2": "rowwise"}, group)
    c.close(f"{kind} parallelize(mlp)", model(x).detach(), want)


def main():
    dist.init_process_group("gloo")
    comm = ncl.init()
    c = Checker(comm.rank, comm.size)
    run("ncl", comm, c)
    run("torch", dist.group.WORLD, c)
    with open(os.path.join(sys.argv[1], f"rank{comm.rank}.json"), "w") as f:
        json.dump({"rank": comm.rank, "failures": c.failures}, f)
    comm.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # torch 2.13's gloo teardown at interpreter exit aborts now and then under load ("terminate
    # called without an active exception", after the results are written and the group is
    # destroyed); skip the C++ static destructors, nothing of ours is left to release.
    sys.stdout.flush()
    os._exit(0)
