"""A model's shape as the cost model sees it, its split over ranks, and the collectives each rank issues.

`Arch.of(cfg)` reads any of ncl.models' configs (Llama 3.x, gpt-oss, EXAONE) by attribute name, so this
module needs neither torch nor the models.  The sharding rules are ncl.models' own:
  dense (Llama, EXAONE)  tensor-parallel over all `tp` ranks: query heads, FFN columns and vocabulary
                         split; KV heads split when tp divides them, else each rank keeps the one its
                         query heads read.  Per layer one all-reduce after attention, one after the MLP.
  MoE (gpt-oss)          N = lcm(tp, ep) ranks: attention tensor-parallel over groups of tp consecutive
                         ranks, data-parallel over the N/tp groups (each its share of the batch); experts
                         over groups of ep ranks; each TP rank routes 1/tp of its group's tokens, the
                         experts' rows travel by all_to_allv (ncl.moe.dispatch / combine) and the TP group
                         all-gathers the combined rows.
`forward_collectives` lists the calls of one forward pass in the order the sharded model makes them,
with the byte counts the flight recorder keeps (the collective's own count argument x item size).
"""
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from ..collectives import BLOCK_COUNTED  # noqa: F401 (collectives whose count is one rank's block)

SLIDING = "sliding_attention"
ALIASES = {
    "n_layers": ("n_layers", "num_hidden_layers", "num_layers"),
    "dim": ("dim", "hidden_size", "d_model"),
    "n_heads": ("n_heads", "num_attention_heads", "num_heads"),
    "n_kv_heads": ("n_kv_heads", "num_key_value_heads", "num_kv_heads"),
    "head_dim": ("head_dim",),
    "ffn_dim": ("ffn_dim", "expert_dim", "intermediate_size", "hidden_dim"),
    "vocab_size": ("vocab_size",),
    "num_experts": ("n_experts", "num_experts", "num_local_experts"),
    "top_k": ("top_k", "experts_per_token", "num_experts_per_tok", "n_active_experts"),
    "tie_embeddings": ("tie_embeddings", "tie_word_embeddings"),
}
# ncl.moe: dispatches whose largest sender moves fewer bytes go as one packed exchange of rows + ids + weights
MOE_PACKED_MAX_BYTES = 256 << 10
COUNT_BYTES = 8          # int64 counts and token ids
MOE_STEP_BYTES = 2 << 20  # ncl.moe's one step: a staging slot (NCL_BUFFSIZE's default 4 MiB holds two)
MOE_WEIGHT_BYTES = 4      # float32 routing weights
ARGMAX_BYTES = (4, 8)    # ParallelLMHead.argmax: the float32 best logit (MAX), then the int64 token id (MIN)


def config_value(cfg, key: str, default=None):
    """A field of a model config under any of its usual names."""
    for name in ALIASES.get(key, (key,)):
        if hasattr(cfg, name):
            return getattr(cfg, name)
    if key == "head_dim":
        return config_value(cfg, "dim") // config_value(cfg, "n_heads")
    if default is not None:
        return default
    raise AttributeError(f"{type(cfg).__name__} has no {key} (looked for {', '.join(ALIASES.get(key, (key,)))})")


@dataclass(frozen=True)
class Arch:
    name: str
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int                 # the MLP's (or each expert's) intermediate size
    vocab: int
    tied: bool
    num_experts: int = 0
    top_k: int = 0
    sliding_window: int = 0
    sliding_layers: int = 0      # layers that attend to a window of sliding_window positions
    biases: bool = False         # gpt-oss: attention and expert biases

    @classmethod
    def of(cls, cfg, name: Optional[str] = None) -> "Arch":
        types = tuple(getattr(cfg, "layer_types", None) or ())
        n_layers = config_value(cfg, "n_layers")
        window = int(getattr(cfg, "sliding_window", 0) or 0)
        return cls(name=name or getattr(cfg, "name", type(cfg).__name__), n_layers=n_layers,
                   dim=config_value(cfg, "dim"), n_heads=config_value(cfg, "n_heads"),
                   n_kv_heads=config_value(cfg, "n_kv_heads"), head_dim=config_value(cfg, "head_dim"),
                   ffn_dim=config_value(cfg, "ffn_dim"), vocab=config_value(cfg, "vocab_size"),
                   tied=bool(config_value(cfg, "tie_embeddings", False)),
                   num_experts=config_value(cfg, "num_experts", 0), top_k=config_value(cfg, "top_k", 0),
                   sliding_window=window, sliding_layers=sum(t == SLIDING for t in types[:n_layers]) if window else 0,
                   biases=config_value(cfg, "num_experts", 0) > 0)

    @property
    def moe(self) -> bool:
        return self.num_experts > 0

    @property
    def full_layers(self) -> int:
        return self.n_layers - self.sliding_layers


@dataclass(frozen=True)
class Split:
    """How ranks share the model: tp for attention (and a dense MLP), ep for experts."""
    tp: int
    ep: int = 1

    def world(self, arch: Arch) -> int:
        return self.tp * self.ep // math.gcd(self.tp, self.ep) if arch.moe else self.tp

    def dp(self, arch: Arch) -> int:
        """Data-parallel attention groups: each runs its share of the batch."""
        return self.world(arch) // self.tp

    def problem(self, arch: Arch) -> Optional[str]:
        """Why this split cannot shard arch (None if it can)."""
        tp, ep = self.tp, self.ep
        if tp < 1 or ep < 1:
            return f"tp and ep must be >= 1, not {tp} and {ep}"
        if arch.n_heads % tp:
            return f"tp {tp} does not divide the {arch.n_heads} attention heads"
        if arch.n_kv_heads % tp and tp % arch.n_kv_heads:
            return f"tp {tp} neither divides nor is a multiple of the {arch.n_kv_heads} KV heads"
        if not arch.moe:
            if ep != 1:
                return "ep applies to mixture-of-experts models only"
            if arch.ffn_dim % tp:
                return f"tp {tp} does not divide the FFN dimension {arch.ffn_dim}"
            return None
        if arch.num_experts % ep:
            return f"ep {ep} does not divide the {arch.num_experts} experts"
        if arch.vocab % tp:
            return f"tp {tp} does not divide the vocabulary ({arch.vocab})"
        return None

    def heads(self, arch: Arch) -> Tuple[int, int]:
        """(query heads, KV heads) of one rank."""
        return arch.n_heads // self.tp, max(1, arch.n_kv_heads // self.tp)


@dataclass(frozen=True)
class Collective:
    kind: str          # all_reduce, all_gather, all_to_allv, ...
    nbytes: int        # as the flight recorder counts it (the call's count x item size)
    group: str         # "tp", "ep" or "world"
    size: int          # ranks in the group

    @property
    def nccl_bytes(self) -> int:
        """nccl-tests' size column of the call (what the link model prices)."""
        return self.nbytes * self.size if self.kind in BLOCK_COUNTED else self.nbytes


def _aligned(nbytes: int, to: int = 8) -> int:
    return -(-nbytes // to) * to


def distinct_ranks(arch: Arch, ep: int) -> float:
    """Expected ranks a token's top_k experts sit on, experts drawn without replacement and spread
    evenly (balanced routing): ep x (1 - C(E - E/ep, k) / C(E, k))."""
    if ep <= 1:
        return 1.0
    e, k, per = arch.num_experts, arch.top_k, arch.num_experts // ep
    miss = math.comb(e - per, k) / math.comb(e, k) if e - per >= k else 0.0
    return ep * (1 - miss)


def moe_rows_per_rank(arch: Arch, split: Split, tokens_per_group: int) -> int:
    """Tokens one rank routes: its 1/tp slice of its TP group's tokens (ncl.models.gpt_oss.MoE)."""
    return -(-tokens_per_group // split.tp)


def forward_collectives(arch: Arch, split: Split, tokens: int, sequences: int, act_bytes: int = 2,
                        routing: Optional[Sequence[Tuple[int, int, int]]] = None,
                        compress: Optional[str] = None) -> List[Collective]:
    """The collectives of one forward pass of `tokens` new positions over `sequences` sequences (one
    rank's batch: a dense model's whole batch, a MoE rank's data-parallel share), that ends in the
    greedy next token of each sequence.  routing[layer] = (rows this rank sends, the most any rank of its
    EP group sends, rows this rank receives) in that layer's dispatch, when a run recorded its routing;
    else balanced routing's expectation for all three (a rank receives what it sends).  compress: the
    activations' all-reduces go block-scaled in that format (ncl.compress: an all_to_all and an
    all_gather of codes each)."""
    tp, n = split.tp, split.world(arch)
    act = tokens * arch.dim * act_bytes
    calls: List[Collective] = []
    tp_group = "world" if tp == n else "tp"

    summed = [Collective("all_reduce", act, tp_group, tp)]  # one all-reduce of the activations
    if compress is not None:
        from ..compress import wire_calls
        summed = [Collective(kind, nbytes, tp_group, tp)
                  for kind, nbytes in wire_calls(tokens * arch.dim, tp, compress)]
    if tp > 1:
        calls += summed                                                              # vocab-parallel embedding
    for layer in range(arch.n_layers):
        if tp > 1:
            calls += summed                                                          # attention out projection
        if not arch.moe:
            if tp > 1:
                calls += summed                                                      # MLP down projection
            continue
        calls += _moe_calls(arch, split, tokens, act_bytes, None if routing is None else routing[layer])
    if tp > 1:
        calls += [Collective("all_reduce", sequences * b, tp_group, tp) for b in ARGMAX_BYTES]
    return calls


def _moe_calls(arch: Arch, split: Split, group_tokens: int, act_bytes: int,
               routed: Optional[Tuple[int, int, int]]) -> List[Collective]:
    tp, ep, n = split.tp, split.ep, split.world(arch)
    rows = moe_rows_per_rank(arch, split, group_tokens)
    calls = []
    if ep > 1:
        ep_group = "world" if ep == n else "ep"
        sent, largest, received = routed or (round(rows * distinct_ranks(arch, ep)),) * 3
        row = arch.dim * act_bytes
        # ncl.moe's one step (native/moe.c): the counts, and each row with its ids and weights when every
        # block fits a piece of a staging slot; `largest` (a rank's whole send) bounds its largest block
        record = _aligned(_aligned(row) + arch.top_k * (COUNT_BYTES + MOE_WEIGHT_BYTES))  # row, ids, weights
        piece = (MOE_STEP_BYTES - _aligned(ep * COUNT_BYTES, 64)) // ep & ~63  # after the sender's counts
        calls.append(Collective("moe_dispatch", sent * record, ep_group, ep))
        if largest > piece // record:
            if largest * row < MOE_PACKED_MAX_BYTES:
                calls.append(Collective("all_to_allv", sent * (row + 2 * arch.top_k * 8), ep_group, ep))  # packed
            else:
                calls.append(Collective("all_to_allv", sent * row, ep_group, ep))       # rows
                calls.append(Collective("all_to_allv", sent * 2 * arch.top_k * 8, ep_group, ep))  # ids, weights
        # combine: the rows back in one step, or in as many as the largest block needs (one call either way)
        back = "moe_combine" if piece >= row else "all_to_allv"
        calls.append(Collective(back, received * row, ep_group, ep))
    if tp > 1:
        calls.append(Collective("all_gather", rows * arch.dim * act_bytes, "world" if tp == n else "tp", tp))
    return calls
