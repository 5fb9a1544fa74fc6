"""The serving simulation against references computed independently of it: a hand-priced single request,
Little's law and the response-time law, the throughput bound of the step function, token and block
accounting under KV pressure, and parameter validation. In-process and fast: synthetic step models only."""
import math
import time

import numpy as np
import pytest

from ncl.bench.serving import (ClosedLoop, EngineConfig, Lengths, OpenLoop, Slo, Stats, Window, Workload,
                               MLPERF_SERVER_SLO, DEFAULT_SLO, simulate, slo_for)


class Linear:
    """step = a + b * prefill tokens + e * sum(new * cached) + c * sum(decode contexts) + d * decodes;
    records every batch it prices so that tests can check the scheduler's limits."""

    def __init__(self, a=5e-3, b=2e-5, c=1e-8, d=5e-5, e=0.0, kv=10 ** 7):
        self.a, self.b, self.c, self.d, self.e = a, b, c, d, e
        self.kv_capacity_tokens = kv
        self.calls = []

    def step_time(self, decode_contexts, prefill):
        dc = np.asarray(decode_contexts, dtype=np.int64)
        self.calls.append((dc.copy(), list(prefill)))
        return (self.a + self.b * sum(n for n, _ in prefill) + self.e * sum(n * k for n, k in prefill)
                + self.c * float(dc.sum()) + self.d * len(dc))


class LinearFast(Linear):
    """The same prices, with the optional vectorised run of decode steps."""

    def decode_step_times(self, decode_contexts, n_steps):
        dc = np.asarray(decode_contexts, dtype=np.int64)
        j = np.arange(n_steps)
        return self.a + self.c * (float(dc.sum()) + len(dc) * j) + self.d * len(dc)


def run(model=None, arrivals=ClosedLoop(1), inp=128, out=64, engine=EngineConfig(), window=Window(), seed=0,
        slo=None):
    return simulate(model or Linear(), Workload(arrivals, inp, out, seed=seed), engine, window, slo)


# ---- one request at a time: the hand computation ------------------------------------------------------------------

@pytest.mark.parametrize("cls", [Linear, LinearFast])
def test_single_user_matches_hand_computation(cls):
    a, b, c, d, e = 4e-3, 3e-5, 2e-7, 1e-4, 1e-8
    P, O, B = 300, 5, 128
    m = cls(a, b, c, d, e)
    res = run(m, ClosedLoop(1), P, O, EngineConfig(max_num_batched_tokens=B, max_num_seqs=4),
              Window(warmup_requests=1, num_requests=3))
    # The prompt in chunks of the budget, each attending to what is already cached; then O - 1 decodes.
    chunks = [(128, 0), (128, 128), (44, 256)]
    prefill = [a + b * n + e * n * k for n, k in chunks]
    decode = [a + c * (P + k) + d for k in range(1, O)]
    ttft, e2e = sum(prefill), sum(prefill) + sum(decode)
    assert [p for _, p in m.calls[:3]] == [[ch] for ch in chunks]
    assert res.ttft.mean == pytest.approx(ttft) and res.ttft.p99 == pytest.approx(ttft)
    assert res.e2e.p50 == pytest.approx(e2e)
    assert res.tpot.mean == pytest.approx(sum(decode) / (O - 1))
    expect_itl = np.tile(decode, 3)
    for q, got in ((50, res.itl.p50), (90, res.itl.p90), (99, res.itl.p99)):
        assert got == pytest.approx(np.percentile(expect_itl, q))
    assert res.itl.mean == pytest.approx(np.mean(decode))
    assert res.window[1] - res.window[0] == pytest.approx(3 * e2e)
    assert res.requests_per_s == pytest.approx(1 / e2e)
    assert res.output_tok_s == pytest.approx(O / e2e)
    assert res.total_tok_s == pytest.approx((P + O) / e2e)
    assert res.mean_batch == pytest.approx(1.0)
    assert res.preemptions == 0 and res.measured_requests == 3


def test_single_output_token_has_no_tpot():
    res = run(Linear(), ClosedLoop(1), 64, 1, window=Window(warmup_requests=0, num_requests=4))
    assert math.isnan(res.tpot.mean) and math.isnan(res.itl.p50)
    assert res.ttft.mean == pytest.approx(res.e2e.mean)
    assert res.goodput_rps == pytest.approx(res.requests_per_s)


# ---- queueing laws ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("think", [0.0, 0.4])
def test_closed_loop_obeys_the_response_time_law(think):
    # C users, each either in the system or thinking: C = X * (W + Z), whatever the engine does.
    C = 12
    res = run(LinearFast(), ClosedLoop(C, think), Lengths.uniform(50, 400), Lengths.uniform(20, 300),
              EngineConfig(max_num_batched_tokens=512, max_num_seqs=8), Window(num_requests=2000), seed=3)
    assert res.requests_per_s * (res.e2e.mean + think) == pytest.approx(C, rel=0.02)


def test_open_loop_obeys_littles_law():
    res = run(LinearFast(), OpenLoop(6.0), Lengths.normal(200, 80), Lengths.lognormal(120, 0.6),
              EngineConfig(max_num_batched_tokens=512, max_num_seqs=16), Window(num_requests=3000), seed=5)
    rq = res.requests
    t0, t1 = res.window
    finish = np.where(np.isnan(rq.finish), np.inf, rq.finish)
    in_system = np.clip(np.minimum(finish, t1) - np.maximum(rq.arrival, t0), 0, None).sum() / (t1 - t0)
    assert res.requests_per_s * res.e2e.mean == pytest.approx(in_system, rel=0.02)
    assert res.requests_per_s == pytest.approx(6.0, rel=0.1)     # stable: it serves what arrives


# ---- physical bounds ----------------------------------------------------------------------------------------------

def test_throughput_never_exceeds_the_step_function_bound():
    a, b, c, d = 8e-3, 2e-5, 1e-8, 4e-5
    P, O, S = 256, 128, 32
    for C in (8, 32, 64):
        res = run(LinearFast(a, b, c, d), ClosedLoop(C), P, O,
                  EngineConfig(max_num_batched_tokens=4096, max_num_seqs=S), Window(num_requests=400))
        # Each request costs its own prefill and decode terms; a step's fixed cost is shared by at most S
        # requests, and a request spends at least O steps in the batch.
        own = b * P + sum(c * (P + k) + d for k in range(1, O))
        bound = 1 / (own + a * O / S)
        assert res.requests_per_s <= bound * 1.005
        assert res.output_tok_s <= O * bound * 1.005
    assert res.requests_per_s >= 0.9 * bound      # saturated, it comes close


def test_latency_never_below_a_lone_request():
    lone = run(Linear(), ClosedLoop(1), 200, 50, window=Window(num_requests=2))
    for loop in (OpenLoop(2.0), OpenLoop(20.0), ClosedLoop(16)):
        res = run(LinearFast(), loop, 200, 50, EngineConfig(max_num_batched_tokens=256, max_num_seqs=8),
                  Window(num_requests=300))
        m = res.requests.measured
        rq = res.requests
        eps = 1e-9                                   # clock values of ~100 s lose ~1e-14 s in subtraction
        assert np.all(rq.first_token[m] - rq.arrival[m] >= lone.ttft.p50 - eps)
        assert np.all(rq.finish[m] - rq.arrival[m] >= lone.e2e.p50 - eps)
        assert res.tpot.p50 >= lone.tpot.p50 - eps


def test_batches_respect_the_engine_limits():
    m = Linear()
    B, S = 300, 6
    res = run(m, ClosedLoop(20), Lengths.uniform(10, 700), Lengths.uniform(1, 60),
              EngineConfig(max_num_batched_tokens=B, max_num_seqs=S), Window(num_requests=200), seed=2)
    for dc, prefill in m.calls:
        assert len(dc) + sum(n for n, _ in prefill) <= B
        assert len(dc) + len(prefill) <= S
        assert all(n >= 1 for n, _ in prefill)
    assert res.mean_batch <= S
    assert res.steps.decode_seqs.max() <= S


# ---- the KV cache -------------------------------------------------------------------------------------------------

def _token_accounting(res, blocks):
    rq, st = res.requests, res.steps
    done = ~np.isnan(rq.finish)
    assert np.array_equal(rq.tokens[done], rq.output_len[done])          # exactly output_len each
    assert np.all(rq.tokens <= rq.output_len)
    assert st.tokens_out.sum() == rq.tokens.sum()                         # every token came from a step
    assert st.kv_blocks.max() <= blocks
    m = rq.measured
    # every gap between tokens is counted once: mean ITL * gaps = the time from first to last token
    gaps = (rq.output_len[m] - 1).sum()
    assert res.itl.mean * gaps == pytest.approx((rq.finish[m] - rq.first_token[m]).sum())


@pytest.mark.parametrize("cls", [Linear, LinearFast])
def test_kv_pressure_preempts_and_recomputes(cls):
    # Prompts of 4 blocks are admitted 16 at a time, but each grows to 20 blocks: decodes must preempt.
    blocks = 80
    res = run(cls(kv=blocks * 16), ClosedLoop(16), 64, 256, window=Window(num_requests=100))
    assert res.preemptions > 0 and res.requests.preemptions.sum() >= res.preemptions
    _token_accounting(res, blocks)
    rq = res.requests
    admitted = ~np.isnan(rq.first_token)
    assert res.steps.prefill_tokens.sum() > rq.input_len[admitted].sum()    # recomputation costs prefill
    m = rq.measured
    tpot = (rq.finish[m] - rq.first_token[m]) / (rq.output_len[m] - 1)
    hit = rq.preemptions[m] > 0
    assert 0 < hit.sum() < m.sum() and tpot[hit].mean() > tpot[~hit].mean()   # a preempted user waits
    roomy = run(cls(), ClosedLoop(16), 64, 256, window=Window(num_requests=100))
    assert roomy.preemptions == 0 and roomy.requests.preemptions.sum() == 0
    assert res.e2e.mean > roomy.e2e.mean


def test_kv_pressure_queues_prompts_that_do_not_fit():
    # Long prompts, one token out: nothing grows, so a full cache only holds back admissions.
    blocks = 200
    res = run(Linear(kv=blocks * 16), ClosedLoop(10), 1000, 2, window=Window(num_requests=100))
    assert res.preemptions == 0
    assert res.steps.kv_blocks.max() <= blocks
    assert res.mean_batch <= 3                   # 63 blocks a prompt: 3 fit at once
    _token_accounting(res, blocks)
    lone = run(Linear(kv=blocks * 16), ClosedLoop(1), 1000, 2, window=Window(num_requests=5))
    assert res.ttft.p50 > 2 * lone.ttft.p50      # queued behind the others


def test_preemption_under_random_lengths_keeps_the_books():
    blocks = 120
    res = run(LinearFast(kv=blocks * 16), OpenLoop(30.0), Lengths.uniform(16, 400), Lengths.uniform(1, 600),
              EngineConfig(max_num_batched_tokens=256, max_num_seqs=32), Window(num_requests=300), seed=11)
    assert res.preemptions > 0
    _token_accounting(res, blocks)


def test_a_request_that_can_never_fit_is_refused_before_simulating():
    class Refuses(Linear):
        def step_time(self, *args):
            raise AssertionError("simulated a workload that cannot run")

    with pytest.raises(ValueError, match=r"needs 63 KV blocks of 16 tokens, but the cache holds 62"):
        run(Refuses(kv=62 * 16 + 15), ClosedLoop(1), 900, 100)
    with pytest.raises(ValueError, match="could never run"):
        run(Refuses(kv=4096), ClosedLoop(1), Lengths.uniform(100, 3000), Lengths.uniform(1, 2000))
    run(Linear(kv=63 * 16), ClosedLoop(1), 900, 109)     # 1007 tokens of KV: exactly 63 blocks


# ---- windows, fast path, reproducibility --------------------------------------------------------------------------

def test_the_decode_fast_path_changes_nothing():
    kw = dict(arrivals=OpenLoop(12.0), inp=Lengths.lognormal(300, 0.8), out=Lengths.uniform(1, 400),
              engine=EngineConfig(max_num_batched_tokens=512, max_num_seqs=24), window=Window(num_requests=400),
              seed=9)
    slow, fast = run(Linear(kv=400 * 16), **kw), run(LinearFast(kv=400 * 16), **kw)
    assert slow.row() == pytest.approx(fast.row(), rel=1e-9)
    assert len(slow.steps) == len(fast.steps)
    assert np.allclose(slow.steps.duration, fast.steps.duration, rtol=1e-9)


def test_seeded_runs_are_reproducible():
    kw = dict(arrivals=OpenLoop(8.0), inp=Lengths.normal(300, 100), out=Lengths.lognormal(100, 0.5),
              window=Window(num_requests=200))
    one, two, other = run(seed=4, **kw), run(seed=4, **kw), run(seed=5, **kw)
    assert one.row() == two.row()
    assert np.array_equal(one.requests.arrival, two.requests.arrival)
    assert one.row() != other.row()


def test_timed_windows():
    res = run(LinearFast(), OpenLoop(10.0), 100, 50, window=Window(warmup_s=5.0, duration_s=30.0))
    assert res.window == (5.0, 35.0)
    rq = res.requests
    m = rq.measured
    assert np.all((rq.finish[m] > 5.0) & (rq.finish[m] <= 35.0))
    later = ~np.isnan(rq.finish) & (rq.finish > 5.0) & (rq.finish <= 35.0)
    assert np.array_equal(m, later)
    assert res.requests_per_s == pytest.approx(m.sum() / 30.0)
    counted = run(LinearFast(), ClosedLoop(4), 100, 50, window=Window(warmup_requests=10, num_requests=37))
    assert counted.measured_requests == 37 and counted.requests.measured.sum() == 37
    assert counted.window[0] == np.sort(counted.requests.finish[~np.isnan(counted.requests.finish)])[9]


def test_default_windows():
    res = run(LinearFast(), ClosedLoop(20), 64, 32)
    assert res.measured_requests == 40
    assert (~np.isnan(res.requests.finish)).sum() >= 60
    assert run(LinearFast(), OpenLoop(20.0), 64, 32).measured_requests == 500


# ---- SLOs and statistics ------------------------------------------------------------------------------------------

def test_goodput_counts_requests_meeting_both_objectives():
    res = run(LinearFast(), OpenLoop(15.0), Lengths.uniform(10, 2000), Lengths.uniform(2, 200),
              EngineConfig(max_num_batched_tokens=512, max_num_seqs=8), Window(num_requests=300), seed=1)
    rq, m = res.requests, res.requests.measured
    ttft = rq.first_token[m] - rq.arrival[m]
    tpot = (rq.finish[m] - rq.first_token[m]) / (rq.output_len[m] - 1)
    slo = Slo(float(np.median(ttft)), float(np.median(tpot)))
    res = run(LinearFast(), OpenLoop(15.0), Lengths.uniform(10, 2000), Lengths.uniform(2, 200),
              EngineConfig(max_num_batched_tokens=512, max_num_seqs=8), Window(num_requests=300), seed=1, slo=slo)
    ok = (ttft <= slo.ttft_s) & (tpot <= slo.tpot_s)
    assert 0 < ok.sum() < len(ok)
    assert res.goodput_rps == pytest.approx(ok.sum() / (res.window[1] - res.window[0]))
    assert res.slo_attainment == pytest.approx(ok.mean())
    assert not res.slo_p99_met


def test_mlperf_limits():
    assert slo_for("llama-3.1-405b") == Slo(6.0, 0.175)
    assert slo_for("llama-3.1-8b") == Slo(2.0, 0.100)
    assert slo_for("llama-3.3-70b") == Slo(2.0, 0.200) == MLPERF_SERVER_SLO["llama2-70b"]
    assert slo_for("llama-3.1-8b", interactive=True) == Slo(0.5, 0.030)
    assert slo_for("gpt-oss-120b") == DEFAULT_SLO
    assert run().slo == DEFAULT_SLO


def test_weighted_stats_equal_the_repeated_values():
    rng = np.random.default_rng(0)
    values, weights = rng.random(50), rng.integers(0, 7, 50)
    got, ref = Stats.of(values, weights), np.repeat(values, weights)
    assert got.mean == pytest.approx(ref.mean())
    for q, v in ((50, got.p50), (90, got.p90), (99, got.p99)):
        assert v == pytest.approx(np.percentile(ref, q))
    assert math.isnan(Stats.of(np.empty(0)).p50)


# ---- parameters ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda: ClosedLoop(0), "concurrency must be >= 1"),
    (lambda: ClosedLoop(2.5), "concurrency must be an integer"),
    (lambda: ClosedLoop(4, think_time_s=-1), "think_time_s must be finite and >= 0"),
    (lambda: OpenLoop(0.0), r"rate \(requests/s\) must be finite and > 0"),
    (lambda: OpenLoop(float("inf")), "rate"),
    (lambda: Lengths.fixed(0), "a fixed length must be >= 1"),
    (lambda: Lengths.uniform(10, 5), r"lo <= hi, not \[10, 5\]"),
    (lambda: Lengths.normal(0.5, 1), "normal mean must be finite and >= 1.0"),
    (lambda: Lengths.lognormal(100, -1), "lognormal sigma must be finite and >= 0"),
    (lambda: Lengths("zipf", 1, 0, 1, 1), "unknown length distribution 'zipf'"),
    (lambda: Workload(ClosedLoop(1), "128", 64), "input_len must be an int or a Lengths"),
    (lambda: Workload(ClosedLoop(1), 128, True), "output_len must be an int or a Lengths"),
    (lambda: Workload(3, 128, 64), "arrivals must be a ClosedLoop or an OpenLoop"),
    (lambda: Workload(ClosedLoop(1), 128, 64, seed=-1), "seed must be >= 0"),
    (lambda: EngineConfig(max_num_batched_tokens=128, max_num_seqs=256), "must be >= max_num_seqs"),
    (lambda: EngineConfig(block_size=0), "block_size must be >= 1"),
    (lambda: Window(warmup_requests=3, warmup_s=1.0), "warmup_requests or warmup_s, not both"),
    (lambda: Window(num_requests=3, duration_s=1.0), "num_requests or duration_s, not both"),
    (lambda: Window(num_requests=0), "num_requests must be >= 1"),
    (lambda: Window(duration_s=0.0), "duration_s must be finite and > 0"),
    (lambda: Window(warmup_requests=-1), "warmup_requests must be >= 0"),
    (lambda: Slo(0, 0.1), "slo ttft_s must be finite and > 0"),
    (lambda: run(Linear(kv=8)), r"model.kv_capacity_tokens must be >= 16"),
    (lambda: run(object()), "model must have step_time"),
    (lambda: run(engine="vllm"), "engine must be an EngineConfig"),
    (lambda: run(window=Window(warmup_requests=0, duration_s=1e-6)), r"no request completed in the measured window"),
    (lambda: run(window=Window(warmup_s=0.5, duration_s=1e-6)), "closed before any request completed"),
])
def test_bad_parameters_raise_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_broken_step_model_is_reported():
    class Zero(Linear):
        def step_time(self, *args):
            return 0.0

    with pytest.raises(ValueError, match="step times must be finite and > 0"):
        run(Zero())


# ---- cost ---------------------------------------------------------------------------------------------------------

def test_a_kperf_point_is_cheap():
    # 256 users, 128 in / 2048 out, 768 requests (~6,000 steps) through step_time alone, no vector path.
    t = time.perf_counter()
    res = run(Linear(), ClosedLoop(256), 128, 2048)
    assert res.measured_requests == 512
    assert time.perf_counter() - t < 1.0        # ~0.05 s here; the bound is loose for loaded CI machines
