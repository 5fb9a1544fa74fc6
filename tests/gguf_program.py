"""SmolLM2 from its GGUF file at TP = N against TP = 1: the program test_gguf_accuracy.py runs under
`ncl-run -n N`.  argv: OUT_DIR SPEC.json, the spec holding the GGUF path, the chat-formatted prompts,
TP 1's greedy answers to them and the end-of-turn id that ends an answer.  Every rank loads only its
shard (bf16 weights and KV cache, float32 compute, as the accuracy reference), answers each prompt
greedily with the KV cache and must produce TP 1's tokens.  Writes OUT_DIR/rank<r>.json with its
failures and tokens.
"""
import json
import os
import sys

import torch

import ncl
from ncl.bench.accuracy import NEW_TOKENS, REFERENCE, VARIANTS, greedy, load, with_cache
from ncl.models.gguf import GGUFWeights


def main():
    torch.set_num_threads(1)  # N ranks share a few cores
    out_dir, spec_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    comm = ncl.init()
    precision, kv = VARIANTS[REFERENCE]
    model = load(GGUFWeights(spec["gguf"]), comm, precision)
    generator = with_cache(model, max(len(p) for p in spec["prompts"]) + NEW_TOKENS, kv)
    tokens = greedy(generator, spec["prompts"], NEW_TOKENS, spec["eos"])
    failures = []
    for i, (got, want) in enumerate(zip(tokens, spec["reference"])):
        if got != want:
            first = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            failures.append(f"prompt {i} rank {comm.rank}/{comm.size}: greedy tokens differ from TP 1's at step "
                            f"{first}: {got[first:first + 4]} != {want[first:first + 4]}")
    with open(os.path.join(out_dir, f"rank{comm.rank}.json"), "w") as f:
        json.dump({"rank": comm.rank, "failures": failures, "tokens": tokens}, f)
    comm.close()


if __name__ == "__main__":
    main()
