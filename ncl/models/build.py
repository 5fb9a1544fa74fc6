"""Building a model of a config: the torch side of ncl.models (imported when a model is built, so that
reading configs needs no torch)."""
import torch

from .configs import GptOssConfig
from .exaone import Exaone, ExaoneConfig
from .llama import Llama, LlamaConfig

# the dense models: config class and model class (every parameter active for every token)
DENSE = ((LlamaConfig, Llama), (ExaoneConfig, Exaone))


def _config(name_or_cfg):
    from . import get_config
    return get_config(name_or_cfg) if isinstance(name_or_cfg, str) else name_or_cfg


def build_model(name_or_cfg, group=None, *, tp=None, ep=None, dtype=torch.float32, seed: int = 0, checkpoint=None):
    """A model of a config (or its name) over group, with seeded random weights or a checkpoint's.
    Llama and EXAONE are tensor-parallel over the whole group (tp, if given, must equal its size; ep
    must be None or 1); gpt-oss takes its TP x EP split from tp and ep."""
    cfg = _config(name_or_cfg)
    dense = next((model for kind, model in DENSE if isinstance(cfg, kind)), None)
    if dense is not None:
        model, name, size = dense, dense.__name__, 1 if group is None else getattr(group, "size", None)
        if tp is not None and size is not None and tp != size:
            raise ValueError(f"{name} is tensor-parallel over the whole group: tp={tp}, but the group has {size} ranks")
        if ep not in (None, 1):
            raise ValueError(f"{name} has no experts: ep must be 1, not {ep}")
        return model(cfg, group, dtype=dtype, seed=seed, checkpoint=checkpoint)
    if isinstance(cfg, GptOssConfig):
        from .gpt_oss import GptOss
        return GptOss(cfg, group, tp=tp, ep=ep, dtype=dtype, seed=seed, checkpoint=checkpoint)
    raise ValueError(f"no model for a config of type {type(cfg).__name__}")


def memory_bytes(model) -> dict:
    """This rank's bytes of the model: {"weights": parameters (a tied one once), "buffers": KV caches and
    other buffers}."""
    def total(tensors):
        seen = {}
        for t in tensors:
            seen.setdefault(t.data_ptr(), t.numel() * t.element_size())
        return sum(seen.values())
    return {"weights": total(model.parameters()), "buffers": total(model.buffers())}
