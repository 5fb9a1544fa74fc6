"""The numbers of one benchmark point, from per-rank phase timings: pure arithmetic, no torch.

A run is one prefill then `output_len` greedy decode steps (each produces one token per
sequence).  Every rank reports, per phase (the prefill, then each decode step), its wall time,
the part of it spent inside ncl calls (the flight record's durations: measured communication),
what those calls would cost on the target topology (emulated communication), and the same
three restricted to the transformer layers (so that the full depth can be projected).

Definitions (all used verbatim in the report):
    TTFT            prefill wall time (slowest rank)
    TPOT            mean decode step wall time (slowest rank per step)
    ITL p50/p90/p99 percentiles of the decode step times (linear interpolation, numpy's default)
    output tok/s    batch * output_len / decode time
    total tok/s     batch * (input_len + output_len) / (prefill + decode time)
    compute time    per rank: wall - measured communication
    comm share      measured communication / wall, over the whole run, mean over ranks
    efficiency      strong scaling: tok/s at n ranks / (n * tok/s at 1 rank), same batch and lengths
"""
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

PHASE_FIELDS = ("wall", "comm", "emulated", "layer_wall", "layer_comm", "layer_emulated")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks."""
    if not len(values):
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def tokens_per_s(tokens: float, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else float("nan")


def efficiency(tok_s: float, nranks: int, base_tok_s: Optional[float]) -> Optional[float]:
    """Strong-scaling efficiency against one rank: tok_s / (nranks * base_tok_s)."""
    if base_tok_s is None or not base_tok_s > 0 or nranks < 1:
        return None
    return tok_s / (nranks * base_tok_s)


def comm_share(comm_s: float, wall_s: float) -> float:
    return comm_s / wall_s if wall_s > 0 else float("nan")


def project_phase(wall: float, comm: float, emulated: float, layer_wall: float, layer_comm: float,
                  layer_emulated: float, measured_layers: int, full_layers: int) -> Dict[str, float]:
    """Full-depth costs of one phase of one rank from a run of `measured_layers` layers:
    per-layer part * full_layers + the rest (embedding, final norm, LM head, sampling) once.
    Returns wall, comm (measured), emulated and compute (= wall - comm), all on this host."""
    scale = full_layers / measured_layers
    rest_wall, rest_comm, rest_emul = wall - layer_wall, comm - layer_comm, emulated - layer_emulated
    out = {"wall": rest_wall + scale * layer_wall, "comm": rest_comm + scale * layer_comm,
           "emulated": rest_emul + scale * layer_emulated}
    out["compute"] = out["wall"] - out["comm"]
    return out


def _phases(ranks: List[Dict[str, List[float]]], field: str) -> np.ndarray:
    """[rank, phase] array of one field."""
    return np.asarray([r[field] for r in ranks], dtype=np.float64)


def summarize(ranks: List[Dict[str, List[float]]], batch: int, input_len: int, output_len: int,
              measured_layers: int, full_layers: int) -> Dict[str, float]:
    """One report row from every rank's per-phase lists (phase 0 the prefill, then the decode steps)."""
    data = {f: _phases(ranks, f) for f in PHASE_FIELDS}
    wall = data["wall"].max(axis=0)                       # [phase] the slowest rank decides latency
    steps = wall[1:]
    ttft, decode = float(wall[0]), float(steps.sum())
    compute = data["wall"] - data["comm"]                 # [rank, phase]
    row = {
        "ttft_ms": ttft * 1e3,
        "tpot_ms": float(steps.mean()) * 1e3 if len(steps) else float("nan"),
        "itl_p50_ms": percentile(steps, 50) * 1e3, "itl_p90_ms": percentile(steps, 90) * 1e3,
        "itl_p99_ms": percentile(steps, 99) * 1e3,
        "output_tok_s": tokens_per_s(batch * output_len, decode),
        "total_tok_s": tokens_per_s(batch * (input_len + output_len), ttft + decode),
        "e2e_s": ttft + decode,
        "compute_prefill_ms": float(compute[:, 0].max()) * 1e3,
        "compute_decode_ms": float(compute[:, 1:].sum(axis=1).max()) * 1e3,
        "compute_mean_rank_s": float(compute.sum(axis=1).mean()),
        "comm_prefill_ms": float(data["comm"][:, 0].max()) * 1e3,
        "comm_decode_ms": float(data["comm"][:, 1:].sum(axis=1).max()) * 1e3,
        "comm_emulated_prefill_ms": float(data["emulated"][:, 0].max()) * 1e3,
        "comm_emulated_decode_ms": float(data["emulated"][:, 1:].sum(axis=1).max()) * 1e3,
        "comm_share": float(np.mean([comm_share(c, w) for c, w in
                                     zip(data["comm"].sum(axis=1), data["wall"].sum(axis=1))])),
    }
    row.update(_projection(data, batch, output_len, measured_layers, full_layers))
    return row


def _projection(data, batch, output_len, measured_layers, full_layers) -> Dict[str, float]:
    """Full depth on this host (per rank, slowest rank per phase)."""
    nranks, nphases = data["wall"].shape
    full = [[project_phase(*(data[f][r, p] for f in PHASE_FIELDS), measured_layers, full_layers)
             for p in range(nphases)] for r in range(nranks)]
    host_wall = np.asarray([[ph["wall"] for ph in rank] for rank in full]).max(axis=0)
    host_decode = float(host_wall[1:].sum())
    return {"proj_layers": full_layers,
            "proj_host_ttft_ms": float(host_wall[0]) * 1e3,
            "proj_host_tpot_ms": float(host_wall[1:].mean()) * 1e3 if nphases > 1 else float("nan"),
            "proj_host_output_tok_s": tokens_per_s(batch * output_len, host_decode)}


def add_efficiency(rows: List[dict], key: str = "output_tok_s") -> None:
    """Set `scaling_eff` (and `pred_scaling_eff` from the predicted tok/s) of every row against the
    1-rank row of the same model, layers, batch and lengths, where the sweep has one."""
    def ident(r):
        return (r.get("sweep"), r.get("model"), r.get("layers"), r.get("batch"), r.get("input_len"),
                r.get("output_len"), r.get("dtype"))
    base = {ident(r): r for r in rows if r.get("nranks") == 1 and r.get("status") == "ok"}
    for r in rows:
        b = base.get(ident(r))
        if r.get("status") != "ok" or b is None:
            continue
        r["scaling_eff"] = efficiency(r[key], r["nranks"], b.get(key))
        if "pred_" + key in r and "pred_" + key in b:
            r["pred_scaling_eff"] = efficiency(r["pred_" + key], r["nranks"], b["pred_" + key])


def window_of(t: float, windows: Sequence[Tuple[float, float]]) -> int:
    """Index of the [begin, end) window holding time t, or -1 (windows sorted, disjoint)."""
    lo, hi = 0, len(windows)
    while lo < hi:
        mid = (lo + hi) // 2
        if windows[mid][1] <= t:
            lo = mid + 1
        else:
            hi = mid
    return lo if lo < len(windows) and windows[lo][0] <= t else -1
