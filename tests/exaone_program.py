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
from llama_program import check_generation  # the same checks as Llama's (this folder is on sys.path)
from ncl.models import Exaone, get_config

STEPS = 12  # every step costs 2 * layers + 2 collectives; 8 ranks share a couple of cores


def main():
    torch.set_num_threads(1)  # N ranks share a few cores: torch's own threads would fight them
    comm = ncl.init()
    cfg = get_config("exaone-tiny")
    ref, par = Exaone(cfg, None, seed=5), Exaone(cfg, comm, seed=5)
    failures = []
    with torch.inference_mode():
        check_generation(failures, cfg, comm, ref, par, longest=STEPS)
    with open(os.path.join(sys.argv[1], f"rank{comm.rank}.json"), "w") as f:
        json.dump({"rank": comm.rank, "failures": failures}, f)
    comm.close()


if __name__ == "__main__":
    main()
