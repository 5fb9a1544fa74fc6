"""DDP overlapping its gradient all-reduces with the backward pass (issue 22 item 3), side by side
in one job.

    ncl-run -n 2 python benchmarks/ddp_overlap.py [--rounds 15 --steps 3 --out FILE]

One model (a stack of wide Linear layers: 16 MiB of float32 gradients in DDP's 4 MiB buckets,
a small batch, so communication is a visible share of a step) trained under four set-ups over
the same ranks, in interleaved rounds (order rotated every round, so the machine's drift hits
each alike):

  ncl           DDP on the "ncl" group: bucket all-reduces start async and run while backward
                goes on (the communicator's worker thread)
  ncl no overlap  the same group, with a comm hook that all-reduces each bucket synchronously
                (backward waits for every bucket: what ncl did before its calls became async)
  gloo          DDP on a gloo group of the same ranks
  no comm       the model alone (no DDP): the compute a step costs

Rank 0 prints the median step time of each and its ratio to "ncl".  The share of a step that
overlap hides is (no overlap - ncl) / (no overlap - no comm).
"""
import argparse
import statistics
import time

import torch
import torch.distributed as dist

import ncl.torch  # noqa: F401  (registers the backend)

WIDTH, LAYERS, BATCH = 1024, 4, 32


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])


def _blocking_hook(group):
    """DDP comm hook: each bucket all-reduced before backward goes on (no overlap)."""
    def hook(_state, bucket):
        buf = bucket.buffer()
        dist.all_reduce(buf, group=group)
        buf.div_(dist.get_world_size(group))
        future = torch.futures.Future()
        future.set_result(buf)
        return future
    return hook


def _setups(gloo):
    ddp_ncl = torch.nn.parallel.DistributedDataParallel(_model(), bucket_cap_mb=4)
    blocking = torch.nn.parallel.DistributedDataParallel(_model(), bucket_cap_mb=4)
    blocking.register_comm_hook(None, _blocking_hook(dist.group.WORLD))
    ddp_gloo = torch.nn.parallel.DistributedDataParallel(_model(), process_group=gloo, bucket_cap_mb=4)
    return {"ncl": ddp_ncl, "ncl no overlap": blocking, "gloo": ddp_gloo, "no comm": _model()}


def _step_time(model, x, steps: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    dist.barrier()
    return (time.perf_counter() - start) / steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    dist.init_process_group("ncl")
    rank, size = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    gloo = dist.new_group(backend="gloo")
    setups = _setups(gloo)
    torch.manual_seed(1 + rank)
    x = torch.randn(BATCH, WIDTH)
    names = list(setups)
    for name in names:  # warm up
        _step_time(setups[name], x, 1)
    times = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(_step_time(setups[name], x, args.steps))
    if rank == 0:
        med = {name: statistics.median(t) for name, t in times.items()}
        grads = LAYERS * (WIDTH * WIDTH + WIDTH) * 4
        lines = [f"DDP step, {size} ranks, {LAYERS} x Linear({WIDTH}, {WIDTH}) ({grads / 2**20:.0f} MiB of gradients, "
                 f"4 MiB buckets), batch {BATCH}, 1 torch thread per rank; median of {args.rounds} rounds of "
                 f"{args.steps} steps",
                 f"{'set-up':16s} {'ms/step':>9s} {'vs ncl':>7s}"]
        lines += [f"{name:16s} {med[name] * 1e3:9.2f} {med[name] / med['ncl']:6.2f}x" for name in names]
        comm = med["ncl no overlap"] - med["no comm"]
        if comm > 0:
            lines.append(f"overlap hides {100 * (med['ncl no overlap'] - med['ncl']) / comm:.0f}% of the "
                         f"communication time ({comm * 1e3:.2f} ms/step without overlap)")
        text = "\n".join(lines)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
