"""Megatron-style tensor parallelism (ncl.torch.tp) against the single-process model.

tp_program.py builds, on 2 and 4 ranks, a 2-layer MLP (column then row parallel), its
sequence-parallel variant, a causal attention block with its heads split, a vocabulary-
parallel embedding and LM head (gathered logits and the all-gather-free argmax) and a model
parallelized by plan, each from the full weights, once over an ncl communicator and once over
a torch (gloo) process group; outputs, input gradients and every parameter gradient must equal
this rank's shard of the single-process reference (float32 tolerance).
"""
import glob
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n", [2, 4])
def test_tensor_parallel_layers_equal_the_single_process_model(tmp_path, n):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NCL_")}
    proc = subprocess.run([sys.executable, "-m", "ncl.run", "-n", str(n), sys.executable,
                           os.path.join(HERE, "tp_program.py"), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.load(open(p)) for p in sorted(glob.glob(str(tmp_path / "rank*.json")))]
    assert [r["rank"] for r in reports] == list(range(n))
    failures = [f for r in reports for f in r["failures"]]
    assert not failures, "\n".join(failures)
