"""The K-Perf report of ncl-bench kperf: kperf.csv and kperf.json (every point), kperf.xlsx (one sheet per
model: rows precision, chips, lengths, concurrency; columns the metrics; a comparison sheet when several
servers ran), the graphs K-Perf publishes (per model: tok/s, TTFT and TPOT p99 and tok/s per watt against
concurrency, and the latency-throughput curve per chip count) and summary.md."""
import json
import math
import os
from typing import Dict, List

from tabulate import tabulate

from .report import _pyplot, machine_facts, write_csv, write_xlsx

FIELDS = ["topology", "chip", "model", "precision", "kv_precision", "chips", "input_len", "output_len", "concurrency",
          "status", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tpot_p50_s", "tpot_p90_s", "tpot_p99_s",
          "itl_p50_s", "itl_p90_s", "itl_p99_s", "e2e_p50_s", "e2e_p90_s", "e2e_p99_s", "output_tok_s",
          "total_tok_s", "requests_per_s", "goodput_rps", "slo_attainment", "slo_p99_met", "slo_ttft_s",
          "slo_tpot_s", "mean_batch", "preemptions", "measured_requests", "window_s", "kv_capacity_tokens",
          "power_w", "static_w", "busy_share", "j_per_token", "tok_s_per_w", "error"]
TABLE = [("chips", "chips"), ("input_len", "in"), ("output_len", "out"), ("concurrency", "users"),
         ("ttft_p99_s", "TTFT p99 s"), ("tpot_p99_s", "TPOT p99 ms"), ("output_tok_s", "out tok/s"),
         ("requests_per_s", "req/s"), ("goodput_rps", "goodput req/s"), ("mean_batch", "batch"),
         ("power_w", "power W"), ("j_per_token", "J/token"), ("tok_s_per_w", "tok/s/W")]
METHOD = """\
Nothing here is measured on this host.  Each point is a closed loop of `users` concurrent users (each sends
its next request when the last one finishes) served by a simulated engine with vLLM's scheduling (continuous
batching, chunked prefill under a token budget, a paged KV cache sized from the chips' memory, preemption
with recompute when it is full), every step priced by the chip and link model that `ncl-bench validate`
checks against published measurements.  Latencies are percentiles over the measured requests (after a
warm-up of one request per user); goodput counts the requests meeting MLPerf's server-scenario TTFT and TPOT
limits for the model's class.  Power: each chip in use draws its idle power plus (TDP - idle) x the share of
time it is busy in compute- or memory-bound operators; the links their bytes at their energy per bit.  Limits:
no prefix caching, fixed lengths, one model replica over `chips` chips (the rest of the server idle and not
counted), the chip and link model's error (benchmarks/results/validation.md)."""


def _cell(k: str, v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if k == "tpot_p99_s":
        return f"{v * 1e3:.3g}"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return v


def _table(rows: List[dict]) -> str:
    return tabulate([[_cell(k, r.get(k)) for k, _ in TABLE] for r in rows], headers=[h for _, h in TABLE],
                    tablefmt="github", disable_numparse=True)


def _headline_precision(rows: List[dict]) -> str:
    """The precision a model's summary table shows: fp8 where it ran, else the first that ran."""
    ran = [r["precision"] for r in rows if r["status"] == "ok"]
    return "fp8" if "fp8" in ran else (ran[0] if ran else "")


def comparison(rows: List[dict]) -> str:
    """One table, the servers side by side: per model, lengths and users, the whole server's output tok/s,
    TPOT p99 and tok/s per watt at the model's headline precision."""
    names = list(dict.fromkeys(r["topology"] for r in rows))
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model and r["status"] == "ok"]
        precision = _headline_precision(mine)
        cells: Dict[tuple, Dict[str, dict]] = {}
        for r in mine:
            if r["precision"] == precision:
                best = cells.setdefault((r["input_len"], r["output_len"], r["concurrency"]), {})
                if r["topology"] not in best or r["chips"] > best[r["topology"]]["chips"]:
                    best[r["topology"]] = r
        for (i, o, c), by in sorted(cells.items()):
            line = [model, precision, f"{i}/{o}", c]
            for name in names:
                r = by.get(name)
                line += [f"{r['output_tok_s']:.0f}", f"{r['tpot_p99_s'] * 1e3:.3g}", f"{r['tok_s_per_w']:.3g}"] \
                    if r else ["-", "-", "-"]
            lines.append(line)
    headers = ["model", "prec", "in/out", "users"]
    for name in names:
        headers += [f"{name} tok/s", f"{name} TPOT p99 ms", f"{name} tok/s/W"]
    return tabulate(lines, headers=headers, tablefmt="github", disable_numparse=True)


def _panels(plt, out: str, name: str, title: str, mine: List[dict], x: str, y: str, xlabel: str, ylabel: str) -> str:
    """One figure of a model: a panel per length pair, a line per server, precision and chip count."""
    pairs = sorted({(r["input_len"], r["output_len"]) for r in mine})
    series = sorted({(r["topology"], r["precision"], r["chips"]) for r in mine})
    servers = list(dict.fromkeys(t for t, _, _ in series))
    configs = sorted({(p, n) for _, p, n in series})
    colors = plt.get_cmap("tab20").colors
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.5 * len(pairs), 4), squeeze=False)
    for ax, (i, o) in zip(axes[0], pairs):
        for topo, precision, n in series:  # a colour per precision and chip count, a line style per server
            pts = sorted((r[x], r[y]) for r in mine
                         if (r["topology"], r["precision"], r["chips"], r["input_len"], r["output_len"]) ==
                         (topo, precision, n, i, o))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], ("-", "--", ":", "-.")[servers.index(topo) % 4],
                        color=colors[configs.index((precision, n)) % len(colors)], marker="o", ms=3,
                        label=f"{topo} {precision} {n} chips")
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, title=f"in {i} / out {o}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    path = os.path.join(out, name)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plots(out: str, rows: List[dict]) -> List[str]:
    plt = _pyplot()
    written = []
    ok = [r for r in rows if r["status"] == "ok"]
    for model in dict.fromkeys(r["model"] for r in ok):
        mine = [r for r in ok if r["model"] == model]
        for y, ylabel, name in (("output_tok_s", "output tok/s", "tok_s"), ("ttft_p99_s", "TTFT p99 (s)", "ttft_p99"),
                                ("tpot_p99_s", "TPOT p99 (s)", "tpot_p99"),
                                ("tok_s_per_w", "output tok/s per W", "tok_s_per_w")):
            written.append(_panels(plt, out, f"{model}_{name}.png", f"{model}: {ylabel} against concurrency", mine,
                                   "concurrency", y, "concurrent users", ylabel))
        users = max(r["concurrency"] for r in mine)
        written.append(_panels(plt, out, f"{model}_latency_throughput.png",
                               f"{model}: latency against throughput, per chip count (users 1 .. {users})", mine,
                               "output_tok_s", "tpot_p99_s", "output tok/s", "TPOT p99 (s)"))
    return written


ACCURACY = ["variant", "tp", "precision", "kv_precision", "perplexity", "top1_agreement", "tokens_compared"]


def write(out: str, rows: List[dict], command: List[str], topologies, elapsed: float,
          accuracy: List[dict] = ()) -> List[str]:
    os.makedirs(out, exist_ok=True)
    files = []
    path = os.path.join(out, "kperf.csv")
    write_csv(path, rows, FIELDS, command)
    files.append(path)
    facts = dict(machine_facts(), kperf_wall_s=round(elapsed, 1))
    path = os.path.join(out, "kperf.json")
    with open(path, "w") as f:
        json.dump({"command": command, "machine": facts, "points": rows}, f, indent=1, default=str)
    files.append(path)
    models = list(dict.fromkeys(r["model"] for r in rows))
    sheets = {m: (FIELDS, [r for r in rows if r["model"] == m]) for m in models}
    if accuracy:
        sheets["accuracy"] = (ACCURACY, list(accuracy))
    about = [["command", " ".join(command)], ["topologies", ", ".join(t.name for t in topologies)],
             ["method", METHOD.replace("\n", " ")]] + [[k, str(v)] for k, v in facts.items()]
    path = os.path.join(out, "kperf.xlsx")
    write_xlsx(path, sheets, about)
    files.append(path)
    files += plots(out, rows)
    lines = ["# K-Perf evaluation (ncl-bench kperf)", "", f"Command: `{' '.join(command)}`", "",
             f"Servers: {', '.join(f'{t.name} ({t.num_chips} x {t.spec.chips[0].type.name})' for t in topologies)}; "
             f"{sum(r['status'] == 'ok' for r in rows)} points in {elapsed:.0f} s.", ""]
    if len(topologies) > 1:
        lines += ["## The servers side by side", "", "Each server's largest chip count at the model's headline "
                  "precision.", "", comparison(rows), ""]
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        for topo in topologies:  # each server at its own headline precision (405B fits RNGD cards only in MXFP4)
            here = [r for r in mine if r["topology"] == topo.name]
            precision = _headline_precision(here)
            shown = [r for r in here if r["status"] == "ok" and r["precision"] == precision]
            if shown:
                lines += [f"## {model}, {precision}, on {topo.name}", "", _table(shown), ""]
        refused = [r for r in mine if r["status"] != "ok"]
        seen = set()
        for r in refused:
            key = (r["topology"], r["precision"], r.get("chips"), r["error"])
            if key not in seen:
                seen.add(key)
                lines.append(f"- {r['topology']}, {r['precision']}, {r.get('chips') or '-'} chips: {r['error']}")
        lines.append("")
    if accuracy:
        lines += ["## Accuracy (SmolLM2-135M-Instruct, a real Llama-architecture model, run here)", "",
                  "Perplexity of a public-domain text (ncl/bench/data) and top-1 agreement of greedy answers with "
                  "bf16 at TP 1, for each weight and KV-cache format, at TP 1 and TP 3 (`python -m "
                  "ncl.bench.accuracy`).  The big models' sharded-against-single-process checks are tests "
                  "(tests/test_llama.py, test_exaone.py, test_gpt_oss.py).", "",
                  tabulate([[r.get(k) for k in ACCURACY] for r in accuracy], headers=ACCURACY, tablefmt="github",
                           floatfmt=".4g"), ""]
    lines += ["## Method", "", METHOD, "", "## Files", ""] + [f"- [{os.path.basename(f)}]({os.path.basename(f)})"
                                                              for f in files]
    path = os.path.join(out, "summary.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return files + [path]
