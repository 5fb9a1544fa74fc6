"""`Group`: the three collectives tensor parallelism and MoE need (all_reduce, all_gather and
reduce_scatter along dim 0), the same on an ncl Communicator and on a torch.distributed ProcessGroup
of any backend.  Outside ncl.torch so that ncl.moe can use it without `import ncl.torch`, which
registers the torch.distributed backend."""
from typing import Optional, Union

import torch
import torch.distributed as dist

from .comm import Communicator


class Group:
    """all_reduce / all_gather / reduce_scatter along dim 0 on either kind of group.  compress: the sums
    (all_reduce, reduce_scatter) go block-scaled in that format (ncl.compress; an ncl Communicator only)."""

    def __init__(self, group: Union[Communicator, dist.ProcessGroup, "Group"], compress: Optional[str] = None):
        if isinstance(group, Group):
            group, compress = group.group, compress or group.compress
        self.group = group
        self.is_ncl = isinstance(group, Communicator)
        self.rank = group.rank if self.is_ncl else dist.get_rank(group)
        self.size = group.size if self.is_ncl else dist.get_world_size(group)
        if compress is not None:
            from .compress import check_format
            check_format(compress)
            if not self.is_ncl:
                raise ValueError("compress needs an ncl Communicator as the group, not a torch ProcessGroup")
        self.compress = compress

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        if self.size == 1:
            return t
        if self.is_ncl:
            return self.group.all_reduce(t, compress=self.compress)
        dist.all_reduce(t, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's t stacked along dim 0."""
        t = t.contiguous()
        if self.size == 1:
            return t
        if self.is_ncl:
            return self.group.all_gather(t)
        out = torch.empty((self.size * t.shape[0],) + t.shape[1:], dtype=t.dtype)
        dist.all_gather_into_tensor(out, t, group=self.group)
        return out

    def reduce_scatter(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of t, this rank's block of dim 0."""
        t = t.contiguous()
        if self.size == 1:
            return t
        if self.is_ncl:
            return self.group.reduce_scatter(t, compress=self.compress)
        out = torch.empty((t.shape[0] // self.size,) + t.shape[1:], dtype=t.dtype)
        dist.reduce_scatter_tensor(out, t, group=self.group)
        return out

    def split_last(self, t: torch.Tensor) -> torch.Tensor:
        if t.shape[-1] % self.size:
            raise ValueError(f"the last dimension ({t.shape[-1]}) must divide by the group size {self.size}")
        return t.chunk(self.size, dim=-1)[self.rank].contiguous()

    def gather_last(self, t: torch.Tensor) -> torch.Tensor:
        stacked = self.all_gather(t.unsqueeze(0))  # (size, ...)
        return torch.cat(stacked.unbind(0), dim=-1)
