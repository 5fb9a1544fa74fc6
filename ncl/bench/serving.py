"""A discrete-event simulation of an LLM serving engine, priced by a step cost model.

One event is one engine step (one forward pass over a batch): the scheduler picks the batch, the StepModel
prices it, the clock moves on by that many seconds and every sequence in the batch advances. When the batch
only decodes and nothing can change it (no prompt left to compute, no waiting request that could be
admitted, no arrival that could be, no finish, enough free KV blocks), the steps up to the next such event
are priced in one go and applied at once, so a point of hundreds of requests of thousands of tokens costs
tens of Python-level events, not tens of thousands.

Engine (vLLM V1's scheduler with its FCFS policy, vllm/v1/core/sched/scheduler.py):
- A step holds at most `max_num_seqs` running requests and `max_num_batched_tokens` tokens.
- Running decodes come first, one token each; the rest of the budget goes to prompt chunks (chunked
  prefill): first requests already admitted whose prompt is partly computed, in admission order, then the
  waiting queue, first come first served. (V1 walks decodes and partial prefills in one admission-ordered
  loop; putting decodes first keeps a long prompt from ever stalling the users already streaming.)
- The KV cache is paged in blocks of `block_size` tokens. The head of the waiting queue is admitted only
  when the blocks of everything it must prefill are free. (V1 allocates chunk by chunk; reserving the whole
  prompt at once means a half-computed prompt never has to preempt anyone for its own next chunk.)
- A decode that needs a new block when none is free preempts the most recently admitted running request
  (perhaps itself): its blocks are freed, it goes back to the front of the waiting queue, and once
  readmitted it recomputes its prompt plus the tokens generated so far as one prefill (V1: `running.pop()`,
  `waiting.prepend_request`, `num_computed_tokens = 0`). A step that preempted admits nobody (V1 too).
- Tokens: the end of the step that computes a request's last prompt chunk gives its first token; each
  decode step gives one more. After a recompute, the end of the recomputed prefill gives the next token.
  A request of P input and O output tokens holds at most P + O - 1 tokens of KV: its last token is
  returned, never fed back.

Workloads: a closed loop of C users (each sends its next request `think_time_s` after its last one
finished; all start at t = 0), or an open loop of Poisson arrivals at `rate` requests/s. Lengths are fixed
or drawn (uniform, normal, lognormal; see Lengths) from generators seeded by `Workload.seed`.

Measurement: completions are counted in finishing order. The window opens after `warmup_requests`
completions (or at `warmup_s`) and closes at the `num_requests`-th completion after that (or `duration_s`
later); the requests completing inside it are the measured ones.

Results (ServingResult), over the measured requests and window:
    TTFT   first token - arrival                       TPOT  (e2e - TTFT) / (output_len - 1), per request
    ITL    every gap between consecutive tokens         e2e   last token - arrival
    requests/s, output tok/s, total tok/s   measured requests, their output / input + output tokens, per
                                            second of window (the convention of vLLM's benchmark_serving)
    goodput    measured requests/s with TTFT <= slo.ttft_s and TPOT <= slo.tpot_s
    mean_batch sequences in a step's batch, weighted by time over the window
    preemptions  preemption events inside the window
"""
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np

from .workload import (BLOCK_SIZE, DEFAULT_SLO, MAX_NUM_BATCHED_TOKENS, MAX_NUM_SEQS, MAX_REQUESTS,  # noqa: F401
                       MLPERF_BENCHMARK, MLPERF_SERVER_SLO, ClosedLoop, EngineConfig, Lengths, OpenLoop, Slo, Window,
                       Workload, _int, slo_for)


# ---- the cost model this runs on ---------------------------------------------------------------------------------

class StepModel(Protocol):
    """Prices one engine step on the server being predicted.

    Optionally it may also have `decode_step_times(decode_contexts, n_steps) -> np.ndarray`: the seconds of
    n_steps consecutive decode-only steps of these sequences, each context one longer every step (element j
    equals step_time(decode_contexts + j, ())). The simulator then prices a run of decode steps in one call
    instead of n_steps; the results are the same either way."""

    kv_capacity_tokens: int   # KV-cache tokens the server's memory holds (all sequences together)

    def step_time(self, decode_contexts: np.ndarray, prefill: Sequence[Tuple[int, int]]) -> float:
        """Seconds of one engine step: one decode token for each running sequence whose context (tokens
        already in its KV cache, the new one included) is decode_contexts[i], plus prefill chunks given as
        (new_tokens, tokens_already_cached_for_that_request)."""


# ---- results -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stats:
    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: np.ndarray, weights: Optional[np.ndarray] = None) -> "Stats":
        """Mean and percentiles (linear interpolation, numpy's default); integer weights count each value
        that many times, without materialising the repeats."""
        values = np.asarray(values, dtype=np.float64)
        if weights is None:
            if not len(values):
                return cls(*(float("nan"),) * 4)
            return cls(float(values.mean()), *(float(v) for v in np.percentile(values, (50, 90, 99))))
        keep = weights > 0
        values, weights = values[keep], weights[keep]
        if not len(values):
            return cls(*(float("nan"),) * 4)
        order = np.argsort(values, kind="stable")
        values, cum = values[order], np.cumsum(weights[order])
        total = int(cum[-1])

        def at(rank):   # the value at 0-based position `rank` of the expanded, sorted list
            return values[np.searchsorted(cum, rank, side="right")]

        ps = []
        for q in (50, 90, 99):
            r = q / 100 * (total - 1)
            lo = math.floor(r)
            ps.append(float(at(lo) + (at(min(lo + 1, total - 1)) - at(lo)) * (r - lo)))
        return cls(float(np.dot(values, weights[order]) / total), *ps)


@dataclass
class StepRecords:
    """One entry per engine step, in order (columns of equal length): what an energy or utilisation model
    needs to price the run after the fact."""
    start: np.ndarray                   # s
    duration: np.ndarray                # s
    decode_seqs: np.ndarray             # sequences decoding one token
    decode_context_tokens: np.ndarray   # sum of their contexts (the new token included)
    prefill_seqs: np.ndarray            # prompt chunks
    prefill_tokens: np.ndarray          # tokens in them
    tokens_out: np.ndarray              # tokens produced (decodes + prompts completed)
    kv_blocks: np.ndarray               # KV blocks in use during the step

    COLUMNS = ("start", "duration", "decode_seqs", "decode_context_tokens", "prefill_seqs", "prefill_tokens",
               "tokens_out", "kv_blocks")

    def __len__(self):
        return len(self.start)


@dataclass
class RequestRecords:
    """Every request that arrived, in arrival order; finish is NaN for those still in flight at the end."""
    arrival: np.ndarray
    first_token: np.ndarray
    finish: np.ndarray
    input_len: np.ndarray
    output_len: np.ndarray
    tokens: np.ndarray        # tokens generated so far
    preemptions: np.ndarray
    measured: np.ndarray      # bool: completed inside the measured window


@dataclass
class ServingResult:
    ttft: Stats
    tpot: Stats
    itl: Stats
    e2e: Stats
    requests_per_s: float
    output_tok_s: float
    total_tok_s: float
    goodput_rps: float        # measured requests/s meeting both SLOs
    slo_attainment: float     # share of measured requests meeting both
    slo_p99_met: bool         # MLPerf's criterion: p99 TTFT and p99 TPOT within the limits
    mean_batch: float
    preemptions: int          # inside the window
    measured_requests: int
    window: Tuple[float, float]
    slo: Slo
    steps: StepRecords = field(repr=False)
    requests: RequestRecords = field(repr=False)

    def row(self) -> Dict[str, float]:
        """The flat numbers, for CSV/JSON reports (times in seconds)."""
        out = {}
        for name in ("ttft", "tpot", "itl", "e2e"):
            st = getattr(self, name)
            out.update({f"{name}_{k}_s": getattr(st, k) for k in ("mean", "p50", "p90", "p99")})
        out.update(requests_per_s=self.requests_per_s, output_tok_s=self.output_tok_s,
                   total_tok_s=self.total_tok_s, goodput_rps=self.goodput_rps, slo_attainment=self.slo_attainment,
                   slo_p99_met=self.slo_p99_met, slo_ttft_s=self.slo.ttft_s, slo_tpot_s=self.slo.tpot_s,
                   mean_batch=self.mean_batch, preemptions=self.preemptions,
                   measured_requests=self.measured_requests, window_s=self.window[1] - self.window[0])
        return out


# ---- the simulation ----------------------------------------------------------------------------------------------

def simulate(model: StepModel, workload: Workload, engine: EngineConfig = EngineConfig(),
             window: Window = Window(), slo: Optional[Slo] = None) -> ServingResult:
    """Serve `workload` on the server `model` prices, with `engine`'s scheduler, and measure `window`.
    Raises ValueError for bad parameters, or when the longest request the workload can draw could never
    fit the KV cache, before simulating anything."""
    if not isinstance(workload, Workload):
        raise ValueError(f"workload must be a Workload, not {workload!r}")
    if not isinstance(engine, EngineConfig):
        raise ValueError(f"engine must be an EngineConfig, not {engine!r}")
    if not isinstance(window, Window):
        raise ValueError(f"window must be a Window, not {window!r}")
    slo = DEFAULT_SLO if slo is None else slo
    if not isinstance(slo, Slo):
        raise ValueError(f"slo must be an Slo, not {slo!r}")
    if not callable(getattr(model, "step_time", None)):
        raise ValueError(f"model must have step_time(decode_contexts, prefill), like StepModel: {model!r}")
    capacity = _int("model.kv_capacity_tokens", getattr(model, "kv_capacity_tokens", None), engine.block_size)
    blocks = capacity // engine.block_size
    worst = workload.input_len.hi + workload.output_len.hi - 1
    if -(-worst // engine.block_size) > blocks:
        raise ValueError(
            f"a request of {workload.input_len.hi} input + {workload.output_len.hi} output tokens needs "
            f"{-(-worst // engine.block_size)} KV blocks of {engine.block_size} tokens, but the cache holds "
            f"{blocks} ({capacity} tokens): it could never run; shorten the lengths or give the server more memory")
    sim = _Simulation(model, workload, engine, window.resolved(workload.arrivals), blocks)
    sim.run()
    return sim.result(slo)


class _ClosedArrivals:
    """C users: all send at t = 0, then each again think_time_s after its request finished. Finishes come in
    time order and the think time is constant, so the pending sends stay sorted in a FIFO."""

    def __init__(self, loop: ClosedLoop):
        self.think = loop.think_time_s
        self.pending = deque([0.0] * loop.concurrency)

    def next_time(self) -> float:
        return self.pending[0] if self.pending else math.inf

    def take_until(self, t: float) -> List[float]:
        out = []
        while self.pending and self.pending[0] <= t:
            out.append(self.pending.popleft())
        return out

    def finished(self, t: float):
        self.pending.append(t + self.think)


class _PoissonArrivals:
    """Exponential gaps at `rate`, drawn a chunk at a time from one seeded generator."""
    CHUNK = 1024

    def __init__(self, loop: OpenLoop, rng: np.random.Generator):
        self.rate, self.rng = loop.rate, rng
        self.times, self.i, self.last = np.empty(0), 0, 0.0

    def next_time(self) -> float:
        if self.i == len(self.times):
            self.times = self.last + np.cumsum(self.rng.exponential(1 / self.rate, self.CHUNK))
            self.i, self.last = 0, float(self.times[-1])
        return float(self.times[self.i])

    def take_until(self, t: float) -> List[float]:
        out = []
        while self.next_time() <= t:
            out.append(float(self.times[self.i]))
            self.i += 1
        return out

    def finished(self, t: float):
        pass


class _Requests:
    """Per-request state in arrays indexed by arrival order, grown by doubling; lengths are drawn as the
    arrays grow, from their own generators, so they do not depend on the arrival process."""
    INT = ("input_len", "output_len", "ctx", "target", "blocks", "generated", "seg_lo", "preemptions")
    FLOAT = ("arrival", "first_token", "finish", "last_token")

    def __init__(self, workload: Workload, rng_in: np.random.Generator, rng_out: np.random.Generator):
        self.w, self.rng_in, self.rng_out = workload, rng_in, rng_out
        self.n = 0
        for name in self.INT + self.FLOAT:
            setattr(self, name, np.empty(0, dtype=np.int64 if name in self.INT else np.float64))

    def _grow(self):
        more = max(256, self.n)
        if self.n + more > MAX_REQUESTS:
            raise ValueError(f"more than {MAX_REQUESTS} requests arrived before the window closed: measure a "
                             f"shorter window, or lower an open loop's rate if it is far beyond what the server serves")
        fresh = {"input_len": self.w.input_len.draw(self.rng_in, more),
                 "output_len": self.w.output_len.draw(self.rng_out, more),
                 "seg_lo": np.full(more, -1, dtype=np.int64)}
        for name in self.INT + self.FLOAT:
            add = fresh.get(name)
            if add is None:
                add = np.zeros(more, np.int64) if name in self.INT else np.full(more, np.nan)
            setattr(self, name, np.concatenate([getattr(self, name), add]))

    def add(self, arrival: float) -> int:
        if self.n == len(self.arrival):
            self._grow()
        i, self.n = self.n, self.n + 1
        self.arrival[i] = arrival
        self.target[i] = self.input_len[i]
        return i


class _StepLog:
    """Step records as column chunks: single steps gather as rows, a decode run arrives as whole columns."""

    def __init__(self):
        self.rows, self.chunks = [], []

    def add(self, *row):
        self.rows.append(row)

    def add_run(self, *columns):
        self._flush()
        self.chunks.append([np.asarray(c, dtype=np.float64) for c in columns])

    def _flush(self):
        if self.rows:
            self.chunks.append(list(np.array(self.rows, dtype=np.float64).T))
            self.rows = []

    def records(self) -> StepRecords:
        self._flush()
        cols = [np.concatenate([c[k] for c in self.chunks]) if self.chunks else np.empty(0)
                for k in range(len(StepRecords.COLUMNS))]
        seconds = {"start", "duration"}
        return StepRecords(*(c if name in seconds else c.astype(np.int64)
                             for name, c in zip(StepRecords.COLUMNS, cols)))


class _Simulation:
    def __init__(self, model, workload: Workload, engine: EngineConfig, window: Window, blocks: int):
        self.model, self.engine, self.window = model, engine, window
        self.fast_decode = getattr(model, "decode_step_times", None)
        rng_arr, rng_in, rng_out = (np.random.default_rng(s) for s in np.random.SeedSequence(workload.seed).spawn(3))
        loop = workload.arrivals
        self.arrivals = _ClosedArrivals(loop) if isinstance(loop, ClosedLoop) else _PoissonArrivals(loop, rng_arr)
        self.req = _Requests(workload, rng_in, rng_out)
        self.total_blocks = self.free = blocks
        self.waiting: deque = deque()
        self.running: List[int] = []        # admission order: the last one is preempted first
        self.t, self.n_steps, self.last_dt = 0.0, 0, math.nan
        self.log = _StepLog()
        self.segments: List[Tuple[int, int, int]] = []   # (request, first, last step) of uninterrupted decoding
        self.gaps: List[Tuple[int, float]] = []          # token gaps across a preemption
        self.preempt_times: List[float] = []
        self.completed: List[int] = []
        # the window: the index in `completed` where measuring starts, and its start and end times
        self.first_measured = 0 if window.warmup_requests == 0 else None
        self.t_start = window.warmup_s if window.warmup_s is not None else \
            (0.0 if window.warmup_requests == 0 else None)
        self.t_end = None
        self.done = False

    # -- the event loop --

    def run(self):
        bs = self.engine.block_size
        while not self.done:
            for ta in self.arrivals.take_until(self.t):
                self.waiting.append(self.req.add(ta))
            if not self.running and not self.waiting:
                self.t = self.arrivals.next_time()      # idle until the next request arrives
                if not math.isfinite(self.t):
                    raise RuntimeError("no request in flight and none to come: the simulation cannot go on")
                self._check_time()
                continue
            admissible = bool(self.waiting) and len(self.running) < self.engine.max_num_seqs and \
                -(-int(self.req.target[self.waiting[0]]) // bs) <= self.free
            r = np.fromiter(self.running, dtype=np.int64, count=len(self.running))
            if not admissible and r.size and np.all(self.req.ctx[r] >= self.req.target[r]):
                self._decode_run(r)
            else:
                self._step(r)
            self._check_time()

    def _check_time(self):
        if self.window.duration_s is not None and self.t_start is not None:
            self.t_end = self.t_start + self.window.duration_s
            self.done = self.done or self.t >= self.t_end

    def _horizon(self) -> float:
        """The first instant at which something could join a pure-decode batch: the next arrival when the
        queue is empty and a seat is free, and the end of a timed window."""
        h = math.inf
        if not self.waiting and len(self.running) < self.engine.max_num_seqs:
            h = self.arrivals.next_time()
        if self.window.duration_s is not None and self.t_start is not None:
            h = min(h, self.t_start + self.window.duration_s)
        return h

    # -- a run of decode-only steps, applied at once --

    def _decode_run(self, r: np.ndarray):
        req, bs = self.req, self.engine.block_size
        ctx = req.ctx[r]
        k = int((req.output_len[r] - req.generated[r]).min())   # up to the first finish
        # A sequence holding ceil(ctx / bs) blocks needs its next one at step j0 = bs * blocks - ctx + 1 (in
        # 1..bs) and every bs steps after, so the new blocks of every step repeat with period bs.
        per_phase = np.bincount(bs * req.blocks[r] - ctx, minlength=bs)
        need = np.cumsum(np.resize(per_phase, k))
        k = int(np.searchsorted(need, self.free, side="right"))   # steps whose blocks are all free
        if k == 0:
            self._step(r)                                        # the next step preempts
            return
        d = self._decode_times(ctx + 1, k, self._horizon())
        k = len(d)
        ends = self.t + np.cumsum(d)
        n = len(r)
        steps = np.arange(1, k + 1)
        used = self.total_blocks - self.free
        self.log.add_run(np.concatenate([[self.t], ends[:-1]]), d, np.full(k, n), ctx.sum() + n * steps,
                         np.zeros(k), np.zeros(k), np.full(k, n), used + need[:k])
        req.ctx[r] += k
        req.generated[r] += k
        req.blocks[r] = -(-req.ctx[r] // bs)
        req.last_token[r] = ends[-1]
        self.free -= int(need[k - 1])
        self.t, self.last_dt = float(ends[-1]), float(d[-1])
        self.n_steps += k
        self._finish(r[req.generated[r] == req.output_len[r]].tolist(), self.n_steps - 1)

    def _decode_times(self, ctx: np.ndarray, k: int, horizon: float) -> np.ndarray:
        """Durations of up to k decode steps, the first at contexts `ctx`; cut after the last step that
        starts before `horizon`. Priced in chunks sized to reach the horizon, so a near arrival costs a few
        steps of pricing, not k."""
        out, done, t = [], 0, self.t
        while done < k:
            n = k - done
            if math.isfinite(horizon) and self.last_dt > 0:
                n = min(n, max(8, int((horizon - t) / self.last_dt * 1.25) + 1))
            d = self._price_decodes(ctx + done, n)
            ends = t + np.cumsum(d)
            keep = 1 + int(np.searchsorted(ends[:-1], horizon, side="left"))   # steps starting before horizon
            out.append(d[:keep])
            done, t = done + keep, float(ends[keep - 1])
            if keep < n or t >= horizon:
                break
        return np.concatenate(out)

    def _price_decodes(self, ctx: np.ndarray, n: int) -> np.ndarray:
        if self.fast_decode is not None:
            d = np.asarray(self.fast_decode(ctx.copy(), n), dtype=np.float64)
            if d.shape != (n,):
                raise ValueError(f"decode_step_times(contexts, {n}) returned shape {d.shape}, not ({n},)")
        else:
            d = np.array([self.model.step_time(ctx + j, ()) for j in range(n)], dtype=np.float64)
        if not np.all(np.isfinite(d) & (d > 0)):
            raise ValueError(f"the step model priced a decode step of {len(ctx)} sequences at "
                             f"{d[~(np.isfinite(d) & (d > 0))][0]} s: step times must be finite and > 0")
        return d

    # -- one general step: decodes, preemptions, prompt chunks, admissions --

    def _step(self, r: np.ndarray):
        req, eng, bs = self.req, self.engine, self.engine.block_size
        decoding = req.ctx[r] >= req.target[r]
        dec = r[decoding]
        need = np.maximum(0, (req.ctx[dec] + bs) // bs - req.blocks[dec])   # ceil((ctx + 1) / bs) - held
        preempted = set()
        if int(need.sum()) > self.free:
            dec, preempted = self._allocate_with_preemption(dec, need)
        else:
            req.blocks[dec] += need
            self.free -= int(need.sum())
        budget = eng.max_num_batched_tokens - len(dec)
        chunks = []   # (request, new tokens)
        for i in r[~decoding].tolist():            # prompts already admitted, in admission order
            if budget == 0:
                break
            if i not in preempted:
                n = min(int(req.target[i] - req.ctx[i]), budget)
                chunks.append((i, n))
                budget -= n
        while not preempted and self.waiting and budget > 0 and len(self.running) < eng.max_num_seqs:
            i = self.waiting[0]
            nb = -(-int(req.target[i]) // bs)
            if nb > self.free:
                break                              # first come, first served: nobody overtakes the head
            self.waiting.popleft()
            self.running.append(i)
            req.blocks[i], self.free = nb, self.free - nb
            n = min(int(req.target[i]), budget)
            chunks.append((i, n))
            budget -= n
        self._execute(dec, chunks)

    def _allocate_with_preemption(self, dec: np.ndarray, need: np.ndarray):
        """Give each decode its block, oldest first; when none is free, preempt the newest running request
        until one is, or until the decode itself was the newest."""
        req, scheduled, preempted = self.req, [], set()
        for i, nd in zip(dec.tolist(), need.tolist()):
            if i in preempted:
                continue
            while nd > self.free and i not in preempted:
                victim = self.running[-1]
                self._preempt(victim)
                preempted.add(victim)
            if i not in preempted:
                req.blocks[i] += nd
                self.free -= nd
                scheduled.append(i)
        return np.array(scheduled, dtype=np.int64), preempted

    def _preempt(self, i: int):
        req = self.req
        self.running.pop()
        self.free += int(req.blocks[i])
        self._close_segment(i, self.n_steps - 1)       # it decoded up to the previous step
        req.blocks[i] = req.ctx[i] = 0
        req.target[i] = req.input_len[i] + req.generated[i]   # recompute prompt + output so far
        req.preemptions[i] += 1
        self.waiting.appendleft(i)
        self.preempt_times.append(self.t)

    def _execute(self, dec: np.ndarray, chunks: List[Tuple[int, int]]):
        req = self.req
        contexts = req.ctx[dec] + 1
        prefill = [(n, int(req.ctx[i])) for i, n in chunks]
        dt = self.model.step_time(contexts, prefill)
        if isinstance(dt, bool) or not isinstance(dt, (int, float, np.integer, np.floating)) \
                or not math.isfinite(dt) or dt <= 0:
            raise ValueError(f"the step model priced a step of {len(dec)} decodes and prefill {prefill} at "
                             f"{dt!r} s: step times must be finite and > 0")
        start, used = self.t, self.total_blocks - self.free
        self.t, self.last_dt = self.t + float(dt), float(dt)
        self.n_steps += 1
        req.ctx[dec] += 1
        req.generated[dec] += 1
        req.last_token[dec] = self.t
        done = dec[req.generated[dec] == req.output_len[dec]].tolist()
        completed_prompts = 0
        for i, n in chunks:
            req.ctx[i] += n
            if req.ctx[i] == req.target[i]:
                completed_prompts += 1
                if self._prompt_done(i):
                    done.append(i)
        self.log.add(start, dt, len(dec), int(contexts.sum()), len(chunks), sum(n for _, n in chunks),
                     len(dec) + completed_prompts, used)
        self._finish(done, self.n_steps - 1)

    def _prompt_done(self, i: int) -> bool:
        """The end of a request's (re)computed prompt gives a token; True when that was its last."""
        req = self.req
        req.generated[i] += 1
        if math.isnan(req.first_token[i]):
            req.first_token[i] = self.t
        else:
            self.gaps.append((i, self.t - req.last_token[i]))   # the token gap across its preemption
        req.last_token[i] = self.t
        if req.generated[i] == req.output_len[i]:
            return True
        req.seg_lo[i] = self.n_steps                  # it decodes from the next step on
        return False

    def _close_segment(self, i: int, last: int):
        lo = int(self.req.seg_lo[i])
        if 0 <= lo <= last:
            self.segments.append((i, lo, last))
        self.req.seg_lo[i] = -1

    def _finish(self, ids: List[int], last_step: int):
        if not ids:
            return
        req, gone = self.req, set(ids)
        self.running = [i for i in self.running if i not in gone]
        for i in ids:
            self._close_segment(i, last_step)
            self.free += int(req.blocks[i])
            req.blocks[i] = 0
            req.finish[i] = self.t
            self.arrivals.finished(self.t)
            self._completed(i)

    def _completed(self, i: int):
        w = self.window
        self.completed.append(i)
        if self.first_measured is None:
            if w.warmup_requests is not None:
                if len(self.completed) == w.warmup_requests:
                    self.first_measured, self.t_start = len(self.completed), self.t
                return
            if self.t <= w.warmup_s:
                return
            self.first_measured = len(self.completed) - 1    # the first completion after warmup_s
        if w.num_requests is not None and not self.done \
                and len(self.completed) - self.first_measured == w.num_requests:
            self.t_end, self.done = self.t, True

    # -- the numbers --

    def _measured(self) -> np.ndarray:
        if self.first_measured is None or self.t_end is None:
            raise ValueError("the measured window closed before any request completed in it: lengthen "
                             "duration_s or shorten the warm-up")
        ids = np.array(self.completed[self.first_measured:], dtype=np.int64)
        if self.window.num_requests is not None:
            ids = ids[:self.window.num_requests]
        else:
            ids = ids[self.req.finish[ids] <= self.t_end]
        if not len(ids):
            raise ValueError(f"no request completed in the measured window [{self.t_start:.3g}, {self.t_end:.3g}] s:"
                             f" lengthen duration_s")
        return ids

    def result(self, slo: Slo) -> ServingResult:
        req, n = self.req, self.req.n
        ids = self._measured()
        steps = self.log.records()
        t0, t1 = self.t_start, self.t_end
        span = t1 - t0
        measured = np.zeros(n, dtype=bool)
        measured[ids] = True
        ttft = req.first_token[ids] - req.arrival[ids]
        e2e = req.finish[ids] - req.arrival[ids]
        out_len = req.output_len[ids]
        multi = out_len > 1
        tpot = (e2e[multi] - ttft[multi]) / (out_len[multi] - 1)
        # Every decode gap is its step's duration (each running decode is in every step), so ITLs are the step
        # durations counted once per measured request decoding in them, plus the gaps across preemptions.
        seg = np.array(self.segments, dtype=np.int64).reshape(-1, 3)
        seg = seg[measured[seg[:, 0]]]
        count = np.bincount(seg[:, 1], minlength=self.n_steps + 1) - \
            np.bincount(seg[:, 2] + 1, minlength=self.n_steps + 1)   # decoders per step, by difference
        gaps = np.array([g for i, g in self.gaps if measured[i]], dtype=np.float64)
        itl = Stats.of(np.concatenate([steps.duration, gaps]),
                       np.concatenate([np.cumsum(count)[:self.n_steps], np.ones(len(gaps), dtype=np.int64)]))
        ok = ttft <= slo.ttft_s
        ok[multi] &= tpot <= slo.tpot_s
        overlap = np.clip(np.minimum(steps.start + steps.duration, t1) - np.maximum(steps.start, t0), 0, None)
        batch = steps.decode_seqs + steps.prefill_seqs
        ttft_s, tpot_s = Stats.of(ttft), Stats.of(tpot)
        pre = np.asarray(self.preempt_times)
        return ServingResult(
            ttft=ttft_s, tpot=tpot_s, itl=itl, e2e=Stats.of(e2e),
            requests_per_s=len(ids) / span, output_tok_s=float(out_len.sum()) / span,
            total_tok_s=float(out_len.sum() + req.input_len[ids].sum()) / span,
            goodput_rps=float(ok.sum()) / span, slo_attainment=float(ok.mean()),
            slo_p99_met=bool(ttft_s.p99 <= slo.ttft_s and not tpot_s.p99 > slo.tpot_s),
            mean_batch=float(np.dot(batch, overlap) / span),
            preemptions=int(((pre >= t0) & (pre < t1)).sum()), measured_requests=len(ids), window=(t0, t1),
            slo=slo, steps=steps,
            requests=RequestRecords(req.arrival[:n].copy(), req.first_token[:n].copy(), req.finish[:n].copy(),
                                    req.input_len[:n].copy(), req.output_len[:n].copy(), req.generated[:n].copy(),
                                    req.preemptions[:n].copy(), measured))


__all__ = ["StepModel", "Lengths", "ClosedLoop", "OpenLoop", "Workload", "EngineConfig", "Window", "Slo",
           "MLPERF_SERVER_SLO", "MLPERF_BENCHMARK", "DEFAULT_SLO", "slo_for", "Stats", "StepRecords",
           "RequestRecords", "ServingResult", "simulate", "MAX_NUM_BATCHED_TOKENS", "MAX_NUM_SEQS", "BLOCK_SIZE"]
