"""Every collective against a numpy reference, on live pools of 1, 2, 3, 4, 5 and 8 ranks.

Each rank's data is a pure function of (case seed, rank), so every worker recomputes its
peers' data and checks its own result bitwise against a reference built with numpy alone.
A test sends one request that loops over many cases and returns the failures as text (plus
digests of the results where ranks must agree), so that one round trip covers a whole sweep.
Most pools use tiny staging (NCL_BUFFSIZE=8192, NCL_P2P_BUFFSIZE=4096) so that the larger
counts span tens of pipelined chunks.
"""
import time

import numpy as np
import pytest

from harness import (DTYPES, FLOATS, OPS, SMALL_STAGING, as_torch, case_seed, digest, garbage_like,
                     mismatch, rank_data, reference_reduce, report)

SIZES = (1, 2, 3, 4, 5, 8)
BIG = 50_000        # elements: many chunks with 8 KiB of staging
COUNTS = (0, 1, 7, 1001, BIG)
ALL_DTYPES = tuple(DTYPES)
TORCH_DTYPES = ("float32", "bfloat16", "float8_e4m3fn", "int64")
INTEGERS = tuple(d for d in DTYPES if d not in FLOATS)


def _ops(dtype):
    """The sweeps' ops: integer AVG has its own test (test_integer_avg_exact_sum)."""
    return OPS if dtype in FLOATS else tuple(op for op in OPS if op != "AVG")


def _op(name):
    import ncl
    return getattr(ncl, name)


def _datas(seed, n, shape, dtype, op=None):
    return [rank_data(seed, r, shape, dtype, op) for r in range(n)]


def _wrap(a, kind):
    return as_torch(a) if kind == "torch" else a


def _check_same_object(label, got, expected, failures):
    if got is not expected:
        failures.append(f"{label}: returned {type(got).__name__} {id(got):#x}, not the result buffer")


def _check_result(label, res, out, kind, want, x, x_before, failures):
    """The common checks of an out-of-place result: `out` returned when given, the input's
    kind kept, the expected values, and the input left unchanged."""
    if out is not None:
        _check_same_object(label, res, out, failures)
    _check_kind(label, res, kind, failures)
    for bad in (mismatch(label, res, want), mismatch(label + " (x changed)", x, x_before)):
        if bad:
            failures.append(bad)


def _checker(failures, me, n):
    """check(label, got, want): record a mismatch, labelled with this rank."""
    def check(label, got, want):
        if (bad := mismatch(f"{label} rank={me}/{n}", got, want)):
            failures.append(bad)
    return check


def _check_kind(label, got, kind, failures):
    if kind == "torch":
        import torch
        if not isinstance(got, torch.Tensor):
            failures.append(f"{label}: torch input gave a {type(got).__name__}")
    elif not isinstance(got, np.ndarray):
        failures.append(f"{label}: numpy input gave a {type(got).__name__}")


# ---- all_reduce -------------------------------------------------------------------------------
def _all_reduce_sweep(comm, tag, dtypes, ops=OPS, counts=COUNTS, kind="numpy"):
    """Every dtype x op x count, in place and into out; (failures, {case: digest})."""
    n, me = comm.size, comm.rank
    failures, digests = [], {}
    for dtype in dtypes:
        for op in ops:
            for count in counts:
                for mode in ("inplace", "out"):
                    label = f"all_reduce {kind} {dtype} {op} count={count} {mode} rank={me}/{n}"
                    datas = _datas(case_seed(tag, dtype, op, count, mode), n, (count,), dtype, op)
                    want = reference_reduce(datas, op)
                    mine = datas[me].copy()
                    x = _wrap(mine, kind)
                    if mode == "inplace":
                        res = comm.all_reduce(x, op=_op(op))
                        _check_same_object(label, res, x, failures)
                        got = x
                    else:
                        out = _wrap(garbage_like(mine), kind)
                        res = comm.all_reduce(x, op=_op(op), out=out)
                        _check_same_object(label, res, out, failures)
                        got = out
                        if (bad := mismatch(label + " (input changed)", x, datas[me])):
                            failures.append(bad)
                    _check_kind(label, got, kind, failures)
                    if (bad := mismatch(label, got, want)):
                        failures.append(bad)
                    digests[(dtype, op, count, mode)] = digest(got)
    return failures, digests


def _assert_sweep(results, what="results"):
    """Per-rank (failures, digests): no failure, and every rank's digests identical."""
    failures = [f for rank_failures, _ in results for f in rank_failures]
    first = results[0][1]
    for r, (_, digests) in enumerate(results[1:], 1):
        differ = sorted(str(k) for k in first if digests.get(k) != first[k])
        if differ:
            failures.append(f"rank {r}'s {what} differ bitwise from rank 0's in {len(differ)} cases: {differ[:5]}")
    assert not failures, report(failures)
    return first


@pytest.mark.timeout(200)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("size", SIZES)
def test_all_reduce(pool_factory, size, dtype):
    pool = pool_factory(size, SMALL_STAGING)
    _assert_sweep(pool.run(_all_reduce_sweep, "all_reduce", [dtype], _ops(dtype), timeout=180))


ALGO_ENVS = {"auto": SMALL_STAGING, "one_shot": SMALL_STAGING + (("NCL_ALGO", "one_shot"),),
             "two_shot": SMALL_STAGING + (("NCL_ALGO", "two_shot"),), "cma": SMALL_STAGING + (("NCL_ALGO", "cma"),)}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("size", (3, 5))
def test_all_reduce_algorithms_agree(pool_factory, size, dtype):
    """NCL_ALGO=one_shot, =two_shot and =cma (and the automatic choice) give the reference,
    bitwise identical across ranks and across algorithms."""
    by_algo = {}
    for algo, env in ALGO_ENVS.items():
        by_algo[algo] = _assert_sweep(pool_factory(size, env).run(_all_reduce_sweep, "algo", [dtype], _ops(dtype),
                                                                       timeout=90))
    differ = [k for k in by_algo["auto"] if len({d[k] for d in by_algo.values()}) > 1]
    assert not differ, f"algorithms disagree bitwise in {len(differ)} cases, e.g. {differ[:5]}"


@pytest.mark.timeout(150)
def test_two_shot_streams_its_output_when_oversubscribed(pool_factory):
    """Two-shot's copies into recv stream (native/copy.c, ncl_output_stream_min_bytes) when the ranks
    oversubscribe the CPUs (NCL_LOCAL_WORLD_SIZE=64 makes them so below 64 CPUs) and their outputs
    pass a quarter of the cache: 3 ranks x 8 MiB of float32 and 4 MiB of bfloat16 (enough for a
    cache up to 96 MiB), a count whose last staging chunk is 52 bytes short of a slot (its last
    block ends inside a cache line, and still streams), in place and out of place: the numpy
    reference, bitwise alike on every rank (a streamed copy 4 bytes short fails it)."""
    env = (("NCL_ALGO", "two_shot"), ("NCL_LOCAL_WORLD_SIZE", "64"))
    _assert_sweep(pool_factory(3, env).run(_all_reduce_sweep, "streamed out", ["float32", "bfloat16"], ("SUM",),
                                           (2_097_139,), timeout=120))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("size", (2, 3))
def test_learned_algorithms_and_stores_agree(pool_factory, size):
    """NCL_STREAMING=on, =off and =auto give the reference, bitwise identical across ranks and
    settings; auto also runs duels of another algorithm or the other kind of stores against the
    choice in force (calls 1-8, 10-17 and 64-71 of a size class, native/learn.c), so every
    rank must pick the same one.  Default staging, sizes from 80 KB (above the learning floor) to
    1.2 MB, 17 calls each per dtype and placement (34 per size class)."""
    counts = (20_001, 300_001) * 17
    by_kind = {kind: _assert_sweep(pool_factory(size, (("NCL_STREAMING", kind),)).run(
        _all_reduce_sweep, "stores", ["float32", "bfloat16"], ("SUM",), counts, timeout=240))
        for kind in ("on", "off", "auto")}
    differ = [k for k in by_kind["auto"] if len({d[k] for d in by_kind.values()}) > 1]
    assert not differ, f"store kinds disagree bitwise in {len(differ)} cases, e.g. {differ[:5]}"


DUELS = ((1, 9), (10, 18), (64, 72), (192, 200))  # native/learn.c: the calls of a class's first duels
CHALLENGER_PLACES = (0, 1, 4, 5)                # C C I I C C I I


def _duel_calls(comm, count, calls, late=None, key="algorithm", registered=False):
    """`calls` in-place all_reduces of `count` float32 on a new communicator (its size classes
    unlearned), rank 1 entering call i late[i] seconds late: (failures, the algorithm each call took,
    or with key="stores" the stores it wrote with, with key=None its flight record entry), on a
    registered buffer (comm.empty) if asked."""
    sub = comm.split(0)
    try:
        want = reference_reduce(_datas(case_seed("duel", count), comm.size, (count,), "float32"), "SUM")
        mine = rank_data(case_seed("duel", count), comm.rank, (count,), "float32")
        buf = sub.empty(count, np.float32) if registered else None
        failures, algos = [], []
        for i in range(calls):
            if late and i in late and comm.rank == 1:
                time.sleep(late[i])
            if registered:
                buf[...] = mine
                got = sub.all_reduce(buf)
            else:
                got = sub.all_reduce(mine.copy())
            entry = sub.flight_record()[-1]
            algos.append(entry[key] if key else entry)
            if (bad := mismatch(f"duel call {i} ({algos[-1]}) rank={comm.rank}", got, want)):
                failures.append(bad)
        return failures, algos
    finally:
        sub.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("size", (2, 3))
def test_learned_choice_duels_on_the_first_calls(pool_factory, size):
    """learn.c's duels on a fresh communicator, 256 KiB staged (whichever staged algorithm the
    model starts from): every rank runs the same algorithm in every call; the first duel
    (calls 1-8) tries the other stores, with the same algorithm throughout; the second (calls
    10-17) runs another algorithm exactly at its challenger's places; outside duels the
    algorithm changes only after a duel's verdict; every result is the numpy reference, bitwise."""
    results = pool_factory(size).run(_duel_calls, 65_536, 210, timeout=100)
    assert not [f for failures, _ in results for f in failures], report([f for fs, _ in results for f in fs])
    algos = results[0][1]
    assert all(a == algos for _, a in results), f"ranks ran different algorithms: {[a for _, a in results]}"
    assert len(set(algos[DUELS[0][0]:DUELS[0][1]])) == 1, " ".join(algos)  # a duel of stores
    first = algos[DUELS[1][0]:DUELS[1][1]]
    incumbent = {a for i, a in enumerate(first) if i not in CHALLENGER_PLACES}
    challengers = {first[i] for i in CHALLENGER_PLACES}
    assert len(incumbent) == 1 and len(challengers) == 1 and incumbent != challengers, " ".join(algos)
    # the call after a duel still runs the incumbent (a verdict holds from the next one on)
    assert all(algos[hi] == algos[lo + 2] for lo, hi in DUELS), " ".join(algos)
    in_duel = {i for lo, hi in DUELS for i in range(lo, hi + 1)}
    runs, run = [], []
    for i, a in enumerate(algos):
        if i in in_duel:
            runs, run = runs + [run] if run else runs, []
        else:
            run.append(a)
    assert all(len(set(r)) == 1 for r in runs + [run]), f"a plain call tried another algorithm: {algos}"


@pytest.mark.timeout(120)
def test_one_slow_call_does_not_decide_a_duel(pool_factory):
    """The second duel at 256 KiB with a peer late at two of its timed calls (places 1, 3, 5, 7:
    C1 I3 C5 I7): I3 by 0.2 s, C5 by 0.05 s.  Its ratios C1/I3, C5/I3, C5/I7 are then ~0, ~0.25
    and far above 1: the median alone crowned the challenger on the strength of one slow incumbent call;
    the last ratio, which does not use I3, keeps the incumbent (learn.c, challenger_won), however
    fast either algorithm really is."""
    lo, hi = DUELS[1]
    results = pool_factory(2).run(_duel_calls, 65_536, 40, {lo + 3: 0.2, lo + 5: 0.05}, timeout=100)
    assert not [f for failures, _ in results for f in failures], report([f for fs, _ in results for f in fs])
    algos = results[0][1]
    incumbent, challenger = algos[lo + 3], algos[lo]
    assert incumbent != challenger, " ".join(algos)  # a duel of algorithms
    assert set(algos[hi:]) == {incumbent}, " ".join(algos)


@pytest.mark.timeout(120)
def test_stores_follow_a_step_not_a_spread(pool_factory):
    """learn.c's react() between duels, rank 0's record of 64 calls at 256 KiB with rank 1 late by D
    (30 ms) or more, so that rank 0's times are the lateness: the first duel crowns streaming stores
    (its incumbent calls 5D late), the second keeps two-shot (its challenger calls 5D late).  Then a
    spread that does not move (calls 18-45: every fifth call on time, the rest D late) must leave
    the stores alone: judged by the recent low (the fastest call), runs of three D-late calls sent
    them to ordinary ones, and nothing brought them back (fails on the code before the median,
    2026-12-06).  Then a step (calls 46-63 all 3D late) is a change to follow: ordinary stores are
    tried, and, as slow, give way to streaming ones again, which stay (held to their calls before
    the step, they went to ordinary ones again)."""
    d = 0.03  # (beside two CPU hogs a call waited up to ~3 ms more than its lateness)
    late = {i: d for i in range(64)}
    late.update({i: 5 * d for i in (3, 4, 7, 8, 10, 11, 14, 15)})  # duel 1: incumbent; duel 2: challenger
    late.update({i: 0.0 for i in range(18, 46, 5)})
    late.update({i: 3 * d for i in range(46, 64)})
    results = pool_factory(2).run(_duel_calls, 65_536, 64, late, "stores", timeout=100)
    assert not [f for failures, _ in results for f in failures], report([f for fs, _ in results for f in fs])
    stores = results[0][1]
    assert stores[1] == "streaming" and stores[3] == "ordinary", stores  # the first duel: streaming challenges
    assert set(stores[18:46]) == {"streaming"}, " ".join(f"{i}:{s}" for i, s in enumerate(stores))
    changes = [i for i in range(47, 64) if stores[i] != stores[i - 1]]
    assert len(changes) == 2 and stores[-1] == "streaming", " ".join(f"{i}:{s}" for i, s in enumerate(stores))


@pytest.mark.timeout(120)
def test_direct_challenges_with_the_stores_two_shot_kept(pool_factory):
    """Registered buffers at 2 ranks, 256 KiB: the model starts on two-shot with its default, ordinary
    stores; the first duel's streaming challenger is made to lose (rank 1 late by 5D at its timed calls,
    D at the rest), so ordinary stores hold; then the second duel's challenger, direct, which has no
    stores of its own yet, must run with those (learn.c, streams): it challenged with its default,
    streaming ones, which in a fast minute lose or tie though direct is the faster with ordinary ones
    (fails on the code before, 2026-12-06)."""
    d = 0.02
    late = {i: d for i in range(18)}
    late.update({i: 5 * d for i in (2, 6)})  # duel 1 (calls 1-8): the challenger's timed calls
    results = pool_factory(2).run(_duel_calls, 65_536, 18, late, None, True, timeout=100)
    assert not [f for failures, _ in results for f in failures], report([f for fs, _ in results for f in fs])
    calls = [(e["algorithm"], e["stores"]) for e in results[0][1]]
    assert calls[2] == ("two_shot", "streaming") and calls[4] == ("two_shot", "ordinary"), calls
    assert [calls[i] for i in (10, 11, 14, 15)] == [("direct", "ordinary")] * 4, calls


# (fp8: e4m3fn's one NaN; e5m2's payload is two bits, and the core stores every NaN canonical, as ml_dtypes does)
QUIET_NAN = {"float16": 0x7E00, "bfloat16": 0x7FC0, "float32": 0x7FC00000, "float64": 0x7FF8000000000000,
             "float8_e4m3fn": 0x7F, "float8_e5m2": 0x7E}


def _nan_sweep(comm, count=3001):
    """MIN and MAX with NaNs on every rank but 0 (payload: the rank), each rank at positions of its
    own and all of them at a few shared ones; all_reduce and reduce_scatter.  Returns (failures,
    {case: digest}); the reference by hand: NaN wherever some rank holds one, with the payload of
    the lowest such rank (float32/float64 keep it whole), every other element the plain min/max."""
    n, me = comm.size, comm.rank
    failures, digests = [], {}
    where = [np.zeros(count, bool)] + [(np.arange(count) % (n + 3) == r) | (np.arange(count) % 97 == 0)
                                       for r in range(1, n)]
    for dtype in FLOATS:
        t = DTYPES[dtype]
        u = f"u{t.itemsize}"
        datas = [rank_data(case_seed("nan", dtype, r), r, (count,), dtype) for r in range(n)]
        for r in range(1, n):
            datas[r].view(u)[where[r]] = QUIET_NAN[dtype] | r
        for op in ("MIN", "MAX"):
            plain = reference_reduce([np.where(w, d[0], d) for w, d in zip(where, datas)], op)
            first = np.zeros(count, int)
            for r in range(n - 1, 0, -1):
                first[where[r]] = r
            for kind in ("all_reduce", "reduce_scatter"):
                x = datas[me].copy()
                if kind == "all_reduce":
                    got, want_nan, lo = comm.all_reduce(x, op=_op(op)), first > 0, 0
                else:
                    per = count // n
                    got = comm.reduce_scatter(x[:per * n], op=_op(op))
                    want_nan, lo = first[me * per:(me + 1) * per] > 0, me * per
                label = f"{kind} {dtype} {op} NaN rank={me}/{n}"
                if not np.array_equal(np.isnan(got.astype(np.float64)), want_nan):
                    failures.append(f"{label}: NaN at {np.flatnonzero(np.isnan(got.astype(np.float64)))[:8]}, "
                                    f"expected at {np.flatnonzero(want_nan)[:8]}")
                    continue
                numbers = ~want_nan
                if (bad := mismatch(label + " (numbers)", got[numbers], plain[lo:lo + len(got)][numbers])):
                    failures.append(bad)
                if dtype in ("float32", "float64"):
                    payload = got.view(u)[want_nan] & 0xFF
                    expected = first[lo:lo + len(got)][want_nan]
                    if not np.array_equal(payload, expected):
                        failures.append(f"{label}: NaN payloads {payload[:8]}, expected the lowest rank's "
                                        f"{expected[:8]}")
                if kind == "all_reduce":  # (reduce_scatter gives each rank its own block)
                    digests[(kind, dtype, op)] = digest(got)
    return failures, digests


@pytest.mark.timeout(200)
@pytest.mark.parametrize("algo", ("one_shot", "two_shot", "cma"))
def test_min_max_propagate_nan_from_any_rank(pool_factory, algo):
    """A NaN held by any rank but 0 reaches every rank, with the same bits everywhere."""
    _assert_sweep(pool_factory(3, ALGO_ENVS[algo]).run(_nan_sweep, timeout=120))


def _integer_avg_sweep(comm, tag):
    failures, digests = _all_reduce_sweep(comm, tag, INTEGERS, ("AVG",), (1, 7, 1001, BIG))
    failures += _reduce_sweep(comm, tag, INTEGERS, ("AVG",), (7, 1001))
    failures += _reduce_scatter_sweep(comm, tag, INTEGERS, ("AVG",))
    return failures, digests


@pytest.mark.timeout(200)
@pytest.mark.parametrize("size", SIZES)
def test_integer_avg_exact_sum(pool_factory, size):
    """Integer AVG is the exact sum divided by the size, truncated toward zero, for all_reduce,
    reduce and reduce_scatter; full-range int8/uint8/int32 data, so a sum that wraps in the
    element type before the division shows."""
    _assert_sweep(pool_factory(size, SMALL_STAGING).run(_integer_avg_sweep, "int-avg", timeout=180))


# ---- reduce -----------------------------------------------------------------------------------
def _reduce_sweep(comm, tag, dtypes, ops=OPS, counts=(0, 1, 7, 1001), roots=None, kind="numpy"):
    n, me = comm.size, comm.rank
    failures = []
    for dtype in dtypes:
        for op in ops:
            for count in counts:
                for root in (range(n) if roots is None else roots):
                    for mode in ("inplace", "out"):
                        label = f"reduce {kind} {dtype} {op} count={count} root={root} {mode} rank={me}/{n}"
                        datas = _datas(case_seed(tag, dtype, op, count, root, mode), n, (count,), dtype, op)
                        x = _wrap(datas[me].copy(), kind)
                        out = _wrap(garbage_like(datas[me]), kind) if mode == "out" else None
                        res = comm.reduce(x, root=root, op=_op(op), out=out)
                        if me == root:
                            got = x if out is None else out
                            _check_same_object(label, res, got, failures)
                            want = reference_reduce(datas, op)
                            if (bad := mismatch(label, got, want)):
                                failures.append(bad)
                        if me != root or out is not None:
                            if (bad := mismatch(label + " (x changed)", x, datas[me])):
                                failures.append(bad)
    return failures


@pytest.mark.timeout(200)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("size", SIZES)
def test_reduce(pool_factory, size, dtype):
    """Every op x count 0/1/7/1001 x every root x in place/out."""
    failures = pool_factory(size, SMALL_STAGING).run(_reduce_sweep, "reduce", [dtype], _ops(dtype), timeout=180)
    assert not sum(failures, []), report(sum(failures, []))


@pytest.mark.timeout(200)
@pytest.mark.parametrize("size", SIZES)
def test_reduce_large_every_root(pool_factory, size):
    pool = pool_factory(size, SMALL_STAGING)
    failures = pool.run(_reduce_sweep, "reduce-large", ["float32", "float16"], ("SUM", "MAX", "AVG"), (BIG,),
                        timeout=180)
    failures += pool.run(_reduce_sweep, "reduce-large", ["int8"], ("SUM", "MAX"), (BIG,), timeout=180)
    assert not sum(failures, []), report(sum(failures, []))


# ---- reduce_scatter ---------------------------------------------------------------------------
def _block_shapes(n):
    """Per-rank block shapes for the dim-0 collectives: x has n * block[0] rows."""
    return [(0,), (1,), (7,), (3, 5), (0, 4), (BIG // n,)]


def _reduce_scatter_sweep(comm, tag, dtypes, ops=OPS, kind="numpy"):
    n, me = comm.size, comm.rank
    failures = []
    for dtype in dtypes:
        for op in ops:
            for block in _block_shapes(n):
                for mode in ("new", "out"):
                    shape = (n * block[0],) + block[1:]
                    label = f"reduce_scatter {kind} {dtype} {op} x.shape={shape} {mode} rank={me}/{n}"
                    datas = _datas(case_seed(tag, dtype, op, shape, mode), n, shape, dtype, op)
                    want = reference_reduce(datas, op)[me * block[0]:(me + 1) * block[0]]
                    x = _wrap(datas[me].copy(), kind)
                    out = _wrap(garbage_like(datas[me], block), kind) if mode == "out" else None
                    res = comm.reduce_scatter(x, op=_op(op), out=out)
                    _check_result(label, res, out, kind, want, x, datas[me], failures)
    return failures


@pytest.mark.timeout(200)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("size", SIZES)
def test_reduce_scatter(pool_factory, size, dtype):
    failures = pool_factory(size, SMALL_STAGING).run(_reduce_scatter_sweep, "reduce_scatter", [dtype], _ops(dtype),
                                                     timeout=180)
    assert not sum(failures, []), report(sum(failures, []))


# ---- all_gather, all_to_all, broadcast, gather, scatter ---------------------------------------------
def _data_movement_sweep(comm, tag, dtypes, kind="numpy"):
    """all_gather, all_to_all, broadcast (every root), gather and scatter (every root)."""
    n, me = comm.size, comm.rank
    failures = []
    check = _checker(failures, me, n)

    for dtype in dtypes:
        for block in _block_shapes(n):
            rows = block[0]
            for mode in ("new", "out"):
                # all_gather: rank r's x is block-shaped; the result stacks them in rank order
                label = f"all_gather {kind} {dtype} x.shape={block} {mode}"
                datas = _datas(case_seed(tag, "ag", dtype, block), n, block, dtype)
                want = np.concatenate(datas)
                x = _wrap(datas[me].copy(), kind)
                out = _wrap(garbage_like(want), kind) if mode == "out" else None
                res = comm.all_gather(x, out=out)
                if out is not None:
                    _check_same_object(label, res, out, failures)
                _check_kind(label, res, kind, failures)
                check(label, res, want)
                check(label + " (x changed)", x, datas[me])

                # all_to_all: block j of rank i's x lands in block i of rank j's result
                shape = (n * rows,) + block[1:]
                label = f"all_to_all {kind} {dtype} x.shape={shape} {mode}"
                datas = _datas(case_seed(tag, "a2a", dtype, shape), n, shape, dtype)
                want = np.concatenate([d[me * rows:(me + 1) * rows] for d in datas])
                x = _wrap(datas[me].copy(), kind)
                out = _wrap(garbage_like(datas[me]), kind) if mode == "out" else None
                res = comm.all_to_all(x, out=out)
                if out is not None:
                    _check_same_object(label, res, out, failures)
                _check_kind(label, res, kind, failures)
                check(label, res, want)
                check(label + " (x changed)", x, datas[me])

            for root in range(n):
                label = f"broadcast {kind} {dtype} x.shape={block} root={root}"
                datas = _datas(case_seed(tag, "bc", dtype, block, root), n, block, dtype)
                x = _wrap(datas[me].copy(), kind)
                res = comm.broadcast(x, root=root)
                if res is not None:
                    _check_same_object(label, res, x, failures)
                check(label, x, datas[root])

                for mode in ("new", "out"):
                    label = f"gather {kind} {dtype} x.shape={block} root={root} {mode}"
                    datas = _datas(case_seed(tag, "g", dtype, block, root, mode), n, block, dtype)
                    want = np.concatenate(datas)
                    x = _wrap(datas[me].copy(), kind)
                    out = _wrap(garbage_like(want), kind) if mode == "out" and me == root else None
                    res = comm.gather(x, root=root, out=out)
                    if me == root:
                        if out is not None:
                            _check_same_object(label, res, out, failures)
                        check(label, res, want)
                    elif res is not None:
                        failures.append(f"{label} rank={me}/{n}: a non-root got {type(res).__name__}, not None")
                    check(label + " (x changed)", x, datas[me])

                # scatter: root's x is split in n blocks; non-roots pass None + out ("out"),
                # or an x of the right shape whose content is ignored ("new")
                for mode in ("new", "out"):
                    shape = (n * rows,) + block[1:]
                    label = f"scatter {kind} {dtype} x.shape={shape} root={root} {mode}"
                    datas = _datas(case_seed(tag, "s", dtype, shape, root, mode), n, shape, dtype)
                    want = datas[root][me * rows:(me + 1) * rows]
                    x = _wrap(datas[me].copy(), kind) if me == root or mode == "new" else None
                    out = _wrap(garbage_like(datas[me], block), kind) if mode == "out" else None
                    res = comm.scatter(x, root=root, out=out)
                    if out is not None:
                        _check_same_object(label, res, out, failures)
                    _check_kind(label, res, kind, failures)
                    check(label, res, want)
                    if x is not None:
                        check(label + " (x changed)", x, datas[me])
    return failures


@pytest.mark.timeout(200)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("size", SIZES)
def test_data_movement(pool_factory, size, dtype):
    """all_gather, all_to_all, broadcast, gather, scatter: every root, counts 0/1/7/(3,5)/large."""
    failures = pool_factory(size, SMALL_STAGING).run(_data_movement_sweep, "move", [dtype], timeout=180)
    assert not sum(failures, []), report(sum(failures, []))


# ---- all_to_allv ------------------------------------------------------------------------------------
def _counts_matrix(n, trial, seed):
    """counts[i][j] = rows rank i sends to rank j, for a named trial."""
    rng = np.random.default_rng(seed)
    if trial == "uneven":  # random, with a rank sending nothing and a rank receiving nothing
        c = rng.integers(0, 6, (n, n))
        c[0, :] = 0
        c[:, n - 1] = 0
        if n > 2:
            c[1, 2] = 0
    elif trial == "large":  # more than the staging buffer per peer for most pairs
        c = rng.integers(0, 3000, (n, n))
        c[n // 2, :] = 0
    elif trial == "zeros":
        c = np.zeros((n, n), np.int64)
    else:  # "diagonal": every rank only keeps rows for itself
        c = np.diag(rng.integers(1, 20, n))
    return c


def _all_to_allv_sweep(comm, tag, dtypes, kind="numpy", known=False):
    n, me = comm.size, comm.rank
    failures = []
    for dtype in dtypes:
        for trial in ("uneven", "large", "zeros", "diagonal"):
            for tail in ((), (3,), (2, 5)):
                if trial == "large" and tail == (2, 5):
                    continue
                counts = _counts_matrix(n, trial, case_seed(tag, trial, n))
                datas = [rank_data(case_seed(tag, dtype, trial, tail), r, (int(counts[r].sum()),) + tail, dtype)
                         for r in range(n)]
                offsets = np.concatenate([np.zeros((n, 1), np.int64), np.cumsum(counts, axis=1)], axis=1)
                want = np.concatenate([datas[i][offsets[i, me]:offsets[i, me] + counts[i, me]] for i in range(n)])
                send = [int(c) for c in counts[me]]
                recv_given = [int(c) for c in counts[:, me]]
                for recv_mode in ("given", "exchanged"):
                    for out_mode in ("new", "out"):
                        label = (f"all_to_allv {kind} {dtype} {trial} tail={tail} recv_counts={recv_mode} "
                                 f"{out_mode} rank={me}/{n} send={send} recv={recv_given}")
                        x = _wrap(datas[me].copy(), kind)
                        out = _wrap(garbage_like(want), kind) if out_mode == "out" else None
                        matrix = {"all_counts": counts} if known else {}  # every rank's counts, known to all
                        res = comm.all_to_allv(x, send, recv_given if recv_mode == "given" else None, out=out,
                                               **matrix)
                        _check_result(label, res, out, kind, want, x, datas[me], failures)
    return failures


@pytest.mark.timeout(200)
@pytest.mark.parametrize("size", SIZES)
def test_all_to_allv(pool_factory, size):
    """Uneven counts with zeros (a rank sending nothing, one receiving nothing), counts above
    the staging size, all zeros, diagonal only; recv_counts given and exchanged; out or not."""
    failures = pool_factory(size, SMALL_STAGING).run(
        _all_to_allv_sweep, "a2av", ["float32", "int8", "bfloat16", "int64"], timeout=180)
    assert not sum(failures, []), report(sum(failures, []))


# ---- send / recv ---------------------------------------------------------------------------------------
P2P_SHAPES = ((0,), (1,), (7,), (3, 5), (10_000,))   # 10_000 float64 = 80 KB, 20x the P2P buffer


def _p2p_sweep(comm, tag, dtypes):
    """A ring (everyone sends right, receives from the left), then every pair both ways, then
    three back-to-back messages to one peer; receivers start from garbage."""
    n, me = comm.size, comm.rank
    failures = []
    check = _checker(failures, me, n)

    for dtype in dtypes:
        for shape in P2P_SHAPES:
            data = lambda r, *what: rank_data(case_seed(tag, dtype, shape, *what), r, shape, dtype)  # noqa: E731
            # ring: odd ranks receive first, so that blocking sends never wait in a cycle
            right, left = (me + 1) % n, (me - 1) % n
            x, buf = data(me, "ring"), garbage_like(data(me, "ring"))
            for step in ((0, 1) if me % 2 == 0 else (1, 0)):
                if step == 0:
                    comm.send(x, right)
                else:
                    res = comm.recv(buf, left)
                    if res is not None:
                        _check_same_object(f"recv {dtype}", res, buf, failures)
            check(f"ring send/recv {dtype} shape={shape} from {left}", buf, data(left, "ring"))
            check(f"ring send {dtype} shape={shape} (x changed)", x, data(me, "ring"))
            # pairwise: pairs in one global order; the lower rank sends first
            for i in range(n):
                for j in range(i + 1, n):
                    if me not in (i, j):
                        continue
                    peer = j if me == i else i
                    buf = garbage_like(data(peer, "pair", i, j))
                    if me == i:
                        comm.send(data(me, "pair", i, j), peer)
                        comm.recv(buf, peer)
                    else:
                        comm.recv(buf, peer)
                        comm.send(data(me, "pair", i, j), peer)
                    check(f"pairwise send/recv {dtype} shape={shape} {i}<->{j}", buf, data(peer, "pair", i, j))
        # back to back: rank 0 sends three messages of different sizes to the last rank
        if n > 1:
            shapes = [(5000,), (1,), (0,), (3000, 2)]
            if me == 0:
                for k, s in enumerate(shapes):
                    comm.send(rank_data(case_seed(tag, dtype, "b2b", k), 0, s, dtype), n - 1)
            elif me == n - 1:
                for k, s in enumerate(shapes):
                    want = rank_data(case_seed(tag, dtype, "b2b", k), 0, s, dtype)
                    buf = garbage_like(want)
                    comm.recv(buf, 0)
                    check(f"back-to-back message {k} {dtype} shape={s}", buf, want)
    return failures


@pytest.mark.timeout(200)
@pytest.mark.parametrize("size", [s for s in SIZES if s > 1])
def test_send_recv(pool_factory, size):
    failures = pool_factory(size, SMALL_STAGING).run(
        _p2p_sweep, "p2p", ["float64", "bfloat16", "uint8", "int32"], timeout=180)
    assert not sum(failures, []), report(sum(failures, []))


# ---- barrier -----------------------------------------------------------------------------------------------
def _barrier_times(comm, rounds):
    """Rank r sleeps r*20 ms before each barrier; returns [(entered, left)] per round."""
    times = []
    for _ in range(rounds):
        time.sleep(0.02 * comm.rank)
        entered = time.monotonic()
        comm.barrier()
        times.append((entered, time.monotonic()))
    return times


@pytest.mark.timeout(120)
@pytest.mark.parametrize("size", SIZES)
def test_barrier(pool_factory, size):
    """No rank leaves a barrier before the last one entered it (CLOCK_MONOTONIC is system-wide)."""
    per_rank = pool_factory(size, SMALL_STAGING).run(_barrier_times, 3, timeout=60)
    for k in range(3):
        last_in = max(t[k][0] for t in per_rank)
        first_out = min(t[k][1] for t in per_rank)
        assert first_out >= last_in, f"round {k}: a rank left at {first_out} before the last entered at {last_in}"


# ---- split -----------------------------------------------------------------------------------------------------
SPLITS = {
    # name: (color(rank, n), key(rank, n)); key None means keep the parent's order
    "even_odd": (lambda r, n: r % 2, lambda r, n: None),
    "even_odd_reversed": (lambda r, n: r % 2, lambda r, n: -r),
    "halves_key_reversed": (lambda r, n: int(r >= n // 2), lambda r, n: n - r),
    "rank0_out": (lambda r, n: None if r == 0 else 7, lambda r, n: None),
    "all_same_reversed": (lambda r, n: 3, lambda r, n: n - 1 - r),
}


def _members(rule, n, color):
    """World ranks of a color's sub-communicator, in sub-rank order (key, then world rank)."""
    color_of, key_of = SPLITS[rule]
    keyed = [(r if key_of(r, n) is None else key_of(r, n), r) for r in range(n) if color_of(r, n) == color]
    return [r for _, r in sorted(keyed)]


def _split_and_check(comm, tag, rule):
    n, me = comm.size, comm.rank
    color_of, key_of = SPLITS[rule]
    color = color_of(me, n)
    sub = comm.split(color, key=key_of(me, n))
    failures = []
    if color is None:
        if sub is not None:
            failures.append(f"{rule} rank={me}: color None returned {sub!r}, not None")
    else:
        members = _members(rule, n, color)
        if (sub.rank, sub.size) != (members.index(me), len(members)):
            failures.append(f"{rule} rank={me}: sub is rank {sub.rank} of {sub.size}, want "
                            f"{members.index(me)} of {len(members)} (members {members})")
        else:
            m, sr = len(members), sub.rank
            # data depend on the world rank; references follow the sub-communicator's order
            datas = _datas(case_seed(tag, rule, color, "ar"), n, (1001,), "float32")
            x = datas[me].copy()
            sub.all_reduce(x)
            if (bad := mismatch(f"{rule} rank={me} sub all_reduce", x, reference_reduce([datas[r] for r in members], "SUM"))):
                failures.append(bad)
            datas = _datas(case_seed(tag, rule, color, "ag"), n, (5, 2), "int32")
            if (bad := mismatch(f"{rule} rank={me} sub all_gather", sub.all_gather(datas[me]),
                                np.concatenate([datas[r] for r in members]))):
                failures.append(bad)
            datas = _datas(case_seed(tag, rule, color, "rs"), n, (m * 3,), "bfloat16")
            want = reference_reduce([datas[r] for r in members], "SUM")[sr * 3:(sr + 1) * 3]
            if (bad := mismatch(f"{rule} rank={me} sub reduce_scatter", sub.reduce_scatter(datas[me]), want)):
                failures.append(bad)
            datas = _datas(case_seed(tag, rule, color, "bc"), n, (BIG // 10,), "float64")
            x = datas[me].copy()
            sub.broadcast(x, root=m - 1)
            if (bad := mismatch(f"{rule} rank={me} sub broadcast from sub rank {m - 1}", x, datas[members[-1]])):
                failures.append(bad)
        sub.close()
    # the parent communicator still works after the split
    datas = _datas(case_seed(tag, rule, "world"), n, (33,), "int64")
    x = datas[me].copy()
    comm.all_reduce(x)
    if (bad := mismatch(f"{rule} rank={me} world all_reduce after split", x, reference_reduce(datas, "SUM"))):
        failures.append(bad)
    return failures


def _nested_split(comm, tag):
    """Split in halves, split each half again in even/odd, all_reduce on the innermost."""
    n, me = comm.size, comm.rank
    half = comm.split(int(me >= n // 2))
    quarter = half.split(half.rank % 2, key=-half.rank)
    members = [r for r in range(n) if (r >= n // 2) == (me >= n // 2)]
    inner = [r for i, r in enumerate(members) if i % 2 == members.index(me) % 2][::-1]
    datas = _datas(case_seed(tag, "nested"), n, (257,), "float16")
    x = datas[me].copy()
    quarter.all_reduce(x)
    failures = []
    if (bad := mismatch(f"nested rank={me} members={inner}", x, reference_reduce([datas[r] for r in inner], "SUM"))):
        failures.append(bad)
    quarter.close()
    half.close()
    return failures


@pytest.mark.timeout(120)
@pytest.mark.parametrize("rule", sorted(SPLITS))
@pytest.mark.parametrize("size", SIZES)
def test_split(pool_factory, size, rule):
    failures = pool_factory(size, SMALL_STAGING).run(_split_and_check, "split", rule, timeout=60)
    assert not sum(failures, []), report(sum(failures, []))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("size", (4, 5, 8))
def test_nested_split(pool_factory, size):
    failures = pool_factory(size, SMALL_STAGING).run(_nested_split, "split", timeout=60)
    assert not sum(failures, []), report(sum(failures, []))


# ---- async_op ----------------------------------------------------------------------------------------------------
def _async_works(comm, tag):
    """Six outstanding works of different collectives, waited in order."""
    n, me = comm.size, comm.rank
    d = lambda what, shape, dtype, op=None: _datas(case_seed(tag, what), n, shape, dtype, op)  # noqa: E731
    ar1, ar2 = d("ar1", (BIG,), "float32"), d("ar2", (7,), "int8", "PROD")
    ag, rs = d("ag", (1001,), "float16"), d("rs", (n * 2000,), "bfloat16")
    bc, a2a = d("bc", (3, 5), "int64"), d("a2a", (n * 3, 2), "uint8")
    x1, x2, x4 = ar1[me].copy(), ar2[me].copy(), None
    x5 = bc[me].copy()
    works = [
        ("all_reduce SUM", comm.all_reduce(x1, async_op=True), reference_reduce(ar1, "SUM"), x1),
        ("all_reduce PROD", comm.all_reduce(x2, op=_op("PROD"), async_op=True), reference_reduce(ar2, "PROD"), x2),
        ("all_gather", comm.all_gather(ag[me], async_op=True), np.concatenate(ag), x4),
        ("reduce_scatter", comm.reduce_scatter(rs[me], async_op=True),
         reference_reduce(rs, "SUM")[me * 2000:(me + 1) * 2000], x4),
        ("broadcast", comm.broadcast(x5, root=n - 1, async_op=True), bc[n - 1], x5),
        ("all_to_all", comm.all_to_all(a2a[me], async_op=True),
         np.concatenate([a[me * 3:(me + 1) * 3] for a in a2a]), x4),
    ]
    failures = []
    for name, work, want, inplace in works:
        res = work.wait(timeout=50)
        if not work.is_completed():
            failures.append(f"async {name} rank={me}: is_completed() is False after wait()")
        got = res if inplace is None or res is not None else inplace
        if inplace is not None and res is not None and res is not inplace:
            failures.append(f"async {name} rank={me}: wait() returned a different object than the in-place buffer")
        if (bad := mismatch(f"async {name} rank={me}/{n}", got, want)):
            failures.append(bad)
        if inplace is not None and (bad := mismatch(f"async {name} rank={me}/{n} (in place)", inplace, want)):
            failures.append(bad)
    # a synchronous call after async ones is ordered after them
    x = ar2[me].copy()
    comm.all_reduce(x, op=_op("PROD"))
    if (bad := mismatch(f"sync after async rank={me}", x, reference_reduce(ar2, "PROD"))):
        failures.append(bad)
    return failures


@pytest.mark.timeout(120)
@pytest.mark.parametrize("size", SIZES)
def test_async_outstanding_works(pool_factory, size):
    failures = pool_factory(size, SMALL_STAGING).run(_async_works, "async", timeout=60)
    assert not sum(failures, []), report(sum(failures, []))


# ---- torch tensors -----------------------------------------------------------------------------------------------
def _torch_sweep(comm, tag):
    import torch  # noqa: F401  (imported in the worker only when needed)
    failures, digests = _all_reduce_sweep(comm, tag, TORCH_DTYPES, counts=(0, 1, 7, 5000), kind="torch")
    failures += _reduce_sweep(comm, tag, TORCH_DTYPES, counts=(1, 1001), roots=[comm.size - 1], kind="torch")
    failures += _reduce_scatter_sweep(comm, tag, TORCH_DTYPES, ops=("SUM", "AVG"), kind="torch")
    failures += _data_movement_sweep(comm, tag, TORCH_DTYPES, kind="torch")
    failures += _all_to_allv_sweep(comm, tag, ["bfloat16"], kind="torch")
    return failures, digests


@pytest.mark.timeout(200)
@pytest.mark.parametrize("size", (1, 2, 3, 5))
def test_torch_tensors(pool_factory, size):
    """torch CPU tensors (float32, bfloat16, float8_e4m3fn, int64) in, torch tensors out, same references."""
    pytest.importorskip("torch")
    _assert_sweep(pool_factory(size, SMALL_STAGING).run(_torch_sweep, "torch", timeout=180))


def _fast_path_sweep(comm, tag):
    """The all_reduce sweep, numpy and torch, in place and into out, on a fresh communicator (the pool's may
    have a worker from an earlier test, which turns the fast path off), each call counted at the backend's
    direct entry: every one took the fast path."""
    fresh = comm.split(0)
    direct, taken = fresh._backend.all_reduce, []

    def counted(*args):
        taken.append(args[2])
        direct(*args)
    fresh._backend.all_reduce = counted
    fresh._refresh_fast_path()
    dtypes, ops, counts = ("float32", "bfloat16", "int32"), ("SUM", "MAX", "AVG"), (0, 1, 7, 5000)
    failures, digests = _all_reduce_sweep(fresh, tag, dtypes, ops, counts)
    more, tensors = _all_reduce_sweep(fresh, tag + "-torch", ("float32", "bfloat16"), ops, counts, kind="torch")
    fresh.close()
    calls = 2 * len(ops) * len(counts) * (len(dtypes) + 2)
    if len(taken) != calls:
        failures.append(f"rank {comm.rank}: {len(taken)} of {calls} all_reduces took the fast path")
    return failures + more, {**digests, **{("torch",) + case: d for case, d in tensors.items()}}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("size", (2, 3))
def test_all_reduce_fast_path(pool_factory, size):
    """Plain numpy arrays (bfloat16 through ml_dtypes) and torch tensors, in place and out=, through the
    fast path (ncl/comm.py): the numpy reference, bitwise alike on every rank."""
    pytest.importorskip("torch")
    _assert_sweep(pool_factory(size, SMALL_STAGING).run(_fast_path_sweep, "fast", timeout=100))


# ---- default staging, and the 1 GiB case ---------------------------------------------------------------------------
@pytest.mark.timeout(200)
@pytest.mark.parametrize("size", (2, 3))
def test_all_reduce_default_staging(pool_factory, size):
    """The default 4 MiB staging: counts up to a few times the buffer."""
    pool = pool_factory(size, ())
    counts = (0, 1001, 1 << 20, 3_000_001)
    _assert_sweep(pool.run(_all_reduce_sweep, "default", ["float32", "bfloat16"], ("SUM", "AVG"), counts, timeout=180))
    _assert_sweep(pool.run(_all_reduce_sweep, "default", ["int32"], ("SUM", "MAX"), counts, timeout=180))


ONE_GIB_COUNT = (1 << 28) + 1   # float32: 1 GiB + 4 bytes


def _all_reduce_1gib(comm):
    """x[i] = (i % 1024) * (rank + 1) (exact in float32), summed; memory stays near 1 GiB + 64 MiB."""
    n, me = comm.size, comm.rank
    pattern = np.arange(1024, dtype=np.float32)
    x = np.empty(ONE_GIB_COUNT, np.float32)
    full = ONE_GIB_COUNT // 1024 * 1024
    x[:full].reshape(-1, 1024)[...] = pattern * (me + 1)
    x[full:] = pattern[:ONE_GIB_COUNT - full] * (me + 1)
    start = time.monotonic()
    comm.all_reduce(x)
    seconds = time.monotonic() - start
    scale = np.float32(n * (n + 1) // 2)
    want_rows = pattern * scale
    failures = []
    step = 1 << 24
    for lo in range(0, full, step):  # every element, in chunks of 64 MiB
        block = x[lo:min(lo + step, full)].reshape(-1, 1024)
        if not np.array_equal(block, np.broadcast_to(want_rows, block.shape)):
            bad = np.argwhere(block != want_rows)[0]
            i = lo + bad[0] * 1024 + bad[1]
            failures.append(f"1 GiB all_reduce rank={me}: x[{i}] = {x[i]!r}, want {want_rows[bad[1]]!r}")
            break
    tail = x[full:]
    if not np.array_equal(tail, pattern[:tail.size] * scale):
        failures.append(f"1 GiB all_reduce rank={me}: last element {tail!r}, want {pattern[:tail.size] * scale!r}")
    samples = {i: float(x[i]) for i in (0, 1, 1023, 1024, 12345678, ONE_GIB_COUNT - 2, ONE_GIB_COUNT - 1)}
    checksum = float(np.add.reduce(x, dtype=np.float64))
    return failures, samples, checksum, seconds


@pytest.mark.timeout(300)
def test_all_reduce_1gib_plus_4_bytes(pool_factory):
    """float32 all_reduce of 1 GiB + 4 bytes (268435457 elements) on 2 ranks, default staging."""
    pool = pool_factory(2, ())
    results = pool.run(_all_reduce_1gib, timeout=240)
    failures = sum((r[0] for r in results), [])
    assert not failures, report(failures)
    per_block = float(np.arange(1024).sum()) * 3
    want_checksum = per_block * (ONE_GIB_COUNT // 1024) + 0.0  # the tail element is pattern[0] * 3 = 0
    for r, (_, samples, checksum, _) in enumerate(results):
        assert samples[1023] == 1023 * 3 and samples[ONE_GIB_COUNT - 2] == ((ONE_GIB_COUNT - 2) % 1024) * 3, samples
        assert checksum == want_checksum, f"rank {r}: checksum {checksum}, want {want_checksum}"


# ---- the harness itself ------------------------------------------------------------------------------------------
def _fail_on_last_rank(comm):
    if comm.rank == comm.size - 1:
        raise ValueError("deliberate failure on the last rank")
    return comm.rank


def _raise_everywhere(comm):
    raise KeyError(f"deliberate on rank {comm.rank}")


def _barrier_on_rank_0_only(comm):
    if comm.rank == 0:
        comm.barrier()  # rank 1 never comes: a deadlock the harness must turn into a TimeoutError
    return comm.rank


@pytest.mark.timeout(60)
def test_harness_reports_errors_and_deadlocks(pool_factory):
    """What the other tests rely on: a rank's exception fails the test with its message and
    leaves the pool usable; a deadlock becomes a TimeoutError and a dead pool, replaced by the
    fixture; run_expect_error hands back every rank's exception."""
    env = SMALL_STAGING + (("NCL_TIMEOUT", "30"),)  # a pool of its own, so the shared ones survive
    pool = pool_factory(2, env)
    with pytest.raises(AssertionError, match="rank 1: ValueError: deliberate failure on the last rank"):
        pool.run(_fail_on_last_rank)
    assert not pool.dead
    errors = pool.run_expect_error(_raise_everywhere)
    assert [(e.rank, e.type_name) for e in errors] == [(0, "KeyError"), (1, "KeyError")]
    with pytest.raises(TimeoutError, match=r"ranks \[0\] did not answer within 3 s"):
        pool.run(_barrier_on_rank_0_only, timeout=3)
    assert pool.dead
    fresh = pool_factory(2, env)
    assert fresh is not pool and len(fresh.run(_barrier_times, 1)) == 2


# ---- the single-copy (process_vm_readv) paths ------------------------------------------------
CMA_ENVS = {"cma_forced": SMALL_STAGING + (("NCL_CMA_MIN_BYTES", "1"),), "cma_off": SMALL_STAGING + (("NCL_CMA", "0"),)}


@pytest.mark.timeout(200)
@pytest.mark.parametrize("size", (2, 3, 8))
@pytest.mark.parametrize("path", sorted(CMA_ENVS))
def test_data_movement_cma_on_and_off(pool_factory, size, path):
    """all_gather, all_to_all, broadcast, gather and scatter with every message read from the
    peer's buffer (NCL_CMA_MIN_BYTES=1), and with CMA disabled (everything staged)."""
    failures = pool_factory(size, CMA_ENVS[path]).run(_data_movement_sweep, "cma", ["float32", "int8"], timeout=180)
    assert not sum(failures, []), report(sum(failures, []))


def _all_to_all_in_place_on_rank_0(comm):
    x = np.arange(4 * comm.size, dtype=np.float32)
    comm.all_to_all(x, out=x if comm.rank == 0 else None)


@pytest.mark.timeout(60)
def test_single_copy_on_some_ranks_only_is_a_mismatch(pool_factory):
    """In-place all_to_all cannot read peers in place; a rank that stages while the others read
    through CMA is caught by the fingerprints on every rank."""
    errors = pool_factory(2, CMA_ENVS["cma_forced"]).run_expect_error(_all_to_all_in_place_on_rank_0)
    assert all(e.is_a("NclMismatchError") and "single-copy reads" in e.message for e in errors), errors


@pytest.mark.timeout(200)
@pytest.mark.parametrize("size", (2, 3, 8))
@pytest.mark.parametrize("path", sorted(CMA_ENVS))
def test_all_to_allv_cma_on_and_off(pool_factory, size, path):
    """all_to_allv with every block read from the sender's buffer, and with every block staged."""
    failures = pool_factory(size, CMA_ENVS[path]).run(_all_to_allv_sweep, "a2av-cma", ["float32", "int8"], timeout=180)
    assert not sum(failures, []), report(sum(failures, []))


def _all_to_allv_registered(comm, registered_ranks):
    """A large uneven all_to_allv whose send buffer is registered on registered_ranks only:
    (failures, the path the call took)."""
    n, me = comm.size, comm.rank
    counts = _counts_matrix(n, "large", case_seed("a2av-reg", n)) + 100  # every rank sends
    datas = [rank_data(case_seed("a2av-reg", n, r), r, (int(counts[r].sum()), 64), "float32") for r in range(n)]
    offsets = np.concatenate([np.zeros((n, 1), np.int64), np.cumsum(counts, axis=1)], axis=1)
    want = np.concatenate([datas[i][offsets[i, me]:offsets[i, me] + counts[i, me]] for i in range(n)])
    window = comm.empty((int(counts.sum(1).max()), 64), np.float32)  # collective: the same shape everywhere
    x = window[:len(datas[me])] if me in registered_ranks else np.empty_like(datas[me])
    x[...] = datas[me]
    res = comm.all_to_allv(x, [int(c) for c in counts[me]])
    failures = [] if np.array_equal(res, want) and np.array_equal(x, datas[me]) else \
        [f"registered all_to_allv rank {me}/{n} (registered on {registered_ranks}): wrong result or input changed"]
    return failures, comm.last_stats()["host_algorithm"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("size", (2, 4))
@pytest.mark.parametrize("registered, env, expected", [
    ("all", (), "direct"),             # every sender's buffer mapped by every rank: plain memcpy
    ("rank 0", (), "cma"),             # the others' buffers read through process_vm_readv
    ("rank 0", (("NCL_CMA", "0"),), "staged"),  # neither: through the shared slots
])
def test_all_to_allv_reads_registered_senders_in_place(pool_factory, size, registered, env, expected):
    ranks = tuple(range(size)) if registered == "all" else (0,)
    results = pool_factory(size, env).run(_all_to_allv_registered, ranks, timeout=100)
    assert not sum((f for f, _ in results), []), report(sum((f for f, _ in results), []))
    assert [path for _, path in results] == [expected] * size


@pytest.mark.timeout(200)
@pytest.mark.parametrize("size", (2, 3, 8))
@pytest.mark.parametrize("env", ["small staging", "cma_forced"])
def test_all_to_allv_with_the_count_matrix_known(pool_factory, size, env):
    """all_counts= skips the exchange of counts (staged), or takes the single-copy path (CMA
    from 1 byte): the same results either way."""
    items = SMALL_STAGING if env == "small staging" else CMA_ENVS["cma_forced"]
    failures = pool_factory(size, items).run(_all_to_allv_sweep, "a2av-known", ["float32", "int8"], "numpy", True,
                                             timeout=180)
    assert not sum(failures, []), report(sum(failures, []))


def _all_to_allv_bad_matrix(comm, how):
    n = comm.size
    matrix = np.full((n, n), 2)
    if how == "shape":
        matrix = matrix[:, :1]
    elif how == "floats":
        matrix = matrix.astype(np.float32)
    elif how == "own row":  # this rank's row is not its send_counts
        matrix[comm.rank, (comm.rank + 1) % n] = 3
    elif how == "another matrix":  # rank 0 disagrees with the others about two other ranks' counts
        if comm.rank == 0:
            matrix[1, 2] = matrix[2, 1] = 1
    comm.all_to_allv(np.arange(2.0 * n, dtype=np.float32), [2] * n, all_counts=matrix)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how, error, says", [
    ("shape", "ValueError", "must be a (3, 3) matrix"),
    ("floats", "ValueError", "must hold ints"),
    ("own row", "ValueError", "all_counts disagree with this rank's counts"),
    ("another matrix", "NclMismatchError", ""),
])
def test_all_to_allv_count_matrix_errors(pool_factory, how, error, says):
    """A malformed matrix, or one that disagrees with this rank's own counts, fails before any
    exchange on every rank; ranks holding different matrices get a mismatch, not garbage."""
    errors = pool_factory(3).run_expect_error(_all_to_allv_bad_matrix, how)
    assert len(errors) == 3 and all(e.is_a(error) and says in e.message for e in errors), errors
