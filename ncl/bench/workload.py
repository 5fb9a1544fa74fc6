"""What a serving simulation runs: the workload (arrivals and lengths), the engine's limits, the measured
window and the service-level objectives, each validated with a clear ValueError (ncl.bench.serving runs them)."""
import math
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

# vLLM's defaults for `vllm serve` on devices under 70 GiB (an RNGD card has 48 GB), from
# EngineArgs.get_batch_defaults in vllm/engine/arg_utils.py: 2048 batched tokens and 256 sequences
# (8192 and 1024 on >= 70 GiB devices other than A100).
MAX_NUM_BATCHED_TOKENS = 2048
MAX_NUM_SEQS = 256
# vLLM's KV block size on CUDA/ROCm: CacheConfig.block_size has no static default and the platform sets 16
# (vllm/platforms/cuda.py and rocm.py, check_and_update_config).
BLOCK_SIZE = 16
MAX_REQUESTS = 200_000   # arrivals one run may hold: a bound on time and memory whatever the window asks


# ---- parameters --------------------------------------------------------------------------------------------------

def _int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, not {value!r}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, not {value}")
    return int(value)


def _real(name: str, value, lo: float = 0.0, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, not {value!r}")
    if not math.isfinite(value) or value < lo or (strict and value == lo):
        raise ValueError(f"{name} must be finite and {'>' if strict else '>='} {lo}, not {value}")
    return float(value)


@dataclass(frozen=True)
class Lengths:
    """Token counts of requests: build with Lengths.fixed, .uniform, .normal or .lognormal (a plain int
    means fixed). Every draw is rounded and clipped to [lo, hi], so the longest request is known before the
    run starts and one that could never fit the KV cache is refused up front."""
    kind: str
    mean: float
    spread: float
    lo: int
    hi: int

    KINDS = ("fixed", "uniform", "normal", "lognormal")

    @classmethod
    def fixed(cls, n: int) -> "Lengths":
        n = _int("a fixed length", n, 1)
        return cls("fixed", n, 0.0, n, n)

    @classmethod
    def uniform(cls, lo: int, hi: int) -> "Lengths":
        """Integers uniform in [lo, hi], both included."""
        lo, hi = _int("uniform lo", lo, 1), _int("uniform hi", hi, 1)
        return cls("uniform", (lo + hi) / 2, 0.0, lo, hi)

    @classmethod
    def normal(cls, mean: float, std: float, hi: Optional[int] = None) -> "Lengths":
        """round(Normal(mean, std)) clipped to [1, hi]; hi defaults to mean + 4 std (1 draw in 30,000)."""
        mean, std = _real("normal mean", mean, 1.0), _real("normal std", std)
        return cls("normal", mean, std, 1, math.ceil(mean + 4 * std) if hi is None else hi)

    @classmethod
    def lognormal(cls, mean: float, sigma: float, hi: Optional[int] = None) -> "Lengths":
        """round(exp(Normal(mu, sigma))) with mu chosen so that the mean is `mean` (heavy-tailed, like
        chat-length data), clipped to [1, hi]; hi defaults to exp(mu + 4 sigma) (1 draw in 30,000)."""
        mean, sigma = _real("lognormal mean", mean, 1.0), _real("lognormal sigma", sigma)
        mu = math.log(mean) - sigma * sigma / 2
        return cls("lognormal", mean, sigma, 1, math.ceil(math.exp(mu + 4 * sigma)) if hi is None else hi)

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise ValueError(f"unknown length distribution {self.kind!r}: the kinds are {', '.join(self.KINDS)}")
        _int(f"{self.kind} lo", self.lo, 1)
        if _int(f"{self.kind} hi", self.hi, 1) < self.lo:
            raise ValueError(f"{self.kind} lengths need lo <= hi, not [{self.lo}, {self.hi}]")

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "fixed":
            x = np.full(n, self.lo, dtype=np.float64)
        elif self.kind == "uniform":
            x = rng.integers(self.lo, self.hi + 1, n).astype(np.float64)
        elif self.kind == "normal":
            x = rng.normal(self.mean, self.spread, n)
        else:
            x = rng.lognormal(math.log(self.mean) - self.spread ** 2 / 2, self.spread, n)
        return np.clip(np.rint(x), self.lo, self.hi).astype(np.int64)


def _lengths(name: str, x) -> Lengths:
    if isinstance(x, Lengths):
        return x
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return Lengths.fixed(x)
    raise ValueError(f"{name} must be an int or a Lengths, not {x!r}")


@dataclass(frozen=True)
class ClosedLoop:
    """`concurrency` users, each sending its next request think_time_s after its last one finished."""
    concurrency: int
    think_time_s: float = 0.0

    def __post_init__(self):
        _int("concurrency", self.concurrency, 1)
        _real("think_time_s", self.think_time_s)


@dataclass(frozen=True)
class OpenLoop:
    """Poisson arrivals at `rate` requests per second, whatever the server does."""
    rate: float

    def __post_init__(self):
        _real("rate (requests/s)", self.rate, strict=True)


@dataclass(frozen=True)
class Workload:
    arrivals: Union[ClosedLoop, OpenLoop]
    input_len: Union[int, Lengths]
    output_len: Union[int, Lengths]
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.arrivals, (ClosedLoop, OpenLoop)):
            raise ValueError(f"arrivals must be a ClosedLoop or an OpenLoop, not {self.arrivals!r}")
        object.__setattr__(self, "input_len", _lengths("input_len", self.input_len))
        object.__setattr__(self, "output_len", _lengths("output_len", self.output_len))
        _int("seed", self.seed, 0)


@dataclass(frozen=True)
class EngineConfig:
    max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS
    max_num_seqs: int = MAX_NUM_SEQS
    block_size: int = BLOCK_SIZE

    def __post_init__(self):
        _int("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        _int("max_num_seqs", self.max_num_seqs, 1)
        _int("block_size", self.block_size, 1)
        if self.max_num_batched_tokens < self.max_num_seqs:   # vLLM refuses this too: a full batch of decodes must fit
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({self.max_num_seqs}): every running sequence needs a token of the budget each step")


@dataclass(frozen=True)
class Window:
    """What to measure: give at most one of warmup_requests / warmup_s and one of num_requests / duration_s.
    Unset, a closed loop of C users discards C completions (the first request of every user meets an empty
    server) and measures max(2 C, 32); an open loop discards 50 and measures 500."""
    warmup_requests: Optional[int] = None
    warmup_s: Optional[float] = None
    num_requests: Optional[int] = None
    duration_s: Optional[float] = None

    def __post_init__(self):
        if self.warmup_requests is not None and self.warmup_s is not None:
            raise ValueError("give warmup_requests or warmup_s, not both")
        if self.num_requests is not None and self.duration_s is not None:
            raise ValueError("give num_requests or duration_s, not both")
        if self.warmup_requests is not None:
            _int("warmup_requests", self.warmup_requests, 0)
        if self.warmup_s is not None:
            _real("warmup_s", self.warmup_s)
        if self.num_requests is not None and _int("num_requests", self.num_requests, 1) > MAX_REQUESTS // 2:
            raise ValueError(f"num_requests must be <= {MAX_REQUESTS // 2}, not {self.num_requests}")
        if self.duration_s is not None:
            _real("duration_s", self.duration_s, strict=True)

    def resolved(self, arrivals) -> "Window":
        closed = isinstance(arrivals, ClosedLoop)
        warm_n = self.warmup_requests
        if warm_n is None and self.warmup_s is None:
            warm_n = arrivals.concurrency if closed else 50
        num = self.num_requests
        if num is None and self.duration_s is None:
            num = max(2 * arrivals.concurrency, 32) if closed else 500
        return Window(warm_n, self.warmup_s, num, self.duration_s)


# ---- service-level objectives ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Slo:
    ttft_s: float
    tpot_s: float

    def __post_init__(self):
        _real("slo ttft_s", self.ttft_s, strict=True)
        _real("slo tpot_s", self.tpot_s, strict=True)


# MLPerf Inference's server-scenario limits, which it applies to the 99th percentiles of TTFT and TPOT of a
# run: mlcommons/inference, loadgen/mlperf.conf, `<benchmark>.Server.ttft_latency` / `.tpot_latency` (ms).
MLPERF_SERVER_SLO = {
    "llama2-70b": Slo(2.0, 0.200),
    "llama2-70b-interactive": Slo(0.450, 0.040),
    "mixtral-8x7b": Slo(2.0, 0.200),
    "llama3_1-405b": Slo(6.0, 0.175),
    "llama3_1-405b-interactive": Slo(4.5, 0.080),
    "llama3_1-8b": Slo(2.0, 0.100),
    "llama3_1-8b-interactive": Slo(0.5, 0.030),
    "deepseek-r1": Slo(2.0, 0.080),
    "deepseek-r1-interactive": Slo(1.5, 0.015),
}
# ncl's models (ncl.models.CONFIGS) to the MLPerf benchmark of their class. MLPerf has no Llama 3.x 70B,
# so the 70Bs take Llama 2 70B's limits. gpt-oss and EXAONE have no confirmed limits here: DEFAULT_SLO.
MLPERF_BENCHMARK = {
    "llama-3.1-8b": "llama3_1-8b",
    "llama-3.1-70b": "llama2-70b",
    "llama-3.3-70b": "llama2-70b",
    "llama-3.1-405b": "llama3_1-405b",
}
DEFAULT_SLO = MLPERF_SERVER_SLO["llama2-70b"]   # MLPerf's general-purpose LLM server limits (also Mixtral's)


def slo_for(model: str, interactive: bool = False) -> Slo:
    """MLPerf's server-scenario limits for the class of `model` (an ncl model name or an MLPerf benchmark
    name), its interactive scenario if asked; DEFAULT_SLO for a model MLPerf does not cover."""
    bench = MLPERF_BENCHMARK.get(model, model)
    if interactive:
        bench += "-interactive"
    return MLPERF_SERVER_SLO.get(bench, DEFAULT_SLO)
