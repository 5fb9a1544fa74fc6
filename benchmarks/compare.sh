#!/usr/bin/env bash
# Regenerate benchmarks/results/: ncl against MPICH (mpi4py) and torch's gloo, side by side,
# as issue 3 asks.  Needs `pip install -e ".[bench,mpi]"` (mpi4py, mpich, torch==2.13.0 first).
# Every sweep runs each backend three times, interleaved, and reports medians: this 2-core VM
# drifts by 2-4x over minutes, so a single pass can compare a fast minute with a slow one.
set -euo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out"

run() {
    local name=$1
    shift
    { echo "\$ ncl-perf $* --repeat 3"; ncl-perf "$@" --repeat 3 --csv "$out/$name.csv" --json "$out/$name.json" \
        --plot "$out/$name.png"; } | tee "$out/$name.txt"
}

run all_reduce_np2 all_reduce -b 8 -e 64M -f 4 -n 2 --compare mpi,gloo
run all_reduce_np8 all_reduce -b 8 -e 64M -f 4 -n 8 --compare mpi,gloo
# every power of two, so that 64 KiB, 1 MiB and 16 MiB (issue 3's targets) are measured too
run all_reduce_np2_4_8_pow2 all_reduce -b 8 -e 64M -f 2 -n 2,4,8 --compare mpi
# registered buffers (comm.empty): the memory-traffic bound column
run all_reduce_np2_registered all_reduce -b 64K -e 64M -f 4 -n 2 -R 1 --compare mpi
for c in all_gather reduce_scatter all_to_all broadcast; do
    run "${c}_np2_np8" "$c" -b 8 -e 64M -f 4 -n 2,8 --compare mpi,gloo
done
