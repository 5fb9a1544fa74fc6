"""ncl-bench's reports: progress lines, and the files in --out: points.csv (every point),
ncl-bench.xlsx (one sheet per sweep, one row per point, every metric a column: K-Perf's
spreadsheet form; plus the run's facts), PNG graphs and summary.md."""
import csv
import json
import math
import os
import sys
from typing import Dict, List

from tabulate import tabulate

from ncl.perf.report import machine_facts  # noqa: F401  (the same facts as ncl-perf's)

from . import metrics

FIELDS = [
    "sweep", "model", "layers", "proj_layers", "tp", "ep", "nranks", "batch", "input_len", "output_len", "dtype",
    "weights", "status", "ttft_ms", "tpot_ms", "itl_p50_ms", "itl_p90_ms", "itl_p99_ms", "output_tok_s",
    "total_tok_s", "e2e_s", "compute_prefill_ms", "compute_decode_ms", "comm_prefill_ms", "comm_decode_ms",
    "comm_emulated_prefill_ms", "comm_emulated_decode_ms", "comm_share", "scaling_eff", "param_mb_per_rank",
    "rss_peak_mb", "est_host_gib", "proj_host_ttft_ms", "proj_host_tpot_ms", "proj_host_output_tok_s",
    "pred_ttft_ms", "pred_tpot_ms", "pred_output_tok_s", "pred_scaling_eff", "pred_bound", "pred_comm_share",
    "pred_fits", "pred_max_batch", "topology", "chip", "threads_per_rank", "build_s", "wall_s", "calls_recorded",
    "record_overflow", "error"]
PREDICTION_FIELDS = [
    "model", "precision", "kv_precision", "tp", "ep", "chips", "requested_batch", "batch", "input_len", "output_len",
    "ttft_ms", "tpot_ms", "output_tok_s", "total_tok_s", "e2e_s", "scaling_eff", "bound", "compute_share",
    "memory_share", "comm_share", "fixed_share", "fits", "max_batch", "weights_gib", "kv_gib", "memory_gib",
    "ttft_floor_ms", "tpot_floor_ms", "topology", "chip", "status", "error"]
COLLECTIVE_FIELDS = ["collective", "nranks", "size", "count", "dtype", "time_us", "algbw", "busbw", "emulated_us",
                     "wrong"]
SUMMARY_COLUMNS = [("tp", "TP"), ("ep", "EP"), ("nranks", "ranks"), ("batch", "batch"), ("input_len", "in"),
                   ("output_len", "out"), ("ttft_ms", "TTFT ms"), ("tpot_ms", "TPOT ms"), ("itl_p99_ms", "ITL p99 ms"),
                   ("output_tok_s", "out tok/s"), ("comm_share", "comm share"), ("scaling_eff", "eff"),
                   ("rss_peak_mb", "RSS MB/rank"), ("proj_host_tpot_ms", "all layers, TPOT ms"),
                   ("pred_tpot_ms", "target: pred. TPOT ms"), ("pred_output_tok_s", "target: pred. out tok/s"),
                   ("pred_scaling_eff", "target: pred. eff")]

METHOD = """\
**Measured** (this host): every point runs `--layers L` transformer layers of the model's real width (plus
the embedding, final norm and LM head), sharded over `ranks` local processes by ncl, with seeded random
weights.  A batched prefill of `batch` random prompts of `in` tokens (in chunks of about 1024 tokens over
the batch, 8192 for gpt-oss, each attending to the cache the earlier ones filled), then `out` greedy decode
steps, after an untimed warm-up (a prefill of at most 128 positions and 2 decode steps).
TTFT = prefill time; TPOT = mean decode step; ITL p50/p90/p99 = percentiles of the decode steps (the slowest
rank's time per phase); out tok/s = batch x out / decode time; total tok/s = batch x (in + out) / (prefill +
decode).  Communication measured = sum of the flight-record durations of the ncl calls a rank made in a
phase (waiting for slower ranks included); compute = wall - communication, per rank; comm share = measured
communication / wall over the whole run, mean over ranks.  Scaling efficiency (strong scaling, same batch and
lengths): out tok/s at n ranks / (n x out tok/s at 1 rank).  On this host all ranks share its CPU cores, so
measured times grow with the rank count: the measured efficiency is a property of the host, not of ncl.
gpt-oss: attention is tensor-parallel over `TP` ranks and data-parallel over ranks / TP groups (each its
share of the batch); experts over `EP` ranks; ranks = lcm(TP, EP).

**Emulated communication**: each recorded call priced by the target topology's model
(`topology.predict(collective, nccl-tests size, group size)`); all_to_allv (MoE dispatch / combine) as one
phase of concurrent transfers, each rank's recorded total split evenly over the other ranks.

**This host's full depth** (*all layers*): pre- and post-hooks on every transformer block time the layers;
per phase and rank, the part inside the layers is multiplied by n_layers / L and the rest (embedding, head,
sampling) kept once.  Still this host's time: 2 cores shared by every rank.

**Predicted on the target** (*pred.*, and the whole Prediction section): nothing measured here is scaled.
The chip and link model (ncl.topology.inference) gives every operator of a prefill chunk and a decode step
its FLOPs and bytes per rank after sharding, costs it at max(FLOPs / achievable compute, bytes / achievable
bandwidth) plus a fixed cost on the topology's chip type (datasheet peaks, one efficiency fitted per chip type
to one published point), and prices the collectives the sharded model issues (the same list this run recorded)
on the topology's links.  `ncl-bench validate` reports its error against published measurements."""


def log(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class Progress:
    """Rows to stdout as points complete; a tqdm bar on a terminal."""

    def __init__(self, total: int, unit: str = "point"):
        self.bar = None
        if sys.stderr.isatty() and total:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit=unit, file=sys.stderr, leave=False)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            log(text)

    def update(self, text: str = "") -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt(v, digits: int = 3):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:.0f}"
    return v


def point_header() -> str:
    return (f"# {'sweep':<16} {'tp':>3} {'ep':>3} {'batch':>5} {'in':>5} {'out':>4} {'TTFT ms':>10} {'TPOT ms':>9} "
            f"{'out tok/s':>10} {'comm':>6} {'pred TPOT ms':>12} {'status':>8}")


def point_line(r: dict) -> str:
    def num(key, width, spec):
        v = r.get(key)
        return f"{v:{width}{spec}}" if isinstance(v, (int, float)) and not math.isnan(v) else " " * (width - 1) + "-"
    share = r.get("comm_share")
    share = f"{share:6.1%}" if isinstance(share, float) and not math.isnan(share) else "     -"
    return (f"  {r['sweep']:<16} {r['tp']:>3} {r['ep']:>3} {r['batch']:>5} {r['input_len']:>5} {r['output_len']:>4} "
            f"{num('ttft_ms', 10, '.2f')} {num('tpot_ms', 9, '.2f')} {num('output_tok_s', 10, '.2f')} {share} "
            f"{num('pred_tpot_ms', 12, '.3f')} {r.get('status', ''):>8}")


def collective_header() -> str:
    return "# collectives: ncl-perf out of place, float32; emulated = the target topology's prediction"


def collective_lines(rows: List[dict]) -> str:
    return "\n".join(f"  {r['collective']:<12} n={r['nranks']} {r['size']:>9} B  {r['time_us']:10.1f} us measured  "
                     f"{r.get('emulated_us', float('nan')):10.1f} us emulated" for r in rows)


def params_table(models) -> str:
    rows = []
    for name in sorted(models.CONFIGS):
        total, active = models.param_counts(name)
        cfg = models.get_config(name)
        layers = getattr(cfg, "n_layers", None)
        rows.append([name, layers, f"{total / 1e9:.2f}B", f"{active / 1e9:.2f}B", f"{total:,}", f"{active:,}"])
    return tabulate(rows, headers=["model", "layers", "total", "active", "total (exact)", "active (exact)"],
                    colalign=("left", "right", "right", "right", "right", "right"))


# ---- files -------------------------------------------------------------------------------------------------------

def _cell(v):
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def write_csv(path: str, rows: List[dict], fields: List[str], command: List[str]) -> None:
    with open(path, "w", newline="") as f:
        f.write(f"# command: {' '.join(command)}\n")
        w = csv.DictWriter(f, fields, extrasaction="ignore")
        w.writeheader()
        w.writerows([{k: _cell(r.get(k)) for k in fields} for r in rows])


def write_xlsx(path: str, sheets: Dict[str, tuple], about: List[list]) -> None:
    """sheets: name -> (fields, rows); one row per point, a header row, frozen panes."""
    import openpyxl
    from openpyxl.styles import Font
    book = openpyxl.Workbook()
    book.remove(book.active)
    for name, (fields, rows) in sheets.items():
        sheet = book.create_sheet(name[:31])
        sheet.append(fields)
        for c in sheet[1]:
            c.font = Font(bold=True)
        for r in rows:
            sheet.append([_cell(r.get(k)) for k in fields])
        sheet.freeze_panes = "A2"
        for k, field in enumerate(fields):
            sheet.column_dimensions[openpyxl.utils.get_column_letter(k + 1)].width = max(10, len(field) + 2)
    run = book.create_sheet("run")
    for line in about:
        run.append([_cell(v) for v in line])
    book.save(path)


def _sweeps(rows: List[dict]) -> Dict[str, List[dict]]:
    out: Dict[str, List[dict]] = {}
    for r in rows:
        out.setdefault(r["sweep"], []).append(r)
    return out


def _ok(rows, key):
    return [r for r in rows if r.get("status") == "ok" and isinstance(r.get(key), (int, float))
            and not math.isnan(r[key])]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _series(rows: List[dict], series: tuple) -> tuple:
    """series, plus whichever of tp / ep varies among rows that share an x value (MoE splits)."""
    extra = tuple(k for k in ("tp", "ep") if k not in series and len({r.get(k) for r in rows}) > 1
                  and len({r.get("nranks") for r in rows}) < len({(r.get("tp"), r.get("ep")) for r in rows}))
    return series + extra


def _lines(ax, rows, x, y, series, style="-", label_prefix=""):
    series = _series(rows, series)
    groups: Dict[tuple, list] = {}
    for r in _ok(rows, y):
        groups.setdefault(tuple(r[k] for k in series), []).append((r[x], r[y]))
    for key, pts in sorted(groups.items()):
        pts.sort()
        label = label_prefix + " ".join(f"{k}={v}" for k, v in zip(series, key))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=4, label=label)
    return bool(groups)


def plot_pair(path: str, rows: List[dict], x: str, ys: tuple, series: tuple, title: str, xlabel: str,
              ylabels: tuple, logx: bool = True, percent: bool = False) -> bool:
    """Two panels (measured, projected) of ys against x, one line per series; False if nothing to draw."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    drawn = False
    for ax, y, ylabel in zip(axes, ys, ylabels):
        for sweep, srows in _sweeps(rows).items():
            drawn |= _lines(ax, srows, x, y, series, label_prefix=f"{sweep} ")
        xs = sorted({r[x] for r in rows if isinstance(r.get(x), int)})
        if logx:
            ax.set_xscale("log", base=2)
        if xs:
            ax.set_xticks(xs)
            ax.xaxis.set_major_formatter(plt.ScalarFormatter())
            ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if percent:
            from matplotlib.ticker import PercentFormatter
            ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    if drawn:
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def plot_collectives(path: str, rows: List[dict]) -> bool:
    plt = _pyplot()
    colls = sorted({r["collective"] for r in rows})
    if not colls:
        return False
    fig, axes = plt.subplots(1, len(colls), figsize=(5 * len(colls), 4.2), squeeze=False)
    for ax, coll in zip(axes[0], colls):
        for n in sorted({r["nranks"] for r in rows if r["collective"] == coll}):
            pts = sorted((r["size"], r["time_us"], r.get("emulated_us")) for r in rows
                         if r["collective"] == coll and r["nranks"] == n)
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", marker="o", ms=3,
                            label=f"n={n} measured")
            if all(p[2] is not None for p in pts):
                ax.plot([p[0] for p in pts], [p[2] for p in pts], "--", color=line.get_color(), label=f"n={n} emulated")
        ax.set(xscale="log", yscale="log", xlabel="size (bytes)", ylabel="time (µs)", title=coll)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_plots(out: str, rows: List[dict], collectives: List[dict], prediction: List[dict] = ()) -> List[str]:
    written = []
    graphs = [
        ("tokens_per_s_vs_batch.png", "batch", ("output_tok_s", "pred_output_tok_s"), ("nranks", "input_len"),
         "output tokens/s against concurrency (batch)", "concurrent sequences",
         ("out tok/s (this host, measured)", "out tok/s (target, predicted)"), False),
        ("tpot_vs_tp.png", "nranks", ("tpot_ms", "pred_tpot_ms"), ("batch", "input_len"),
         "time per output token against TP / EP size", "ranks (TP x EP split)",
         ("TPOT ms (this host, measured)", "TPOT ms (target, predicted)"), False),
        ("comm_share.png", "nranks", ("comm_share", "pred_comm_share"), ("batch", "input_len"),
         "share of time in communication", "ranks", ("this host, measured", "target, predicted"), True),
        ("scaling_efficiency.png", "nranks", ("scaling_eff", "pred_scaling_eff"), ("batch", "input_len"),
         "scaling efficiency against 1 rank", "ranks", ("this host, measured", "target, predicted"), True),
    ]
    for name, x, ys, series, title, xlabel, ylabels, percent in graphs:
        path = os.path.join(out, name)
        if plot_pair(path, rows, x, ys, series, title, xlabel, ylabels, percent=percent):
            written.append(path)
    if collectives:
        path = os.path.join(out, "collectives.png")
        if plot_collectives(path, collectives):
            written.append(path)
    if prediction:
        written += plot_prediction(out, prediction)
    return written


def plot_prediction(out: str, prediction: List[dict]) -> List[str]:
    """The predicted grid: TPOT and output tok/s against chips (one panel per length pair, a line per
    model, precision and batch), and where the time goes (compute, memory, communication, fixed costs)."""
    plt = _pyplot()
    ok = [r for r in prediction if r.get("status") == "ok"]
    pairs = sorted({(r["input_len"], r["output_len"]) for r in ok})
    written = []
    for name, y, ylabel in (("prediction_tpot.png", "tpot_ms", "TPOT ms"),
                            ("prediction_tokens_per_s.png", "output_tok_s", "output tok/s"),
                            ("prediction_efficiency.png", "scaling_eff", "scaling efficiency")):
        if not pairs:
            break
        fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4.2), squeeze=False)
        for ax, (i, o) in zip(axes[0], pairs):
            lines: Dict[tuple, list] = {}
            for r in ok:
                if (r["input_len"], r["output_len"]) == (i, o) and isinstance(r.get(y), (int, float)):
                    lines.setdefault((r["model"], r["precision"], str(r["requested_batch"])), []).append(
                        (r["chips"], r[y]))
            for (model, precision, batch), pts in sorted(lines.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3,
                        label=f"{model} {precision} batch {batch}")
            ax.set(xscale="log", xlabel="chips", ylabel=ylabel, title=f"in {i} / out {o}")
            if y != "scaling_eff":
                ax.set_yscale("log")
            ax.set_xticks(sorted({r["chips"] for r in ok}))
            ax.xaxis.set_major_formatter(plt.ScalarFormatter())
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6)
        fig.suptitle(f"predicted on {ok[0]['topology']} ({ok[0]['chip']} chips)")
        fig.tight_layout()
        path = os.path.join(out, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    shares = [r for r in ok if (r["input_len"], r["output_len"]) == pairs[0]] if pairs else []
    if shares:
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(shares)), 4.5))
        bottom = [0.0] * len(shares)
        for part in ("compute", "memory", "comm", "fixed"):
            v = [r[f"{part}_share"] for r in shares]
            ax.bar(range(len(shares)), v, bottom=bottom, label=part)
            bottom = [b + x for b, x in zip(bottom, v)]
        ax.set_xticks(range(len(shares)))
        ax.set_xticklabels([f"{r['model']} {r['precision']} n={r['chips']} b={r['requested_batch']}" for r in shares],
                           rotation=90, fontsize=6)
        ax.set(ylabel="share of the request's time", title=f"where the time goes (in {pairs[0][0]} / out {pairs[0][1]})")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out, "prediction_shares.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _summary_table(rows: List[dict]) -> str:
    table = []
    for r in rows:
        if r.get("status") != "ok":
            continue
        line = []
        for key, _ in SUMMARY_COLUMNS:
            v = r.get(key)
            if key.endswith("share") or key.endswith("eff"):
                v = f"{v:.1%}" if isinstance(v, float) and not math.isnan(v) else ""
            line.append(_fmt(v, 4))
        table.append(line)
    return tabulate(table, headers=[h for _, h in SUMMARY_COLUMNS], tablefmt="github", disable_numparse=True)


def write_summary(path: str, rows: List[dict], collectives: List[dict], command: List[str], facts: dict,
                  topo, files: List[str], prediction: List[dict] = ()) -> None:
    from .predict import pivot
    lines = ["# ncl-bench report", "", f"Command: `{' '.join(command)}`", ""]
    ok = [r for r in prediction if r.get("status") == "ok"]
    if prediction:
        chip = next((r["chip"] for r in ok), None)
        lines += [f"## Prediction on {getattr(topo, 'name', '?')} ({chip} chips)", "",
                  "What the sharded models do on the target server, from the chip and link model (nothing here is "
                  "this host's time): TPOT per request of a static batch, output tok/s over the batch with its "
                  "strong-scaling efficiency against 1 chip, what bounds the point (the largest of compute, memory "
                  "and communication time) with the communication share; a time marked * is a configuration "
                  "whose weights and KV cache do not fit the chips (predicted as if they did).  Batch *max*: "
                  "the largest that fits (at most 1024).", ""]
        for model in dict.fromkeys(r["model"] for r in prediction):
            for i, o in dict.fromkeys((r["input_len"], r["output_len"]) for r in prediction if r["model"] == model):
                grid = [r for r in prediction if r["model"] == model and (r["input_len"], r["output_len"]) == (i, o)]
                lines += [f"### {model}, {i} in / {o} out", "", pivot(grid), ""]
        lines += ["Every point with its shares, floors and memory: prediction.csv and the *prediction* sheet of "
                  "ncl-bench.xlsx.", ""]
    for sweep, srows in _sweeps(rows).items():
        first = srows[0]
        lines += [f"## This host's measurements: {sweep}", "",
                  f"{first['model']}: {first['layers']} of {first.get('proj_layers') or '?'} layers measured at full "
                  f"width, {first['dtype']}, on this host: its {os.cpu_count()} cores shared by every rank, so these "
                  f"times and their scaling are the host's, not a chip's.  *All layers*: this host's time projected "
                  f"to the full depth.  *Target* columns: the same point predicted on "
                  f"{getattr(topo, 'name', 'the target')}.  Weights: {first.get('weights', 'fast')} "
                  "(see ncl.bench.weights).", "",
                  _summary_table(srows), ""]
        for r in srows:
            if r.get("status") != "ok":
                lines.append(f"- **{r['status']}**: TP {r['tp']} EP {r['ep']} batch {r['batch']} in {r['input_len']} "
                             f"out {r['output_len']}: {r.get('error')}")
        lines.append("")
    if collectives:
        lines += ["## This host's collectives (ncl-perf, out of place, float32)", "",
                  tabulate([[r["collective"], r["nranks"], r["size"], _fmt(r["time_us"], 4), _fmt(r.get("busbw"), 3),
                             _fmt(r.get("emulated_us"), 4)] for r in collectives],
                           headers=["collective", "ranks", "bytes", "measured µs", "busbw GB/s", "emulated µs"],
                           tablefmt="github"), ""]
    lines += ["## Machine", "",
              tabulate([[k, v] for k, v in facts.items() if k != "env"], headers=["fact", "value"], tablefmt="github"),
              "", "## Method", "", METHOD, "", "## Files", ""]
    lines += [f"- [{os.path.basename(f)}]({os.path.basename(f)})" for f in files]
    lines += [""] + [f"![{os.path.basename(f)}]({os.path.basename(f)})" for f in files if f.endswith(".png")]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_all(out: str, rows: List[dict], collectives: List[dict], command: List[str], facts: dict, topo,
              dtype: str, prediction: List[dict] = ()) -> List[str]:
    """Every report file into out; returns their paths (summary.md last)."""
    os.makedirs(out, exist_ok=True)
    files = []
    for name, data, fields in (("prediction.csv", prediction, PREDICTION_FIELDS), ("points.csv", rows, FIELDS),
                               ("collectives.csv", collectives, COLLECTIVE_FIELDS)):
        if data:
            write_csv(os.path.join(out, name), data, fields, command)
            files.append(os.path.join(out, name))
    with open(os.path.join(out, "points.json"), "w") as f:
        json.dump({"command": command, "machine": facts, "points": rows, "collectives": collectives,
                   "prediction": list(prediction)}, f, indent=1, default=str)
    files.append(os.path.join(out, "points.json"))
    sheets = {"prediction": (PREDICTION_FIELDS, prediction)} if prediction else {}
    sheets.update({f"host {name}": (FIELDS, srows) for name, srows in _sweeps(rows).items()})
    if collectives:
        sheets["host collectives"] = (COLLECTIVE_FIELDS, collectives)
    about = [["command", " ".join(command)], ["topology", getattr(topo, "name", None)], ["dtype", dtype]]
    about += [[k, json.dumps(v) if isinstance(v, dict) else v] for k, v in facts.items()]
    about += [["method", METHOD.replace("\n", " ")]]
    path = os.path.join(out, "ncl-bench.xlsx")
    write_xlsx(path, sheets, about)
    files.append(path)
    files += write_plots(out, rows, collectives, prediction)
    path = os.path.join(out, "summary.md")
    write_summary(path, rows, collectives, command, facts, topo, files, prediction)
    return files + [path]


POINT_KEYS = ("sweep", "model", "layers", "tp", "ep", "batch", "input_len", "output_len", "dtype", "weights",
              "topology")


def point_order(q: dict) -> tuple:
    """Where a point goes in a sweep: smallest world first within each batch and lengths, so that
    the 1-rank row efficiency compares against comes first."""
    return q["batch"], q["input_len"], q["output_len"], q["nranks"], q["tp"]


def merge(reports: List[dict]) -> tuple:
    """The points and collectives of several points.json files as one report's: a point measured
    again (same POINT_KEYS) keeps its latest ok row, and a row that is not ok (refused, failed,
    interrupted) never replaces an ok one; scaling efficiency is computed again against the merged
    1-rank rows, so a sweep resumed at other TP sizes is compared with the TP 1 row of an earlier one."""
    points: Dict[tuple, dict] = {}
    for data in reports:
        for r in data["points"]:
            key = tuple(r.get(k) for k in POINT_KEYS)
            if key not in points or r.get("status") == "ok" or points[key].get("status") != "ok":
                points[key] = {k: v for k, v in r.items() if k not in ("scaling_eff", "pred_scaling_eff")}
    order = {name: i for i, name in enumerate(dict.fromkeys(k[0] for k in points))}
    rows = sorted(points.values(), key=lambda q: (order[q["sweep"]],) + point_order(q))
    metrics.add_efficiency(rows)
    prediction = next((data["prediction"] for data in reversed(reports) if data.get("prediction")), [])
    return rows, [c for data in reports for c in data["collectives"]], prediction


def _load(p, directory: str) -> dict:
    try:
        with open(os.path.join(directory, "points.json")) as f:
            data = json.load(f)
        missing = [k for k in ("command", "machine", "points", "collectives") if k not in data]
        if missing:
            raise KeyError(", ".join(missing))
        if not isinstance(data["points"], list) or not isinstance(data["collectives"], list):
            raise TypeError("points and collectives must be lists")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        p.error(f"{directory}: no points.json written by ncl-bench ({exc})")
    return data


def _write(out: str, rows: List[dict], collectives: List[dict], command: List[str], facts: dict,
           prediction: List[dict] = ()) -> None:
    from . import sizing
    names = {r.get("topology") for r in list(rows) + list(prediction) if r.get("topology")}
    topo = sizing.topology(names.pop()) if len(names) == 1 else None
    dtype = rows[0].get("dtype", "") if rows else ""
    for path in write_all(out, rows, collectives, command, facts, topo, dtype, prediction):
        log(f"# wrote {path}")


def main(argv=None) -> int:
    """`python -m ncl.bench.report DIR...`: write each DIR's report files again from its points.json.
    With `--out NEW`: merge the DIRs' points into one report in NEW (e.g. a sweep resumed at the sizes
    an earlier one did not reach)."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m ncl.bench.report", description=main.__doc__)
    p.add_argument("directory", nargs="+", help="directories written by ncl-bench --out")
    p.add_argument("--out", help="merge every DIR into one report here (created) instead of rewriting each")
    args = p.parse_args(argv)
    reports = [_load(p, d) for d in args.directory]
    if args.out is None:
        for directory, data in zip(args.directory, reports):
            _write(directory, data["points"], data["collectives"], data["command"], data["machine"],
                   data.get("prediction", []))
        return 0
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} exists and is not a directory")
    rows, collectives, prediction = merge(reports)
    per_run = ("date", "ncl_commit", "sweep_wall_s")  # facts of one run: given per source instead
    facts = {k: v for k, v in reports[0]["machine"].items() if k not in per_run}
    for k, data in enumerate(reports):
        m = data["machine"]
        facts[f"source {k + 1}"] = (f"{m.get('date', '?')}, ncl {m.get('ncl_commit', '?')}, "
                                    f"{m.get('sweep_wall_s', '?')} s: {' '.join(data['command'])}")
    command = ["python", "-m", "ncl.bench.report", "--out", args.out] + list(args.directory)
    _write(args.out, rows, collectives, command, facts, prediction)
    return 0


if __name__ == "__main__":
    sys.exit(main())
