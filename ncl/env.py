"""Every NCL_* environment knob, declared once with its default and meaning (as NCCL's
param table).  Library code reads knobs only through `get`."""
import os
from typing import Any, Callable, Dict, NamedTuple

from .job import MAX_RANKS


def parse_bytes(text: str) -> int:
    """'4M', '256k', '1G' or a plain number of bytes; ValueError unless 0 <= bytes < 2**63
    (what the C core's size_t fields take, with room to add)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    n = int(t[:-1] if scale > 1 else t) * scale
    if not 0 <= n < 1 << 63:
        raise ValueError(f"{text!r} is not a byte count between 0 and 2**63")
    return n


def _choice(text: str, choices) -> str:
    value = text.strip().upper()
    if value not in choices:
        raise ValueError(f"must be one of {', '.join(choices)}")
    return value


def _lower_choice(*choices: str) -> Callable[[str], str]:
    """A parser of one of `choices`, any case, returned in lower case."""
    return lambda text: _choice(text, tuple(c.upper() for c in choices)).lower()


_YES, _NO = ("1", "YES", "TRUE", "ON"), ("0", "NO", "FALSE", "OFF")


def _flag(text: str) -> bool:
    """1/yes/true/on or 0/no/false/off, any case; anything else is an error, not a silent 'on'."""
    return _choice(text, _YES + _NO) in _YES


def _int_in(lo: int, hi: int) -> Callable[[str], int]:
    """A parser of ints in [lo, hi] (what the C core's fields hold)."""
    def parse(text: str) -> int:
        value = int(text)
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return value
    return parse


class Knob(NamedTuple):
    parse: Callable[[str], Any]
    default: Any
    meaning: str


KNOBS: Dict[str, Knob] = {
    "NCL_BUFFSIZE": Knob(parse_bytes, 4 << 20, "staging bytes per rank for collectives (a ring of two slots' "
                                                "worth); longer messages are pipelined, a slot at a time (registered "
                                                "direct all_reduce: half a slot)"),
    "NCL_P2P_BUFFSIZE": Knob(parse_bytes, 256 << 10, "staging bytes per ordered pair of ranks for send/recv"),
    "NCL_TIMEOUT": Knob(float, 600.0, "seconds any wait may last before NclTimeoutError"),
    "NCL_ALGO": Knob(_lower_choice("one_shot", "two_shot", "direct", "cma"), "",
                     "force the all_reduce algorithm: one_shot, two_shot, direct or cma"),
    "NCL_ONE_SHOT_MAX_BYTES": Knob(parse_bytes, None, "all_reduce: one-shot up to this size (default: the cost model)"),
    "NCL_DIRECT_MIN_BYTES": Knob(parse_bytes, None,
                                 "registered buffers: read peers in place from this size up (default: the cost model)"),
    "NCL_TUNING_FILE": Knob(str, "", "cost-model calibration to use (default: this host's in the user cache, "
                                     "else the shipped one; see ncl/tuning.py)"),
    "NCL_CMA": Knob(_flag, True,
                    "single-copy reads of peers' buffers with process_vm_readv (0: stage everything)"),
    "NCL_CMA_MIN_BYTES": Knob(parse_bytes, 32 << 10, "single-copy reads from this many bytes per peer block up"),
    "NCL_STREAMING": Knob(_lower_choice("auto", "on", "off"), "auto",
                          "all_reduce's stores for data peers read: auto (measure both kinds while running, "
                          "native/learn.c), on (streaming from 32 KiB), off (ordinary)"),
    "NCL_SPIN_US": Knob(_int_in(0, 10**7), 50, "busy-wait microseconds before yielding (2 when ranks outnumber CPUs)"),
    "NCL_YIELD_US": Knob(_int_in(0, 10**8), 2000, "sched_yield microseconds before sleeping on a futex"),
    "NCL_KERNEL_ISA": Knob(_lower_choice("generic", "avx2", "avx512"), "",
                           "force the reduction kernels: generic, avx2 or avx512 (read by C, checked by Python)"),
    "NCL_DEBUG": Knob(lambda t: _choice(t, ("WARN", "INFO", "TRACE")), "",
                      "log to stderr, rank-prefixed: WARN (failures), INFO (+ setup decisions), TRACE (+ every call)"),
    "NCL_TRACE_DIR": Knob(str, "", "on a timeout, dead peer or mismatch, write this rank's flight record "
                                   "(Chrome trace JSON) into this directory"),
    "NCL_TRACE_BUFFER": Knob(_int_in(0, 1 << 20), 1024, "calls the flight recorder keeps per communicator (0: none)"),
    "NCL_CHECK_CALLS": Knob(_flag, True,
                            "compare every call's fingerprint across ranks (0 only to measure what the check costs)"),
    "NCL_HOSTS": Knob(_int_in(1, 1 << 16), 1, "split each host's ranks into this many emulated hosts, "
                                             "which talk over MPI (under mpiexec or ncl-run --hosts)"),
    "NCL_TOPOLOGY": Knob(str, "", "the emulated interconnect: a topology file or a shipped name (topology/*.yaml); "
                                  "each call is also costed on its links (ncl-run --topology sets it)"),
    "NCL_EMULATE": Knob(lambda t: _choice(t, ("OFF", "ACCOUNT", "PACE")).lower(), None,
                        "with a topology: account (report emulated time beside wall time; the default), pace "
                        "(also make each call last at least its emulated time) or off"),
    "NCL_RANK": Knob(int, None, "this process's rank (set by ncl-run)"),
    "NCL_WORLD_SIZE": Knob(int, None, "number of ranks (set by ncl-run)"),
    "NCL_LOCAL_WORLD_SIZE": Knob(_int_in(1, MAX_RANKS), None, "ranks of the job on this machine (set by ncl-run)"),
    "NCL_UNIQUE_ID": Knob(str, None, "the job's secret id; names its shared-memory segments (set by ncl-run)"),
}


def get(name: str) -> Any:
    knob = KNOBS[name]
    text = os.environ.get(name, "")
    if text == "":
        return knob.default
    try:
        return knob.parse(text)
    except ValueError as exc:
        detail = f" ({exc})" if str(exc).startswith("must be") else ""
        raise ValueError(f"environment variable {name}={text!r} is not valid{detail}: {knob.meaning}") from None
