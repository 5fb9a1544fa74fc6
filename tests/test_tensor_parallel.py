"""Megatron-style tensor parallelism (ncl.torch.tp) against the single-process model.

tp_program.py builds, on 2 and 4 ranks, a 2-layer MLP (column then row parallel), its
sequence-parallel variant, a causal attention block with its heads split, a vocabulary-
parallel embedding and LM head (gathered logits and the all-gather-free argmax) and a model
parallelized by plan, each from the full weights, once over an ncl communicator and once over
a torch (gloo) process group; outputs, input gradients and every parameter gradient must equal
this rank's shard of the single-process reference (float32 tolerance).
"""
import os

import pytest

from harness import ncl_run_argv, program_failures

pytest.importorskip("torch")
PROGRAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tp_program.py")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n", [2, 4])
def test_tensor_parallel_layers_equal_the_single_process_model(tmp_path, n):
    failures = program_failures(ncl_run_argv(n, PROGRAM, str(tmp_path)), tmp_path, n)
    assert not failures, "\n".join(failures)
