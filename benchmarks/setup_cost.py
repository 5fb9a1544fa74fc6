"""What creating a sub-group costs: comm.split and torch.distributed.new_group on backend "ncl".

    ncl-run -n 8 python benchmarks/setup_cost.py [--repeat 9] [--no-torch]

Each round starts from a barrier; a rank's time is from there until its new group is ready, and
the round's time is the slowest rank's (the group is usable only then).  Rank 0 prints the median
and the spread (min..max) of the rounds, in ms, for: a split into one group of everyone, a split
in two (even and odd ranks), and torch's new_group of everyone and of the even ranks (each
new_group is followed by one all_reduce on it, so that a group torch builds lazily is built).
"""
import argparse
import statistics
import time

import numpy as np

import ncl


def timed(world, make, rounds: int) -> list:
    """The slowest rank's time, in ms, of each of `rounds` calls of make() (closing what it returns)."""
    times = []
    for _ in range(rounds):
        world.barrier()
        start = time.perf_counter()
        made = make()
        mine = np.array([time.perf_counter() - start])
        if made is not None and hasattr(made, "close"):
            made.close()
        times.append(float(world.all_reduce(mine, op=ncl.MAX)[0]) * 1e3)
    return times


def row(name: str, times: list) -> str:
    return f"{name:<32} {statistics.median(times):8.2f} {min(times):8.2f} {max(times):8.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=9, help="rounds of each case (default 9)")
    p.add_argument("--no-torch", action="store_true", help="skip torch.distributed.new_group")
    args = p.parse_args()
    world = ncl.init()
    rows = [("split (everyone)", timed(world, lambda: world.split(0), args.repeat)),
            ("split (even / odd)", timed(world, lambda: world.split(world.rank % 2), args.repeat))]
    if not args.no_torch:
        import torch
        import torch.distributed as dist
        from ncl.torch import register
        register()
        dist.init_process_group("ncl")
        evens = list(range(0, world.size, 2))

        def new_group(ranks):
            group = dist.new_group(ranks)
            if world.rank in ranks:
                dist.all_reduce(torch.ones(1), group=group)
            return None

        rows += [("new_group (everyone)", timed(world, lambda: new_group(list(range(world.size))), args.repeat)),
                 ("new_group (even ranks)", timed(world, lambda: new_group(evens), args.repeat))]
    if world.rank == 0:
        with open("/proc/loadavg") as f:
            load = f.read().split()[:3]
        print(f"# {world.size} ranks, {args.repeat} rounds, load average {' '.join(load)}")
        print(f"{'case':<32} {'median':>8} {'min':>8} {'max':>8}  (ms, slowest rank)")
        for name, times in rows:
            print(row(name, times))
    world.close()


if __name__ == "__main__":
    main()
