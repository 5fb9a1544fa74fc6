"""Model architectures sharded with ncl: Llama 3.x, EXAONE 4.0 and gpt-oss.

    model = build_model("llama-tiny", comm)           # random weights, TP over comm
    tokens = Generator(model, max_batch=4, max_seq=64).generate(prompts, 16)

CONFIGS maps names to exact published configs; get_config(name, n_layers=1) gives fewer layers of
the real width (the way the big models run on one host).  The configs and their parameter counts
(ncl/models/configs.py) need no torch; the models, build_model and Generator load torch when first
asked for (module __getattr__), so `ncl-bench params`, `predict` and `validate` run without it."""
import dataclasses
from typing import Tuple

from .configs import (EXAONE_CONFIGS, GPT_OSS_CONFIGS, LLAMA_CONFIGS, ExaoneConfig, GptOssConfig, LlamaConfig,
                      exaone_param_count, gpt_oss_param_count, llama_param_count)

CONFIGS = {**LLAMA_CONFIGS, **EXAONE_CONFIGS, **GPT_OSS_CONFIGS}


def get_config(name: str, **overrides):
    """The config named `name`, with fields replaced (e.g. n_layers=1)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}: the models are {', '.join(CONFIGS)}")
    cfg = CONFIGS[name]
    unknown = set(overrides) - {f.name for f in dataclasses.fields(cfg)}
    if unknown:
        raise ValueError(f"{name} has no config field(s) {', '.join(sorted(unknown))}")
    return dataclasses.replace(cfg, **overrides)


def param_counts(name_or_cfg) -> Tuple[int, int]:
    """(total, active per token) parameters of a config."""
    cfg = get_config(name_or_cfg) if isinstance(name_or_cfg, str) else name_or_cfg
    if isinstance(cfg, GptOssConfig):
        return gpt_oss_param_count(cfg)
    for kind, count in ((LlamaConfig, llama_param_count), (ExaoneConfig, exaone_param_count)):
        if isinstance(cfg, kind):  # dense: every parameter active for every token
            n = count(cfg)
            return n, n
    raise ValueError(f"no parameter count for a config of type {type(cfg).__name__}")


# the torch side, loaded when first asked for
_LAZY = {"build_model": "build", "memory_bytes": "build", "DENSE": "build", "Generator": "generate", "Llama": "llama",
         "Exaone": "exaone"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CONFIGS", "get_config", "build_model", "param_counts", "memory_bytes", "Generator", "Llama", "LlamaConfig",
           "Exaone", "ExaoneConfig"]
