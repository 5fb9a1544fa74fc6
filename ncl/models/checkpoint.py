"""Hugging Face–format checkpoints: a directory holding config.json and model.safetensors, or several
*.safetensors files listed in model.safetensors.index.json ({"weight_map": {tensor name: file}}).

Every read goes through safetensors' get_slice, so a rank reads only its shard from disk.
"""
import json
import os
from typing import Dict, Optional, Sequence

import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def _safetensors():
    try:
        import safetensors
        import safetensors.torch  # noqa: F401
    except ImportError as exc:
        raise ImportError("reading and writing checkpoints needs safetensors: pip install safetensors") from exc
    return safetensors


def read_config(dir: str) -> dict:
    path = os.path.join(dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{dir} is not a Hugging Face checkpoint directory: it has no config.json")
    with open(path) as f:
        return json.load(f)


def weight_map(dir: str) -> Dict[str, str]:
    """tensor name -> the file (in dir) that holds it."""
    index = os.path.join(dir, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            return dict(json.load(f)["weight_map"])
    single = os.path.join(dir, SINGLE)
    if not os.path.isfile(single):
        raise ValueError(f"{dir} holds neither {INDEX} nor {SINGLE}")
    with _safetensors().safe_open(single, framework="pt") as f:
        return {name: SINGLE for name in f.keys()}


class CheckpointWeights:
    """The weight source of a checkpoint directory (see ncl.models.weights): get() reads a slice."""

    def __init__(self, dir: str):
        self.dir = str(dir)
        self.config = read_config(self.dir)
        self.files = weight_map(self.dir)

    def shape(self, name: str):
        with self._open(name) as f:
            return tuple(f.get_slice(name).get_shape())

    def _open(self, name: str):
        if name not in self.files:
            raise ValueError(f"the checkpoint in {self.dir} has no tensor {name!r}")
        return _safetensors().safe_open(os.path.join(self.dir, self.files[name]), framework="pt")

    def get(self, name: str, full_shape: Optional[Sequence[int]] = None, dim: Optional[int] = None, start: int = 0,
            stop: Optional[int] = None, *, dtype=torch.float32, **random_only) -> torch.Tensor:
        """full[name] restricted to start:stop along dim (None: all of it), as dtype; full_shape, when
        given, must be the stored shape.  std and mean (for random sources) are ignored."""
        with self._open(name) as f:
            part = f.get_slice(name)
            shape = tuple(part.get_shape())
            if full_shape is not None and shape != tuple(full_shape):
                raise ValueError(f"{name} in {self.dir} has shape {shape}, the model expects {tuple(full_shape)}")
            if dim is None:
                return part[:].to(dtype)
            dim %= len(shape)
            stop = shape[dim] if stop is None else stop
            if not 0 <= start <= stop <= shape[dim]:
                raise ValueError(f"{name}: slice {start}:{stop} is out of range for dimension {dim} of {shape}")
            return part[(slice(None),) * dim + (slice(start, stop),)].to(dtype)

    def __repr__(self) -> str:
        return f"CheckpointWeights({self.dir!r})"


def write_checkpoint(dir: str, config: dict, tensors: Dict[str, torch.Tensor], *, files: int = 1) -> None:
    """Write config.json and the tensors, in one model.safetensors or split over `files` files named
    model-0000i-of-0000n.safetensors with the index json (as the Hub does for large models)."""
    st = _safetensors()
    if files < 1:
        raise ValueError(f"files must be >= 1, not {files}")
    os.makedirs(dir, exist_ok=True)
    with open(os.path.join(dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    names = list(tensors)
    if files == 1:
        st.torch.save_file({n: tensors[n].contiguous() for n in names}, os.path.join(dir, SINGLE))
        return
    mapping = {}
    for i in range(files):
        file = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        chunk = names[i * len(names) // files:(i + 1) * len(names) // files]
        st.torch.save_file({n: tensors[n].contiguous() for n in chunk}, os.path.join(dir, file),
                           metadata={"format": "pt"})
        mapping.update({n: file for n in chunk})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(dir, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": mapping}, f, indent=2)
