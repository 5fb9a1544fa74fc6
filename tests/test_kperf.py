"""ncl-bench kperf: the serving simulation on the chip and link model.

The checks the K-Perf issue asks for, on real servers of the model (not synthetic step functions, which
tests/test_serving.py covers): Little's law, one user equal to the cost model's single-request prediction,
no throughput beyond the step floors, no latency below one user's, energy per token falling with
concurrency until the server saturates and never below the static power's share.
"""
import json
import os

import numpy as np
import pytest

from ncl.bench import cli, kperf, serving
from ncl.models import get_config
from ncl.topology import load_topology
from ncl.topology import predict as model_predict
from ncl.topology.arch import Arch, Split
from ncl.topology.inference import Keys, Server


def _steps(model="llama-3.1-8b", n=1, precision="fp8", topology="pcie-gen5-8card"):
    arch = Arch.of(get_config(model), model)
    return kperf.ServerSteps(Server(load_topology(topology), arch, Split(n, n if arch.moe else 1), precision))


def _point(model, precision, chips, i, o, c, topology="pcie-gen5-8card"):
    q = dict(model=model, precision=precision, kv_precision=None, chips=chips, input_len=i, output_len=o,
             concurrency=c, topology=topology, status="planned")
    return kperf.run_point(load_topology(topology), q, {})


@pytest.mark.parametrize("model, n", [("llama-3.1-8b", 1), ("gpt-oss-120b", 2), ("exaone-4.0-32b", 2)])
def test_one_user_is_the_cost_models_single_request(model, n):
    steps = _steps(model, n, "mxfp4" if model.startswith("gpt") else "fp8")
    result = serving.simulate(steps, serving.Workload(serving.ClosedLoop(1), 128, 64), kperf.engine_for(steps.server))
    single = model_predict.static_batch(steps.server, 1, 128, 64)
    assert result.ttft.p50 * 1e3 == pytest.approx(single["ttft_ms"], rel=1e-6)
    assert result.tpot.p50 * 1e3 == pytest.approx(single["tpot_ms"], rel=1e-6)
    assert result.e2e.p50 == pytest.approx(single["e2e_s"], rel=1e-6)


def test_littles_law_on_a_real_server():
    steps = _steps("llama-3.3-70b", 4)
    result = serving.simulate(steps, serving.Workload(serving.OpenLoop(2.0), 512, 128, seed=3),
                              kperf.engine_for(steps.server), serving.Window(num_requests=300))
    r = result.requests
    begin, end = result.window
    grid = np.linspace(begin, end, 4001)[:-1] + (end - begin) / 8000
    in_system = [np.sum((r.arrival <= t) & ((r.finish > t) | np.isnan(r.finish))) for t in grid]
    measured = r.measured
    mean_latency = float(np.mean(r.finish[measured] - r.arrival[measured]))
    assert np.mean(in_system) == pytest.approx(result.requests_per_s * mean_latency, rel=0.02)


@pytest.mark.parametrize("model, precision, chips", [("llama-3.1-8b", "fp8", 1), ("llama-3.3-70b", "fp8", 8),
                                                     ("llama-3.1-405b", "mxfp4", 8)])
def test_throughput_latency_and_energy_stay_physical(model, precision, chips):
    rows = [_point(model, precision, chips, 128, 256, c) for c in (1, 4, 16, 64, 256)]
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    server = _steps(model, chips, precision).server
    for r in rows:
        c = r["concurrency"]
        floor = float(server.floor(c, c, Keys.decode(np.full(c, 129), server.arch.sliding_window)))
        assert r["output_tok_s"] <= c / floor                          # every token comes out of a step
        assert r["e2e_p50_s"] >= rows[0]["e2e_p50_s"] * (1 - 1e-9)    # nobody beats the lone user
        assert r["j_per_token"] >= r["static_w"] / r["output_tok_s"]  # idle power is paid per token too
    for a, b in zip(rows, rows[1:]):
        if b["output_tok_s"] > 1.05 * a["output_tok_s"]:              # not yet saturated
            assert b["j_per_token"] < a["j_per_token"]


def test_the_kperf_command_writes_the_report(tmp_path, capsys):
    out = tmp_path / "kp"
    assert cli.main(["kperf", "--topology", "pcie-gen5-8card,hgx-h200-8gpu", "--models", "llama-3.1-8b",
                     "--precision", "fp8", "--lengths", "128/128", "--concurrency", "1,16", "--out", str(out)]) == 0
    names = set(os.listdir(out))
    assert {"kperf.csv", "kperf.json", "kperf.xlsx", "summary.md", "llama-3.1-8b_tok_s.png",
            "llama-3.1-8b_latency_throughput.png", "llama-3.1-8b_tok_s_per_w.png"} <= names
    with open(out / "kperf.json") as f:
        rows = json.load(f)["points"]
    assert {r["topology"] for r in rows} == {"pcie-gen5-8card", "hgx-h200-8gpu"}
    by = {(r["topology"], r["chips"], r["concurrency"]): r for r in rows}
    for c in (1, 16):  # the H200 box is the faster one: each server priced on its own chips
        assert by[("hgx-h200-8gpu", 8, c)]["output_tok_s"] > by[("pcie-gen5-8card", 8, c)]["output_tok_s"]
        assert by[("hgx-h200-8gpu", 8, c)]["chip"] == "h200" and by[("pcie-gen5-8card", 8, c)]["chip"] == "rngd"
    md = (out / "summary.md").read_text()
    assert "The servers side by side" in md and "pcie-gen5-8card tok/s" in md
    import openpyxl
    assert openpyxl.load_workbook(out / "kperf.xlsx").sheetnames == ["llama-3.1-8b", "run"]


def test_an_fp8_kv_cache_holds_twice_the_tokens_and_serves_more_users():
    steps = {kv: kperf.ServerSteps(Server(load_topology("pcie-gen5-8card"), Arch.of(get_config("llama-3.3-70b")),
                                          Split(2), "fp8", kv)) for kv in ("bf16", "fp8")}
    assert abs(steps["fp8"].kv_capacity_tokens - 2 * steps["bf16"].kv_capacity_tokens) <= 1   # whole tokens
    q = dict(model="llama-3.3-70b", precision="fp8", chips=2, input_len=2048, output_len=512, concurrency=64,
             topology="pcie-gen5-8card", status="planned")
    got = {kv: kperf.run_point(load_topology("pcie-gen5-8card"), dict(q, kv_precision=kv), {}) for kv in ("bf16", "fp8")}
    assert got["fp8"]["output_tok_s"] > got["bf16"]["output_tok_s"]
    assert got["bf16"]["preemptions"] >= got["fp8"]["preemptions"]


def test_a_model_that_fits_nowhere_is_refused_with_why(tmp_path):
    rows = kperf.plan(load_topology("pcie-gen5-8card"), ["llama-3.1-405b"], ["bf16"], None, None, [(128, 128)], [1])
    assert rows[0]["status"] == "refused" and "does not fit 8 chips" in rows[0]["error"]


@pytest.mark.parametrize("args, message", [
    (["--models", "nope"], "unknown: nope"),
    (["--lengths", "128"], "input/output pairs"),
    (["--lengths", "128/1"], "output >= 2"),
    (["--precision", "fp3"], "--precision takes"),
    (["--chips", "16"], "exceeds the 8 chips"),
    (["--topology", "this-host"], "no chip type"),
])
def test_kperf_rejects_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["kperf"] + args)
    assert exc.value.code == 2 and message in capsys.readouterr().err
