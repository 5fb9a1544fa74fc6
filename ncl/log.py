"""NCL_DEBUG logging: lines on stderr, each prefixed with the rank, host and pid, as
NCCL_DEBUG does.  Levels: WARN (failures), INFO (also what each communicator decided at
setup: sizes, waiting, single-copy reads, algorithm thresholds), TRACE (also every call:
size, algorithm taken, time).

Everything goes through the standard `logging` logger "ncl".  Without NCL_DEBUG it has only
a NullHandler, so ncl prints nothing unless the application configures logging itself, and
checking whether a level is on costs one comparison.
"""
import logging
import os
import socket

from . import env

TRACE = 5
logging.addLevelName(TRACE, "TRACE")
_LEVELS = {"WARN": logging.WARNING, "INFO": logging.INFO, "TRACE": TRACE}

logger = logging.getLogger("ncl")


class _Who(logging.Filter):
    """Records logged outside a communicator name the process's rank from ncl-run, if any."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "who"):
            rank = os.environ.get("NCL_RANK")
            record.who = f"rank {rank}" if rank else "ncl"
        return True


def configure() -> None:
    """Apply NCL_DEBUG (called once, when ncl is imported)."""
    level = env.get("NCL_DEBUG")
    if not level:
        if not logger.handlers:
            logger.addHandler(logging.NullHandler())
        return
    handler = logging.StreamHandler()
    handler.addFilter(_Who())
    handler.setFormatter(logging.Formatter(
        f"[%(who)s] {socket.gethostname()}:%(process)d ncl %(levelname)s %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(_LEVELS[level])
    logger.propagate = False


def for_rank(rank: int, size: int, label: str) -> logging.LoggerAdapter:
    """The logger of one communicator: its lines start with [rank r/n label]."""
    return logging.LoggerAdapter(logger, {"who": f"rank {rank}/{size} {label}"})


def size_text(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.4g} {unit}"
    return f"{nbytes} B"
