"""What a point needs before it runs: per-rank parameter and KV-cache bytes, the peak of the
activations, whether all ranks fit this host's memory.

The byte counts come from the config alone (nothing is built), with the sharding rules of
ncl.models: attention heads, FFN columns and the vocabulary split over TP (KV heads replicated
when TP exceeds them), experts split over EP, MXFP4 experts at 4.25 bits per weight.
"""
import math
import os
from dataclasses import dataclass
from typing import Optional

from ncl.topology.arch import config_value  # noqa: F401  (the one reader of config fields; callers use it from here)
from ncl.topology.chip import WEIGHT_BYTES

PROCESS_BYTES = 450 << 20   # one rank's interpreter, torch, ncl and buffers: peak RSS less weights, 405B TP 8
MOE_CHUNK_TOKENS = 8192     # MoE prefill passes: each pass decodes the MXFP4 experts anew, so fewer, larger ones
HOST_RESERVE = 0.90         # use at most this share of MemAvailable

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def model_config(name: str, layers: Optional[int] = None):
    """ncl.models' config `name`, cut to `layers` layers of the real width (per-layer fields such
    as gpt-oss's layer_types cut with it)."""
    from ncl.models import get_config
    full = get_config(name)
    if layers is None:
        return full
    extra = {"layer_types": tuple(full.layer_types[:layers])} if getattr(full, "layer_types", None) else {}
    return get_config(name, n_layers=layers, **extra)


def torch_dtype(name: str):
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def is_moe(cfg) -> bool:
    return config_value(cfg, "num_experts", 0) > 0


def chunk_tokens(cfg) -> int:
    """Prompt tokens (over the batch) per prefill pass of cfg's model."""
    from ncl.models.generate import PREFILL_CHUNK_TOKENS
    return MOE_CHUNK_TOKENS if is_moe(cfg) else PREFILL_CHUNK_TOKENS


@dataclass
class Footprint:
    params: int        # bytes of weights on the largest rank
    kv_cache: int      # bytes of the KV cache on one rank
    activations: int   # peak bytes of one prefill's temporaries on one rank
    nranks: int

    @property
    def per_rank(self) -> int:
        return self.params + self.kv_cache + self.activations + PROCESS_BYTES

    @property
    def host(self) -> int:
        return self.per_rank * self.nranks


def footprint(cfg, tp: int, ep: int, nranks: int, batch: int, seq: int, dtype: str) -> Footprint:
    """Memory of one rank of cfg (with its n_layers) at this split, batch and max sequence."""
    es = DTYPE_BYTES[dtype]
    d, v, layers = config_value(cfg, "dim"), config_value(cfg, "vocab_size"), config_value(cfg, "n_layers")
    h, kv, hd = config_value(cfg, "n_heads"), config_value(cfg, "n_kv_heads"), config_value(cfg, "head_dim")
    f = config_value(cfg, "ffn_dim")
    kv_local = max(1, kv // tp)
    attn = d * (h // tp) * hd * 2 + d * kv_local * hd * 2 + 2 * d
    tables = (1 if config_value(cfg, "tie_embeddings", False) else 2) * math.ceil(v / tp) * d
    if is_moe(cfg):
        e = config_value(cfg, "num_experts")
        experts = math.ceil(e / ep) * (3 * d * f * WEIGHT_BYTES["mxfp4"] + (2 * f + d) * es)  # MXFP4 weights, biases
        layer = (attn + d * e + e) * es + experts
        act_ffn = batch * seq * config_value(cfg, "top_k") * 2 * f * 4  # routed copies, float32 worst case
    else:
        layer = (attn + 3 * d * (f // tp)) * es
        act_ffn = batch * seq * 2 * (f // tp) * es
    params = int(layers * layer + tables * es)
    kv_cache = 2 * layers * batch * seq * kv_local * hd * es
    from ncl.models.generate import prefill_chunk
    chunk = prefill_chunk(batch, seq, chunk_tokens(cfg))  # the prefill runs in chunks of this many positions
    act_ffn = act_ffn * chunk // seq
    scores = batch * (h // tp) * chunk * seq * 4  # one layer's attention scores of a chunk (float32)
    logits = batch * math.ceil(v / tp) * 4 * 2  # last position's logits (and their gather)
    hidden = batch * chunk * d * es * 4  # the residual stream and three temporaries
    return Footprint(params, kv_cache, int(max(scores, act_ffn) + logits + hidden), nranks)


def available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fits(fp: Footprint, available: Optional[int] = None) -> Optional[str]:
    """None if the point fits this host, else why not (for the report and the refusal message)."""
    available = available_bytes() if available is None else available
    if fp.host <= HOST_RESERVE * available:
        return None
    gib = 2 ** 30
    return (f"needs ~{fp.host / gib:.1f} GiB on this host ({fp.nranks} ranks x {fp.per_rank / gib:.2f} GiB: "
            f"weights {fp.params / gib:.2f}, KV cache {fp.kv_cache / gib:.2f}, activations "
            f"{fp.activations / gib:.2f}, process {PROCESS_BYTES / gib:.2f}) but {available / gib:.1f} GiB is "
            f"available (limit {HOST_RESERVE:.0%})")


# ---- the target topology ------------------------------------------------------------------------------------------

def topology(name_or_path: Optional[str]):
    """The topology given (a shipped name or a file), else ncl.topology's default; None when the
    module is missing.  ValueError / OSError from a bad or missing file."""
    try:
        from ncl import topology as topo
    except ImportError:
        return None
    return topo.load_topology(name_or_path) if name_or_path else topo.default_topology()


def fit_topology(topo, nranks: int):
    """topo grown to nranks chips when it has fewer (more servers of the same kind)."""
    return topo.scaled(nranks) if topo is not None and nranks > topo.num_chips else topo


# ---- the split --------------------------------------------------------------------------------------------------

def world_size(cfg, tp: int, ep: int) -> int:
    """Ranks of a point: tp for a dense model; for a MoE the smallest world both tp and ep divide
    (attention TP groups of tp ranks, data-parallel over the N/tp groups; experts over ep ranks)."""
    return tp * ep // math.gcd(tp, ep) if is_moe(cfg) else tp


def local_batch(cfg, tp: int, ep: int, batch: int) -> int:
    """Sequences one rank runs: the whole batch for a dense model (TP ranks share it); for a MoE
    the batch is split over the N/tp data-parallel attention groups."""
    return batch // (world_size(cfg, tp, ep) // tp) if is_moe(cfg) else batch


def split_problem(cfg, tp: int, ep: int, batch: Optional[int] = None) -> Optional[str]:
    """Why tp / ep cannot shard cfg (None if they can)."""
    h, kv = config_value(cfg, "n_heads"), config_value(cfg, "n_kv_heads")
    if h % tp:
        return f"--tp {tp} does not divide the {h} attention heads"
    if kv % tp and tp % kv:
        return f"--tp {tp} neither divides nor is a multiple of the {kv} KV heads"
    if not is_moe(cfg):
        if ep != 1:
            return "--ep applies to mixture-of-experts models only (gpt-oss-*)"
        if config_value(cfg, "ffn_dim") % tp:
            return f"--tp {tp} does not divide the FFN dimension {config_value(cfg, 'ffn_dim')}"
        return None
    e = config_value(cfg, "num_experts")
    if e % ep:
        return f"--ep {ep} does not divide the {e} experts"
    if config_value(cfg, "vocab_size") % tp:
        return f"--tp {tp} does not divide the vocabulary ({config_value(cfg, 'vocab_size')})"
    groups = world_size(cfg, tp, ep) // tp
    if batch is not None and batch % groups:
        return (f"--batch {batch} does not split over the {groups} data-parallel attention groups of "
                f"--tp {tp} --ep {ep} ({world_size(cfg, tp, ep)} ranks)")
    return None
