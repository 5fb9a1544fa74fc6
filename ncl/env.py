"""Every NCL_* environment knob, declared once with its default and meaning (as NCCL's
param table).  Library code reads knobs only through `get`."""
import os
from typing import Any, Callable, Dict, NamedTuple


def parse_bytes(text: str) -> int:
    """'4M', '256k', '1G' or a plain number of bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    return int(t[:-1] if scale > 1 else t) * scale


class Knob(NamedTuple):
    parse: Callable[[str], Any]
    default: Any
    meaning: str


KNOBS: Dict[str, Knob] = {
    "NCL_BUFFSIZE": Knob(parse_bytes, 4 << 20,
                         "staging bytes per rank for collectives (two slots); longer messages are pipelined"),
    "NCL_P2P_BUFFSIZE": Knob(parse_bytes, 256 << 10, "staging bytes per ordered pair of ranks for send/recv"),
    "NCL_TIMEOUT": Knob(float, 600.0, "seconds any wait may last before NclTimeoutError"),
    "NCL_ALGO": Knob(str.lower, "", "force the all_reduce algorithm: one_shot, two_shot, direct or cma"),
    "NCL_ONE_SHOT_MAX_BYTES": Knob(parse_bytes, None, "all_reduce: one-shot up to this size (default: the cost model)"),
    "NCL_DIRECT_MIN_BYTES": Knob(parse_bytes, None,
                                 "registered buffers: read peers in place from this size up (default: the cost model)"),
    "NCL_TUNING_FILE": Knob(str, "", "cost-model calibration to use (default: the one shipped, measured here)"),
    "NCL_CMA": Knob(lambda t: t.strip().lower() not in ("0", "no", "false", "off"), True,
                    "single-copy reads of peers' buffers with process_vm_readv (0: stage everything)"),
    "NCL_CMA_MIN_BYTES": Knob(parse_bytes, 32 << 10, "single-copy reads from this many bytes per peer block up"),
    "NCL_SPIN_US": Knob(int, 50, "busy-wait microseconds before yielding (2 when ranks outnumber CPUs)"),
    "NCL_YIELD_US": Knob(int, 2000, "sched_yield microseconds before sleeping on a futex"),
    "NCL_KERNEL_ISA": Knob(str.lower, "", "force the reduction kernels: generic, avx2 or avx512 (read by C)"),
    "NCL_RANK": Knob(int, None, "this process's rank (set by ncl-run)"),
    "NCL_WORLD_SIZE": Knob(int, None, "number of ranks (set by ncl-run)"),
    "NCL_UNIQUE_ID": Knob(str, None, "the job's secret id; names its shared-memory segments (set by ncl-run)"),
}


def get(name: str) -> Any:
    knob = KNOBS[name]
    text = os.environ.get(name, "")
    if text == "":
        return knob.default
    try:
        return knob.parse(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not valid: {knob.meaning}") from None
