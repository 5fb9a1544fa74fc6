"""MoE expert parallelism (ncl.moe): dispatch and combine against the dense layer.

moe_program.py runs, on 2, 4 and 8 ranks, an MoE layer (top-2 routing with softmax over the
chosen experts, 8 experts in contiguous blocks, tanh experts) for uniform, skewed (Zipf) and
degenerate routing (every token to experts 0 and 1; no token for the last rank), and checks
this rank's output, its tokens' gradients and its experts' weight gradients against the dense
single-process layer over every rank's tokens, and that a token is sent once per rank, not
once per expert.  With a capacity factor (1.0 Zipf, 1.5 degenerate, 0.5 uniform: 2-7 choices
dropped per rank) the reference drops by its own independent rule, and the counts must agree.
The low-latency mode (low_latency_dispatch: fixed registered buffers, no count exchange) must
give the same outputs, counts, and -1 ids in its padding rows; group_by_expert (aligned to 4
rows) and ungroup must give the same expert outputs as running each row through its experts.
"""
import contextlib
import gc
import os
import sys
from typing import NamedTuple

import numpy as np
import pytest
import torch

import ncl
from harness import SMALL_STAGING, ncl_run_argv, program_failures
from ncl import moe, scratch

PROGRAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "moe_program.py")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n", [2, 4, 8])
def test_moe_layer_equals_the_dense_layer(tmp_path, n):
    failures = program_failures(ncl_run_argv(n, PROGRAM, str(tmp_path)), tmp_path, n)
    assert not failures, "\n".join(failures)


def test_single_rank_layout_and_round_trip():
    with ncl.init() as comm:
        idx = torch.tensor([[0, 3], [2, -1], [1, 2]])
        layout = moe.get_dispatch_layout(idx, 4, comm)
        assert layout.num_tokens_per_rank.tolist() == [3] and layout.num_recv_per_rank.tolist() == [3]
        assert layout.num_tokens_per_expert.tolist() == [1, 1, 2, 1]
        x = torch.arange(6.0).view(3, 2)
        recv_x, recv_idx, recv_w, handle = moe.dispatch(x, idx, torch.ones(3, 2), comm, layout)
        assert torch.equal(recv_x, x) and torch.equal(recv_idx, idx)
        assert torch.equal(moe.combine(recv_x * 2, handle), x * 2)


@pytest.mark.parametrize("call, says", [
    (lambda c: moe.dispatch(torch.zeros(4), torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2), c, num_experts=4),
     r"x must be \(tokens, hidden\)"),
    (lambda c: moe.get_dispatch_layout(torch.tensor([[0, 9]]), 4, c), "outside 0..3"),
    (lambda c: moe.get_dispatch_layout(torch.zeros(2, 2), 4, c), "int tensor"),
    (lambda c: moe.dispatch(torch.zeros(2, 3), torch.zeros(2, 2, dtype=torch.long), torch.ones(3, 2), c,
                            num_experts=4), "topk_weights"),
    (lambda c: moe.dispatch(torch.zeros(2, 3), torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2), c),
     "needs num_experts"),
])
def test_bad_routing_is_a_clear_error(call, says):
    with ncl.init() as comm:
        with pytest.raises(ValueError, match=says):
            call(comm)


@pytest.mark.timeout(300)
def test_moe_across_two_emulated_hosts(tmp_path):
    """The same layer under mpiexec with NCL_HOSTS=2: the exchanges run as the two-level
    all_to_allv (shared memory, then one MPI message per host pair)."""
    pytest.importorskip("mpi4py")
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    failures = program_failures([mpiexec, "-n", "4", sys.executable, PROGRAM, str(tmp_path)], tmp_path, 4,
                                env={"NCL_HOSTS": "2"})
    assert not failures, "\n".join(failures)


# ---- the Buffer, on a pool of 3 ranks, against numpy ------------------------------------------------------
# Rank r holds experts 2r and 2r+1 (6 experts); expert e multiplies a row by 1 + e/4.  Every rank's routing
# is a pure function of (seed, rank), so each rank computes what it must receive and get back with numpy.
EXPERTS, HIDDEN, TOP_K = 6, 40, 2
TOKENS = (5, 0, 9)  # per rank: rank 1 sends nothing


class Case(NamedTuple):
    tokens: tuple = TOKENS  # per rank
    experts: int = EXPERTS
    top_k: int = TOP_K
    only: int = -1          # >= 0: every token chooses this expert alone (its other choices -1)


def _routing(seed: int, rank: int, hidden: int = HIDDEN, case: Case = Case()):
    """(x, topk_idx, topk_weights) as numpy: distinct experts per token, some choices -1."""
    g = np.random.default_rng([seed, rank])
    tokens, k = case.tokens[rank], case.top_k
    x = g.standard_normal((tokens, hidden)).astype(np.float32)
    idx = np.array([g.choice(case.experts, k, replace=False) for _ in range(tokens)], dtype=np.int64)
    idx = idx.reshape(tokens, k)
    idx[g.random((tokens, k)) < 0.2] = -1
    if case.only >= 0:
        idx[:] = -1
        idx[:, 0] = case.only
    return x, idx, g.random((tokens, k)).astype(np.float32)


def _scale(ids: np.ndarray) -> np.ndarray:
    return np.where(ids >= 0, 1 + ids / 4, 0.0)


def _received(seed: int, me: int, n: int, hidden: int = HIDDEN, case: Case = Case()):
    """Per source rank, in numpy: (its rows this rank receives, their ids, -1 where this rank
    lacks the expert, their weights)."""
    per = case.experts // n
    received = []
    for source in range(n):
        x, idx, w = _routing(seed, source, hidden, case)
        mine = ((idx >= 0) & (idx // per == me)).any(1)
        received.append((x[mine], np.where((idx >= 0) & (idx // per == me), idx, -1)[mine], w[mine]))
    return received


def _expected(seed: int, me: int, n: int, hidden: int = HIDDEN, case: Case = Case()):
    """(rows from each source rank, this rank's combined output), in numpy."""
    x, idx, w = _routing(seed, me, hidden, case)
    return ([rows for rows, _, _ in _received(seed, me, n, hidden, case)],
            (x * (w * _scale(idx)).sum(1, keepdims=True)).astype(np.float32))


def _play_experts(recv_x, recv_idx, recv_w):
    """This rank's experts on the received rows, each weighted (combine's input)."""
    factor = (recv_w.double() * torch.from_numpy(_scale(recv_idx.numpy()))).sum(1, keepdim=True)
    return (recv_x.double() * factor).float()


def _mismatches(label, recv_x, recv_counts, y, seed, me, n, slots=0, hidden=HIDDEN):
    """What differs from numpy: the received rows (block by source; low-latency padding zero), the output."""
    received, want_y = _expected(seed, me, n, hidden)
    out = []
    if recv_counts != [len(r) for r in received]:
        out.append(f"{label}: rank {me} received {recv_counts} rows, want {[len(r) for r in received]}")
        return out
    at = 0
    for source, rows in enumerate(received):
        start = source * slots if slots else at
        block = recv_x[start:start + (slots or len(rows))].numpy()
        if not np.array_equal(block[:len(rows)], rows) or block[len(rows):].any():
            out.append(f"{label}: rank {me}, the rows from rank {source} differ from numpy's")
        at += len(rows)
    if not np.allclose(y.numpy(), want_y, rtol=1e-5, atol=1e-6):
        out.append(f"{label}: rank {me}, the combined output differs from numpy's")
    return out


def _round_trip(buffer, label, seed, low_latency, hidden=HIDDEN):
    """dispatch + experts + combine in one mode: (label, recv_x, counts, output, slots) for _mismatches."""
    me = buffer.group.rank
    x, idx, w = (torch.from_numpy(a) for a in _routing(seed, me, hidden))
    if low_latency:
        slots = max(TOKENS)
        recv_x, recv_idx, recv_w, handle = buffer.low_latency_dispatch(x, idx, w, slots, num_experts=EXPERTS)
        return label, recv_x, handle.recv_counts, buffer.low_latency_combine(_play_experts(recv_x, recv_idx, recv_w),
                                                                             handle), slots
    recv_x, recv_idx, recv_w, handle = buffer.dispatch(x, idx, w, num_experts=EXPERTS)
    return label, recv_x, handle.recv_counts, buffer.combine(_play_experts(recv_x, recv_idx, recv_w), handle), 0


@contextlib.contextmanager
def _exchange_path(path: str):
    """Force how the normal mode moves rows: "packed" (the default at these sizes), "registered"
    (rows from the registered send buffer, outputs from the pools), or "pooled" (one step of the
    core, as by default, its outputs from the pools as a large batch's are)."""
    saved = moe.ONE_STEP, moe.PACKED_MAX_BYTES, moe.SEND_BUFFER_MIN_BYTES, scratch.POOL_MIN_BYTES
    if path == "registered":
        moe.ONE_STEP = False
        moe.PACKED_MAX_BYTES = moe.SEND_BUFFER_MIN_BYTES = scratch.POOL_MIN_BYTES = 0
    if path == "pooled":
        scratch.POOL_MIN_BYTES = 0
    try:
        yield
    finally:
        moe.ONE_STEP, moe.PACKED_MAX_BYTES, moe.SEND_BUFFER_MIN_BYTES, scratch.POOL_MIN_BYTES = saved


def _both_modes_on_rank(comm, path):
    failures = []
    with _exchange_path(path), moe.Buffer(comm) as buffer:
        # every output checked after all the calls: a pooled one is not handed out again while it lives
        trips = [(seed, _round_trip(buffer, f"{path}, low_latency={low_latency}", seed, low_latency))
                 for seed, low_latency in ((1, False), (2, True), (3, False), (3, True))]
        for seed, (label, recv_x, counts, y, slots) in trips:
            failures += _mismatches(label, recv_x, counts, y, seed, comm.rank, comm.size, slots)
    return failures


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", ["packed", "registered", "pooled"])
def test_buffer_normal_and_low_latency_modes_equal_numpy(pool_factory, path):
    failures = sum(pool_factory(3).run(_both_modes_on_rank, path), [])
    assert not failures, "\n".join(failures)


def _two_buffers_on_rank(comm):
    """Two Buffers, their calls interleaved: each dispatch's handle is combined on its own Buffer
    after the other Buffer ran (the hidden sizes differ, so their registered memory does too)."""
    failures = []
    with _exchange_path("registered"), moe.Buffer(comm) as a, moe.Buffer(comm) as b:
        me, n = comm.rank, comm.size
        xa, ia, wa = (torch.from_numpy(t) for t in _routing(4, me))
        xb, ib, wb = (torch.from_numpy(t) for t in _routing(5, me, 24))
        ra = a.dispatch(xa, ia, wa, num_experts=EXPERTS)
        rb = b.low_latency_dispatch(xb, ib, wb, max(TOKENS), num_experts=EXPERTS)
        rc = b.dispatch(xb, ib, wb, num_experts=EXPERTS)
        ya = a.combine(_play_experts(*ra[:3]), ra[3])
        yc = b.combine(_play_experts(*rc[:3]), rc[3])
        yb = b.low_latency_combine(_play_experts(*rb[:3]), rb[3])
        failures += _mismatches("buffer a, normal", ra[0], ra[3].recv_counts, ya, 4, me, n)
        failures += _mismatches("buffer b, low latency", rb[0], rb[3].recv_counts, yb, 5, me, n, max(TOKENS), 24)
        failures += _mismatches("buffer b, normal", rc[0], rc[3].recv_counts, yc, 5, me, n, 0, 24)
        try:
            a.combine(_play_experts(*rc[:3]), rc[3])
            failures.append("a handle of buffer b was combined on buffer a")
        except ValueError:
            pass
    return failures


@pytest.mark.timeout(120)
def test_two_buffers_on_one_communicator_do_not_interfere(pool_factory):
    failures = sum(pool_factory(3).run(_two_buffers_on_rank), [])
    assert not failures, "\n".join(failures)


def _shared_mappings() -> int:
    """Shared-memory segments this process maps (the communicator's and every registered window: memfds)."""
    with open("/proc/self/maps") as f:
        return sum("/memfd:ncl-" in line for line in f)


def _job_files(unique_id: str) -> list:
    """The pool's files in /dev/shm (other jobs on the machine come and go meanwhile)."""
    return sorted(f for f in os.listdir("/dev/shm") if f.startswith(f"ncl-{unique_id[:12]}"))


def _buffer_memory_on_rank(comm, unique_id):
    """(mappings before, while the Buffer holds memory, after close, /dev/shm before, after, closed use refused)."""
    gc.collect()
    before, files_before = _shared_mappings(), _job_files(unique_id)
    with _exchange_path("registered"):
        buffer = moe.Buffer(comm)
        results = [_round_trip(buffer, "", 6, low_latency) for low_latency in (False, True)]
    during = _shared_mappings()
    buffer.close()
    refused = False
    try:
        _round_trip(buffer, "", 6, False)
    except ncl.NclStateError:
        refused = True
    del results
    gc.collect()
    return before, during, _shared_mappings(), files_before, _job_files(unique_id), refused


@pytest.mark.timeout(120)
def test_a_closed_buffer_frees_its_registered_memory(pool_factory):
    """The send buffer and the low-latency slots are registered windows, mapped on every rank;
    once the Buffer is closed and its results dropped, none stays mapped or in /dev/shm."""
    pool = pool_factory(3)
    for rank, (before, during, after, files_before, files_after, refused) in enumerate(
            pool.run(_buffer_memory_on_rank, pool.unique_id)):
        assert during > before, f"rank {rank}: the Buffer mapped no registered memory ({before} -> {during})"
        assert after == before, f"rank {rank}: {after - before} mappings left after close"
        assert files_after == files_before, f"rank {rank}: /dev/shm {files_before} -> {files_after}"
        assert refused, f"rank {rank}: a closed Buffer still dispatched"


# ---- the one-step path (ncl/moe_step.py, native/moe.c) against numpy, and against the other paths bit for bit
ONE_STEP_CASES = [  # tokens per rank (the first N of them), experts, top-k: one token, empty ranks, top-1 to top-4
    Case((1, 1, 1, 1), 4, 1),
    Case((0, 3, 0, 7), 8, 4),
    Case((6, 2, 9, 1), 16, 3),
    Case((40, 0, 33, 45), 8, 2),  # with 8 KiB of staging, blocks that do not fit one step: counts, then the rows
]
ONE_STEP_CASES_8 = [  # at 8 ranks (the decode shape the per-call work was cut for): one token each, empty ranks,
    Case((1,) * 8, 16, 4),  # every token to one expert (one rank receives everything, the others nothing)
    Case((0, 3, 0, 7, 1, 0, 2, 5), 32, 4),
    Case((1, 2, 0, 3, 1, 1, 0, 2), 16, 2, only=13),
]


def _one_step_round_trips(comm, case: Case, dtype: torch.dtype, id_dtype: torch.dtype):
    """(failures, the flight record's paths of the one-step dispatches): both modes through the one-step
    path, checked against numpy (rows, ids, weights, output) and against the other paths (every output bit)."""
    me, n, slots = comm.rank, comm.size, max(max(case.tokens[:comm.size]), 1)
    x, idx, w = (torch.from_numpy(a) for a in _routing(21, me, HIDDEN, case))
    x, idx = x.to(dtype), idx.to(id_dtype)
    failures, results = [], {}
    for path in ("packed", "registered"):  # packed: the one-step path; registered: the other ones
        with _exchange_path(path), moe.Buffer(comm) as buffer:
            for low_latency in (False, True):
                if low_latency:
                    got = buffer.low_latency_dispatch(x, idx, w, slots, num_experts=case.experts)
                    y = buffer.low_latency_combine(_play_experts(got[0].float(), *got[1:3]).to(dtype), got[3])
                else:
                    got = buffer.dispatch(x, idx, w, num_experts=case.experts)
                    y = buffer.combine(_play_experts(got[0].float(), *got[1:3]).to(dtype), got[3])
                results[path, low_latency] = got[:3] + (y,)
    paths = [(e["collective"], e["algorithm"], e["steps"]) for e in comm.flight_record()
             if e["collective"] in ("moe_dispatch", "moe_combine")]
    for low_latency in (False, True):
        label = f"{case}, {dtype}, ids {id_dtype}, low_latency={low_latency}, rank {me}"
        recv_x, recv_idx, recv_w, y = results["packed", low_latency]
        if any(not torch.equal(a, b) for a, b in zip(results["packed", low_latency], results["registered", low_latency])):
            failures.append(f"{label}: the one-step path differs from the other paths")
        at = 0
        for source, (rows, ids, weights) in enumerate(_received(21, me, n, HIDDEN, case)):
            start = source * slots if low_latency else at
            block = slice(start, start + len(rows))
            pad = slice(start + len(rows), start + slots) if low_latency else slice(0, 0)
            if not (torch.equal(recv_x[block], torch.from_numpy(rows).to(dtype)) and
                    torch.equal(recv_idx[block], torch.from_numpy(ids)) and
                    torch.equal(recv_w[block], torch.from_numpy(weights)) and
                    not recv_x[pad].any() and (recv_idx[pad] == -1).all() and not recv_w[pad].any()):
                failures.append(f"{label}: the rows, ids or weights from rank {source} differ from numpy's")
            at += len(rows)
        want = torch.from_numpy(_expected(21, me, n, HIDDEN, case)[1])
        if not torch.allclose(y.float(), want, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2):
            failures.append(f"{label}: the combined output differs from numpy's")
    return failures, paths


@pytest.mark.timeout(180)
@pytest.mark.parametrize("n, staging", [(2, ()), (4, ()), (8, ()), (2, SMALL_STAGING)])
def test_one_step_dispatch_and_combine_equal_numpy_and_the_other_paths(pool_factory, n, staging):
    pool = pool_factory(n, staging)
    for i, case in enumerate(ONE_STEP_CASES_8 if n == 8 else ONE_STEP_CASES[-1:] if staging else ONE_STEP_CASES):
        dtype, ids = (torch.bfloat16, torch.int32) if i % 2 else (torch.float32, torch.int64)
        answers = pool.run(_one_step_round_trips, case, dtype, ids)
        failures = sum((f for f, _ in answers), [])
        assert not failures, "\n".join(failures)
        paths = answers[0][1]
        # the rows moved in the one step (the normal and the low-latency dispatch and combine), or, with 8 KiB of
        # staging, the blocks of the last case did not fit it: the normal dispatch moved only the counts, then the
        # rows the other way; the low-latency dispatch and both combines moved them in more steps of one call
        # (blocks of up to 45 rows, 10 a step)
        algorithms = [a for _, a, _ in paths[-4:]]
        assert algorithms == (["counts", "steps", "steps", "steps"] if staging else ["one_step"] * 4), paths
        assert [s > 2 for _, a, s in paths[-4:] if a != "counts"] == [bool(staging)] * (3 if staging else 4), paths


def _low_latency_rows_no_piece_holds(comm):
    """Failures of low-latency round trips whose rows (600 float32, 2400 B) are larger than a piece of 8 KiB of
    staging: only the counts move in the core, the rows the other way; with no token anywhere too."""
    me, n, hidden, failures = comm.rank, comm.size, 600, []
    for case in (Case((0, 0), 4, 2), Case((1, 2), 4, 2)):
        slots = max(max(case.tokens), 1)
        x, idx, w = (torch.from_numpy(a) for a in _routing(5, me, hidden, case))
        with moe.Buffer(comm) as buffer:
            recv_x, recv_idx, recv_w, handle = buffer.low_latency_dispatch(x, idx, w, slots, num_experts=case.experts)
            y = buffer.low_latency_combine(_play_experts(recv_x, recv_idx, recv_w), handle)
        for source, (rows, ids, weights) in enumerate(_received(5, me, n, hidden, case)):
            block, pad = slice(source * slots, source * slots + len(rows)), slice(source * slots + len(rows),
                                                                                (source + 1) * slots)
            if not (torch.equal(recv_x[block], torch.from_numpy(rows)) and torch.equal(recv_idx[block],
                    torch.from_numpy(ids)) and torch.equal(recv_w[block], torch.from_numpy(weights)) and
                    not recv_x[pad].any() and (recv_idx[pad] == -1).all() and not recv_w[pad].any()):
                failures.append(f"{case}, rank {me}: the block from rank {source} differs from numpy's")
        if not torch.allclose(y, torch.from_numpy(_expected(5, me, n, hidden, case)[1]), rtol=1e-5, atol=1e-5):
            failures.append(f"{case}, rank {me}: the combined output differs from numpy's")
    paths = [e["algorithm"] for e in comm.flight_record() if e["collective"] == "moe_dispatch"]
    if paths[-2:] != ["counts", "counts"]:
        failures.append(f"rank {me}: the dispatches took {paths[-2:]}, not the core's counts and then the rows")
    return failures


@pytest.mark.timeout(120)
def test_low_latency_rows_larger_than_a_piece_of_staging_move_the_other_way(pool_factory):
    failures = sum(pool_factory(2, SMALL_STAGING).run(_low_latency_rows_no_piece_holds), [])
    assert not failures, "\n".join(failures)


def _low_latency_padding_over_used_memory(comm):
    """Failures of a low-latency dispatch of 1 token a rank into memory the pool took back from a full one
    (2 blocks of 128 rows of 32 KiB: recv_x is 8 MiB, pooled): the padding, 127 rows a block, 8.3 MB a
    rank, must read zero, ids -1, weights 0 (native/moe.c pad_slots)."""
    me, failures, hidden, slots = comm.rank, [], 8192, 128
    g = torch.Generator().manual_seed(me)
    with moe.Buffer(comm) as buffer:
        for tokens in (slots, 1):  # every block full of rows, then one row a block in the same memory
            x = torch.rand(tokens, hidden, generator=g) + 1  # no zero anywhere
            idx = torch.tensor([[0, 2]] * tokens)  # expert 0 on rank 0, expert 2 on rank 1
            w = torch.full((tokens, 2), 0.5)
            recv_x, recv_idx, recv_w, handle = buffer.low_latency_dispatch(x, idx, w, slots, num_experts=4)
            sent = comm.all_gather(x).view(comm.size, tokens, hidden)  # every rank's rows
            ids = torch.tensor([[0, -1] if me == 0 else [-1, 2]] * tokens)  # the experts this rank holds
            for source in range(comm.size):
                block = slice(source * slots, source * slots + tokens)
                pad = slice(source * slots + tokens, (source + 1) * slots)
                if not (torch.equal(recv_x[block], sent[source]) and torch.equal(recv_idx[block], ids) and
                        not recv_x[pad].any() and (recv_idx[pad] == -1).all() and not recv_w[pad].any()):
                    failures.append(f"{tokens} tokens, rank {me}: the block from rank {source} is wrong")
            if tokens == slots:
                del recv_x, recv_idx, recv_w, handle  # the 8 MiB go back to the pool
    return failures


@pytest.mark.timeout(120)
@pytest.mark.parametrize("oversubscribed", (False, True))
def test_low_latency_padding_reads_zero_in_reused_memory(pool_factory, oversubscribed):
    """Zeroed with ordinary stores, and with streaming ones (copy.c's rule for a rank's own output:
    NCL_LOCAL_WORLD_SIZE=64 makes 2 ranks oversubscribed below 64 CPUs, and 8.3 MB of padding is over
    the line where the largest cache is under 66 MB)."""
    env = (("NCL_LOCAL_WORLD_SIZE", "64"),) if oversubscribed else ()
    failures = sum(pool_factory(2, env).run(_low_latency_padding_over_used_memory), [])
    assert not failures, "\n".join(failures)


# ---- fp8 dispatch (DeepEP's convention), on pools of 2 and 3 ranks: the codes and scales numpy's, bit for bit;
# combine in bfloat16 within fp8's bound of the bfloat16 dispatch's
FP8_CASE, FP8_HIDDEN = Case((4, 0, 7), 6, 2), 200  # rank 1 sends nothing; rows of two blocks, the second short


def _fp8_round_trips(comm):
    from test_quant import reference_fp8_rows, reference_fp8_rows_values
    me, n, slots, failures = comm.rank, comm.size, max(FP8_CASE.tokens), []
    x32, idx, w = _routing(31, me, FP8_HIDDEN, FP8_CASE)
    x32[:, ::37] *= 50  # outliers
    x, idx, w = torch.from_numpy(x32).to(torch.bfloat16), torch.from_numpy(idx), torch.from_numpy(w)
    received = []  # the senders' rows with their outliers, rounded to bfloat16 as they were
    for rows, _, _ in _received(31, me, n, FP8_HIDDEN, FP8_CASE):
        rows[:, ::37] *= 50
        received.append(torch.from_numpy(rows).to(torch.bfloat16).float().numpy())
    with moe.Buffer(comm) as buffer, torch.no_grad():
        for low_latency in (False, True):
            def dispatch(**wire):
                if low_latency:
                    return buffer.low_latency_dispatch(x, idx, w, slots, num_experts=FP8_CASE.experts, **wire)
                return buffer.dispatch(x, idx, w, num_experts=FP8_CASE.experts, **wire)
            label = f"rank {me} of {n}, low_latency={low_latency}"
            (codes, scales), ids, weights, _ = dispatch(fp8=True)
            deq, _, _, handle = dispatch(fp8=True, dequantize=True)
            plain, _, _, plain_handle = dispatch()
            if codes.dtype != torch.float8_e4m3fn or scales.dtype != torch.float32 or deq.dtype != torch.bfloat16:
                failures.append(f"{label}: dtypes {codes.dtype}, {scales.dtype}, {deq.dtype}")
                continue
            at = 0
            for source, rows in enumerate(received):
                start = source * slots if low_latency else at
                block, pad = slice(start, start + len(rows)), slice(start + len(rows), start + slots)
                want = reference_fp8_rows(rows)
                if (codes[block].view(torch.uint8).numpy().tobytes() != want[:, :FP8_HIDDEN].tobytes() or
                        scales[block].numpy().tobytes() != want[:, -scales.shape[1] * 4:].tobytes()):
                    failures.append(f"{label}: the codes or scales from rank {source} are not numpy's")
                if not torch.equal(deq[block], torch.from_numpy(reference_fp8_rows_values(want, FP8_HIDDEN)).to(
                        torch.bfloat16)):
                    failures.append(f"{label}: the dequantized rows from rank {source} are not numpy's")
                if low_latency and (codes[pad].view(torch.uint8).any() or scales[pad].any() or deq[pad].any()):
                    failures.append(f"{label}: padding rows from rank {source} are not zero")
                at += len(rows)
            combine = buffer.low_latency_combine if low_latency else buffer.combine
            y = combine(_play_experts(deq.float(), ids, weights).to(torch.bfloat16), handle).float()
            exact = combine(_play_experts(plain.float(), ids, weights).to(torch.bfloat16), plain_handle).float()
            # each dequantized value is off by at most 1/16 of its block's largest (e4m3: 3 mantissa bits), then
            # bfloat16 roundings; a token's rows add up with its total weight
            total = torch.from_numpy((w.numpy() * _scale(idx.numpy())).sum(1, keepdims=True)).float()
            bound = total * x.float().abs().amax(1, keepdim=True) * (1 / 16 + 1 / 128) + exact.abs() / 64 + 1e-6
            if ((y - exact).abs() > bound).any():
                failures.append(f"{label}: the fp8 round trip is off by more than fp8's bound")
    return failures


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [2, 3])
def test_fp8_dispatch_sends_numpys_codes_and_combines_within_the_bound(pool_factory, n):
    failures = sum(pool_factory(n).run(_fp8_round_trips), [])
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("wire, x, says", [
    (dict(fp8="yes"), torch.zeros(2, 8), "must be bools"),
    (dict(dequantize=True), torch.zeros(2, 8), "needs fp8=True"),
    (dict(fp8=True), torch.zeros(2, 8, dtype=torch.float16), "bfloat16 or float32"),
    (dict(fp8=True), torch.zeros(2, 8, requires_grad=True), "no gradient"),
])
def test_bad_fp8_arguments_are_clear_errors(wire, x, says):
    idx, w = torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2)
    with ncl.init() as comm:
        for call in (lambda: moe.dispatch(x, idx, w, comm, num_experts=4, **wire),
                     lambda: moe.dispatch(x, idx, w, comm, num_experts=4, max_tokens_per_rank=2, **wire)):
            with pytest.raises((ValueError, TypeError), match=says):
                call()
