"""Llama 3.x and the shared model pieces (ncl.models).

In-process: seeded random weights are the same full tensor however they are sharded; rope with
llama3 and YaRN scaling against the published formulas written out here; attention (GQA, sinks,
sliding window, cached start positions) against a loop over queries in numpy; decoding with the
KV cache against recomputing the whole sequence; a checkpoint the test writes (split over two
files with the index json) loads into the model built from the same tensors in memory; the
parameter counts of the published configs.  Multi-rank: llama_program.py under ncl-run on 2, 4
and 8 ranks (KV heads replicated at 4 and 8) against TP = 1.  Slow (NCL_SLOW=1): one full-width
405B layer in bf16 at TP = 8 against TP = 1.
"""
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from harness import ncl_run_argv, program_failures
from ncl.models import CONFIGS, Generator, Llama, build_model, get_config, memory_bytes, param_counts
from ncl.models.checkpoint import CheckpointWeights, read_config, write_checkpoint
from ncl.models.layers import KVCache, apply_rope, attention, rope_frequencies
from ncl.models.llama import Attention, LlamaConfig, weight_shapes
from ncl.models.weights import RandomWeights, TensorWeights, load_shard, random_shard

PROGRAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama_program.py")
CHECKPOINT_SEED = 21


# ---- weights ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(600, 520), (3, 300, 260), (70000,), (1, 1)])
def test_random_shard_is_the_same_tensor_for_any_split(shape):
    full = random_shard("w", shape, None, 0, 1, seed=4, std=1.0)
    assert full.shape == shape and (full.numel() < 100 or abs(float(full.std()) - 1) < 0.1)
    for dim in range(len(shape)):
        for parts in (2, 3, 4, 5):
            if shape[dim] % parts:
                continue
            pieces = [random_shard("w", shape, dim, i, parts, seed=4, std=1.0) for i in range(parts)]
            assert torch.equal(torch.cat(pieces, dim), full), (dim, parts)
    assert not torch.equal(random_shard("w", shape, None, 0, 1, seed=5, std=1.0), full)
    assert not torch.equal(random_shard("v", shape, None, 0, 1, seed=4, std=1.0), full)
    bf16 = random_shard("w", shape, None, 0, 1, seed=4, std=0.5, mean=1.0, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, (full * 0.5 + 1.0).to(torch.bfloat16))


def test_random_shard_generates_only_the_tiles_it_overlaps(monkeypatch):
    calls = []
    real = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    random_shard("w", (1024, 1024), 0, 1, 4, seed=0, std=1.0)  # rows 256:512 -> 1 x 4 tiles of 256 x 256
    assert calls == [[256, 256]] * 4


def test_bad_shards_are_clear_errors():
    with pytest.raises(ValueError, match="must divide"):
        random_shard("w", (10, 4), 0, 0, 3, seed=0, std=1.0)
    with pytest.raises(ValueError, match="out of range"):
        random_shard("w", (10, 4), 0, 2, 2, seed=0, std=1.0)
    with pytest.raises(ValueError, match="out of range"):
        random_shard("w", (10, 4), 2, 0, 2, seed=0, std=1.0)


# ---- rope and attention -----------------------------------------------------------------------------------

def llama3_inv_freq_reference(head_dim, theta, factor, low, high, original):
    """Llama 3.1's frequency rule, branch by branch as published."""
    out = []
    for i in range(0, head_dim, 2):
        f = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / f
        if wavelen < original / high:
            out.append(f)
        elif wavelen > original / low:
            out.append(f / factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return np.array(out)


def test_rope_llama3_scaling_against_the_published_rule():
    s = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192}
    cos, sin = rope_frequencies(128, 40, 5e5, s)
    inv = llama3_inv_freq_reference(128, 5e5, 8.0, 1.0, 4.0, 8192)
    angles = np.outer(np.arange(40), inv)
    assert np.allclose(cos.numpy(), np.cos(angles), atol=1e-6) and np.allclose(sin.numpy(), np.sin(angles), atol=1e-6)
    plain, _ = rope_frequencies(128, 40, 5e5, None)
    assert not torch.allclose(plain, cos)  # all three branches occur for these numbers
    assert len({"keep" if a == b else "scaled" if np.isclose(a, b / 8) else "smooth"
                for a, b in zip(inv, 1 / 5e5 ** (np.arange(0, 128, 2) / 128))}) == 3


@pytest.mark.parametrize("truncate", [False, True])
def test_rope_yarn_against_the_published_rule(truncate):
    """gpt-oss's YaRN: NTK by parts between the dims turning beta_fast and beta_slow times over the
    original context, and cos/sin scaled by 0.1 ln(factor) + 1."""
    d, theta, factor, original = 64, 150000.0, 32.0, 4096
    s = {"rope_type": "yarn", "factor": factor, "beta_fast": 32.0, "beta_slow": 1.0,
         "original_max_position_embeddings": original, "truncate": truncate}
    cos, sin = rope_frequencies(d, 50, theta, s)
    freq = theta ** (np.arange(0, d, 2) / d)
    low = d / 2 * math.log(original / (32.0 * 2 * math.pi)) / math.log(theta)
    high = d / 2 * math.log(original / (1.0 * 2 * math.pi)) / math.log(theta)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    mask = 1 - np.clip((np.arange(d // 2) - low) / (high - low), 0, 1)
    inv = 1 / (factor * freq) * (1 - mask) + 1 / freq * mask
    concentration = 0.1 * math.log(factor) + 1
    angles = np.outer(np.arange(50), inv)
    assert np.allclose(cos.numpy(), np.cos(angles) * concentration, atol=1e-5)
    assert np.allclose(sin.numpy(), np.sin(angles) * concentration, atol=1e-5)


def test_apply_rope_rotates_half_pairs():
    x = torch.randn(2, 3, 4, 8)
    cos, sin = rope_frequencies(8, 10, 100.0)
    positions = torch.tensor([4, 5, 6])
    got = apply_rope(x, cos, sin, positions)
    half = torch.cat([-x[..., 4:], x[..., :4]], dim=-1)  # HF's rotate_half
    c, s = (torch.cat([t[positions]] * 2, -1)[None, :, None] for t in (cos, sin))
    assert torch.allclose(got, x * c + half * s, atol=1e-6)
    assert torch.allclose(got.norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # a rotation


def attention_reference(q, k, v, start_pos, sinks=None, window=None):
    """A loop over batch, head and query in numpy (float64)."""
    q, k, v = (t.double().numpy() for t in (q, k, v))
    b, t, hq, d = q.shape
    group = hq // k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for h in range(hq):
            for i in range(t):
                pos = start_pos + i
                keys = [j for j in range(k.shape[1]) if j <= pos and (window is None or pos - j < window)]
                logits = np.array([q[bi, i, h] @ k[bi, j, h // group] / math.sqrt(d) for j in keys])
                top = logits.max() if sinks is None else max(logits.max(), float(sinks[h]))
                e = np.exp(logits - top)
                denominator = e.sum() + (0.0 if sinks is None else math.exp(float(sinks[h]) - top))
                out[bi, i, h] = sum(w * v[bi, j, h // group] for w, j in zip(e / denominator, keys))
    return torch.from_numpy(out).float()


@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("window", [None, 1, 3])
@pytest.mark.parametrize("start_pos, t", [(0, 6), (4, 3), (8, 1)])
def test_attention_against_a_loop(sinks, window, start_pos, t):
    g = torch.Generator().manual_seed(start_pos * 10 + t)
    q = torch.randn(2, t, 6, 8, generator=g)
    k, v = torch.randn(2, start_pos + t, 2, 8, generator=g), torch.randn(2, start_pos + t, 2, 8, generator=g)
    s = torch.randn(6, generator=g) if sinks else None
    got = attention(q, k, v, start_pos=start_pos, sinks=s, window=window)
    assert got.shape == q.shape
    assert torch.allclose(got, attention_reference(q, k, v, start_pos, s, window), atol=1e-5)


def test_attention_with_sinks_in_query_chunks(monkeypatch):
    import ncl.models.layers as layers
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 9, 4, 8, generator=g), torch.randn(1, 9, 2, 8, generator=g), torch.randn(1, 9, 2, 8)
    s = torch.randn(4, generator=g)
    whole = attention(q, k, v, start_pos=0, sinks=s, window=4)
    monkeypatch.setattr(layers, "_SCORES_BUDGET", 4 * 9 * 2)  # two queries per chunk
    assert torch.allclose(attention(q, k, v, start_pos=0, sinks=s, window=4), whole, atol=1e-6)


def test_kv_cache_returns_every_past_position():
    cache = KVCache(2, 10, 3, 4)
    k1, v1 = torch.randn(2, 4, 3, 4), torch.randn(2, 4, 3, 4)
    cache.update(torch.arange(4), k1, v1)
    k2, v2 = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    k, v = cache.update(4, k2, v2)
    assert k.shape == (1, 5, 3, 4) and torch.equal(k, torch.cat([k1[:1], k2], 1)) and torch.equal(v[:, 4:], v2)
    with pytest.raises(ValueError, match="holds 2 sequences of 10"):
        cache.update(8, torch.randn(1, 3, 3, 4), torch.randn(1, 3, 3, 4))


# ---- the model --------------------------------------------------------------------------------------------

def test_decoding_with_the_cache_equals_recomputing_the_sequence():
    cfg = get_config("llama-tiny", n_layers=2)
    cached, plain = Llama(cfg, seed=1), Llama(cfg, seed=1)
    tokens = torch.randint(0, 256, (3, 5), generator=torch.Generator().manual_seed(0))
    cached.setup_cache(3, 16)
    with torch.inference_mode():
        logits = cached(tokens, 0)
        assert torch.allclose(logits, plain(tokens), atol=1e-5)
        for step in range(6):
            nxt = logits[:, -1].argmax(-1)
            assert torch.equal(cached.next_tokens(tokens[:, -1:], tokens.shape[1] - 1), nxt)  # rewrites the same slot
            logits = cached(nxt[:, None], tokens.shape[1])
            tokens = torch.cat([tokens, nxt[:, None]], 1)
            assert torch.allclose(logits[:, -1], plain(tokens)[:, -1], atol=1e-5), step


@pytest.mark.parametrize("chunk_tokens", [1, 3, 8, 1000])
def test_chunked_prefill_generates_what_one_pass_does(chunk_tokens):
    """Prompts of 11 positions prefilled in chunks (2 sequences: 1, 1, 4 and 11 positions a pass)
    continue exactly as prefilling them at once, and as the model run over the whole sequence."""
    model = Llama(get_config("llama-tiny", n_layers=2), seed=4)
    prompts = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(2))
    whole = Generator(model, max_batch=2, max_seq=20).generate(prompts, 8)
    out = Generator(model, max_batch=2, max_seq=20, chunk_tokens=chunk_tokens).generate(prompts, 8)
    assert torch.equal(out, whole)
    full = torch.cat([prompts, out[:, :-1]], 1)
    assert torch.equal(Llama(get_config("llama-tiny", n_layers=2), seed=4)(full)[:, 10:].argmax(-1), out)
    with pytest.raises(ValueError, match="chunk_tokens"):
        Generator(model, max_batch=2, max_seq=20, chunk_tokens=0)


def test_generator_steps_and_timing():
    model = Llama(get_config("llama-tiny", n_layers=2), seed=2)
    prompts = torch.randint(0, 256, (2, 4), generator=torch.Generator().manual_seed(1))
    steps = []
    out = Generator(model, max_batch=2, max_seq=12).generate(prompts, 8, on_step=lambda s, t: steps.append((s, t)))
    assert out.shape == (2, 8) and [s for s, _ in steps] == list(range(8)) and all(t > 0 for _, t in steps)
    full = torch.cat([prompts, out[:, :-1]], 1)
    assert torch.equal(Llama(get_config("llama-tiny", n_layers=2), seed=2)(full)[:, 3:].argmax(-1), out)
    with pytest.raises(ValueError, match="exceed"):
        Generator(model, max_batch=2, max_seq=12).generate(prompts, 10)
    with pytest.raises(ValueError, match="after prefill"):
        Generator(model, max_batch=2, max_seq=12).decode(torch.zeros(2, dtype=torch.long))


def write_tiny_checkpoint(path, cfg):
    source = RandomWeights(CHECKPOINT_SEED, std=0.05)
    tensors = {n: source.get(n, s, mean=1.0 if n.endswith("norm.weight") else 0.0)
               for n, s in weight_shapes(cfg).items()}
    write_checkpoint(str(path), cfg.to_hf(), tensors, files=2)
    return tensors


def test_checkpoint_round_trip(tmp_path):
    cfg = get_config("llama-tiny")
    tensors = write_tiny_checkpoint(tmp_path, cfg)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2 and set(index["weight_map"]) == set(tensors)
    assert LlamaConfig.from_hf(read_config(str(tmp_path))) == cfg
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(load_shard(str(tmp_path), name, 1, 3, 4), tensors[name].chunk(4, 1)[3])
    assert torch.equal(load_shard(str(tmp_path), name, None, 0, 1, torch.bfloat16), tensors[name].bfloat16())
    memory, loaded = Llama(cfg, checkpoint=TensorWeights(tensors)), Llama(None, checkpoint=str(tmp_path))
    tokens = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(11))
    with torch.inference_mode():
        assert torch.equal(loaded(tokens), memory(tokens))
    with pytest.raises(ValueError, match="has shape"):
        Llama(get_config("llama-tiny", ffn_dim=96), checkpoint=str(tmp_path))
    with pytest.raises(ValueError, match="no tensor"):
        CheckpointWeights(str(tmp_path)).get("model.layers.9.mlp.up_proj.weight")
    with pytest.raises(ValueError, match="no config.json"):
        read_config(str(tmp_path / "nowhere"))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("n", [2, 4, 8])
def test_tensor_parallel_llama_equals_tp1(tmp_path, n):
    """Logits, greedy tokens (32 at batch 3) and the checkpoint loaded at TP = n."""
    checkpoint = tmp_path / "checkpoint"
    write_tiny_checkpoint(checkpoint, get_config("llama-tiny", n_layers=2))
    argv = ncl_run_argv(n, PROGRAM, str(tmp_path), str(checkpoint), str(CHECKPOINT_SEED))
    failures = program_failures(argv, tmp_path, n, timeout=220)
    assert not failures, "\n".join(failures)


# ---- configs ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, billions", [("llama-3.1-405b", "405.85"), ("llama-3.3-70b", "70.55"),
                                            ("llama-3.1-8b", "8.03")])
def test_published_parameter_counts(name, billions):
    total, active = param_counts(name)
    assert f"{total / 1e9:.2f}" == billions and active == total


def test_published_configs():
    c = CONFIGS["llama-3.1-405b"]
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim, c.vocab_size, c.rope_theta, c.norm_eps) == \
        (16384, 126, 128, 8, 53248, 128256, 5e5, 1e-5)
    assert c.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192}
    assert get_config("llama-3.1-405b", n_layers=1).n_layers == 1 and CONFIGS["llama-3.1-405b"].n_layers == 126


def test_memory_bytes_counts_weights_and_the_cache():
    cfg = get_config("llama-tiny", n_layers=1, tie_embeddings=True)
    model = Llama(cfg)
    total, _ = param_counts(cfg)
    assert memory_bytes(model) == {"weights": total * 4, "buffers": 0}
    model.setup_cache(2, 10)
    assert memory_bytes(model)["buffers"] == 2 * 2 * 10 * cfg.n_kv_heads * cfg.head_dim * 4  # k and v


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model"):
        get_config("llama-9")
    with pytest.raises(ValueError, match="no config field"):
        get_config("llama-tiny", layers=2)
    with pytest.raises(ValueError, match="must be a positive int"):
        get_config("llama-tiny", n_layers=0)
    with pytest.raises(ValueError, match="KV heads must divide heads"):
        LlamaConfig(dim=64, n_heads=8, n_kv_heads=3)
    with pytest.raises(ValueError, match="tensor-parallel over the whole group"):
        build_model("llama-tiny", tp=2)
    with pytest.raises(ValueError, match="needs a KV cache"):
        Llama(get_config("llama-tiny", n_layers=1))(torch.zeros(1, 2, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="tokens must be an int tensor"):
        Llama(get_config("llama-tiny", n_layers=1))(torch.zeros(2))
    with pytest.raises(ValueError, match="token ids must lie in 0..255"):
        Llama(get_config("llama-tiny", n_layers=1))(torch.tensor([[3, 256]]))
    with pytest.raises(ValueError, match="3 KV heads can neither be split over nor replicated to 2 ranks"):
        Attention(LlamaConfig(dim=48, n_heads=6, n_kv_heads=3), "model.layers.0.self_attn",
                  SimpleNamespace(rank=0, size=2), RandomWeights(), torch.float32)


# ---- slow: one real 405B layer ------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("NCL_SLOW") != "1", reason="a full-width 405B layer: set NCL_SLOW=1")
@pytest.mark.timeout(1800)
def test_405b_layer_tp8_equals_tp1(tmp_path):
    failures = program_failures(ncl_run_argv(8, PROGRAM, str(tmp_path), "405b-layer"), tmp_path, 8, timeout=1700)
    report = json.loads((tmp_path / "rank0.json").read_text())
    print({k: v for k, v in report.items() if k != "failures"})
    assert not failures, "\n".join(failures)
