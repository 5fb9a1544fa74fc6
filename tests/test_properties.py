"""Property tests (hypothesis) of argument handling and of all_to_allv's count exchange.

Argument checks: whatever is passed, the result is either a correct description of the buffer
(or counts) or a TypeError / ValueError, never another exception and never a wrong size.
all_to_allv: for any count matrix, on a live pool of 3 ranks, what arrives equals the numpy
reference, and the exchanged receive counts equal the matrix's column."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from harness import DTYPES, rank_data

from ncl.buffers import as_buffer, check_counts

ANY_DTYPE = st.sampled_from(sorted(DTYPES) + ["complex64", "bool", "uint16", "float128" if hasattr(np, "float128")
                                              else "float64"])


@settings(max_examples=300, deadline=None)
@given(dtype=ANY_DTYPE, shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=5), step=st.integers(1, 3),
       writable=st.booleans(), read_only=st.booleans())
def test_as_buffer_describes_or_refuses(dtype, shape, step, writable, read_only):
    base = np.zeros(tuple(s * step for s in shape), DTYPES.get(dtype, np.dtype(dtype)))
    x = base[tuple(slice(None, None, step) for _ in shape)] if shape else base
    x.flags.writeable = not read_only
    supported = dtype in DTYPES
    legal = supported and x.flags.c_contiguous and not (writable and read_only)
    try:
        buf = as_buffer(x, "x", writable=writable)
    except (TypeError, ValueError):
        assert not legal
        return
    assert legal and buf.count == x.size and buf.nbytes == x.nbytes and buf.shape == x.shape


@settings(max_examples=300, deadline=None)
@given(counts=st.one_of(st.lists(st.one_of(st.integers(-3, 10**12), st.booleans(), st.floats(), st.text(max_size=2)),
                                 max_size=5),
                        st.text(max_size=3), st.integers(), st.none()),
       size=st.integers(1, 5))
def test_check_counts_accepts_exactly_the_valid(counts, size):
    valid = (isinstance(counts, list) and len(counts) == size
             and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts))
    try:
        got = check_counts(counts, "counts", size)
    except (TypeError, ValueError):
        assert not valid
        return
    assert valid and got == tuple(counts)


def _exchange(comm, matrix, seed):
    n, me = comm.size, comm.rank
    sends = [rank_data(seed, r, (sum(matrix[r]), 2), "int32") for r in range(n)]
    offsets = [np.cumsum([0] + list(matrix[r])) for r in range(n)]
    got = comm.all_to_allv(sends[me], matrix[me])
    want = np.concatenate([sends[r][offsets[r][me]:offsets[r][me + 1]] for r in range(n)])
    return bool(np.array_equal(got, want)) and got.shape == want.shape


@pytest.mark.timeout(240)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(matrix=st.lists(st.lists(st.integers(0, 300), min_size=3, max_size=3), min_size=3, max_size=3),
       seed=st.integers(0, 2**20))
def test_all_to_allv_any_count_matrix(pool_factory, matrix, seed):
    assert all(pool_factory(3).run(_exchange, matrix, seed, timeout=60))
