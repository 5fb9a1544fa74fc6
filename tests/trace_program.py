"""The calls a sharded model really makes: the program test_predict.py runs under `ncl-run -n N`.
Builds MODEL (a tiny config) over the world with TP and EP, prefills a batch in one chunk and decodes
a few steps, and writes each rank's flight record of that generation, every communicator's calls
merged in the order they began: OUT_DIR/rank<r>.json {"rank", "failures", "calls": [[kind, bytes,
group size], ...], "routing": [[rows sent, most rows any EP rank sent, rows received] per MoE layer
call]}.
argv: OUT_DIR MODEL TP EP BATCH PROMPT STEPS."""
import json
import os
import sys
import time

import torch

import ncl
from ncl.bench.worker import _communicators as communicators  # every ncl communicator the model holds
from ncl.models import Generator, build_model, get_config


def main():
    out, name, tp, ep, batch, prompt, steps = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:8])
    comm = ncl.init()
    cfg = get_config(name)
    moe = hasattr(cfg, "n_experts")
    model = build_model(cfg, comm, tp=tp, ep=ep if moe else None, dtype=torch.bfloat16, seed=3)
    groups = comm.size // tp if moe else 1  # a MoE rank runs its data-parallel group's share of the batch
    mine = batch // groups
    tokens = torch.randint(0, cfg.vocab_size, (mine, prompt), generator=torch.Generator().manual_seed(comm.rank // tp))
    routing = []  # per MoE layer call, in order: (rows sent, the most any EP rank sends, rows received)
    for module in model.modules():
        if getattr(module, "ep_buffer", None) is not None and hasattr(module, "routing"):
            ep_rank = module.ep_buffer.group.rank
            module.register_forward_hook(lambda m, *_, r=ep_rank: routing.append(
                (int(m.routing[r].sum()), int(m.routing.sum(axis=1).max()), int(m.routing[:, r].sum()))))
    with torch.inference_mode():
        gen = Generator(model, max_batch=mine, max_seq=prompt + steps + 1, chunk_tokens=1 << 20)
        comm.barrier()
        start = time.clock_gettime(time.CLOCK_MONOTONIC)
        nxt = gen.prefill(tokens)
        for _ in range(steps):
            nxt = gen.decode(nxt)
    calls = [(e["begin_s"], e["collective"], e["bytes"], c.size) for c in communicators(model, comm)
             for e in c.flight_record() if e["begin_s"] >= start]
    with open(os.path.join(out, f"rank{comm.rank}.json"), "w") as f:
        json.dump({"rank": comm.rank, "failures": [], "calls": [c[1:] for c in sorted(calls)], "routing": routing}, f)
    comm.close()


if __name__ == "__main__":
    main()
