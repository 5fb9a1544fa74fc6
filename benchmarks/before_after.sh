#!/usr/bin/env bash
# Two installs of ncl side by side in one run: `before` (the ncl-perf found on BEFORE_PATH, e.g.
# main in the system python) and `after` (the one on PATH, e.g. a branch's venv), in interleaved
# rounds, each round headed by the load and the C probe's busbw (the host's mode); then the
# medians of ncl's time per size and placement, and after/before.
#     BEFORE_PATH=/usr/bin:/bin ROUNDS=3 bash benchmarks/before_after.sh all_reduce -b 256K -e 16M -f 4 -n 2
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d /tmp/ncl-before-after.XXXXXX)
trap 'rm -rf "$work"' EXIT
cc -O3 -march=native -o "$work/probe" "$here/probe_all_reduce.c"
after=$(command -v ncl-perf)
for r in $(seq 1 "${ROUNDS:-3}"); do
    echo "# round $r: $(uptime | sed 's/.*load/load/'); probe busbw (B:GB/s): $("$work/probe" 1048576 16777216 | awk '{printf "%s:%s ", $1, $3}')"
    env -u VIRTUAL_ENV PATH="${BEFORE_PATH:?set BEFORE_PATH to where the other ncl-perf is}" ncl-perf "$@" --json "$work/before_$r.json" > /dev/null
    "$after" "$@" --json "$work/after_$r.json" > /dev/null
done
python - "$work" <<'PY'
import glob, json, statistics, sys
def medians(tag):
    times = {}
    for path in glob.glob(f"{sys.argv[1]}/{tag}_*.json"):
        for row in json.load(open(path))["rows"]:
            if row.get("backend") == "ncl" and row.get("time_us") is not None:
                times.setdefault((row["nranks"], row["size"], row["in_place"]), []).append(row["time_us"])
    return {k: statistics.median(v) for k, v in times.items()}
before, after = medians("before"), medians("after")
print(f"{'ranks':>5} {'size (B)':>10} {'place':>5} {'before us':>10} {'after us':>10} {'after/before':>12}")
for k in sorted(before.keys() & after.keys()):
    print(f"{k[0]:>5} {k[1]:>10} {'in' if k[2] else 'out':>5} {before[k]:>10.1f} {after[k]:>10.1f} {after[k] / before[k]:>12.2f}")
PY
