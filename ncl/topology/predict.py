"""Inference at full scale, predicted from the step costs of inference.Server: no process runs.

Two kinds of point:
  static batch     `batch` requests of input_len prompt tokens arrive together; the prefill runs in chunks
                   of at most CHUNK_TOKENS tokens over the batch (each chunk attends to the cache the earlier
                   ones filled); the first token of every request comes at its end (TTFT), then output_len - 1
                   decode steps (TPOT: their mean; the context grows by one each step).
                   output tok/s = batch x output_len / (TTFT + (output_len - 1) x TPOT).
  max throughput   continuous batching at steady state, as serving stacks run an offline benchmark: B requests
                   are running, each step decodes one token for each and prefills the prompts of those that
                   replace the finished ones in the same step (chunked prefill).  In steady state the step's
                   prefill tokens are B x input_len / (output_len - 1), and the running contexts are spread
                   evenly over input_len .. input_len + output_len.  B is the largest that fits the KV cache
                   under the stack's admission rule (ADMISSION), the token budget and MAX_SEQS.
"""
import math
from typing import Dict

import numpy as np

from .inference import Keys, Server

# token budget of one engine step and the running-request cap: vLLM's V1 defaults for online serving
# (max_num_batched_tokens 8192, max_num_seqs 1024 on data-centre GPUs; vllm/engine/arg_utils.py)
CHUNK_TOKENS = 8192
MAX_SEQS = 1024

# KV positions a running request holds, by the serving stack's admission rule, as a function of (input_len,
# output_len).  on_demand: vLLM allocates pages as a sequence grows and preempts when the cache is full, so
# the running requests hold their mean context (vllm/v1/core/sched/scheduler.py).  full_request:
# TensorRT-LLM's default capacity policy GUARANTEED_NO_EVICT admits a request only when its prompt plus
# its whole output fit, so each holds input_len + output_len
# (https://nvidia.github.io/TensorRT-LLM/performance/performance-tuning-guide/useful-runtime-flags.html).
ADMISSION = {
    "on_demand": lambda input_len, output_len: input_len + output_len / 2,
    "full_request": lambda input_len, output_len: input_len + output_len,
}


def _parts(cost, weight=1.0) -> Dict[str, float]:
    w = np.asarray(weight, dtype=np.float64)
    return {"compute": float(np.sum(cost.compute * w)), "memory": float(np.sum(cost.memory * w)),
            "fixed": float(np.sum(cost.overhead * w)), "comm": float(np.sum(np.broadcast_to(cost.comm, np.shape(w))
                                                                             * w)),
            "seconds": float(np.sum(cost.seconds * w))}


def prefill_chunks(batch: int, input_len: int, chunk_tokens: int = CHUNK_TOKENS):
    """(tokens, sequences, new [chunk, piece], cached [chunk, piece], repeat) of the prefill of `batch`
    prompts of input_len tokens in chunks of at most chunk_tokens: short prompts packed whole into
    chunks, long ones cut into pieces (one sequence per chunk, the chunks repeated for each)."""
    if input_len >= chunk_tokens:
        starts = np.arange(0, input_len, chunk_tokens)
        new = np.minimum(chunk_tokens, input_len - starts)
        return new, 1, new[:, None], starts[:, None], batch
    per = max(1, chunk_tokens // input_len)
    counts = [per] * (batch // per) + ([batch % per] if batch % per else [])
    full = np.full((len(counts), per), float(input_len))
    mask = np.arange(per)[None, :] < np.asarray(counts)[:, None]
    return np.asarray(counts) * input_len, np.asarray(counts), full * mask, np.zeros_like(full), 1


def prefill(server: Server, batch: int, input_len: int, chunk_tokens: int = CHUNK_TOKENS) -> Dict[str, float]:
    tokens, seqs, new, cached, repeat = prefill_chunks(batch, input_len, chunk_tokens)
    keys = Keys.prefill(new, cached, server.arch.sliding_window)
    parts = {k: 0.0 for k in ("compute", "memory", "fixed", "comm", "seconds", "floor")}
    for j in range(len(tokens)):  # chunks differ in size (the last) and in the sequences that emit a token
        s = int(np.atleast_1d(seqs)[j] if np.ndim(seqs) else seqs)
        k = Keys(*(np.atleast_1d(getattr(keys, f))[j] for f in ("attended_full", "attended_window", "read_full",
                                                              "read_window")))
        last = _parts(server.step(int(tokens[j]), s, k))
        for name, v in last.items():
            parts[name] += v * repeat
        parts["floor"] += float(server.floor(int(tokens[j]), s, k)) * repeat
    if server.pp > 1:  # pipeline stages: the last chunk's micro-batches drain through pp - 1 more stages
        for name, v in last.items():
            parts[name] += v * (server.pp - 1) / server.pp
    return parts


def decode_keys(batch: int, contexts: np.ndarray, window: int) -> Keys:
    c = np.asarray(contexts, dtype=np.float64)
    w = np.minimum(c, window) if window else c
    return Keys(batch * c, batch * w, batch * c, batch * w)


def decode(server: Server, batch: int, input_len: int, output_len: int) -> Dict[str, float]:
    """The output_len - 1 decode steps after the prefill: totals over them."""
    steps = output_len - 1
    if steps < 1:
        return {k: 0.0 for k in ("compute", "memory", "fixed", "comm", "seconds", "floor")}
    keys = decode_keys(batch, input_len + np.arange(1, steps + 1), server.arch.sliding_window)
    parts = _parts(server.step(batch, batch, keys), np.ones(steps))
    parts["floor"] = float(np.sum(server.floor(batch, batch, keys)))
    return parts


def static_batch(server: Server, batch: int, input_len: int, output_len: int,
                 chunk_tokens: int = CHUNK_TOKENS) -> Dict[str, float]:
    """TTFT, TPOT, throughput, where the time goes and the floors of one static batch."""
    pre, dec = prefill(server, batch, input_len, chunk_tokens), decode(server, batch, input_len, output_len)
    steps = output_len - 1
    total = pre["seconds"] + dec["seconds"]
    row = {"ttft_ms": pre["seconds"] * 1e3, "tpot_ms": dec["seconds"] / steps * 1e3 if steps else float("nan"),
           "e2e_s": total, "output_tok_s": batch * output_len / total,
           "total_tok_s": batch * (input_len + output_len) / total,
           "ttft_floor_ms": pre["floor"] * 1e3, "tpot_floor_ms": dec["floor"] / steps * 1e3 if steps else float("nan")}
    row.update(_shares(pre, dec))
    return row


def _shares(*phases) -> Dict[str, object]:
    time = {k: sum(p[k] for p in phases) for k in ("compute", "memory", "fixed", "comm")}
    whole = sum(time.values())
    shares = {f"{k}_share": v / whole if whole else float("nan") for k, v in time.items()}
    bound = max(("compute", "memory", "comm"), key=lambda k: time[k])
    return dict(shares, bound={"comm": "communication"}.get(bound, bound))


def max_throughput(server: Server, input_len: int, output_len: int, chunk_tokens: int = CHUNK_TOKENS,
                   max_seqs: int = MAX_SEQS, admission: str = "on_demand") -> Dict[str, float]:
    """Continuous batching at steady state with as many running requests as fit (see the module doc)."""
    if admission not in ADMISSION:
        raise ValueError(f"admission must be one of {', '.join(ADMISSION)}, not {admission!r}")
    steps = max(1, output_len - 1)
    prefill_per_running = input_len / steps          # prompt tokens per step per running request
    running = min(server.max_sequences(ADMISSION[admission](input_len, output_len)), max_seqs,
                  int(server.pp * chunk_tokens // (1 + prefill_per_running)))  # a token budget per micro-batch
    dp = server.split.dp(server.arch)
    running = running // dp * dp
    if running < 1:
        return {"batch": 0, "output_tok_s": 0.0, "total_tok_s": 0.0, "fits": False}
    fill = running * prefill_per_running
    w = server.arch.sliding_window
    # decodes at contexts spread evenly over a request's life, plus the prompt chunks of the requests that
    # replace the finished ones (a prompt token attends to (input_len + 1) / 2 keys on average)
    contexts = input_len + (np.arange(running) + 0.5) * output_len / running
    dk = decode_keys(1, contexts, w)
    prompt_keys = (input_len + 1) / 2
    decodes = Keys(np.sum(dk.attended_full), np.sum(dk.attended_window), np.sum(dk.read_full),
                   np.sum(dk.read_window))
    prompts = Keys(fill * prompt_keys, fill * (min(w, prompt_keys) if w else prompt_keys), fill, fill)
    keys = (decodes, prompts)
    tokens = int(math.ceil(running + fill))
    cost = server.step(tokens, running, keys)
    step_s = float(np.sum(cost.seconds))
    out = running / step_s * output_len / steps       # each request: output_len tokens over `steps` steps
    row = {"batch": running, "step_ms": step_s * 1e3, "output_tok_s": out,
           "total_tok_s": out * (input_len + output_len) / output_len, "fits": True,
           "floor_step_ms": float(np.sum(server.floor(tokens, running, keys))) * 1e3}
    row.update(_shares(_parts(cost)))
    return row


def point(server: Server, batch, input_len: int, output_len: int, chunk_tokens: int = CHUNK_TOKENS) -> Dict:
    """One grid point: a static batch (an int) or "max" (the largest static batch that fits, at most
    MAX_SEQS)."""
    context = input_len + output_len
    largest = server.max_sequences(context)
    if batch == "max":  # as a serving stack runs it: at most MAX_SEQS sequences
        batch = min(largest, MAX_SEQS)
        if batch < 1:
            return {"batch": 0, "fits": False, "max_batch": 0, "weights_gib": server.weight_bytes() / 2 ** 30}
    dp = server.split.dp(server.arch)
    if batch % dp:
        raise ValueError(f"batch {batch} does not split over the {dp} data-parallel attention groups")
    row = {"batch": batch, "fits": server.fits(batch, context), "max_batch": largest,
           "weights_gib": server.weight_bytes() / 2 ** 30,
           "kv_gib": server.kv_bytes(batch, context) / 2 ** 30,
           "memory_gib": server.chip.memory_bytes / 2 ** 30}
    row.update(static_batch(server, batch, input_len, output_len, chunk_tokens))
    return row
