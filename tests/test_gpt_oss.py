"""gpt-oss (ncl.models.gpt_oss): the published configs and their parameter counts; the mixture of
experts against an independent dense reference (every expert decoded, HF's interleaved clamped
SwiGLU); the KV cache; Hugging Face checkpoints with MXFP4 (and dense) experts read at 1 rank; and,
under `ncl-run -n N` (gpt_oss_program.py), the sharded model (attention TP or data parallel, experts
spread over the ranks) against the single-process one, logits and 32 greedy tokens, and a checkpoint
read at 4 ranks."""
import os
from dataclasses import replace

import pytest
import torch

from harness import ncl_run_argv, program_failures
from ncl.models import mxfp4
from ncl.models.checkpoint import write_checkpoint
from ncl.models.gpt_oss import FULL, GPT_OSS_CONFIGS, SLIDING, GptOss, GptOssConfig, hf_tensors, param_count

PROGRAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpt_oss_program.py")
TINY = GPT_OSS_CONFIGS["gpt-oss-tiny"]
SEED, STD = 3, 0.2  # as gpt_oss_program.py


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: torch's thread pool only spins on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_parameter_counts_are_the_model_cards():
    counts = {name: param_count(GPT_OSS_CONFIGS[name]) for name in ("gpt-oss-120b", "gpt-oss-20b")}
    assert counts == {"gpt-oss-120b": (116_829_156_672, 5_132_849_472), "gpt-oss-20b": (20_914_757_184, 3_608_307_264)}
    assert [round(n / 1e9, 1) for n in counts["gpt-oss-120b"] + counts["gpt-oss-20b"]] == [116.8, 5.1, 20.9, 3.6]


def test_published_configs():
    big = GPT_OSS_CONFIGS["gpt-oss-120b"]
    assert (big.n_layers, big.dim, big.n_experts, big.top_k, big.expert_dim) == (36, 2880, 128, 4, 2880)
    assert (big.n_heads, big.n_kv_heads, big.head_dim, big.vocab_size, big.sliding_window) == (64, 8, 64, 201088, 128)
    assert big.layer_types[:3] == (SLIDING, FULL, SLIDING) and len(big.layer_types) == 36
    assert big.rope_theta == 150000 and big.rope_scaling["factor"] == 32 and big.swiglu_limit == 7.0
    small = GPT_OSS_CONFIGS["gpt-oss-20b"]
    assert (small.n_layers, small.n_experts) == (24, 32)
    for cfg in GPT_OSS_CONFIGS.values():
        assert GptOssConfig.from_hf(cfg.to_hf(), cfg.name) == cfg


@pytest.mark.parametrize("kwargs, says", [
    (dict(dim=70), "multiples of 32"), (dict(layer_types=(FULL,)), "layer_types"),
    (dict(n_kv_heads=3), "multiple of n_kv_heads"), (dict(top_k=9), "top_k"),
])
def test_bad_configs_are_clear_errors(kwargs, says):
    with pytest.raises(ValueError, match=says):
        replace(TINY, **kwargs)


def test_bad_splits_are_clear_errors():
    with pytest.raises(ValueError, match="tp must be a positive int dividing"):
        GptOss(TINY, tp=2, dtype=torch.float32)
    with pytest.raises(ValueError, match="ep must be"):
        GptOss(TINY, ep=0, dtype=torch.float32)


def dense_moe(layer, x, cfg):
    """One MoE layer as Hugging Face's dense path: every expert decoded in full, every token run
    through all of them, the gate_up columns split even (gate) / odd (up), weighted by the softmax
    over the top-k router logits (zero elsewhere)."""
    e = layer.mlp.experts
    gate_up = mxfp4.decode(e.gate_up_proj_blocks, e.gate_up_proj_scales, torch.float64)   # [E, 2I, D]
    down = mxfp4.decode(e.down_proj_blocks, e.down_proj_scales, torch.float64)             # [E, D, I]
    x = x.double()
    logits = x @ layer.mlp.router.weight.double().t() + layer.mlp.router.bias.double()      # [n, E]
    top, idx = logits.topk(cfg.top_k, dim=-1)
    routing = torch.zeros_like(logits).scatter(1, idx, top.softmax(-1))                    # [n, E]
    h = torch.einsum("nd,eod->eno", x, gate_up) + e.gate_up_proj_bias.double()[:, None]    # [E, n, 2I]
    gate, up = h[..., ::2], h[..., 1::2]
    gate, up = gate.clamp(max=cfg.swiglu_limit), up.clamp(-cfg.swiglu_limit, cfg.swiglu_limit)
    act = (up + 1) * gate * torch.sigmoid(cfg.swiglu_alpha * gate)                          # [E, n, I]
    y = torch.einsum("eni,edi->end", act, down) + e.down_proj_bias.double()[:, None]       # [E, n, D]
    return (y * routing.t()[..., None]).sum(0)                                             # [n, D]


def test_moe_equals_the_dense_reference():
    model = GptOss(TINY, dtype=torch.float32, seed=SEED, init_std=STD)
    x = torch.randn(23, TINY.dim, generator=torch.Generator().manual_seed(5))
    for layer in model.layers:
        want = dense_moe(layer, x, TINY)
        torch.testing.assert_close(layer.mlp(x[None])[0].double(), want, rtol=1e-4, atol=1e-5)


def test_kv_cache_steps_equal_the_whole_sequence():
    model = GptOss(TINY, dtype=torch.float32, seed=SEED, init_std=STD)
    tokens = torch.randint(0, TINY.vocab_size, (3, 13), generator=torch.Generator().manual_seed(6))
    whole = model(tokens, 0)
    model.setup_cache(3, 16)
    parts = [model(tokens[:, :7], 0)] + [model(tokens[:, i:i + 1], i) for i in range(7, 13)]
    torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=1e-4, atol=1e-4)
    assert torch.equal(model.next_tokens(tokens[:, 12:], 12), whole[:, -1].argmax(-1))


def test_chunked_prefill_equals_one_pass_across_the_window():
    """Prefill in chunks of 5 positions over a prompt longer than the sliding window: the same
    greedy continuation as one pass (sinks, window and cache offsets all in play)."""
    from ncl.models import Generator
    model = GptOss(TINY, dtype=torch.float32, seed=SEED, init_std=STD)
    length = TINY.sliding_window + 6
    prompts = torch.randint(0, TINY.vocab_size, (2, length), generator=torch.Generator().manual_seed(7))
    whole = Generator(model, max_batch=2, max_seq=length + 6).generate(prompts, 6)
    assert torch.equal(Generator(model, max_batch=2, max_seq=length + 6, chunk_tokens=10).generate(prompts, 6), whole)


def test_bfloat16_by_default():
    model = GptOss(TINY, seed=SEED, init_std=STD)
    assert model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert model.layers[0].mlp.experts.gate_up_proj_blocks.dtype == torch.uint8
    logits = model(torch.randint(0, TINY.vocab_size, (2, 5), generator=torch.Generator().manual_seed(9)))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_the_sliding_window_matters():
    """On a prompt longer than the window, the sliding layers see fewer keys than full layers would."""
    tokens = torch.randint(0, TINY.vocab_size, (1, 12), generator=torch.Generator().manual_seed(7))
    windowed = GptOss(TINY, dtype=torch.float32, seed=SEED, init_std=STD)(tokens)
    full = GptOss(replace(TINY, layer_types=(FULL,) * 4), dtype=torch.float32, seed=SEED, init_std=STD)(tokens)
    torch.testing.assert_close(windowed[:, :TINY.sliding_window], full[:, :TINY.sliding_window])
    assert not torch.allclose(windowed[:, TINY.sliding_window:], full[:, TINY.sliding_window:], atol=1e-3)


def write_tiny_checkpoint(path, *, dense_experts=False, files=1):
    tensors = hf_tensors(TINY, seed=SEED, init_std=STD)
    if dense_experts:  # Hugging Face's dequantized layout: gate_up_proj [E, D, 2I], down_proj [E, I, D]
        for name in [n for n in tensors if n.endswith("_blocks")]:
            stem = name[:-len("_blocks")]
            weight = mxfp4.decode(tensors.pop(name), tensors.pop(stem + "_scales"), torch.float32)
            tensors[stem] = weight.transpose(1, 2).contiguous()
    write_checkpoint(str(path), TINY.to_hf(), tensors, files=files)
    return tensors


def test_checkpoint_layout_is_hugging_faces(tmp_path):
    tensors = write_tiny_checkpoint(tmp_path)
    p, d, i, e = "model.layers.1.", TINY.dim, TINY.expert_dim, TINY.n_experts
    x = p + "mlp.experts."
    shapes = {x + "gate_up_proj_blocks": (e, 2 * i, d // 32, 16), x + "gate_up_proj_scales": (e, 2 * i, d // 32),
              x + "gate_up_proj_bias": (e, 2 * i), x + "down_proj_blocks": (e, d, i // 32, 16),
              x + "down_proj_scales": (e, d, i // 32), x + "down_proj_bias": (e, d),
              p + "mlp.router.weight": (e, d), p + "mlp.router.bias": (e,),
              p + "self_attn.sinks": (TINY.n_heads,), p + "self_attn.q_proj.weight": (TINY.n_heads * 16, d),
              p + "self_attn.k_proj.bias": (TINY.n_kv_heads * 16,), p + "input_layernorm.weight": (d,),
              p + "post_attention_layernorm.weight": (d,), "model.embed_tokens.weight": (TINY.vocab_size, d),
              "lm_head.weight": (TINY.vocab_size, d), "model.norm.weight": (d,)}
    assert {n: tuple(tensors[n].shape) for n in shapes} == shapes
    assert tensors[p + "mlp.experts.gate_up_proj_blocks"].dtype == torch.uint8
    assert len(tensors) == 3 + TINY.n_layers * 19  # 2 norms, 8 attention + sinks, 2 router, 6 experts


@pytest.mark.parametrize("dense_experts, files", [(False, 1), (False, 3), (True, 1)])
def test_checkpoint_at_one_rank_equals_the_in_memory_model(tmp_path, dense_experts, files):
    write_tiny_checkpoint(tmp_path, dense_experts=dense_experts, files=files)
    tokens = torch.randint(0, TINY.vocab_size, (2, 9), generator=torch.Generator().manual_seed(8))
    want = GptOss(TINY, dtype=torch.float32, seed=SEED, init_std=STD)(tokens)
    loaded = GptOss(TINY, dtype=torch.float32, checkpoint=str(tmp_path))
    assert torch.equal(loaded(tokens), want)
    first_two = GptOss(replace(TINY, n_layers=2, layer_types=None), dtype=torch.float32, checkpoint=str(tmp_path))
    assert first_two(tokens).shape == want.shape  # a model may run the checkpoint's first layers only
    assert replace(GptOss(None, dtype=torch.float32, checkpoint=str(tmp_path)).config, name=TINY.name) == TINY


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    write_tiny_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="does not match"):
        GptOss(replace(TINY, n_experts=4), dtype=torch.float32, checkpoint=str(tmp_path))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n", [2, 4, 8])
def test_sharded_model_equals_the_single_process_model(tmp_path, n):
    """tp=ep=N, tp=1 ep=N and mixed splits; at 4 ranks also the checkpoint read sharded."""
    argv = ncl_run_argv(n, PROGRAM, str(tmp_path))
    if n == 4:
        write_tiny_checkpoint(tmp_path / "checkpoint")
        argv.append(str(tmp_path / "checkpoint"))
    failures = program_failures(argv, tmp_path, n)
    assert not failures, "\n".join(failures)
