"""torch's shrink_group for "ncl" groups: the survivors of a failure go on in a smaller group.

torch 2.13 has `dist.shrink_group(ranks_to_exclude, group)`, but it cannot take a backend written
in Python: it asks the group for its C++ backend (`group._get_backend(device)`, a c10d::Backend
with `supports_shrinking` and `shrink()`) and wraps what `shrink()` returns in a new C++
ProcessGroup (`_create_shrunk_process_group` calls `_register_backend`, which takes only a
c10d::Backend).  A Python backend is a ProcessGroup, and c10d::Backend has no Python constructor
("No constructor defined"), so ncl cannot plug into that hook.  `shrink_group` here keeps torch's
contract instead: the same arguments and checks, the old group destroyed, the new one registered
in torch's world under a new name (and made the default group, other groups destroyed, when the
default group shrinks), through the same helpers torch's shrink_group uses; the new group's
communicator comes from `Communicator.shrink` (ncl/elastic.py).
"""
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from .backend import ProcessGroupNcl, ncl_group

_TORCH_HELPERS = ("_destroy_all_other_groups", "_cleanup_original_group", "_update_default_pg",
                  "_register_pg_in_world", "_process_group_name")


def shrink_group(ranks_to_exclude: Optional[List[int]] = None,
                 group: Optional[dist.ProcessGroup] = None) -> ProcessGroupNcl:
    """A new "ncl" group of `group`'s ranks not in ranks_to_exclude (group ranks; None: the ranks
    found dead) and not failed, ranks renumbered in order, as torch's dist.shrink_group.  Called
    by every survivor, with the same ranks_to_exclude; works after a failure or an abort
    (`_abort_process_group` revokes).  Shrinking the default group makes the new group the
    default and destroys every other group, as torch does."""
    missing = [name for name in _TORCH_HELPERS if not hasattr(c10d, name)]
    if missing:
        raise NotImplementedError(f"ncl.torch.shrink_group uses torch's shrink_group helpers, which torch "
                                  f"{torch.__version__} lacks ({', '.join(missing)})")
    pg = ncl_group(group)
    if ranks_to_exclude is not None and not isinstance(ranks_to_exclude, list):
        raise TypeError("ranks_to_exclude must be a list of group ranks or None, not "
                        f"{type(ranks_to_exclude).__name__}")
    if ranks_to_exclude is not None and pg.rank() in ranks_to_exclude:
        raise RuntimeError(f"rank {pg.rank()} is in ranks_to_exclude {ranks_to_exclude}: only the survivors call "
                           "shrink_group")
    is_default = pg is c10d._get_default_group()
    old_ranks = dist.get_process_group_ranks(pg)  # global ranks, in group order
    backend_name, store = c10d._world.pg_map[pg]
    config = c10d._world.pg_backend_config.get(pg, "")
    old_name = c10d._get_process_group_name(pg)

    new_comm = pg.comm.shrink(ranks_to_exclude)  # checks ranks_to_exclude; closes the old communicator
    # who survived, as every survivor saw it (a second failure during the shrink changes it)
    members = new_comm.all_gather(np.array([pg.rank()], np.int64)).tolist()
    remaining = [old_ranks[r] for r in members]
    new_pg = ProcessGroupNcl(new_comm, pg.options)

    if is_default:
        c10d._destroy_all_other_groups(exclude_group=pg)
    c10d._cleanup_original_group(pg, is_default)
    name = c10d._process_group_name(remaining, use_hashed_name=True)
    new_pg._set_group_name(name)
    new_pg.setGroupDesc("default:shrunken" if is_default else f"{old_name}:shrunk")
    if is_default:
        c10d._update_default_pg(new_pg)
    c10d._register_pg_in_world(pg=new_pg, backend_name=backend_name, store=store, group_name=name,
                               backend_config=config,
                               rank_mapping={g: r for r, g in enumerate(remaining)})
    return new_pg
