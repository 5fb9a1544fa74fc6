"""The emulated interconnect (ncl/emulation.py): with a topology every call is also costed on its
links, reported beside the wall time, and in pace mode waited out.  emulation_program.py checks,
on real ranks, each call's emulated time against the link model computed by hand."""
import os
import subprocess
import sys

import numpy as np
import pytest

import ncl
from harness import ncl_run_argv, program_failures
from ncl import emulation
from ncl.topology import load_topology

PROGRAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "emulation_program.py")
# two chips, one slow link: every call costs milliseconds, far above what it takes here
SLOW = """name: slow-pair
chips:
  - {name: "c{i}", count: 2, memory_gib: 1, memory_bandwidth_gbps: 100}
links:
  - {a: c0, b: c1, bandwidth_gbps: 0.05, latency_us: 2000}
"""


@pytest.mark.timeout(200)
@pytest.mark.parametrize("n, topology", [(3, "pcie-gen5-8card"), (4, "ring-8chip")])
def test_every_call_is_costed_on_the_links(tmp_path, n, topology):
    failures = program_failures(ncl_run_argv(n, PROGRAM, str(tmp_path)), tmp_path, n,
                                env={"NCL_TOPOLOGY": topology})
    assert not failures, "\n".join(failures)


@pytest.mark.timeout(200)
def test_pace_makes_calls_last_their_emulated_time(tmp_path):
    path = tmp_path / "slow.yaml"
    path.write_text(SLOW)
    argv = [sys.executable, "-m", "ncl.run", "-n", "2", "--topology", str(path), "--emulate", "pace",
            sys.executable, PROGRAM, str(tmp_path)]
    failures = program_failures(argv, tmp_path, 2)
    assert not failures, "\n".join(failures)


def test_costs_follow_nccl_tests_sizes():
    topo = load_topology("pcie-gen5-8card")
    e = emulation.Emulator(topo, "account", 4, keep=8)
    assert e.cost("all_gather", 1000) == (topo.best_algorithm("all_gather", 4000, 4),
                                          topo.predict("all_gather", 4000, 4))
    assert e.cost("all_to_allv", 1000)[1] == topo.predict("all_to_all", 1000, 4)
    assert e.cost("send", 64)[1] == topo.predict("send_recv", 64, 4)
    assert e.record(1, "all_reduce", 1 << 20, "two_shot", 0.5) == 0.0  # account: nothing to wait
    assert e.last["host_algorithm"] == "two_shot" and e.last["wall_us"] == 0.5e6
    assert e.reset()["calls"] == 1 and e.totals["calls"] == 0
    for seq in range(2, 20):
        e.record(seq, "barrier", 0, None, 0.0)
    assert e.of_seq(1) is None and e.of_seq(19) is not None  # keeps the flight recorder's length


def test_bad_settings_are_clear_errors(monkeypatch):
    topo = load_topology("pcie-gen5-8card")
    with pytest.raises(ValueError, match="8 chips, fewer than the 9 ranks"):
        emulation.Emulator(topo, "account", 9, keep=1)
    monkeypatch.setenv("NCL_EMULATE", "sometimes")
    with pytest.raises(ValueError, match="NCL_EMULATE"):
        ncl.init()
    monkeypatch.setenv("NCL_EMULATE", "account")
    monkeypatch.setenv("NCL_TRACE_BUFFER", "0")
    with pytest.raises(ValueError, match="NCL_TRACE_BUFFER must be at least 1"):
        ncl.init()


def test_without_a_topology_last_stats_has_wall_time_only(monkeypatch):
    monkeypatch.delenv("NCL_TOPOLOGY", raising=False)
    monkeypatch.delenv("NCL_EMULATE", raising=False)
    with ncl.init() as comm:
        assert comm.last_stats() is None and comm.emulated_totals() is None and comm.topology is None
        comm.all_reduce(np.ones(4, np.float32))
        stats = comm.last_stats()
        assert stats["collective"] == "all_reduce" and stats["bytes"] == 16 and stats["emulated_us"] is None


def test_ncl_run_refuses_a_bad_topology(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SLOW.replace("0.05", "fast"))
    proc = subprocess.run([sys.executable, "-m", "ncl.run", "-n", "2", "--topology", str(bad), sys.executable, "-c",
                           "1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "bandwidth_gbps" in proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "ncl.run", "-n", "9", "--topology", "pcie-gen5-8card",
                           sys.executable, "-c", "1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "fewer than -n 9" in proc.stderr, proc.stderr
