"""ncl-bench: the metrics against hand-computed numbers, the emulation of recorded calls, the sizing
of points, the report files, argument validation, and one tiny sweep through real processes."""
import csv
import json
import math
import os
import subprocess
import sys

import pytest

from harness import popen_then_signal
from ncl import collectives, emulation
from ncl.bench import cli, metrics, report, sizing, weights

torch = pytest.importorskip("torch")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- metrics -----------------------------------------------------------------------------------------------------

def test_percentiles_interpolate_linearly():
    steps = [0.1, 0.2, 0.3, 0.4]
    assert metrics.percentile(steps, 50) == pytest.approx(0.25)
    assert metrics.percentile(steps, 90) == pytest.approx(0.37)   # 0.3 + 0.7 * 0.1
    assert metrics.percentile(steps, 99) == pytest.approx(0.397)
    assert math.isnan(metrics.percentile([], 50))


def _rank(wall, comm, emulated, layer_share=0.5):
    return {"wall": wall, "comm": comm, "emulated": emulated, "layer_wall": [w * layer_share for w in wall],
            "layer_comm": [c * layer_share for c in comm], "layer_emulated": [e * layer_share for e in emulated]}


def test_summary_of_two_ranks_by_hand():
    # prefill then 4 decode steps; rank 1 is slower at the prefill and step 3
    r0 = _rank([1.0, 0.1, 0.2, 0.3, 0.4], [0.2, 0.01, 0.02, 0.03, 0.04], [0.002] * 5)
    r1 = _rank([1.2, 0.1, 0.2, 0.35, 0.4], [0.1, 0.01, 0.02, 0.03, 0.04], [0.002] * 5)
    row = metrics.summarize([r0, r1], batch=8, input_len=16, output_len=4, measured_layers=1, full_layers=1)
    steps = [0.1, 0.2, 0.35, 0.4]                                   # the slowest rank per step
    assert row["ttft_ms"] == pytest.approx(1200)
    assert row["tpot_ms"] == pytest.approx(sum(steps) / 4 * 1e3)
    assert row["itl_p50_ms"] == pytest.approx(275)
    assert row["output_tok_s"] == pytest.approx(8 * 4 / 1.05)
    assert row["total_tok_s"] == pytest.approx(8 * 20 / 2.25)
    assert row["compute_prefill_ms"] == pytest.approx(1100)          # rank 1: 1.2 - 0.1
    assert row["comm_decode_ms"] == pytest.approx(100)
    assert row["comm_emulated_prefill_ms"] == pytest.approx(2)
    share0, share1 = 0.3 / 2.0, 0.2 / 2.25
    assert row["comm_share"] == pytest.approx((share0 + share1) / 2)
    assert row["proj_host_ttft_ms"] == pytest.approx(1200)           # 1 of 1 layers: nothing to project


def test_projection_scales_the_layers_and_keeps_the_rest():
    ph = metrics.project_phase(wall=10.0, comm=2.0, emulated=0.5, layer_wall=6.0, layer_comm=1.0,
                               layer_emulated=0.25, measured_layers=2, full_layers=126)
    assert ph["wall"] == pytest.approx(4 + 63 * 6)
    assert ph["comm"] == pytest.approx(1 + 63 * 1)
    assert ph["emulated"] == pytest.approx(0.25 + 63 * 0.25)
    assert ph["compute"] == pytest.approx(ph["wall"] - ph["comm"])


def test_the_host_projection_scales_every_phase_to_the_full_depth():
    r = _rank([1.0, 0.5], [0.0, 0.0], [0.01, 0.001], layer_share=1.0)
    row = metrics.summarize([r], batch=2, input_len=4, output_len=1, measured_layers=1, full_layers=10)
    assert row["proj_host_ttft_ms"] == pytest.approx(10 * 1.0 * 1e3)
    assert row["proj_host_tpot_ms"] == pytest.approx(10 * 0.5 * 1e3)
    assert row["proj_host_output_tok_s"] == pytest.approx(2 / 5.0)


def test_efficiency_against_one_rank():
    assert metrics.efficiency(30.0, 4, 10.0) == pytest.approx(0.75)
    assert metrics.efficiency(30.0, 4, None) is None
    rows = [dict(sweep="s", model="m", layers=1, batch=1, input_len=8, output_len=4, dtype="bf16", nranks=n,
                 status="ok", output_tok_s=tok, pred_output_tok_s=2 * tok)
            for n, tok in ((1, 10.0), (2, 15.0), (4, 20.0))]
    rows.append(dict(rows[0], batch=2, nranks=2, output_tok_s=5.0))   # no 1-rank row at batch 2
    metrics.add_efficiency(rows)
    assert [r.get("scaling_eff") for r in rows] == pytest.approx([1.0, 0.75, 0.5, None])
    assert rows[2]["pred_scaling_eff"] == pytest.approx(0.5)
    assert metrics.comm_share(1.0, 4.0) == 0.25


# ---- emulation of recorded calls ---------------------------------------------------------------------------------

class FakeTopology:
    name, num_chips = "fake", 8

    def __init__(self):
        self.calls = []

    def predict(self, collective, nbytes, nranks, algorithm=None):
        self.calls.append((collective, nbytes, nranks))
        return 1e-6 * (1 + nbytes / 1000)

    def predict_transfers(self, transfers):
        self.calls.append(("transfers", tuple(transfers)))
        return 1e-6 * sum(b for _, _, b in transfers)


def test_recorded_counts_become_nccl_tests_sizes():
    e = {"collective": "all_gather", "bytes": 100}
    assert collectives.nccl_bytes("all_gather", 100, 4) == 400
    assert collectives.nccl_bytes("all_reduce", 100, 4) == 100
    assert collectives.nccl_bytes("all_to_all", 64, 2) == 128
    topo = FakeTopology()
    emu = emulation.Pricer(topo)
    assert emu.call(e, 4, [0, 1, 2, 3]) == pytest.approx(1.4e-6)
    assert emu.call(e, 4, [0, 1, 2, 3]) == pytest.approx(1.4e-6)   # cached
    assert topo.calls == [("all_gather", 400, 4)]
    assert emu.call({"collective": "barrier", "bytes": 0}, 4, [0, 1, 2, 3]) == 0.0
    assert emu.call(e, 1, [0]) == 0.0                                  # one rank: nothing moves
    assert emu.call({"collective": "send", "bytes": 10}, 2, [0, 1]) > 0
    assert topo.calls[-1] == ("send_recv", 10, 2)


def test_all_to_allv_prices_every_ranks_total_spread_evenly():
    topo = FakeTopology()
    cost = emulation.Pricer(topo).call({"collective": "all_to_allv", "bytes": 300}, 3, [4, 5, 6], [300, 600, 0])
    assert topo.calls == [("transfers", ((4, 5, 100), (4, 6, 100), (5, 4, 200), (5, 6, 200)))]
    assert cost == pytest.approx(600e-6)


def test_window_lookup():
    windows = [(0.0, 1.0), (2.0, 3.0), (3.0, 3.5)]
    assert [metrics.window_of(t, windows) for t in (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 3.4, 4.0)] == \
        [0, 0, -1, -1, 1, 2, 2, -1]


# ---- sizing ------------------------------------------------------------------------------------------------------

def test_405b_layer_footprint_by_hand():
    cfg = sizing.model_config("llama-3.1-405b", 1)
    fp = sizing.footprint(cfg, tp=8, ep=1, nranks=8, batch=1, seq=21, dtype="bf16")
    d, v = 16384, 128256
    per_rank = d * 16 * 128 * 2 + d * 1 * 128 * 2 + 2 * d + 3 * d * (53248 // 8) + 2 * (v // 8) * d
    assert fp.params == per_rank * 2
    assert fp.kv_cache == 2 * 1 * 1 * 21 * 1 * 128 * 2
    assert fp.host == 8 * fp.per_rank
    assert sizing.fits(fp, available=64 << 30) is None
    why = sizing.fits(fp, available=4 << 30)
    assert "GiB on this host (8 ranks" in why and "4.0 GiB is available" in why


@pytest.mark.parametrize("name, tp, ep", [("llama-tiny", 1, 1), ("llama-tiny", 2, 1), ("gpt-oss-tiny", 1, 1),
                                          ("gpt-oss-tiny", 2, 2)])
def test_footprint_matches_a_built_shard(name, tp, ep):
    from ncl.models import build_model
    cfg = sizing.model_config(name)
    model = build_model(cfg, None, dtype=torch.bfloat16) if tp == ep == 1 else None
    if model is None:  # a shard alone: the bytes of a TP/EP rank are those of the whole divided as the model does
        whole = sizing.footprint(cfg, 1, 1, 1, 1, 8, "bf16").params
        part = sizing.footprint(cfg, tp, ep, max(tp, ep), 1, 8, "bf16").params
        assert whole / 2.2 < part < whole / 1.8
        return
    real = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    assert sizing.footprint(cfg, tp, ep, 1, 1, 8, "bf16").params == pytest.approx(real, rel=0.02)


def test_splits_are_checked_against_the_config():
    llama, moe = sizing.model_config("llama-3.1-405b", 1), sizing.model_config("gpt-oss-120b", 1)
    assert sizing.split_problem(llama, 8, 1) is None
    assert "attention heads" in sizing.split_problem(llama, 3, 1)
    assert "mixture-of-experts" in sizing.split_problem(llama, 2, 2)
    assert "experts" in sizing.split_problem(moe, 1, 3)
    assert sizing.split_problem(moe, 1, 8, batch=8) is None
    assert "data-parallel" in sizing.split_problem(moe, 1, 8, batch=4)
    assert sizing.world_size(moe, 2, 8) == 8 and sizing.local_batch(moe, 2, 8, 8) == 2
    assert sizing.world_size(llama, 4, 1) == 4 and sizing.local_batch(llama, 4, 1, 8) == 8
    assert sizing.model_config("gpt-oss-120b", 2).layer_types == ("sliding_attention", "full_attention")


# ---- the fast weight source ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(300, 200), (4, 64, 9, 16), (3, 5, 7), (5000,)])
def test_fast_weights_shards_are_slices_of_one_full_tensor(shape):
    src = weights.FastWeights(seed=3)
    full = src._slice("w", shape, None, 0, 0, torch.float32, 0.02, 0.0)
    for d in range(len(shape)):
        idx = [slice(None)] * len(shape)
        idx[d] = slice(1, shape[d] - 1)
        assert torch.equal(src._slice("w", shape, d, 1, shape[d] - 1, torch.float32, 0.02, 0.0), full[tuple(idx)])
    assert not torch.equal(full, src._slice("v", shape, None, 0, 0, torch.float32, 0.02, 0.0))  # names differ


def test_fast_weights_small_tensors_are_the_models_seeded_values():
    from ncl.models.weights import RandomWeights
    src = weights.FastWeights(seed=3)
    want = RandomWeights(3).get("model.norm.weight", (64,), dtype=torch.float32, mean=1.0)
    assert torch.equal(src.get("model.norm.weight", (64,), dtype=torch.float32, mean=1.0), want)
    blocks = src.get("l.mlp.experts.down_proj_blocks", (4, 64, 2, 16), 0, 2, 4, dtype=torch.uint8)
    scales = src.get("l.mlp.experts.down_proj_scales", (4, 64, 2), 0, 2, 4, dtype=torch.uint8)
    assert blocks.shape == (2, 64, 2, 16) and blocks.dtype == torch.uint8 and int(blocks.max()) > 15
    assert scales.shape == (2, 64, 2) and int(scales.min()) == int(scales.max()) == weights.MXFP4_SCALE
    assert "l.mlp.experts.down_proj_blocks" in src.files and "l.mlp.router.weight" not in src.files


# ---- reports -----------------------------------------------------------------------------------------------------

def _synthetic_rows():
    rows = []
    for n, tok in ((1, 10.0), (2, 16.0), (4, 24.0)):
        r = dict(sweep="llama-3.1-405b", model="llama-3.1-405b", layers=1, tp=n, ep=1, nranks=n, batch=1,
                 input_len=16, output_len=4, dtype="bf16", status="ok", output_tok_s=tok, pred_output_tok_s=10 * tok,
                 pred_tpot_ms=1.0 / n)
        ranks = [_rank([0.5, 0.1, 0.1, 0.12, 0.1], [0.05 * n] * 5, [0.001] * 5)]
        r.update(metrics.summarize(ranks, 1, 16, 4, 1, 126))
        r["output_tok_s"] = tok
        rows.append(r)
    rows.append(dict(rows[0], tp=8, nranks=8, status="refused", error="needs ~99 GiB"))
    metrics.add_efficiency(rows)
    return rows


def test_report_files(tmp_path):
    rows = _synthetic_rows()
    coll = [dict(sweep="collectives", collective="all_reduce", nranks=2, size=s, count=s // 4, dtype="float32",
                 time_us=10.0 + s / 1e3, busbw=1.0, emulated_us=2.0 + s / 1e4, wrong=0) for s in (65536, 524288)]
    files = report.write_all(str(tmp_path), rows, coll, ["ncl-bench", "infer"], {"cpu": "test"}, None, "bf16")
    names = {os.path.basename(f) for f in files}
    assert {"points.csv", "collectives.csv", "ncl-bench.xlsx", "summary.md", "tokens_per_s_vs_batch.png",
            "tpot_vs_tp.png", "comm_share.png", "scaling_efficiency.png", "collectives.png"} <= names
    with open(tmp_path / "points.csv") as f:
        assert f.readline().startswith("# command: ncl-bench infer")
        table = list(csv.DictReader(f))
    assert [r["status"] for r in table] == ["ok", "ok", "ok", "refused"]
    assert float(table[1]["scaling_eff"]) == pytest.approx(0.8)
    import openpyxl
    book = openpyxl.load_workbook(tmp_path / "ncl-bench.xlsx")
    assert book.sheetnames == ["host llama-3.1-405b", "host collectives", "run"]
    sheet = book["host llama-3.1-405b"]
    header = [c.value for c in sheet[1]]
    assert header == report.FIELDS
    assert sheet.cell(row=3, column=header.index("output_tok_s") + 1).value == 16.0
    assert sheet.cell(row=5, column=header.index("status") + 1).value == "refused"
    assert book["host collectives"].max_row == 3
    for png in ("tpot_vs_tp.png", "collectives.png"):
        with open(tmp_path / png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "summary.md").read_text()
    assert "Command: `ncl-bench infer`" in md and "| TP" in md and "target: pred. TPOT ms" in md
    assert "This host's measurements" in md and "**refused**: TP 8" in md
    (tmp_path / "summary.md").unlink()
    assert report.main([str(tmp_path)]) == 0                          # written again from points.json
    assert (tmp_path / "summary.md").read_text() == md


def test_reports_merge_into_one_with_efficiency_against_the_earlier_tp1(tmp_path, capsys):
    """A sweep resumed at the sizes an earlier one did not reach: one report, the latest ok row of
    each point, efficiency of the later rows against the earlier TP 1 row."""
    tp1, tp2, tp4 = (r for r in _synthetic_rows() if r["status"] == "ok")
    first = [tp1, tp2, dict(tp4, status="interrupted", error="not run")]
    again = dict(tp2, output_tok_s=18.0)
    second = [dict(tp4, scaling_eff=0.123), dict(tp2, status="refused", error="needs ~99 GiB"), again]
    dirs = []
    for k, rows in enumerate((first, second)):
        d = tmp_path / f"part{k}"
        facts = {"date": f"day{k}", "ncl_commit": f"c{k}", "sweep_wall_s": 10 * k, "cpu": "test"}
        report.write_all(str(d), rows, [], ["ncl-bench", "infer", f"--part{k}"], facts, None, "bf16")
        dirs.append(str(d))
    out = tmp_path / "merged"
    assert report.main(["--out", str(out)] + dirs) == 0
    data = json.loads((out / "points.json").read_text())
    rows = data["points"]
    assert [(r["tp"], r["status"]) for r in rows] == [(1, "ok"), (2, "ok"), (4, "ok")]
    assert rows[1]["output_tok_s"] == 18.0                                 # measured again: the later ok row
    assert [r["scaling_eff"] for r in rows] == pytest.approx([1.0, 18.0 / 20, 24.0 / 40])   # not the stale 0.123
    assert data["machine"] == {"cpu": "test", "source 1": "day0, ncl c0, 0 s: ncl-bench infer --part0",
                               "source 2": "day1, ncl c1, 10 s: ncl-bench infer --part1"}
    md = (out / "summary.md").read_text()
    assert "day0, ncl c0, 0 s: ncl-bench infer --part0" in md and "interrupted" not in md
    with pytest.raises(SystemExit):
        report.main(["--out", str(out), str(tmp_path / "nowhere")])
    assert "no points.json written by ncl-bench" in capsys.readouterr().err


def test_point_lines_show_missing_numbers_as_dashes():
    line = report.point_line(dict(sweep="x", tp=2, ep=1, batch=1, input_len=8, output_len=4, status="failed"))
    assert "failed" in line and " -" in line


# ---- the command line --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["infer", "--model", "nope"], "unknown model 'nope'"),
    (["infer", "--model", "llama-tiny", "--tp", "3"], "does not divide the 8 attention heads"),
    (["infer", "--model", "llama-tiny", "--ep", "2"], "mixture-of-experts models only"),
    (["infer", "--model", "gpt-oss-tiny", "--ep", "3"], "does not divide the 8 experts"),
    (["infer", "--model", "gpt-oss-tiny", "--ep", "2", "--batch", "1"], "data-parallel attention groups"),
    (["infer", "--model", "llama-tiny", "--input-len", "0"], "--input-len values must be >= 1"),
    (["infer", "--model", "llama-tiny", "--batch", "two"], "--batch takes integers"),
    (["infer", "--model", "llama-tiny", "--layers", "9"], "--layers must be in 1..4"),
    (["infer", "--model", "llama-tiny", "--topology", "/nonexistent.yaml"], "--topology /nonexistent.yaml"),
    (["infer", "--model", "llama-tiny", "--warmup", "-1"], "--warmup must be >= 0"),
    (["infer", "--model", "llama-tiny", "--tp", "x"], "--tp takes integers"),
    (["infer", "--model", "gpt-oss-tiny", "--tp", "ep", "--ep", "16"], "does not divide the 8 attention heads"),
    (["infer", "--model", "llama-tiny", "--input-len", "1000", "--output-len", "100"], "exceed llama-tiny's 1024"),
    (["infer", "--model", "llama-3.1-405b", "--batch", "64", "--input-len", "4096"], "no point fits this host"),
])
def test_bad_arguments_exit_2_with_a_message(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(args + ["--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_out_must_be_a_writable_directory(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exc:
        cli.main(["infer", "--model", "llama-tiny", "--out", str(tmp_path / "file")])
    assert exc.value.code == 2 and "is not a directory" in capsys.readouterr().err


def test_params_lists_every_config(capsys):
    assert cli.main(["params"]) == 0
    out = capsys.readouterr().out
    assert "llama-3.1-405b" in out and "405.85B" in out and "116.83B" in out and "5.13B" in out


# ---- end to end --------------------------------------------------------------------------------------------------

@pytest.mark.timeout(240)
def test_tiny_sweep_through_real_processes(tmp_path):
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "ncl.bench", "infer", "--model", "llama-tiny", "--tp", "1,2", "--batch", "2",
           "--input-len", "8", "--output-len", "4", "--dtype", "fp32", "--timeout", "120", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=230, cwd=str(tmp_path),
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.returncode == 0, done.stdout + done.stderr
    with open(out / "points.json") as f:
        rows = json.load(f)["points"]
    assert [(r["tp"], r["status"]) for r in rows] == [(1, "ok"), (2, "ok")]
    assert rows[0]["first_tokens"] == rows[1]["first_tokens"]          # greedy tokens do not depend on TP
    one, two = rows
    assert one["comm_share"] == 0 and two["comm_share"] > 0 and two["comm_decode_ms"] > 0
    assert two["calls_recorded"] >= 2 * (1 + 4) * 4                    # 2 all-reduces per layer and phase, 2 ranks
    assert one["scaling_eff"] == pytest.approx(1.0) and two["scaling_eff"] > 0
    assert not two["record_overflow"]
    for r in rows:
        assert r["ttft_ms"] > 0 and r["tpot_ms"] > 0 and r["itl_p99_ms"] >= r["itl_p50_ms"]
        assert r["proj_layers"] == 4 and r["param_mb_per_rank"] > 0 and r["rss_peak_mb"] > r["param_mb_per_rank"]
    for name in ("points.csv", "ncl-bench.xlsx", "summary.md", "tpot_vs_tp.png"):
        assert (out / name).exists()
    assert "llama-tiny" in done.stdout and "wrote" in done.stdout


@pytest.mark.timeout(120)
def test_ctrl_c_while_a_point_starts_stops_its_launcher(tmp_path, monkeypatch):
    """A Ctrl-C that lands after Popen has forked the launcher but before run_point holds its handle
    (the window CI once hit: the ranks ran on after the sweep had gone) still takes the point down."""
    import signal
    parser = cli.parser()
    args = parser.parse_args(["infer", "--model", "llama-tiny", "--tp", "2", "--batch", "2", "--input-len", "8",
                              "--output-len", "400", "--dtype", "fp32"])
    cli._check_infer(parser, args)
    point, = cli.plan("t", "llama-tiny", 2, [(2, 1)], [2], [8], [400], args)
    started = []
    try:
        with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
            patch.setattr(cli.subprocess, "Popen", popen_then_signal(signal.SIGINT, started))
            cli.run_point(point, 60.0, str(tmp_path / "point.log"))
        assert len(started) == 1 and started[0].poll() is not None, "the launcher outlived the Ctrl-C"
        pattern = f'ncl.bench.worker.*"output_len": {point["output_len"]}'
        leftovers = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
        assert not leftovers, f"ranks left running: {leftovers}"
    finally:  # a failure must not leave the job running for the rest of the suite
        for proc in started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_ctrl_c_while_a_row_is_printed_keeps_the_row(tmp_path, monkeypatch):
    """The window stress runs hit next: SIGINT lands while the first point's row is being written, between
    points. The measured row stays ok and only the points not run are marked interrupted."""
    from types import SimpleNamespace
    points = [dict(sweep="s", tp=t, nranks=t) for t in (1, 2, 4)]
    monkeypatch.setattr(cli, "_run_planned", lambda k, point, args, logs: dict(point, status="ok"))
    monkeypatch.setattr(cli.report, "point_line", lambda row: f"row tp={row['tp']}")
    written = []

    class CtrlCOnFirstRow(cli.Progress):
        def write(self, text):
            written.append(text)
            if text.startswith("row"):
                raise KeyboardInterrupt
    try:
        rows = cli.run_points(points, SimpleNamespace(out=str(tmp_path)), CtrlCOnFirstRow(0))
    except KeyboardInterrupt:  # caught, or it would stop the whole test session rather than fail this test
        pytest.fail("the Ctrl-C escaped run_points: the sweep would end with no report")
    assert [(r["tp"], r["status"]) for r in rows] == [(1, "ok"), (2, "interrupted"), (4, "interrupted")]
    assert written[-1].startswith("# interrupted: 2 of 3 points not run")


def _cwd(pid: str) -> str:
    """A process's working directory ('' once it has ended)."""
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""


@pytest.mark.timeout(240)
def test_interrupted_sweep_keeps_what_it_measured(tmp_path):
    """SIGINT after the first point: its ranks are stopped, the report is written with the point
    measured and the others marked interrupted, and the exit code is 130."""
    import signal
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "ncl.bench", "infer", "--model", "llama-tiny", "--tp", "1,2,4", "--batch", "2",
           "--input-len", "8", "--output-len", "200", "--dtype", "fp32", "--timeout", "120", "--out", str(out)]
    # a shell starts background jobs with SIGINT ignored, and Python keeps an inherited SIG_IGN: give
    # the sweep the default disposition, as a terminal's Ctrl-C finds it
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(tmp_path),
                            env=dict(os.environ, PYTHONPATH=ROOT),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in proc.stdout:  # the first point's row, then stop the sweep in the second
        seen.append(line)
        if line.strip().startswith("llama-tiny") and line.rstrip().endswith("ok"):
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, "".join(seen) + rest
    with open(out / "points.json") as f:
        rows = json.load(f)["points"]
    assert [(r["tp"], r["status"]) for r in rows] == [(1, "ok"), (2, "interrupted"), (4, "interrupted")]
    assert "interrupted" in rest and (out / "summary.md").exists()
    matching = subprocess.run(["pgrep", "-f", 'ncl.bench.worker.*"model": "llama-tiny"'], capture_output=True,
                              text=True).stdout.split()
    leftovers = [pid for pid in matching if _cwd(pid) == str(tmp_path)]  # this sweep's ranks: another suite's
    assert not leftovers, f"ranks left running: {leftovers}"               # on the host are not ours


@pytest.mark.timeout(240)
def test_moe_point_through_real_processes(tmp_path):
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "ncl.bench", "infer", "--model", "gpt-oss-tiny", "--tp", "ep", "--ep", "2",
           "--batch", "2", "--input-len", "8", "--output-len", "3", "--timeout", "120", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=230, cwd=str(tmp_path),
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.returncode == 0, done.stdout + done.stderr
    with open(out / "points.json") as f:
        (row,) = json.load(f)["points"]
    assert (row["tp"], row["ep"], row["nranks"], row["status"]) == (2, 2, 2, "ok")
    assert row["comm_emulated_decode_ms"] > 0 and row["pred_tpot_ms"] > 0   # all_to_allv priced on the topology


@pytest.mark.timeout(120)
def test_a_point_that_times_out_is_reported_and_the_sweep_goes_on(tmp_path):
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "ncl.bench", "infer", "--model", "llama-tiny", "--tp", "1,2", "--batch", "2",
           "--input-len", "8", "--output-len", "2", "--timeout", "1", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=110, cwd=str(tmp_path),
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.returncode == 1, done.stdout + done.stderr
    with open(out / "points.json") as f:
        rows = json.load(f)["points"]
    assert [r["status"] for r in rows] == ["failed", "failed"]               # both points tried
    assert all("timeout after 1 s" in r["error"] for r in rows)
    assert (out / "summary.md").exists() and "**failed**" in (out / "summary.md").read_text()
