"""Work: the handle of a collective started with async_op=True (as torch.distributed's)."""
from concurrent.futures import Future
from concurrent.futures import TimeoutError as _FutureTimeout
from typing import Any, Optional

from .errors import NclTimeoutError


class Work:
    """wait() returns the collective's result or raises the group's error."""

    __slots__ = ("_future", "_name")

    def __init__(self, future: Future, name: str):
        self._future = future
        self._name = name

    def wait(self, timeout: Optional[float] = None) -> Any:
        try:
            return self._future.result(timeout)
        except _FutureTimeout:
            raise NclTimeoutError(f"{self._name} did not complete within {timeout} s") from None

    def is_completed(self) -> bool:
        return self._future.done()

    def exception(self) -> Optional[BaseException]:
        return self._future.exception() if self._future.done() else None

    def __repr__(self) -> str:
        state = "done" if self._future.done() else "pending"
        return f"<ncl.Work {self._name} {state}>"
