"""EXAONE 4.0 (ncl.models.exaone).

In-process: one sliding and one full layer against a reference written out here in float64 torch
(per-head QK RMSNorm, rotate-half RoPE on sliding layers only, a loop over queries with the window
mask, norms after attention and after the MLP); decoding with the KV cache against recomputing the
whole sequence; a checkpoint round trip; the published config and parameter count.  Multi-rank:
exaone_program.py under ncl-run on 2, 4 and 8 ranks (KV heads replicated at 4 and 8) against TP = 1.
"""
import math
import os

import pytest
import torch

from harness import ncl_run_argv, program_failures
from ncl.models import CONFIGS, Exaone, ExaoneConfig, build_model, get_config, param_counts
from ncl.models.checkpoint import write_checkpoint
from ncl.models.exaone import FULL, SLIDING, Block, weight_shapes
from ncl.models.layers import rope_frequencies
from ncl.models.weights import TensorWeights

PROGRAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "exaone_program.py")


def random_tensors(cfg, seed):
    """Every tensor of cfg's model, random; norm weights around 1 so that they matter."""
    g = torch.Generator().manual_seed(seed)
    return {name: (1 + 0.3 * torch.randn(shape, generator=g)) if name.endswith("norm.weight")
            else 0.1 * torch.randn(shape, generator=g) for name, shape in weight_shapes(cfg).items()}


# ---- one layer against a plain reference ------------------------------------------------------------------

def rms(x, weight, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate(x, theta):
    """Rotate-half RoPE of x [T, H, D] at positions 0..T-1: feature i pairs with i + D/2."""
    t, _, d = x.shape
    angle = torch.arange(t, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    c, s = angle.cos()[:, None], angle.sin()[:, None]                  # [T, 1, D/2]
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def reference_layer(w, cfg, layer, x, *, window, rope):
    """Layer `layer` of one sequence x [T, D] in float64, written from the architecture's description."""
    p, hd, eps = f"model.layers.{layer}", cfg.head_dim, cfg.norm_eps
    w = {k: v.double() for k, v in w.items() if k.startswith(p + ".")}
    x = x.double()
    t = x.shape[0]
    q = (x @ w[f"{p}.self_attn.q_proj.weight"].T).view(t, cfg.n_heads, hd)
    k = (x @ w[f"{p}.self_attn.k_proj.weight"].T).view(t, cfg.n_kv_heads, hd)
    v = (x @ w[f"{p}.self_attn.v_proj.weight"].T).view(t, cfg.n_kv_heads, hd)
    q, k = rms(q, w[f"{p}.self_attn.q_norm.weight"], eps), rms(k, w[f"{p}.self_attn.k_norm.weight"], eps)
    if rope:
        q, k = rotate(q, cfg.rope_theta), rotate(k, cfg.rope_theta)
    y = torch.zeros(t, cfg.n_heads, hd, dtype=torch.float64)
    group = cfg.n_heads // cfg.n_kv_heads
    for h in range(cfg.n_heads):
        for i in range(t):
            keys = [j for j in range(i + 1) if window is None or i - j < window]
            scores = torch.stack([q[i, h] @ k[j, h // group] for j in keys]) / math.sqrt(hd)
            y[i, h] = sum(pr * v[j, h // group] for pr, j in zip(scores.softmax(0), keys))
    attn = y.reshape(t, -1) @ w[f"{p}.self_attn.o_proj.weight"].T
    h = x + rms(attn, w[f"{p}.post_attention_layernorm.weight"], eps)
    gate, up = h @ w[f"{p}.mlp.gate_proj.weight"].T, h @ w[f"{p}.mlp.up_proj.weight"].T
    mlp = (gate * torch.sigmoid(gate) * up) @ w[f"{p}.mlp.down_proj.weight"].T
    return h + rms(mlp, w[f"{p}.post_feedforward_layernorm.weight"], eps)


@pytest.mark.parametrize("layer", [0, 3])  # sliding (rotary, window 4) and full (no rotary, every position)
def test_layer_against_a_plain_reference(layer):
    cfg = get_config("exaone-tiny", rope_scaling=None)  # plain RoPE here; its scaled frequencies are test_llama's
    assert cfg.layer_types[layer] == (SLIDING if layer == 0 else FULL)
    w = random_tensors(cfg, seed=layer)
    block = Block(cfg, layer, source=TensorWeights(w))
    t = 9  # more positions than the window
    x = torch.randn(2, t, cfg.dim, generator=torch.Generator().manual_seed(7))
    cos, sin = rope_frequencies(cfg.head_dim, t, cfg.rope_theta)
    with torch.inference_mode():
        got = block(x, torch.arange(t), cos, sin, 0)
    sliding = layer == 0
    for b in range(2):
        want = reference_layer(w, cfg, layer, x[b], window=cfg.sliding_window if sliding else None, rope=sliding)
        assert torch.allclose(got[b].double(), want, atol=1e-5), float((got[b] - want).abs().max())
    # the reference is not blind to what distinguishes the layer kinds
    other = reference_layer(w, cfg, layer, x[0], window=None if sliding else 4, rope=not sliding)
    assert not torch.allclose(got[0].double(), other, atol=1e-3)


# ---- the model --------------------------------------------------------------------------------------------

def test_decoding_with_the_cache_equals_recomputing_the_sequence():
    cfg = get_config("exaone-tiny")
    cached, plain = Exaone(cfg, seed=1), Exaone(cfg, seed=1)
    tokens = torch.randint(0, 256, (3, 5), generator=torch.Generator().manual_seed(0))
    cached.setup_cache(3, 16)
    with torch.inference_mode():
        logits = cached(tokens, 0)
        assert torch.allclose(logits, plain(tokens), atol=1e-5)
        for step in range(7):  # up to 12 positions: three windows
            nxt = logits[:, -1].argmax(-1)
            assert torch.equal(cached.next_tokens(tokens[:, -1:], tokens.shape[1] - 1), nxt)  # rewrites the same slot
            logits = cached(nxt[:, None], tokens.shape[1])
            tokens = torch.cat([tokens, nxt[:, None]], 1)
            assert torch.allclose(logits[:, -1], plain(tokens)[:, -1], atol=1e-5), step


def test_checkpoint_round_trip(tmp_path):
    cfg = get_config("exaone-tiny", n_layers=2)
    tensors = random_tensors(cfg, seed=3)
    write_checkpoint(str(tmp_path), cfg.to_hf(), tensors, files=2)
    memory, loaded = Exaone(cfg, checkpoint=TensorWeights(tensors)), Exaone(None, checkpoint=str(tmp_path))
    assert loaded.config == cfg
    tokens = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(11))
    with torch.inference_mode():
        assert torch.equal(loaded(tokens), memory(tokens))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [2, 4, 8])
def test_tensor_parallel_exaone_equals_tp1(tmp_path, n):
    failures = program_failures(ncl_run_argv(n, PROGRAM, str(tmp_path)), tmp_path, n, timeout=110)
    assert not failures, "\n".join(failures)


# ---- configs ----------------------------------------------------------------------------------------------

def test_published_config():
    """LGAI-EXAONE/EXAONE-4.0-32B config.json."""
    c = CONFIGS["exaone-4.0-32b"]
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.vocab_size) == \
        (5120, 64, 40, 8, 128, 27392, 102400)
    assert (c.sliding_window, c.rope_theta, c.norm_eps, c.max_seq_len, c.tie_embeddings) == \
        (4096, 1e6, 1e-5, 131072, False)
    assert c.rope_scaling == {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192}
    assert [i for i, kind in enumerate(c.layer_types) if kind == FULL] == list(range(3, 64, 4))  # LLLG
    assert [c.rotates(i) for i in range(4)] == [True, True, True, False]
    assert get_config("exaone-4.0-32b", n_layers=2).layer_types == (SLIDING, SLIDING)


def test_published_parameter_count():
    """The model card: 30.95B parameters without embeddings, 32.0B in all."""
    c = CONFIGS["exaone-4.0-32b"]
    total, active = param_counts("exaone-4.0-32b")
    assert active == total and f"{total / 1e9:.1f}" == "32.0"
    assert f"{(total - 2 * c.vocab_size * c.dim) / 1e9:.2f}" == "30.95"
    assert param_counts("llama-3.1-70b") == param_counts("llama-3.3-70b")


def test_hugging_face_configs():
    for name in ("exaone-4.0-32b", "exaone-tiny"):
        assert ExaoneConfig.from_hf(CONFIGS[name].to_hf()) == CONFIGS[name]
    hf = CONFIGS["exaone-4.0-32b"].to_hf()
    del hf["layer_types"]
    rope = hf.pop("rope_scaling")
    hf.update(sliding_window_pattern="LLLG", rope_parameters={**rope, "rope_theta": hf.pop("rope_theta")})
    assert ExaoneConfig.from_hf(hf) == CONFIGS["exaone-4.0-32b"]  # the pattern spelling, rope_theta in rope_parameters
    everywhere = ExaoneConfig.from_hf({**hf, "sliding_window": None, "num_hidden_layers": 3})
    assert everywhere.layer_types == (FULL,) * 3  # no window: every layer full, and every layer rotates
    assert all(everywhere.rotates(i) for i in range(3))


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="layer_types must give"):
        ExaoneConfig(n_layers=2, layer_types=("sliding_attention", "local"))
    with pytest.raises(ValueError, match="need a sliding_window"):
        ExaoneConfig(n_layers=2, sliding_window=None, layer_types=(SLIDING, FULL))
    with pytest.raises(ValueError, match="must be a multiple of n_kv_heads"):
        ExaoneConfig(n_heads=40, n_kv_heads=3)
    with pytest.raises(ValueError, match="tensor-parallel over the whole group"):
        build_model("exaone-tiny", tp=2)
    with pytest.raises(ValueError, match="needs a KV cache"):
        Exaone(get_config("exaone-tiny", n_layers=1))(torch.zeros(1, 2, dtype=torch.long), 3)
