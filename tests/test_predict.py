"""The fidelity model: chip types in topology files, the operator-level cost model, ncl-bench predict and
validate.

The floors here are written independently of ncl.topology.inference: from the published parameter
counts (ncl.models.param_counts), the KV cache a context needs and the chip's peak rates, perfectly
spread over the chips.  The collectives a sharded model issues are recorded by real processes
(trace_program.py under ncl-run) and compared call by call with arch.forward_collectives.
"""
import itertools
import json
import os

import numpy as np
import pytest

from harness import ncl_run_argv, program_failures
from ncl.bench import cli, validate
from ncl.models import get_config, param_counts
from ncl.topology import load_topology
from ncl.topology import predict as model_predict
from ncl.topology.arch import Arch, Split, forward_collectives
from ncl.topology.chip import WEIGHT_BYTES
from ncl.topology.inference import Keys, Server
from ncl.topology.schema import parse

PROGRAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trace_program.py")
KPERF_MODELS = ["llama-3.1-8b", "llama-3.3-70b", "llama-3.1-405b", "exaone-4.0-32b", "gpt-oss-120b"]
LENGTHS = [(128, 128), (2048, 128), (128, 2048), (2048, 2048)]


# ---- the collectives the sharded model really issues ------------------------------------------------------

def _recorded(tmp_path, model, tp, ep, n, rank=0, batch=4, prompt=5, steps=2):
    """(calls, routing) that rank of a real run recorded."""
    argv = ncl_run_argv(n, PROGRAM, str(tmp_path), model, str(tp), str(ep), str(batch), str(prompt), str(steps))
    assert program_failures(argv, tmp_path, n) == []
    with open(tmp_path / f"rank{rank}.json") as f:
        data = json.load(f)
    return [tuple(c) for c in data["calls"]], [tuple(r) for r in data["routing"]]


def _predicted(model, tp, ep, batch=4, prompt=5, steps=2, routing=None):
    """The list of the same generation from the model; routing: a run's, per MoE layer call in order."""
    arch, split = Arch.of(get_config(model), model), Split(tp, ep)
    b = batch // split.dp(arch)
    passes = [(b * prompt, b)] + [(b, b)] * steps
    calls = []
    for k, (tokens, sequences) in enumerate(passes):
        routed = routing[k * arch.n_layers:(k + 1) * arch.n_layers] if routing else None
        calls += forward_collectives(arch, split, tokens, sequences, routing=routed)
    return [(c.kind, c.nbytes, c.size) for c in calls]


@pytest.mark.parametrize("model, tp, n", [("llama-tiny", 2, 2), ("llama-tiny", 4, 4), ("exaone-tiny", 2, 2)])
def test_a_dense_models_calls_are_the_predicted_list(tmp_path, model, tp, n):
    calls, routing = _recorded(tmp_path, model, tp, 1, n)
    assert calls == _predicted(model, tp, 1) and routing == []


@pytest.mark.parametrize("tp, ep, rank", [(2, 2, 1), (1, 2, 0)])
def test_a_moe_models_calls_are_the_predicted_list_given_the_runs_routing(tmp_path, tp, ep, rank):
    """With the routing the run recorded (rows each dispatch sent), every call is the predicted one, the
    all_to_allv byte counts included; under balanced routing's expectation only those differ."""
    got, routing = _recorded(tmp_path, "gpt-oss-tiny", tp, ep, 2, rank)
    assert len(routing) == 3 * get_config("gpt-oss-tiny").n_layers            # prefill + 2 decode steps
    assert got == _predicted("gpt-oss-tiny", tp, ep, routing=routing)
    expected = _predicted("gpt-oss-tiny", tp, ep)
    assert [(k, s) for k, _, s in got] == [(k, s) for k, _, s in expected]
    routed = ("all_to_allv", "moe_dispatch", "moe_combine")  # their bytes follow the routing
    assert [c for c in got if c[0] not in routed] == [c for c in expected if c[0] not in routed]


# ---- floors -------------------------------------------------------------------------------------------------

def _floors(name, split, precision, batch, i, o, chip):
    """(TTFT, TPOT) no server can beat: the non-embedding weights (a MoE: one token's active ones) read once
    per step and the KV cache of the shortest context, at peak bandwidth over all chips; or the matmul FLOPs
    of the tokens at peak compute."""
    cfg = get_config(name)
    arch = Arch.of(cfg, name)
    total, active = param_counts(cfg)
    streamed = (active if arch.moe else total) - arch.vocab * arch.dim
    n = split.world(arch)
    bw, peak = chip.memory_bandwidth_gbps * 1e9 * n, chip.peak_flops(precision) * n
    kv = 2 * arch.n_kv_heads * arch.head_dim * arch.n_layers * (1 if precision == "fp8" else 2)
    weight = min(WEIGHT_BYTES[precision], 2)
    tpot = max((streamed * weight + batch * (i + 1) * kv) / bw, 2 * batch * active / peak)
    ttft = max(streamed * weight / bw, 2 * batch * i * (active - arch.vocab * arch.dim) / peak)
    return ttft, tpot


def test_no_point_of_the_kperf_grid_beats_its_floor_or_scales_past_100_percent():
    topo = load_topology("pcie-gen5-8card")
    checked = 0
    for name in KPERF_MODELS:
        arch = Arch.of(get_config(name), name)
        for precision in (("mxfp4", "bf16") if arch.moe else ("bf16", "fp8")):
            base = {}
            for tp in (1, 2, 4, 8):
                split = Split(tp, tp if arch.moe else 1)
                if split.problem(arch):
                    continue
                server = Server(topo, arch, split, precision)
                for batch, (i, o) in itertools.product((1, 8, 32, "max"), LENGTHS):
                    row = model_predict.point(server, batch, i, o)
                    if row["batch"] == 0:
                        continue
                    ttft, tpot = _floors(name, split, precision, row["batch"], i, o, server.chip)
                    where = f"{name} {precision} tp={tp} batch={batch} {i}/{o}"
                    assert row["ttft_ms"] >= ttft * 1e3 and row["tpot_ms"] >= tpot * 1e3, where
                    assert row["ttft_ms"] >= row["ttft_floor_ms"] and row["tpot_ms"] >= row["tpot_floor_ms"], where
                    if batch != "max":
                        key = (batch, i, o)
                        base.setdefault(key, row["output_tok_s"])
                        assert row["output_tok_s"] <= split.world(arch) * base[key] * 1.000001, where
                    checked += 1
    assert checked > 300


def test_the_issues_three_rows_are_physical():
    topo = load_topology("pcie-gen5-8card")
    server = Server(topo, Arch.of(get_config("llama-3.1-405b")), Split(8), "bf16")
    row = model_predict.point(server, 1, 128, 128)
    assert row["tpot_ms"] >= 810e9 / 8 / 1.5e12 * 1e3   # 1/8 of 810 GB per token at 1.5 TB/s: 67.5 ms
    moe = Server(topo, Arch.of(get_config("gpt-oss-120b")), Split(2, 2), "mxfp4")
    assert model_predict.point(moe, 8, 128, 128)["tpot_ms"] < 30   # not the 290 ms of the host-rate projection


def test_decode_is_memory_bound_and_a_long_prefill_compute_bound():
    server = Server(load_topology("nvswitch-8gpu"), Arch.of(get_config("llama-3.1-8b")), Split(1), "bf16")
    assert model_predict.point(server, 1, 128, 512)["bound"] == "memory"
    assert model_predict.point(server, 1, 8192, 2)["bound"] == "compute"


def test_decode_and_prompt_attention_are_separate_kernels_by_hand():
    """A mixed step's decode attention (memory-bound) and prompt attention (compute-bound) are two kernels:
    the step costs what the merged kernel costs plus the smaller of the two hidden parts, per layer."""
    server = Server(load_topology("nvswitch-8gpu"), Arch.of(get_config("llama-3.1-8b")), Split(1), "bf16")
    a, chip = server.arch, server.chip
    decodes = Keys.decode(np.full(64, 100_000.0), 0)   # long contexts: the KV read dwarfs the new tokens' traffic
    prompts = Keys.prefill([8192], [100_000], 0)
    tokens, seqs = 64 + 8192, 65
    split = server.step(tokens, seqs, (decodes, prompts)).seconds
    merged = server.step(tokens, seqs, decodes + prompts).seconds
    kv_row = 2 * a.n_kv_heads * a.head_dim * WEIGHT_BYTES[server.kv_precision]
    def flops_s(keys):
        return 4 * a.n_heads * a.head_dim * float(keys.attended_full) / chip.flops("bf16")
    read_s = float(decodes.read_full) * kv_row / chip.bandwidth                       # decode kernel, per layer
    assert flops_s(prompts) > read_s > 10 * flops_s(decodes)
    # merged: the prompt's and decodes' FLOPs (compute-bound); split: the decodes' read plus the prompt's FLOPs
    extra = a.n_layers * (read_s - flops_s(decodes) + chip.kernel_overhead_us * 1e-6)   # and one more launch
    assert float(split - merged) == pytest.approx(extra, rel=0.01)
    # a step of decodes alone is one kernel, as before
    assert float(server.step(64, 64, (decodes,)).seconds) == float(server.step(64, 64, decodes).seconds)


def test_sliding_window_keys_by_hand():
    keys = Keys.prefill([6], [2], 4)           # positions 3..8 attend min(pos, 4) keys
    assert float(keys.attended_full) == sum(range(3, 9)) and float(keys.attended_window) == 3 + 4 * 5
    assert float(keys.read_window) == 8 and float(keys.read_full) == 8   # keys 1..8 between them
    keys = Keys.prefill([6], [10], 4)          # positions 11..16 read keys 8..16 between them
    assert float(keys.attended_window) == 6 * 4 and float(keys.read_window) == 9 and float(keys.read_full) == 16


# ---- chip types in topology files ----------------------------------------------------------------------------

def _file(chip_type):
    return {"name": "t", "chip_types": {"x": chip_type}, "chips": [{"name": "c{i}", "count": 2, "type": "x"}],
            "links": [{"a": "c0", "b": "c1", "bandwidth_gbps": 10, "latency_us": 1, "efficiency": 0.5}]}


def test_chip_types_cite_every_figure_and_keep_efficiencies_in_range():
    good = {"memory_gib": 8, "memory_bandwidth_gbps": 100, "compute_tflops": {"bf16": 10}, "tdp_w": 50,
            "sources": {"memory_gib": "a", "memory_bandwidth_gbps": "b", "compute_tflops": "c", "tdp_w": "d"}}
    spec = parse(_file(good), "t.yaml")
    assert spec.chips[1].type.tdp_w == 50 and spec.links[0].bandwidth_gbps == 5.0
    with pytest.raises(ValueError, match=r"chip_types.x.sources gives no source for tdp_w"):
        parse(_file(dict(good, sources={k: v for k, v in good["sources"].items() if k != "tdp_w"})), "t.yaml")
    with pytest.raises(ValueError, match="memory_efficiency is a share of the peak"):
        parse(_file(dict(good, memory_efficiency=1.5, sources=dict(good["sources"], memory_efficiency="e"))), "t")
    with pytest.raises(ValueError, match="calibrated_field"):
        parse(_file(dict(good, calibrated_from="p")), "t.yaml")
    with pytest.raises(ValueError, match="nor a shipped chip type .*rngd"):
        parse(dict(_file(good), chips=[{"name": "c0", "type": "nope"}, {"name": "c1", "type": "x"}]), "t.yaml")


@pytest.mark.parametrize("name", ["pcie-gen5-8card", "nvswitch-8gpu", "hgx-h200-8gpu", "mi300x-8gpu", "l40s-pcie-8gpu"])
def test_every_shipped_server_has_a_cited_chip_type_that_survives_scaling(name):
    topo = load_topology(name)
    chip = topo.spec.chips[0].type
    assert chip.compute_tflops and chip.tdp_w and chip.calibrated_from
    for key in ("memory_gib", "memory_bandwidth_gbps", "compute_efficiency", "memory_efficiency"):
        assert chip.sources.get(key), (name, key)
    assert topo.scaled(16).spec.chips[-1].type == chip


# ---- the commands ---------------------------------------------------------------------------------------------

def test_validate_reproduces_each_calibration_and_predicts_every_point():
    data = validate.load(validate.DATA)
    result = validate.rows(data)
    assert len(result) == len(data["points"]) and all(r["predicted"] > 0 for r in result)
    calibrations = [r for r in result if r["role"] == "calibration"]
    assert len(calibrations) == 5 and all(abs(r["error"]) < 0.01 for r in calibrations)
    s = validate.summary(result)
    assert s["points"] >= 8 and len(s["chip_types"]) >= 3


def test_the_trtllm_table_is_whole_and_keeps_the_calibration_ids():
    data = validate.load(os.path.join(os.path.dirname(validate.DATA), "trtllm-perf-overview.yaml"))
    assert len(data["points"]) == 60  # 3 models x 2 chips x 10 lengths, none left out
    result = validate.rows(data)
    # two of its rows calibrate a chip type: H100's memory efficiency, H200's compute efficiency
    assert sum(r["role"] == "calibration" for r in result) == 2 and all(r["predicted"] > 0 for r in result)


@pytest.mark.parametrize("field, value, message", [
    ("admission", "greedy", "admission must be one of on_demand, full_request"),
    ("max_seqs", 0, "max_seqs must be an integer >= 1"),
    ("max_seqs", "256", "max_seqs must be an integer >= 1"),
    ("replicas", 0, "replicas must be an integer >= 1"),
    ("replicas", 2.5, "replicas must be an integer >= 1"),
    ("pp", 0, "pp must be an integer >= 1"),
    ("pp", True, "pp must be an integer >= 1"),
])
def test_validate_refuses_a_bad_stack_field(tmp_path, field, value, message):
    import yaml
    point = dict(validate.load(validate.DATA)["points"][0], **{field: value})
    path = tmp_path / "points.yaml"
    path.write_text(yaml.safe_dump({"points": [point]}))
    with pytest.raises(ValueError, match=message):
        validate.load(str(path))


def test_replicas_add_throughput_and_share_the_requests():
    one = dict(id="p", system="s", topology="pcie-gen5-8card", model="llama-3.1-8b", tp=2, precision="fp8",
               input_len=128, output_len=128, metric="output_tok_s", value=1.0, source="x", date="2025")
    server = validate.server_for(one)
    alone = model_predict.max_throughput(server, 128, 128)["output_tok_s"]
    assert validate.predict(dict(one, concurrency="max", replicas=3)) == pytest.approx(3 * alone)
    # 16 requests in flight on two copies: 8 each, continuous batching
    eight = model_predict.max_throughput(server, 128, 128, max_seqs=8)
    assert validate.predict(dict(one, concurrency=16, replicas=2)) == pytest.approx(2 * eight["output_tok_s"])
    # a latency is one copy's: two requests on two copies run alone
    single = model_predict.static_batch(server, 1, 128, 128)["tpot_ms"]
    assert validate.predict(dict(one, concurrency=2, replicas=2, metric="tpot_ms")) == pytest.approx(single)


def test_pipeline_stages_hold_a_share_of_the_layers_and_keep_every_chip_busy_only_when_batched():
    topo, arch = load_topology("pcie-gen5-8card"), Arch.of(get_config("llama-3.1-8b"))
    one, two = Server(topo, arch, Split(1), "bf16"), Server(topo, arch, Split(1), "bf16", pp=2)
    assert two.nranks == 2
    # by hand: 32 layers untied -> 16 layers and one of the two tables per chip, exactly half; KV half
    assert two.weight_bytes() == pytest.approx(one.weight_bytes() / 2)
    assert two.kv_bytes(8, 1000) == pytest.approx(one.kv_bytes(8, 1000) / 2)
    # compute-bound (a 4096-token prefill): two chips share the FLOPs, the step takes about half
    chunk = Keys.prefill([4096], [0], 0)
    ratio = two.step(4096, 1, chunk).seconds / one.step(4096, 1, chunk).seconds
    assert 0.45 < ratio < 0.6
    # one sequence's decode cannot be split: each chip reads its half of the weights in turn, no faster
    decode = Keys.decode([129], 0)
    assert two.step(1, 1, decode).seconds >= one.step(1, 1, decode).seconds
    assert two.step(1, 1, decode).seconds >= two.floor(1, 1, decode)
    # a hand-off of 4096 hidden states (4096 x 4096 x 2 bytes) at the switch's line rate at least
    assert two.handoff_seconds(4096) >= 4096 * 4096 * 2 / 63e9
    # ... which travels while the stage computes the next micro-batch: with tp 1 nothing else communicates
    assert two.step(4096, 1, chunk).comm == 0.0
    # a lone prompt's two micro-batches: stage 1 runs the first, then both stages run, then stage 2 the
    # second: three stage-times of a quarter of the work each, 3/4 of one chip's prefill
    ttft = [model_predict.static_batch(s, 1, 4096, 2)["ttft_ms"] for s in (one, two)]
    assert ttft[1] / ttft[0] == pytest.approx(0.75, abs=0.05)
    # no more stages than layers
    with pytest.raises(ValueError, match="pp must be an integer from 1 to the 32 layers"):
        Server(topo, arch, Split(1), "bf16", pp=33)


def test_admission_full_request_holds_prompt_plus_output_and_on_demand_the_mean():
    server = Server(load_topology("nvswitch-8gpu"), Arch.of(get_config("llama-3.1-405b")), Split(8), "fp8")
    full = model_predict.max_throughput(server, 128, 4096, admission="full_request")
    paged = model_predict.max_throughput(server, 128, 4096, admission="on_demand")
    assert full["batch"] == server.max_sequences(128 + 4096)          # by hand: KV of 4224 positions each
    assert paged["batch"] == server.max_sequences(128 + 4096 / 2) > full["batch"]
    assert paged["output_tok_s"] > full["output_tok_s"]
    with pytest.raises(ValueError, match="admission must be one of"):
        model_predict.max_throughput(server, 128, 128, admission="greedy")


def test_predict_prints_a_grid_and_json(capsys):
    assert cli.main(["predict", "--model", "llama-3.1-8b,gpt-oss-120b", "--tp", "1,2", "--precision", "mxfp4",
                     "--batch", "1,max", "--input-len", "128", "--output-len", "64"]) == 0
    out = capsys.readouterr().out
    assert "llama-3.1-8b" in out and "gpt-oss-120b" in out and "TPOT ms" in out
    assert cli.main(["predict", "--model", "llama-3.1-405b", "--tp", "8", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["chips"] == 8 and rows[0]["bound"] == "memory" and rows[0]["tpot_ms"] > 67.5


def test_predict_sweeps_pipeline_stages(capsys):
    assert cli.main(["predict", "--model", "llama-3.1-8b", "--tp", "2", "--pp", "1,2,33", "--batch", "8",
                     "--json"]) == 0
    rows = {r["pp"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[1]["chips"] == 2 and rows[2]["chips"] == 4 and rows[2]["status"] == "ok"
    assert rows[33]["status"] == "refused" and "more stages than the 32 layers" in rows[33]["error"]


@pytest.mark.parametrize("args, message", [
    (["--model", "nope"], "unknown: nope"),
    (["--model", "llama-3.1-8b", "--precision", "fp4x"], "--precision takes"),
    (["--model", "llama-3.1-8b", "--tp", "0"], "must be >= 1"),
    (["--model", "llama-3.1-8b", "--pp", "0"], "--pp values must be >= 1"),
    (["--model", "llama-3.1-8b", "--batch", "big"], "or max"),
    (["--model", "llama-3.1-8b", "--topology", "nowhere"], "no topology"),
])
def test_predict_rejects_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["predict"] + args)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_the_report_leads_with_the_prediction(tmp_path):
    from ncl.bench import predict, report
    topo = load_topology("pcie-gen5-8card")
    grid = predict.grid(topo, ["llama-3.1-405b"], [1, 8], None, ["mxfp4"], [1, "max"], [(128, 128)])
    assert [r["status"] for r in grid] == ["ok", "refused", "ok", "ok"]   # 405B does not fit one 48 GB chip
    files = report.write_all(str(tmp_path), [], [], ["ncl-bench"], {"cpu": "test"}, topo, "bf16", grid)
    names = {os.path.basename(f) for f in files}
    assert {"prediction.csv", "prediction_tpot.png", "prediction_shares.png", "summary.md"} <= names
    md = (tmp_path / "summary.md").read_text()
    assert md.index("## Prediction on pcie-gen5-8card (rngd chips)") < md.index("## Machine")
    import openpyxl
    assert openpyxl.load_workbook(tmp_path / "ncl-bench.xlsx").sheetnames[0] == "prediction"
