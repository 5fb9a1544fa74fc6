"""torch.distributed integration: `import ncl.torch` registers the backend "ncl" for CPU
tensors, so that `dist.init_process_group("ncl")` runs every collective through ncl."""
from .backend import ProcessGroupNcl, register

register()

__all__ = ["ProcessGroupNcl", "register"]
