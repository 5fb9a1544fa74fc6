"""Work and Worker: how a call started with async_op=True runs (as torch.distributed's).

A communicator's Worker is one background thread that runs its queued calls in program order;
`Work` is the handle the caller gets at once.  Consecutive point-to-point calls in the queue
progress together as one batch (the backend's `p2p_batch`, NCCL's group semantics), and a
batch takes in sends and recvs queued while it runs, so a ring of large messages in which
every rank sends first completes.  `idle` is what the communicator's synchronous fast path
asks: nothing queued and nothing running, so the caller's thread may use the core itself.
"""
import atexit
import collections
import threading
import weakref
from concurrent.futures import Future
from concurrent.futures import TimeoutError as _FutureTimeout
from typing import Any, Callable, Optional

from .errors import NclTimeoutError

_P2P = ("send", "recv")
_ROUND_S = 0.002  # a batch comes back this often to take in newly queued sends and recvs
_EXIT_WAIT_S = 2.0  # at interpreter exit, how long a worker still running a call is waited for
_workers: "weakref.WeakSet[Worker]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """End idle workers before the interpreter tears down what their callbacks use (torch's)."""
    for worker in list(_workers):
        worker.stop(_EXIT_WAIT_S)


def wait_for(future: Future, interrupted: Optional[Callable[[BaseException], None]], timeout: Optional[float] = None):
    """future.result(timeout); an exception raised in this thread while it waits (Ctrl-C: the worker's C wait
    cannot see it) goes to interrupted(exc) first, which aborts the group, so peers learn why at once."""
    try:
        return future.result(timeout)
    except BaseException as exc:
        if interrupted is not None and not future.done() and not isinstance(exc, _FutureTimeout):
            interrupted(exc)
        raise


class Work:
    """wait() returns the collective's result or raises the group's error."""

    __slots__ = ("_future", "_name", "_value", "_interrupted")

    def __init__(self, future: Future, name: str, value: Optional[Callable] = None,
                 interrupted: Optional[Callable[[BaseException], None]] = None):
        self._future = future
        self._name = name
        self._value = value  # what wait() makes of the call's result
        self._interrupted = interrupted  # aborts the group when this thread's wait is interrupted

    def wait(self, timeout: Optional[float] = None) -> Any:
        try:
            result = wait_for(self._future, self._interrupted, timeout)
        except _FutureTimeout:
            raise NclTimeoutError(f"{self._name} did not complete within {timeout} s") from None
        return self._value(result) if self._value is not None else result

    def map(self, value: Callable) -> "Work":
        """The same call, whose wait() returns value(result)."""
        return Work(self._future, self._name, value, self._interrupted)

    def is_completed(self) -> bool:
        return self._future.done()

    def exception(self) -> Optional[BaseException]:
        return self._future.exception() if self._future.done() else None

    def add_done_callback(self, fn: Callable[["Work"], Any]) -> None:
        """fn(work) once the call is done (at once if it is): on the worker thread, so it must not
        start calls on this communicator."""
        self._future.add_done_callback(lambda _: fn(self))

    def __repr__(self) -> str:
        state = "done" if self._future.done() else "pending"
        return f"<ncl.Work {self._name} {state}>"


class _Task:
    __slots__ = ("call", "result", "future")

    def __init__(self, call, result):
        self.call, self.result, self.future = call, result, Future()


class Worker:
    """One thread running a communicator's async calls in order.  run(call) executes a call and
    raises its (already translated) error; fail(call, exc) turns a group failure into the
    exception each Work reports; p2p_batch() is the backend's, or None."""

    def __init__(self, name: str, run: Callable, fail: Callable, p2p_batch: Optional[Callable]):
        self._run, self._fail, self._p2p_batch = run, fail, p2p_batch
        self._queue: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._submitted = self._finished = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        _workers.add(self)

    @property
    def idle(self) -> bool:
        return self._submitted == self._finished

    def submit(self, call, result) -> Future:
        task = _Task(call, result)
        with self._cv:
            self._submitted += 1
            self._queue.append(task)
            self._cv.notify()
        return task.future

    def drain(self) -> None:
        """Wait until every queued call has finished (their errors stay with their Work)."""
        with self._cv:
            self._cv.wait_for(lambda: self.idle)

    def stop(self, timeout: Optional[float] = None) -> None:
        """Finish the queue, then end the thread (idempotent)."""
        with self._cv:
            self._queue.append(None)
            self._cv.notify()
        self._thread.join(timeout)

    def _next(self, block: bool = True):
        with self._cv:
            if block:
                self._cv.wait_for(lambda: self._queue)
            elif not self._queue or self._queue[0] is None or self._queue[0].call.collective not in _P2P:
                return None
            return self._queue.popleft()

    def _done(self, task: _Task, exc: Optional[BaseException] = None) -> None:
        with self._cv:
            self._finished += 1
            self._cv.notify_all()
        if task.future.set_running_or_notify_cancel():
            task.future.set_exception(exc) if exc is not None else task.future.set_result(task.result)

    def _loop(self) -> None:
        while (task := self._next()) is not None:
            if task.call.collective in _P2P and self._p2p_batch is not None:
                self._batch(task)
                continue
            try:
                self._run(task.call)
            except BaseException as exc:  # noqa: B036  (it belongs to the Work, not to this thread)
                self._done(task, exc)
            else:
                self._done(task)

    def _batch(self, first: _Task) -> None:
        """first and every send or recv queued behind it, progressing together until all are done."""
        batch, pending = self._p2p_batch(), {}
        task: Optional[_Task] = first
        while task is not None or pending:
            while task is not None:
                pending[batch.add(task.call)] = task
                task = self._next(block=False)
            try:
                finished = batch.progress(_ROUND_S)
            except BaseException as exc:  # noqa: B036
                for t in pending.values():
                    self._done(t, self._fail(t.call, exc))
                return
            for token in finished:
                self._done(pending.pop(token))
            task = self._next(block=False)
