"""Tensor-parallel Llama against the single-process model: the program test_llama.py runs under
`ncl-run -n N`.  Every rank builds the TP = 1 model in-process (group None) and the TP = N model
over the world communicator from the same seed, so both are the same full model.  The tiny config
(2 layers here: the collectives of 8 ranks on a small host dominate the time) has 2 KV heads, so
N = 4 and 8 replicate them.  Checked for a batch of 1 (4 new tokens) and of 3 (32 new tokens):
the prefill logits, the greedy tokens (prefill + decode with the KV cache), and the logits of the
whole generated sequence recomputed in one pass.  With a checkpoint directory (argv[2]), the
TP = N model loaded from it must give the logits of the in-memory model built from the same tensors
(argv[3]: the seed they were made with).  Writes OUT_DIR/rank<r>.json.
"""
import json
import os
import sys

import torch

import ncl
from ncl.models import Generator, Llama, get_config
from ncl.models.llama import weight_shapes
from ncl.models.weights import RandomWeights, TensorWeights

TOL = dict(rtol=1e-4, atol=1e-5)
STEPS = 32


def prompts(batch, length, seed):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def close(failures, label, got, want):
    if not torch.allclose(got, want, **TOL):
        failures.append(f"{label}: max diff {float((got - want).abs().max()):.3g}")


def check_generation(failures, cfg, comm, ref, par, longest=STEPS):
    """Prefill logits, greedy tokens and whole-sequence logits of the TP = N model against TP = 1 (also run
    by exaone_program.py)."""
    me = f"rank {comm.rank}/{comm.size}"
    ref_gen, par_gen = (Generator(m, max_batch=3, max_seq=7 + longest) for m in (ref, par))
    for batch, length, steps in ((1, 5, 4), (3, 7, longest)):  # every step costs 2 * layers + 2 collectives
        tokens = prompts(batch, length, seed=batch)
        close(failures, f"prefill logits batch={batch} {me}", par(tokens), ref(tokens))
        want, got = ref_gen.generate(tokens, steps), par_gen.generate(tokens, steps)
        if not torch.equal(got, want):
            failures.append(f"greedy tokens batch={batch} {me}: {got.tolist()} != {want.tolist()}")
        whole = torch.cat([tokens, want[:, :-1]], dim=1)  # the whole sequence at once (cache rewritten from 0)
        logits = par(whole, 0)
        close(failures, f"whole-sequence logits batch={batch} {me}", logits, ref(whole, 0))
        if not torch.equal(logits[:, length - 1:].argmax(-1), want):
            failures.append(f"whole-sequence argmax differs from cached decoding batch={batch} {me}")


def check_checkpoint(failures, cfg, comm, path, seed):
    source = RandomWeights(seed, std=0.05)
    tensors = {n: source.get(n, s, mean=1.0 if n.endswith("norm.weight") else 0.0)
               for n, s in weight_shapes(cfg).items()}
    memory = Llama(cfg, None, checkpoint=TensorWeights(tensors))
    loaded = Llama(None, comm, checkpoint=path)
    tokens = prompts(2, 6, seed=11)
    close(failures, f"checkpoint logits rank {comm.rank}/{comm.size}", loaded(tokens), memory(tokens))


def check_405b_layer(comm):
    """One full-width Llama-3.1-405B layer in bf16 over 4 tokens: TP = N against TP = 1.  The TP = N
    shards are freed before rank 0 alone builds the whole layer (6.4 GB), so the host holds one layer
    at a time; the report carries the errors, the time and the peak memory of each rank."""
    import gc
    import resource
    import time

    from ncl.models.layers import rope_frequencies
    from ncl.models.llama import TransformerBlock
    cfg = get_config("llama-3.1-405b", n_layers=1)
    x = (torch.randn(1, 4, cfg.dim, generator=torch.Generator().manual_seed(5))).to(torch.bfloat16)
    positions = torch.arange(4)
    cos, sin = rope_frequencies(cfg.head_dim, 4, cfg.rope_theta, cfg.rope_scaling)
    t0 = time.perf_counter()
    block = TransformerBlock(cfg, 0, comm, dtype=torch.bfloat16, seed=1)
    built = time.perf_counter() - t0
    with torch.inference_mode():
        got = block(x, positions, cos, sin, 0).float()
    del block
    gc.collect()
    comm.barrier()
    report = {"built_s": round(built, 1), "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}
    failures = []
    if comm.rank == 0:
        block = TransformerBlock(cfg, 0, None, dtype=torch.bfloat16, seed=1)
        with torch.inference_mode():
            want = block(x, positions, cos, sin, 0).float()
        del block
        err = (got - want).abs()
        scale = want.abs().max()
        report.update(max_abs_err=float(err.max()), max_abs_out=float(scale), rms_out=float(want.pow(2).mean().sqrt()),
                      max_rel_err=float(err.max() / scale), mean_abs_err=float(err.mean()),
                      peak_rss_gb_with_tp1=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)
        if not torch.allclose(got, want, rtol=2e-2, atol=2e-2 * float(scale)):
            failures.append(f"405B layer TP={comm.size} vs TP=1: max abs err {float(err.max()):.3g} "
                            f"(output max {float(scale):.3g})")
    comm.barrier()
    return failures, report


def main():
    torch.set_num_threads(1)  # N ranks share a few cores: torch's own threads would fight them
    comm = ncl.init()
    if sys.argv[2:3] == ["405b-layer"]:
        failures, report = check_405b_layer(comm)
        with open(os.path.join(sys.argv[1], f"rank{comm.rank}.json"), "w") as f:
            json.dump({"rank": comm.rank, "failures": failures, **report}, f)
        comm.close()
        return
    failures = []
    cfg = get_config("llama-tiny", n_layers=2)  # 2 KV heads: replicated at TP 4 and 8
    ref, par = Llama(cfg, None, seed=3), Llama(cfg, comm, seed=3)
    with torch.inference_mode():
        check_generation(failures, cfg, comm, ref, par)
        if len(sys.argv) > 2:
            check_checkpoint(failures, cfg, comm, sys.argv[2], int(sys.argv[3]))
    with open(os.path.join(sys.argv[1], f"rank{comm.rank}.json"), "w") as f:
        json.dump({"rank": comm.rank, "failures": failures}, f)
    comm.close()


if __name__ == "__main__":
    main()
