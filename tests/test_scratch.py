"""ncl.scratch (memory reused between exchanges) and the MoE combine's rank-ordered sum, in
one process against plain references."""
import numpy as np
import pytest
import torch

from ncl import moe, scratch


@pytest.mark.parametrize("nbytes", [1, 15, 16, 17, 1000, 4095, 4096, 44_363_520, 44_409_600, (1 << 30) + 1])
def test_size_classes_round_up_by_at_most_an_eighth(nbytes):
    size = scratch.size_class(nbytes)
    assert nbytes <= size <= max(nbytes * 9 // 8 + 1, 16)
    assert scratch.size_class(size) == size


def test_nearby_sizes_share_a_class():
    """A call's row counts vary a little from call to call: one buffer must serve them all."""
    assert scratch.size_class(7702 * 5760) == scratch.size_class(7710 * 5760)


def test_pool_reuses_memory_only_after_the_caller_lets_go(monkeypatch):
    monkeypatch.setattr(scratch, "POOL_MIN_BYTES", 1024)
    pool = scratch.OutputPool(keep=2)
    a = pool.empty((64, 32), torch.float32)
    b = pool.empty((64, 32), torch.float32)
    assert a.shape == (64, 32) and a.dtype == torch.float32 and a.is_contiguous()
    assert a.data_ptr() != b.data_ptr()  # both alive: never the same memory
    a.fill_(1.0)
    b.fill_(2.0)
    assert bool((a == 1.0).all())
    where = a.data_ptr()
    view = a[3:]  # a view keeps the buffer in use
    del a
    c = pool.empty((64, 32), torch.float32)
    assert c.data_ptr() not in (where, b.data_ptr())
    del view
    assert pool.idle() == 1
    d = pool.empty((63, 32), torch.float32)  # the same size class: the buffer comes back
    assert d.data_ptr() == where and pool.idle() == 0
    del b, c, d
    assert pool.idle() == 2  # keep=2: the oldest of three idle buffers went back to the system


def test_pool_passes_small_and_empty_requests_to_torch(monkeypatch):
    monkeypatch.setattr(scratch, "POOL_MIN_BYTES", 0)
    pool = scratch.OutputPool()
    empty = pool.empty((0, 7), torch.bfloat16)
    assert empty.shape == (0, 7) and pool.idle() == 0
    monkeypatch.setattr(scratch, "POOL_MIN_BYTES", 1 << 20)
    small = pool.empty((4, 4), torch.float64)
    del small
    assert pool.idle() == 0


def _handle(send_token, send_counts, tokens, hidden, slots=0):
    return moe.Handle(None, torch.as_tensor(send_token, dtype=torch.long), list(send_counts), [], tokens, hidden,
                      slots=slots)


def _routing(seed, tokens, n, hidden, dtype, slots=0):
    """(back, handle, reference): random rows for random (token, rank) pairs, each token at most
    once per rank, and the rank-ordered sum each token must get (float64 reference)."""
    rng = np.random.default_rng(seed)
    goes = rng.random((n, tokens)) < 0.6
    goes[:, 0] = False  # a token nobody returns: zero
    send_counts = goes.sum(1).tolist()
    send_token = np.concatenate([np.flatnonzero(goes[r]) for r in range(n)])
    rows = slots * n if slots else len(send_token)
    back = torch.from_numpy(rng.standard_normal((rows, hidden))).to(dtype)
    want = np.zeros((tokens, hidden))
    at = 0
    for r, count in enumerate(send_counts):
        start = r * slots if slots else at
        for i in range(count):
            want[send_token[at + i]] += back[start + i].double().numpy()
        at += count
    return back, _handle(send_token, send_counts, tokens, hidden, slots), want


@pytest.mark.parametrize("slots", [0, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sum_by_token_adds_every_returned_row_to_its_token(dtype, slots):
    back, handle, want = _routing(1, 37, 4, 9, dtype, slots)
    got = moe.sum_by_token(back, handle)
    assert got.dtype == dtype and got.shape == (37, 9)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-6, atol=1e-6)
    assert not got[0].any()


def test_sum_by_token_rounds_16_bit_floats_once_in_rank_order():
    """bfloat16 rows add in float32, in rank order, and round once: bit for bit that computation."""
    back, handle, _ = _routing(2, 50, 3, 33, torch.bfloat16)
    got = moe.sum_by_token(back, handle)
    want = torch.zeros(50, 33, dtype=torch.float32)
    at = 0
    for count in handle.send_counts:
        token = handle.send_token[at:at + count]
        want[token] += back[at:at + count].float()
        at += count
    assert torch.equal(got, want.to(torch.bfloat16))


def test_sum_by_token_of_a_dtype_without_a_kernel():
    back, handle, want = _routing(3, 20, 3, 5, torch.float32)
    got = moe.sum_by_token(back.to(torch.complex64), handle)
    np.testing.assert_allclose(got.real.double().numpy(), want, rtol=1e-6, atol=1e-6)
