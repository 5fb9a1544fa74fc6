"""Tensor-parallel EXAONE against the single-process model: the program test_exaone.py runs under
`ncl-run -n N`.  Every rank builds the TP = 1 model in-process (group None) and the TP = N model
over the world communicator from the same seed: the same full model.  exaone-tiny has 2 KV heads
(replicated at N = 4 and 8) and a window of 4 positions, so the sequences here (up to 7 + 12
positions) run well past it.  Checked for a batch of 1 and of 3: the prefill logits, the greedy
tokens (prefill + decode with the KV cache) and the logits of the whole generated sequence in one
pass.  Writes OUT_DIR/rank<r>.json.
"""
import json
import os
import sys

import torch

import ncl
from ncl.models import Exaone, Generator, get_config

TOL = dict(rtol=1e-4, atol=1e-5)
STEPS = 12  # every step costs 2 * layers + 2 collectives; 8 ranks share a couple of cores


def close(failures, label, got, want):
    if not torch.allclose(got, want, **TOL):
        failures.append(f"{label}: max diff {float((got - want).abs().max()):.3g}")


def check(failures, comm, ref, par):
    me = f"rank {comm.rank}/{comm.size}"
    ref_gen, par_gen = (Generator(m, max_batch=3, max_seq=7 + STEPS) for m in (ref, par))
    for batch, length, steps in ((1, 5, 4), (3, 7, STEPS)):
        tokens = torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(batch))
        close(failures, f"prefill logits batch={batch} {me}", par(tokens), ref(tokens))
        want, got = ref_gen.generate(tokens, steps), par_gen.generate(tokens, steps)
        if not torch.equal(got, want):
            failures.append(f"greedy tokens batch={batch} {me}: {got.tolist()} != {want.tolist()}")
        whole = torch.cat([tokens, want[:, :-1]], dim=1)  # the whole sequence at once (cache rewritten from 0)
        logits = par(whole, 0)
        close(failures, f"whole-sequence logits batch={batch} {me}", logits, ref(whole, 0))
        if not torch.equal(logits[:, length - 1:].argmax(-1), want):
            failures.append(f"whole-sequence argmax differs from cached decoding batch={batch} {me}")


def main():
    torch.set_num_threads(1)  # N ranks share a few cores: torch's own threads would fight them
    comm = ncl.init()
    cfg = get_config("exaone-tiny")
    ref, par = Exaone(cfg, None, seed=5), Exaone(cfg, comm, seed=5)
    failures = []
    with torch.inference_mode():
        check(failures, comm, ref, par)
    with open(os.path.join(sys.argv[1], f"rank{comm.rank}.json"), "w") as f:
        json.dump({"rank": comm.rank, "failures": failures}, f)
    comm.close()


if __name__ == "__main__":
    main()
