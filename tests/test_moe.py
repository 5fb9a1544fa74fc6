"""MoE expert parallelism (ncl.moe): dispatch and combine against the dense layer.

moe_program.py runs, on 2, 4 and 8 ranks, an MoE layer (top-2 routing with softmax over the
chosen experts, 8 experts in contiguous blocks, tanh experts) for uniform, skewed (Zipf) and
degenerate routing (every token to experts 0 and 1; no token for the last rank), and checks
this rank's output, its tokens' gradients and its experts' weight gradients against the dense
single-process layer over every rank's tokens, and that a token is sent once per rank, not
once per expert.  With a capacity factor (1.0 Zipf, 1.5 degenerate, 0.5 uniform: 2-7 choices
dropped per rank) the reference drops by its own independent rule, and the counts must agree.
The low-latency mode (max_tokens_per_rank: fixed registered buffers, no count exchange) must
give the same outputs, counts, and -1 ids in its padding rows; group_by_expert (aligned to 4
rows) and ungroup must give the same expert outputs as running each row through its experts.
"""
import os
import sys

import pytest
import torch

import ncl
from harness import ncl_run_argv, program_failures
from ncl import moe

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
