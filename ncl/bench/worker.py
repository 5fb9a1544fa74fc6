"""One rank of an `ncl-bench infer` point (started by ncl-bench under ncl-run).

Each rank builds only its shard of the model (seeded random weights), warms up, then times one batched prefill of random prompts and `output_len` greedy
decode steps.  Phase boundaries and every transformer layer's start and end are taken on the
C core's clock (CLOCK_MONOTONIC), so the flight record's calls fall into phases and layers
by their start time.  Rank 0 prints one JSON object (the point's row) on stdout; nothing else
goes to stdout.
"""
import argparse
import json
import os
import resource
import sys
import time

import numpy as np

from .metrics import PHASE_FIELDS


def now() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)  # the flight recorder's clock


def _communicators(model, world):
    """The world communicator and every other ncl communicator the model holds (its TP / EP
    groups), in module order, so that every rank lists them in the same order."""
    import ncl
    from ncl.torch.tp import Group
    found = [world]
    for module in model.modules():
        for value in vars(module).values():
            comm = value.group if isinstance(value, Group) and value.is_ncl else value
            if isinstance(comm, ncl.Communicator) and all(comm is not c for c in found):
                found.append(comm)
    return found


def _layers(model):
    """The model's list of transformer blocks (hooks time each one)."""
    from torch import nn
    layers = getattr(model, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return list(layers)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no list of layers to time (model.layers)")
    return list(lists[0])


class LayerClock:
    """Start and end of every call of the hooked layers (forward pre- and post-hooks that only
    read the clock: no communication or computation is added)."""

    def __init__(self, layers):
        self.windows = []
        self.handles = []
        for layer in layers:
            self.handles.append(layer.register_forward_pre_hook(self._begin))
            self.handles.append(layer.register_forward_hook(self._end))
        self.on = False

    def _begin(self, *_):
        if self.on:
            self.start = now()

    def _end(self, *_):
        if self.on:
            self.windows.append((self.start, now()))


def _record(comms, start: float):
    """Each communicator's calls that began after `start`, and whether the record overflowed."""
    calls, overflow = [], False
    for c in comms:
        entries = c.flight_record()
        mine = [e for e in entries if e["begin_s"] >= start]
        overflow |= len(entries) == len(mine) and len(entries) >= c._options.flight_entries  # oldest calls lost
        calls.append(mine)
    return calls, overflow


def phase_costs(comms, calls, phases, layer_windows, topology):
    """[field][phase] sums of wall, measured and emulated communication, overall and inside layers."""
    from ncl.collectives import SENDS_TOTAL
    from ncl.emulation import Pricer

    from .metrics import window_of
    emu = Pricer(topology)
    out = {f: [0.0] * len(phases) for f in PHASE_FIELDS}
    for p, (b, e) in enumerate(phases):
        out["wall"][p] = e - b
    for lb, le in layer_windows:
        p = window_of(lb, phases)
        if p >= 0:
            out["layer_wall"][p] += le - lb
    for comm, mine in zip(comms, calls):
        members = [int(m) for m in comm.all_gather(np.array([comms[0].rank], dtype=np.int64))]
        a2av = [e for e in mine if e["collective"] in SENDS_TOTAL]
        gathered = comm.all_gather(np.array([e["bytes"] for e in a2av], dtype=np.int64)) if comm.size > 1 else \
            np.array([e["bytes"] for e in a2av], dtype=np.int64)
        totals = {id(e): [int(x) for x in gathered[k::len(a2av)]] for k, e in enumerate(a2av)} if a2av else {}
        for e in mine:
            p = window_of(e["begin_s"], phases)
            if p < 0 or e["collective"] == "barrier":
                continue
            cost = emu.call(e, comm.size, members, totals.get(id(e)))
            seconds = e["duration_us"] * 1e-6
            out["comm"][p] += seconds
            out["emulated"][p] += cost
            if window_of(e["begin_s"], layer_windows) >= 0:
                out["layer_comm"][p] += seconds
                out["layer_emulated"][p] += cost
    return out


def _param_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _build(cfg, comm):
    """(model config, this rank's shard of the model, build seconds)."""
    import torch
    from ncl.models import build_model
    from . import sizing, weights
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // comm.size))  # the ranks share the host's cores
    mcfg = sizing.model_config(cfg.model, cfg.layers)
    t0 = time.perf_counter()
    source = weights.source_for(mcfg, cfg.seed) if cfg.weights == "fast" else None
    model = build_model(mcfg, group=comm, tp=cfg.tp, ep=cfg.ep, dtype=sizing.torch_dtype(cfg.dtype), seed=cfg.seed,
                        checkpoint=source)
    return mcfg, model, time.perf_counter() - t0


def _prompts(cfg, mcfg, comm):
    """This rank's prompts [b, input_len]: the whole batch for a dense model (its TP ranks share it);
    for a MoE, its data-parallel attention group's slice of the batch."""
    import torch
    from . import sizing
    vocab = sizing.config_value(mcfg, "vocab_size")
    every = torch.randint(0, vocab, (cfg.batch, cfg.input_len), generator=torch.Generator().manual_seed(cfg.seed))
    if not sizing.is_moe(mcfg):
        return every
    b, group = sizing.local_batch(mcfg, cfg.tp, cfg.ep, cfg.batch), comm.rank // cfg.tp
    return every[group * b:(group + 1) * b]


WARMUP_PROMPT = 128  # prompt positions of the untimed warm-up prefill


def _generate(model, mcfg, prompts, cfg, comm):
    """Warm-up, then the timed prefill and decode steps: (phase windows, layer windows, last tokens)."""
    import torch
    from ncl.models.generate import Generator
    from . import sizing
    max_seq = cfg.input_len + cfg.output_len + 1
    clock = LayerClock(_layers(model))
    with torch.inference_mode():
        chunk = sizing.chunk_tokens(mcfg)
        gen = Generator(model, max_batch=prompts.shape[0], max_seq=max_seq, chunk_tokens=chunk)
        for _ in range(cfg.warmup):  # a short prompt warms the kernels and allocator; a long one would double the cost
            nxt = gen.prefill(prompts[:, :WARMUP_PROMPT])
            for _ in range(min(2, cfg.output_len)):
                nxt = gen.decode(nxt)
        gen = Generator(model, max_batch=prompts.shape[0], max_seq=max_seq, chunk_tokens=chunk)
        comm.barrier()
        clock.on = True
        start = now()
        nxt = gen.prefill(prompts)
        phases = [(start, now())]
        for _ in range(cfg.output_len):
            begin = now()
            nxt = gen.decode(nxt)
            phases.append((begin, now()))
        clock.on = False
    return phases, clock.windows, nxt


def run(cfg, comm):
    """Every rank's measurements gathered: ([rank, values] array, rank 0's last tokens, topology)."""
    from . import sizing
    topology = sizing.fit_topology(sizing.topology(cfg.topology) if cfg.topology else None, comm.size)
    mcfg, model, build_s = _build(cfg, comm)
    comms = _communicators(model, comm)
    phases, layer_windows, nxt = _generate(model, mcfg, _prompts(cfg, mcfg, comm), cfg, comm)
    calls, overflow = _record(comms, phases[0][0])
    costs = phase_costs(comms, calls, phases, layer_windows, topology)
    mine = np.concatenate([np.asarray(costs[f]) for f in PHASE_FIELDS] + [np.asarray(
        [_param_bytes(model), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, overflow,
         build_s, sum(len(c) for c in calls)], dtype=np.float64)])
    every = comm.all_gather(mine).reshape(comm.size, -1) if comm.size > 1 else mine[None, :]
    return every, [int(x) for x in nxt.reshape(-1).tolist()], topology


def row_from(cfg, every, tokens, topology, nranks):
    """The point's report row from every rank's measurements."""
    from . import metrics, sizing
    nph = cfg.output_len + 1
    ranks = [{f: list(r[i * nph:(i + 1) * nph]) for i, f in enumerate(PHASE_FIELDS)} for r in every]
    extra = every[:, len(PHASE_FIELDS) * nph:]
    params, rss, overflow, build_s, ncalls = (extra[:, k] for k in range(5))
    full = sizing.config_value(sizing.model_config(cfg.model), "n_layers")
    row = metrics.summarize(ranks, cfg.batch, cfg.input_len, cfg.output_len, cfg.layers, full)
    row.update(nranks=nranks, param_mb_per_rank=float(params.max()) / 2**20, rss_peak_mb=float(rss.max()) / 2**20,
               build_s=float(build_s.max()), threads_per_rank=max(1, len(os.sched_getaffinity(0)) // nranks),
               calls_recorded=int(ncalls.sum()), record_overflow=bool(overflow.any()), weights=cfg.weights,
               topology=getattr(topology, "name", None), first_tokens=tokens[:8],
               per_rank={f: [sum(r[f]) for r in ranks] for f in ("wall", "comm")})
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ncl.bench.worker")
    p.add_argument("--config", required=True, help="JSON of the point (written by ncl-bench)")
    cfg = argparse.Namespace(**json.loads(p.parse_args(argv).config))
    import ncl
    comm = ncl.init()
    try:
        every, tokens, topology = run(cfg, comm)
        if comm.rank == 0:
            row = row_from(cfg, every, tokens, topology, comm.size)
            sys.stdout.write(json.dumps(row) + "\n")
            sys.stdout.flush()
    finally:
        comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
