"""Model architectures sharded with ncl: Llama 3.x, EXAONE 4.0 (and gpt-oss, when its module is present).

    model = build_model("llama-tiny", comm)           # random weights, TP over comm
    tokens = Generator(model, max_batch=4, max_seq=64).generate(prompts, 16)

CONFIGS maps names to exact published configs; get_config(name, n_layers=1) gives fewer layers of
the real width (the way the big models run on one host)."""
import dataclasses
from typing import Tuple

import torch

from .exaone import EXAONE_CONFIGS, Exaone, ExaoneConfig, param_count as exaone_param_count
from .generate import Generator
from .llama import LLAMA_CONFIGS, Llama, LlamaConfig, param_count as llama_param_count

CONFIGS = {**LLAMA_CONFIGS, **EXAONE_CONFIGS}
try:
    from .gpt_oss import GPT_OSS_CONFIGS
    CONFIGS.update(GPT_OSS_CONFIGS)
except ImportError:
    GPT_OSS_CONFIGS = {}

# the dense models: config class, model class, parameter count (every parameter active for every token)
DENSE = ((LlamaConfig, Llama, llama_param_count), (ExaoneConfig, Exaone, exaone_param_count))


def _dense(cfg):
    """(model class, parameter count) of a dense model's config; None for any other config."""
    return next(((model, count) for kind, model, count in DENSE if isinstance(cfg, kind)), None)


def get_config(name: str, **overrides):
    """The config named `name`, with fields replaced (e.g. n_layers=1)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}: the models are {', '.join(CONFIGS)}")
    cfg = CONFIGS[name]
    unknown = set(overrides) - {f.name for f in dataclasses.fields(cfg)}
    if unknown:
        raise ValueError(f"{name} has no config field(s) {', '.join(sorted(unknown))}")
    return dataclasses.replace(cfg, **overrides)


def _config(name_or_cfg):
    return get_config(name_or_cfg) if isinstance(name_or_cfg, str) else name_or_cfg


def build_model(name_or_cfg, group=None, *, tp=None, ep=None, dtype=torch.float32, seed: int = 0, checkpoint=None):
    """A model of a config (or its name) over group, with seeded random weights or a checkpoint's.
    Llama and EXAONE are tensor-parallel over the whole group (tp, if given, must equal its size; ep
    must be None or 1); gpt-oss takes its TP x EP split from tp and ep."""
    cfg = _config(name_or_cfg)
    dense = _dense(cfg)
    if dense is not None:
        model, name, size = dense[0], dense[0].__name__, 1 if group is None else getattr(group, "size", None)
        if tp is not None and size is not None and tp != size:
            raise ValueError(f"{name} is tensor-parallel over the whole group: tp={tp}, but the group has {size} ranks")
        if ep not in (None, 1):
            raise ValueError(f"{name} has no experts: ep must be 1, not {ep}")
        return model(cfg, group, dtype=dtype, seed=seed, checkpoint=checkpoint)
    if GPT_OSS_CONFIGS:
        from .gpt_oss import GptOss, GptOssConfig
        if isinstance(cfg, GptOssConfig):
            return GptOss(cfg, group, tp=tp, ep=ep, dtype=dtype, seed=seed, checkpoint=checkpoint)
    raise ValueError(f"no model for a config of type {type(cfg).__name__}")


def param_counts(name_or_cfg) -> Tuple[int, int]:
    """(total, active per token) parameters of a config."""
    cfg = _config(name_or_cfg)
    dense = _dense(cfg)
    if dense is not None:
        n = dense[1](cfg)
        return n, n
    if GPT_OSS_CONFIGS:
        from .gpt_oss import GptOssConfig, param_count as gpt_oss_param_count
        if isinstance(cfg, GptOssConfig):
            return gpt_oss_param_count(cfg)
    raise ValueError(f"no parameter count for a config of type {type(cfg).__name__}")


def memory_bytes(model) -> dict:
    """This rank's bytes of the model: {"weights": parameters (a tied one once), "buffers": KV caches and
    other buffers}."""
    def total(tensors):
        seen = {}
        for t in tensors:
            seen.setdefault(t.data_ptr(), t.numel() * t.element_size())
        return sum(seen.values())
    return {"weights": total(model.parameters()), "buffers": total(model.buffers())}


__all__ = ["CONFIGS", "get_config", "build_model", "param_counts", "memory_bytes", "Generator", "Llama", "LlamaConfig",
           "Exaone", "ExaoneConfig"]
