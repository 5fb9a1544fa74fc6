"""The torch.distributed backend "ncl" (`import ncl.torch`).

torch_program.py runs every supported call (all_reduce with every ReduceOp torch has for CPU,
async and sync; reduce; the three reduce_scatter forms; broadcast; all_gather and both tensor
forms; all_to_all and all_to_all_single, even and uneven; gather; scatter; send/recv and
isend/irecv; barrier; new_group; new_subgroups; the functional collectives; DDP for 3 steps
against single-process training), float32 and bfloat16, on 2, 3 and 4 ranks under ncl-run
(env:// initialisation).  torch_libraries_program.py runs torch's own libraries where they need
the group's CPU device or point-to-point that progresses together; torch_compress_program.py its
compressed groups.  Bootstrap through file://, an explicit store and torchrun is tested
here too.
"""
import os
import re
import subprocess
import sys
import textwrap

import pytest

from harness import ncl_run_argv, program_failures

pytest.importorskip("torch")
HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.timeout(300)


def _env():
    return {k: v for k, v in os.environ.items() if not k.startswith("NCL_")}


def _ncl_run(n, *argv, timeout=280):
    return subprocess.run(ncl_run_argv(n, *argv), capture_output=True, text=True, env=_env(), timeout=timeout)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_every_supported_call_matches_numpy_and_gloo(tmp_path, n):
    failures = program_failures(ncl_run_argv(n, os.path.join(HERE, "torch_program.py"), str(tmp_path)), tmp_path, n)
    assert not failures, "\n".join(failures[:30])


@pytest.mark.parametrize("n", [2, 3])
def test_compressed_groups_match_ncls_own_compressed_calls(tmp_path, n):
    """torch_compress_program.py: a group with pg_options=ncl.torch.Options(compress=...) or
    set_compress gives the bits of comm.all_reduce(compress=) and friends, async too, within the
    float64 bound; ints, MAX and object collectives stay exact; bad options raise."""
    failures = program_failures(ncl_run_argv(n, os.path.join(HERE, "torch_compress_program.py"), str(tmp_path)),
                                tmp_path, n, timeout=200)
    assert not failures, "\n".join(failures[:30])


def test_torch_libraries_that_need_the_cpu_device_and_p2p_progress(tmp_path):
    """torch_libraries_program.py: the CPU device registered (DCP async_save, FSDP2 loading with
    broadcast_from_rank0), a batch_isend_irecv ring of 1 MiB and Schedule1F1B with 4 MiB
    activations on 2 ranks; a deadlock ends at NCL_TIMEOUT as a failure."""
    argv = ncl_run_argv(2, os.path.join(HERE, "torch_libraries_program.py"), str(tmp_path))
    failures = program_failures(argv, tmp_path, 2, env={"NCL_TIMEOUT": "30"}, timeout=150)
    assert not failures, "\n".join(failures)


BOOTSTRAP = """
    import os, sys, datetime, torch, torch.distributed as dist, ncl.torch
    rank, size, how = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), sys.argv[1]
    if how == "env":
        dist.init_process_group("ncl")
    elif how == "file":
        dist.init_process_group("ncl", init_method="file://" + sys.argv[2], rank=rank, world_size=size)
    else:
        store = dist.TCPStore("127.0.0.1", int(os.environ["MASTER_PORT"]), size, rank == 0,
                              timeout=datetime.timedelta(seconds=60))
        dist.init_process_group("ncl", store=store, rank=rank, world_size=size)
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    sys.stdout.write(f"{how} rank {rank}: {dist.get_backend()} {t.item()}\\n")  # one write: lines stay whole
    dist.destroy_process_group()
"""


@pytest.mark.parametrize("how", ["file", "store"])
def test_init_with_file_and_store_under_ncl_run(tmp_path, how):
    prog = tmp_path / "prog.py"
    prog.write_text(textwrap.dedent(BOOTSTRAP))
    proc = _ncl_run(3, str(prog), how, str(tmp_path / "rendezvous"), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(re.findall(rf"{how} rank \d: \w+ [\d.]+", proc.stdout)) == \
        [f"{how} rank {r}: ncl 6.0" for r in range(3)], proc.stdout


def test_init_under_torchrun(tmp_path):
    """env:// as torchrun sets it up (its own store; no NCL_* variables)."""
    prog = tmp_path / "prog.py"
    prog.write_text(textwrap.dedent(BOOTSTRAP))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3", str(prog), "env"],
                          capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(re.findall(r"env rank \d: \w+ [\d.]+", proc.stdout)) == \
        [f"env rank {r}: ncl 6.0" for r in range(3)], proc.stdout
