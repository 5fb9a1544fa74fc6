"""ncl-perf: nccl-tests-style bandwidth and latency sweeps of ncl, side by side with MPI, gloo and DeepSpeed.

    specs.py     what each collective moves: sizes, bus-bandwidth factor, test data, expected result
    backends.py  the same collectives through ncl, mpi4py, torch.distributed (gloo) and DeepSpeed's shm all-reduce
    worker.py    one rank's sweep: verify, warm up, time; rank 0 prints one JSON line per size
    report.py    tables, ratios, CSV / JSON / spreadsheet files and plots
    runner.py    what the commands share: argument types, starting a sweep's ranks, reading their rows, progress
    cli.py       the ncl-perf command: launches the ranks of each backend and gathers their lines
"""
