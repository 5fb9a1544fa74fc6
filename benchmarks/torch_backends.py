"""One torch.distributed program, unchanged but for the backend name: the same numbers and the
time of each.

    ncl-run -n 4 python benchmarks/torch_backends.py gloo
    ncl-run -n 4 python benchmarks/torch_backends.py ncl

It trains a small MLP with DDP for 20 steps on each rank's shard of a fixed data set, then
all-reduces float32 tensors from 4 KiB to 16 MiB.  Rank 0 prints the losses and a checksum of
the parameters (rounded to 6 decimals; the backends add in different orders, so the last bits
of a float sum may differ), and the median time of a training step and of each all_reduce.
"""
import statistics
import sys
import time

import torch
import torch.distributed as dist

if sys.argv[1:2] == ["ncl"]:
    import ncl.torch  # noqa: F401  (registers the backend; the only ncl-specific line)


def timed(fn, repeat):
    times = []
    for _ in range(repeat):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    backend = sys.argv[1]
    dist.init_process_group(backend)
    rank, size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64 * size, 256, generator=gen), torch.randn(64 * size, 256, generator=gen)
    mine = slice(64 * rank, 64 * (rank + 1))
    losses = []

    def step():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(ddp(x[mine]), y[mine])
        loss.backward()
        opt.step()
        losses.append(loss.detach())

    step_s = timed(step, 20)
    for loss in losses:  # the mean loss over ranks, as every rank sees it
        dist.all_reduce(loss)
    checksum = sum(float(p.double().sum()) for p in model.parameters())
    rows = []
    for nbytes in (4 << 10, 256 << 10, 4 << 20, 16 << 20):
        t = torch.ones(nbytes // 4)
        seconds = timed(lambda: dist.all_reduce(t), 10 if nbytes >= 4 << 20 else 50)
        rows.append((nbytes, seconds))
    if rank == 0:
        print(f"backend {backend}, {size} ranks")
        print("losses (mean over ranks):", " ".join(f"{float(v) / size:.6f}" for v in losses[::4]))
        print(f"parameter checksum after 20 steps: {checksum:.6f}")
        print(f"DDP training step: {step_s * 1e3:.2f} ms (median of 20)")
        for nbytes, seconds in rows:
            print(f"all_reduce {nbytes >> 10:6d} KiB: {seconds * 1e6:10.1f} us")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
