"""A GGUF file of a Llama-architecture model (llama.cpp's format) as ncl's config, weight source and
tokenizer.

    weights = GGUFWeights(path)                       # reads the header; tensors stay on disk (mmap)
    model = Llama(weights.config, group, checkpoint=weights)
    tokenizer = weights.tokenizer()

GGUF names its tensors its own way (blk.N.attn_q.weight) and stores each as rows of quantization
blocks (a Q4_1 block: 32 values, an fp16 scale and minimum); get() answers by Hugging Face name,
picks this rank's rows, or the blocks of its columns, before dequantizing with gguf's own quants
module, so a rank decodes only its shard.

llama.cpp's converter reorders the rows of every q and k head: its rotary embedding pairs features
2i and 2i + 1, Hugging Face's (ours, ncl.models.layers) pairs i and i + head_dim / 2.  So the HF
row `half * head_dim / 2 + i` of a head is the GGUF row `2 i + half` of the same head; get() reads
the rows in that order, which undoes the reordering.  A head's rows stay inside the head, so a
rank's heads come from the same heads of the file.
"""
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .llama import LlamaConfig

# Hugging Face name -> GGUF name; "{i}" is the layer.
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_MODEL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}


def _gguf():
    try:
        import gguf
    except ImportError as exc:
        raise ImportError("reading GGUF files needs the gguf package: pip install gguf") from exc
    return gguf


def gguf_name(hf_name: str) -> str:
    """The GGUF name of a Llama tensor's Hugging Face name."""
    if hf_name in _MODEL_NAMES:
        return _MODEL_NAMES[hf_name]
    parts = hf_name.split(".", 3)  # model, layers, i, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_NAMES:
        return f"blk.{parts[2]}.{_LAYER_NAMES[parts[3]]}"
    raise ValueError(f"{hf_name!r} is not a Llama tensor name")


def rotary_rows(n_rows: int, head_dim: int) -> np.ndarray:
    """For each Hugging Face row of a q or k projection (n_rows = heads * head_dim), the GGUF row
    that holds it: row half * head_dim / 2 + i of a head is GGUF row 2 i + half of that head."""
    if head_dim % 2 or n_rows % head_dim:
        raise ValueError(f"{n_rows} rows are not whole heads of an even head_dim {head_dim}")
    r = np.arange(n_rows)
    head, within = r // head_dim, r % head_dim
    half, pair = within // (head_dim // 2), within % (head_dim // 2)
    return head * head_dim + 2 * pair + half


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ValueError(f"the GGUF file has no {key!r}")
        return default
    return field.contents()


def llama_config(reader) -> LlamaConfig:
    """The LlamaConfig of a GGUFReader's metadata (architecture "llama")."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"the GGUF file holds a {arch!r} model, not a Llama")
    key = lambda name, default=None: _field(reader, f"llama.{name}", default)  # noqa: E731
    if key("rope.scaling.type", "none") not in ("none", "") or any(t.name == "rope_freqs.weight"
                                                                    for t in reader.tensors):
        raise ValueError("the GGUF file scales its rotary embeddings, which this loader does not read")
    dim, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("rope.dimension_count", dim // heads))
    if head_dim * heads != dim or int(key("attention.key_length", head_dim)) != head_dim:
        raise ValueError(f"heads of {head_dim} features that do not fill dim {dim} are not a Llama of ncl's")
    names = {t.name for t in reader.tensors}
    vocab = int(key("vocab_size", 0)) or len(_field(reader, "tokenizer.ggml.tokens"))  # older files: no vocab_size
    return LlamaConfig(dim=dim, n_layers=int(key("block_count")), n_heads=heads,
                       n_kv_heads=int(key("attention.head_count_kv", heads)), ffn_dim=int(key("feed_forward_length")),
                       vocab_size=vocab, rope_theta=float(key("rope.freq_base", 10000.0)), rope_scaling=None,
                       norm_eps=float(key("attention.layer_norm_rms_epsilon")),
                       max_seq_len=int(key("context_length")), tie_embeddings="output.weight" not in names)


class GGUFWeights:
    """The weight source (ncl.models.weights) of a GGUF Llama file; .config is its LlamaConfig."""

    def __init__(self, path: str):
        self.path = str(path)
        self.reader = _gguf().GGUFReader(self.path)
        self.config = llama_config(self.reader)
        self.tensors = {t.name: t for t in self.reader.tensors}

    def shape(self, name: str):
        """The Hugging Face shape of a tensor ([out, in]; GGUF lists its dimensions innermost first)."""
        return tuple(int(n) for n in reversed(self._tensor(name).shape))

    def _tensor(self, name: str):
        t = self.tensors.get(gguf_name(name))
        if t is None:
            raise ValueError(f"{self.path} has no tensor {gguf_name(name)!r} (for {name!r})")
        return t

    def _row_order(self, name: str, n_rows: int) -> Optional[np.ndarray]:
        if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            return rotary_rows(n_rows, self.config.head_dim)
        return None

    def get(self, name: str, full_shape: Optional[Sequence[int]] = None, dim: Optional[int] = None, start: int = 0,
            stop: Optional[int] = None, *, dtype=torch.float32, **random_only) -> torch.Tensor:
        """full[name] restricted to start:stop along dim (None: all of it), dequantized to dtype."""
        t, shape = self._tensor(name), self.shape(name)
        if len(shape) > 2:
            raise ValueError(f"{name}: a Llama has no {len(shape)}-d tensors")
        if full_shape is not None and shape != tuple(full_shape):
            raise ValueError(f"{name} in {self.path} has shape {shape}, the model expects {tuple(full_shape)}")
        lo, hi = [0] * len(shape), list(shape)
        if dim is not None:
            dim %= len(shape)
            stop = shape[dim] if stop is None else stop
            if not 0 <= start <= stop <= shape[dim]:
                raise ValueError(f"{name}: slice {start}:{stop} is out of range for dimension {dim} of {shape}")
            lo[dim], hi[dim] = start, stop
        raw = t.data.reshape(-1, t.data.shape[-1])              # [rows, units of the row's blocks]
        rows = np.arange(lo[0], hi[0]) if len(shape) == 2 else np.arange(1)
        order = self._row_order(name, shape[0])
        if order is not None:
            rows = order[rows]                                   # undo the converter's rotary reordering
        gguf = _gguf()
        block, block_bytes = gguf.GGML_QUANT_SIZES[t.tensor_type]
        units = block_bytes // raw.dtype.itemsize                # array entries per block (1 value for F32)
        c0, c1 = lo[-1], hi[-1]
        if c0 % block == 0 and c1 % block == 0:                  # whole blocks: decode only those
            part, first = raw[rows, c0 // block * units:c1 // block * units], c0
        else:
            part, first = raw[rows], 0
        values = gguf.quants.dequantize(np.ascontiguousarray(part), t.tensor_type)  # float32 [rows, columns]
        values = values[:, c0 - first:c1 - first].reshape([b - a for a, b in zip(lo, hi)])
        return torch.from_numpy(np.ascontiguousarray(values)).to(dtype)

    def tokenizer(self) -> "GGUFTokenizer":
        return GGUFTokenizer(self.reader)

    def __repr__(self) -> str:
        return f"GGUFWeights({self.path!r})"


# Byte-level BPE pre-tokenizers by tokenizer.ggml.pre: whether digits split one by one before the
# GPT-2 split (SmolLM's tokenizer does, so that numbers never merge).
_PRE_TOKENIZERS = {"smollm": True, "gpt-2": False}


class GGUFTokenizer:
    """The byte-level BPE tokenizer ("gpt2" model) a GGUF file describes: its vocabulary, merges and
    control tokens, built with Hugging Face's tokenizers library; chat() renders the file's chat
    template (jinja2)."""

    def __init__(self, reader):
        try:
            from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
        except ImportError as exc:
            raise ImportError("the GGUF tokenizer needs Hugging Face's tokenizers: pip install tokenizers") from exc
        kind, pre = _field(reader, "tokenizer.ggml.model"), _field(reader, "tokenizer.ggml.pre", "gpt-2")
        if kind != "gpt2" or pre not in _PRE_TOKENIZERS:
            raise ValueError(f"tokenizer {kind!r} with pre-tokenizer {pre!r}: only byte-level BPE ('gpt2') "
                             f"with {', '.join(_PRE_TOKENIZERS)} is supported")
        tokens: List[str] = list(_field(reader, "tokenizer.ggml.tokens"))
        merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
        bpe = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
        split = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        if _PRE_TOKENIZERS[pre]:
            split.insert(0, pre_tokenizers.Digits(individual_digits=True))
        bpe.pre_tokenizer = pre_tokenizers.Sequence(split)
        bpe.decoder = decoders.ByteLevel()
        types = _field(reader, "tokenizer.ggml.token_type", [])
        control = [tokens[i] for i, kind in enumerate(types) if kind == 3]  # llama.cpp's CONTROL type
        bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
        self._bpe, self.vocab_size = bpe, len(tokens)
        self.bos_id = int(_field(reader, "tokenizer.ggml.bos_token_id", -1))
        self.eos_id = int(_field(reader, "tokenizer.ggml.eos_token_id", -1))
        self.chat_template: Optional[str] = _field(reader, "tokenizer.chat_template", "") or None

    def encode(self, text: str) -> List[int]:
        """Token ids of text (control tokens written in it, e.g. <|im_start|>, become their ids)."""
        return self._bpe.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self._bpe.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def chat(self, messages: List[Dict[str, str]], add_generation_prompt: bool = True) -> List[int]:
        """Token ids of messages ([{"role", "content"}]) rendered by the file's chat template."""
        if not self.chat_template:
            raise ValueError("the GGUF file has no chat template")
        import jinja2
        template = jinja2.Environment().from_string(self.chat_template)
        return self.encode(template.render(messages=messages, add_generation_prompt=add_generation_prompt))


__all__ = ["GGUFWeights", "GGUFTokenizer", "gguf_name", "llama_config", "rotary_rows"]
