"""The published configs of the models ncl ships, and their parameter counts: plain dataclasses, no
torch, so that what only reads a config (`ncl-bench params`, `predict`, `validate`, the cost model) runs
without it.  The torch models (llama.py, exaone.py, gpt_oss.py) import their config from here."""
from dataclasses import dataclass, field
from typing import Optional, Tuple

SLIDING, FULL = "sliding_attention", "full_attention"  # Hugging Face's layer_types strings
MXFP4_BLOCK = 32  # values per MXFP4 block (ncl/models/mxfp4.py's BLOCK; tests/test_mxfp4.py pins them equal)


# ---- Llama 3.x -------------------------------------------------------------------------------------------------
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


@dataclass
class LlamaConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    ffn_dim: int = 14336
    vocab_size: int = 128256
    rope_theta: float = 500000.0
    rope_scaling: Optional[dict] = field(default_factory=lambda: dict(LLAMA3_ROPE))
    norm_eps: float = 1e-5
    max_seq_len: int = 131072
    tie_embeddings: bool = False

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, not {getattr(self, name)!r}")
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim {self.dim}, n_heads {self.n_heads} and n_kv_heads {self.n_kv_heads}: "
                             "heads must divide dim and KV heads must divide heads")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        """From a Hugging Face config.json (LlamaForCausalLM)."""
        return cls(dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
                   n_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
                   ffn_dim=hf["intermediate_size"], vocab_size=hf["vocab_size"],
                   rope_theta=float(hf.get("rope_theta", 10000.0)), rope_scaling=hf.get("rope_scaling"),
                   norm_eps=hf.get("rms_norm_eps", 1e-5), max_seq_len=hf.get("max_position_embeddings", 131072),
                   tie_embeddings=hf.get("tie_word_embeddings", False))

    def to_hf(self) -> dict:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.dim,
                "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
                "num_key_value_heads": self.n_kv_heads, "intermediate_size": self.ffn_dim,
                "vocab_size": self.vocab_size, "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
                "rms_norm_eps": self.norm_eps, "max_position_embeddings": self.max_seq_len,
                "tie_word_embeddings": self.tie_embeddings, "hidden_act": "silu", "head_dim": self.head_dim}


LLAMA_CONFIGS = {
    "llama-3.1-8b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336),
    "llama-3.3-70b": LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672),
    "llama-3.1-70b": LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672),  # 3.3's architecture
    "llama-3.1-405b": LlamaConfig(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim=53248),
    # for tests: 2 KV heads, so TP 4 and 8 replicate them; long-context rope scaling as the big ones
    "llama-tiny": LlamaConfig(dim=64, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=160, vocab_size=256,
                              max_seq_len=1024,
                              rope_scaling={**LLAMA3_ROPE, "original_max_position_embeddings": 64}),
}


def llama_param_count(cfg: LlamaConfig) -> int:
    """Parameters of the whole model (every Llama parameter is active for every token)."""
    kv = cfg.n_kv_heads * cfg.head_dim
    attention = cfg.dim * cfg.dim * 2 + cfg.dim * kv * 2        # wq, wo; wk, wv
    mlp = 3 * cfg.dim * cfg.ffn_dim                             # w1, w3, w2
    layer = attention + mlp + 2 * cfg.dim                       # + two RMSNorms
    embeddings = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
    return cfg.n_layers * layer + embeddings + cfg.dim          # + the final norm


# ---- EXAONE 4.0 ------------------------------------------------------------------------------------------------
EXAONE_ROPE = {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def pattern_layer_types(n_layers: int, pattern="LLLG") -> tuple:
    """layer_types from Hugging Face's sliding_window_pattern: an int N (every N-th layer full) or a
    string of L (sliding) and G (full) repeated from layer 0, whose last layer is always full."""
    if isinstance(pattern, int):
        return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(n_layers))
    types = [SLIDING if pattern[i % len(pattern)] == "L" else FULL for i in range(n_layers)]
    return tuple(types[:-1] + [FULL])


@dataclass
class ExaoneConfig:
    dim: int = 5120
    n_layers: int = 64
    n_heads: int = 40
    n_kv_heads: int = 8
    head_dim: int = 128
    ffn_dim: int = 27392
    vocab_size: int = 102400
    sliding_window: Optional[int] = 4096
    layer_types: Optional[tuple] = None   # per layer SLIDING or FULL; default LLLG repeated
    rope_theta: float = 1000000.0
    rope_scaling: Optional[dict] = field(default_factory=lambda: dict(EXAONE_ROPE))
    norm_eps: float = 1e-5
    max_seq_len: int = 131072
    tie_embeddings: bool = False

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size", "max_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ExaoneConfig.{name} must be a positive int, not {getattr(self, name)!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ValueError(f"sliding_window must be None or a positive int, not {self.sliding_window!r}")
        if self.layer_types is None:
            self.layer_types = pattern_layer_types(self.n_layers, 4 if self.sliding_window else 1)
        self.layer_types = tuple(self.layer_types)[:self.n_layers]  # fewer layers: the model's first ones
        if len(self.layer_types) != self.n_layers or set(self.layer_types) - {SLIDING, FULL}:
            raise ValueError(f"layer_types must give {SLIDING!r} or {FULL!r} for each of the {self.n_layers} layers")
        if self.sliding_window is None and SLIDING in self.layer_types:
            raise ValueError("sliding layers need a sliding_window")

    def window(self, layer: int) -> Optional[int]:
        """The window of layer `layer` (None: it attends to every position)."""
        return self.sliding_window if self.layer_types[layer] == SLIDING else None

    def rotates(self, layer: int) -> bool:
        """Whether layer `layer` applies RoPE: with a sliding window, only its sliding layers do."""
        return self.sliding_window is None or self.layer_types[layer] == SLIDING

    @classmethod
    def from_hf(cls, hf: dict) -> "ExaoneConfig":
        """From a Hugging Face config.json (Exaone4ForCausalLM; rope_theta top-level or in rope_parameters)."""
        rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 1000000.0))
        n_layers, window = hf["num_hidden_layers"], hf.get("sliding_window")
        types = hf.get("layer_types")
        if types is None:  # older configs give only the pattern
            pattern = hf.get("sliding_window_pattern") or 4
            types = pattern_layer_types(n_layers, pattern) if window else (FULL,) * n_layers
        return cls(dim=hf["hidden_size"], n_layers=n_layers, n_heads=hf["num_attention_heads"],
                   n_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
                   head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
                   ffn_dim=hf["intermediate_size"], vocab_size=hf["vocab_size"], sliding_window=window,
                   layer_types=tuple(types), rope_theta=float(theta),
                   rope_scaling=rope if rope.get("rope_type", "default") != "default" else None,
                   norm_eps=hf.get("rms_norm_eps", 1e-5), max_seq_len=hf.get("max_position_embeddings", 131072),
                   tie_embeddings=hf.get("tie_word_embeddings", False))

    def to_hf(self) -> dict:
        return {"architectures": ["Exaone4ForCausalLM"], "model_type": "exaone4", "hidden_size": self.dim,
                "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
                "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim, "intermediate_size": self.ffn_dim,
                "vocab_size": self.vocab_size, "sliding_window": self.sliding_window,
                "layer_types": list(self.layer_types), "rope_theta": self.rope_theta,
                "rope_scaling": self.rope_scaling, "rms_norm_eps": self.norm_eps,
                "max_position_embeddings": self.max_seq_len, "tie_word_embeddings": self.tie_embeddings,
                "hidden_act": "silu"}


EXAONE_CONFIGS = {
    # LGAI-EXAONE/EXAONE-4.0-32B config.json (Hugging Face), as published
    "exaone-4.0-32b": ExaoneConfig(),
    # for tests: 4 layers (LLLG: both kinds), a window of 4 positions, 2 KV heads (replicated at TP 4 and 8),
    # heads * head_dim (128) != dim (64), llama3 rope scaling that matters within the test's positions
    "exaone-tiny": ExaoneConfig(dim=64, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=16, ffn_dim=160, vocab_size=256,
                                sliding_window=4, max_seq_len=1024,
                                rope_scaling={**EXAONE_ROPE, "original_max_position_embeddings": 64}),
}


def exaone_param_count(cfg: ExaoneConfig) -> int:
    """Parameters of the whole model (all active for every token).  The model card of EXAONE-4.0-32B
    publishes 30.95B without embeddings and a model size of 32.0B; this gives 30,954,640,384 without
    the two (untied) embedding matrices and 32,003,216,384 in all."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    attention = 2 * cfg.dim * q + 2 * cfg.dim * kv + 2 * cfg.head_dim  # q, o; k, v; q_norm, k_norm
    layer = attention + 3 * cfg.dim * cfg.ffn_dim + 2 * cfg.dim         # gate, up, down; the two post-norms
    embeddings = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
    return cfg.n_layers * layer + embeddings + cfg.dim                  # + the final norm


# ---- gpt-oss ----------------------------------------------------------------------------------------------------
@dataclass
class GptOssConfig:
    name: str = "gpt-oss-120b"
    n_layers: int = 36
    dim: int = 2880                 # hidden size
    n_heads: int = 64
    n_kv_heads: int = 8
    head_dim: int = 64
    n_experts: int = 128
    top_k: int = 4
    expert_dim: int = 2880          # each expert's intermediate size
    vocab_size: int = 201088
    sliding_window: int = 128
    layer_types: Optional[tuple] = None   # per layer SLIDING or FULL; default: sliding, full, sliding, ...
    rope_theta: float = 150000.0
    rope_scaling: dict = field(default_factory=lambda: {
        "rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "original_max_position_embeddings": 4096, "truncate": False})
    norm_eps: float = 1e-5
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    max_seq_len: int = 131072

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = tuple(SLIDING if i % 2 == 0 else FULL for i in range(self.n_layers))
        self.layer_types = tuple(self.layer_types)[:self.n_layers]  # fewer layers: the model's first ones
        if len(self.layer_types) != self.n_layers or set(self.layer_types) - {SLIDING, FULL}:
            raise ValueError(f"layer_types must give {SLIDING!r} or {FULL!r} for each of the {self.n_layers} layers")
        if self.dim % MXFP4_BLOCK or self.expert_dim % MXFP4_BLOCK:
            raise ValueError(f"dim ({self.dim}) and expert_dim ({self.expert_dim}) must be multiples of "
                             f"{MXFP4_BLOCK} (MXFP4 blocks)")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k ({self.top_k}) must be in 1..n_experts ({self.n_experts})")

    @classmethod
    def from_hf(cls, config: dict, name: str = "gpt-oss") -> "GptOssConfig":
        """From a Hugging Face config.json (model_type gpt_oss)."""
        rope = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", config.get("rope_theta", 150000.0))
        return cls(name=name, n_layers=config["num_hidden_layers"], dim=config["hidden_size"],
                   n_heads=config["num_attention_heads"], n_kv_heads=config["num_key_value_heads"],
                   head_dim=config.get("head_dim", config["hidden_size"] // config["num_attention_heads"]),
                   n_experts=config["num_local_experts"],
                   top_k=config.get("num_experts_per_tok", config.get("experts_per_token", 4)),
                   expert_dim=config["intermediate_size"], vocab_size=config["vocab_size"],
                   sliding_window=config.get("sliding_window", 128), layer_types=config.get("layer_types"),
                   rope_theta=float(theta), rope_scaling=rope or None, norm_eps=config.get("rms_norm_eps", 1e-5),
                   swiglu_limit=config.get("swiglu_limit", 7.0),
                   max_seq_len=config.get("max_position_embeddings", 131072))

    def to_hf(self) -> dict:
        """The Hugging Face config.json of this config (experts in MXFP4)."""
        return {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "num_hidden_layers": self.n_layers,
                "hidden_size": self.dim, "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
                "head_dim": self.head_dim, "num_local_experts": self.n_experts, "num_experts_per_tok": self.top_k,
                "experts_per_token": self.top_k, "intermediate_size": self.expert_dim, "vocab_size": self.vocab_size,
                "sliding_window": self.sliding_window, "layer_types": list(self.layer_types),
                "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling, "rms_norm_eps": self.norm_eps,
                "swiglu_limit": self.swiglu_limit, "max_position_embeddings": self.max_seq_len,
                "attention_bias": True, "tie_word_embeddings": False, "hidden_act": "silu",
                "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
                    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}}


GPT_OSS_CONFIGS = {
    # openai/gpt-oss-120b and -20b config.json (Hugging Face), as published
    "gpt-oss-120b": GptOssConfig(name="gpt-oss-120b", n_layers=36, n_experts=128),
    "gpt-oss-20b": GptOssConfig(name="gpt-oss-20b", n_layers=24, n_experts=32),
    # for tests: every feature of the big ones at a size that runs in milliseconds
    "gpt-oss-tiny": GptOssConfig(name="gpt-oss-tiny", n_layers=4, dim=64, n_heads=8, n_kv_heads=2, head_dim=16,
                                 n_experts=8, top_k=2, expert_dim=64, vocab_size=256, sliding_window=4,
                                 max_seq_len=512),
}


def gpt_oss_param_count(cfg: GptOssConfig) -> Tuple[int, int]:
    """(total, active per token) parameters, counted as OpenAI's model card does: every weight and
    bias (MXFP4 expert weights count one parameter per value, scales not counted); active = the
    attention, norms, router and top_k experts of every layer, plus the LM head (the embedding is a
    lookup, not counted as active):

        gpt-oss-120b  116,829,156,672 total   5,132,849,472 active   (card: 116.83B / 5.13B)
        gpt-oss-20b    20,914,757,184 total   3,608,307,264 active   (card:  20.91B / 3.61B)
    """
    d, hd = cfg.dim, cfg.head_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    attention = (d * q + q) + 2 * (d * kv + kv) + (q * d + d) + cfg.n_heads   # q, k, v, o (biases) and sinks
    norms = 2 * d
    router = d * cfg.n_experts + cfg.n_experts
    expert = (d * 2 * cfg.expert_dim + 2 * cfg.expert_dim) + (cfg.expert_dim * d + d)
    embedding = head = cfg.vocab_size * d
    total = cfg.n_layers * (attention + norms + router + cfg.n_experts * expert) + embedding + head + d
    active = cfg.n_layers * (attention + norms + router + cfg.top_k * expert) + head + d
    return total, active


# ---- groups ---------------------------------------------------------------------------------------------------
