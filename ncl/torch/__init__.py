"""torch integration: `import ncl.torch` registers the torch.distributed backend "ncl" for
CPU tensors (`dist.init_process_group("ncl")`; `pg_options=ncl.torch.Options(compress=...)`
or `set_compress` compresses a group's collectives); `shrink_group` is torch's shrink for
"ncl" groups; `ncl.torch.tp` has the tensor-parallel mappings and layers, which take an ncl
communicator or any torch process group."""
from . import tp
from .backend import Options, ProcessGroupNcl, register, set_compress
from .elastic import shrink_group

register()

__all__ = ["Options", "ProcessGroupNcl", "register", "set_compress", "shrink_group", "tp"]
