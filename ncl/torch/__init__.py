"""torch integration: `import ncl.torch` registers the torch.distributed backend "ncl" for
CPU tensors (`dist.init_process_group("ncl")`); `ncl.torch.tp` has the tensor-parallel
mappings and layers, which take an ncl communicator or any torch process group."""
from . import tp
from .backend import ProcessGroupNcl, register

register()

__all__ = ["ProcessGroupNcl", "register", "tp"]
