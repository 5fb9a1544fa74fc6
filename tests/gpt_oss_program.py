"""The sharded gpt-oss against the single-process model: the program test_gpt_oss.py runs under
`ncl-run -n N`.  Every rank builds the reference model alone (group=None, same seed, float32) and
the sharded one for several (tp, ep) splits; for this rank's batch (the same on the ranks of a TP
group, different for each data-parallel group) it compares the logits of a prompt longer than the
sliding window, and 32 greedy tokens generated with the KV cache.  With a checkpoint directory as
second argument it also loads that checkpoint sharded (tp = ep = N) and compares it with the
in-memory model.  Writes OUT_DIR/rank<r>.json.

    python -m ncl.run -n 4 python tests/gpt_oss_program.py OUT_DIR [CHECKPOINT_DIR]
"""
import json
import os
import sys
from dataclasses import replace

import torch

import ncl
from ncl.models.generate import Generator
from ncl.models.gpt_oss import GPT_OSS_CONFIGS, GptOss

CFG = GPT_OSS_CONFIGS["gpt-oss-tiny"]
SEED, STD = 3, 0.2           # a larger init than the real 0.02, so that attention and routing are peaked
PROMPT, STEPS, BATCH = 11, 32, 2   # prompt longer than the sliding window (4 positions)
TOL = dict(rtol=1e-4, atol=1e-4)
torch.set_num_threads(1)


def splits(n):
    """(tp, ep) pairs to check on n ranks: attention TP and data parallel with the experts spread over
    all ranks; on 2 and 4 ranks also experts not spread (ep 1) or over part of the world (replicated
    across the EP groups), and two TP groups of n/2 ranks, data parallel between them."""
    pairs = [(n, n), (1, n)]
    if n == 2:
        pairs.append((2, 1))
    if n == 4:
        pairs += [(4, 2), (2, 4)]
    return pairs


def prompts(dp_index):
    """This data-parallel group's prompts [BATCH, PROMPT]: distinct for every group."""
    g = torch.Generator().manual_seed(1000 + dp_index)
    return torch.randint(0, CFG.vocab_size, (BATCH, PROMPT), generator=g)


def greedy(model, tokens):
    return Generator(model, max_batch=BATCH, max_seq=PROMPT + STEPS).generate(tokens, STEPS)


def compare(label, got, want, failures):
    if got.shape != want.shape or not torch.allclose(got, want, **TOL):
        diff = f"shape {tuple(got.shape)} vs {tuple(want.shape)}" if got.shape != want.shape else \
            f"max diff {float((got - want).abs().max()):.3g}"
        failures.append(f"{label}: {diff}")


class Reference:
    """The single-process model's logits and greedy tokens for a data-parallel group's prompts."""

    def __init__(self):
        self.model = GptOss(CFG, dtype=torch.float32, seed=SEED, init_std=STD)
        self.results = {}

    def __call__(self, dp_index):
        if dp_index not in self.results:
            tokens = prompts(dp_index)
            self.results[dp_index] = (tokens, self.model(tokens, 0), greedy(self.model, tokens))
        return self.results[dp_index]


def check_split(comm, reference, tp, ep, failures, checkpoint=None):
    label = f"rank {comm.rank}/{comm.size} tp={tp} ep={ep}" + (" checkpoint" if checkpoint else "")
    tokens, logits, want = reference(comm.rank // tp)
    model = GptOss(CFG, comm, tp=tp, ep=ep, dtype=torch.float32, seed=SEED, init_std=STD, checkpoint=checkpoint)
    compare(f"{label} logits", model(tokens, 0), logits, failures)
    got = greedy(model, tokens)
    if not torch.equal(got, want):
        first = int((got != want).any(0).nonzero()[0])
        failures.append(f"{label}: greedy tokens differ from step {first}: {got.tolist()} vs {want.tolist()}")


def check_errors(comm, failures):
    """Splits the config cannot take are ValueErrors, raised before any rank communicates."""
    bad = [(CFG, dict(tp=3 if comm.size % 3 else 5)), (replace(CFG, n_heads=6, n_kv_heads=2), dict(tp=4)),
           (replace(CFG, n_experts=6), dict(ep=4)), (CFG, dict(tp=0))]
    for cfg, kwargs in bad:
        try:
            GptOss(cfg, comm, dtype=torch.float32, **kwargs)
            failures.append(f"rank {comm.rank}: GptOss({kwargs}) on {comm.size} ranks did not raise")
        except ValueError:
            pass


def main():
    comm = ncl.init()
    failures = []
    if comm.size == 4:
        check_errors(comm, failures)
    reference = Reference()
    for tp, ep in splits(comm.size):
        check_split(comm, reference, tp, ep, failures)
    if len(sys.argv) > 2:
        check_split(comm, reference, comm.size, comm.size, failures, checkpoint=sys.argv[2])
    with open(os.path.join(sys.argv[1], f"rank{comm.rank}.json"), "w") as f:
        json.dump({"rank": comm.rank, "failures": failures}, f)
    comm.barrier()
    comm.close()


if __name__ == "__main__":
    main()
