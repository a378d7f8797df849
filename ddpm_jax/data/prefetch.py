"""A background thread that builds the next batches while the device trains on this one."""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, Self


@dataclasses.dataclass(frozen=True)
class _Failure:
    error: BaseException


def _put(q: queue.Queue, stop: threading.Event, item: Any) -> None:
    # Never block forever on a full queue: close() must be able to end the thread.
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _produce_forever(produce: Callable[[int], Any], q: queue.Queue, stop: threading.Event):
    # A plain function, not a method: the thread must not keep its iterator alive, so that
    # dropping the iterator (-> __del__ -> stop) ends the thread.
    k = 0
    try:
        while not stop.is_set():
            _put(q, stop, produce(k))
            k += 1
    except BaseException as err:  # noqa: BLE001 -- re-raised by the consumer
        _put(q, stop, _Failure(err))


class PrefetchIterator(Iterator):
    """Calls `produce(k)` for k = 0, 1, ... on a daemon thread, keeping up to `depth` results
    queued (depth 0: produce on demand in the caller's thread). next() re-raises errors from the
    thread. close(), `with`, or dropping the iterator stops the thread."""

    def __init__(self, produce: Callable[[int], Any], depth: int):
        self._produce = produce
        self._k = 0  # next k, when producing in the caller's thread
        self._closed = False
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._thread = None
        if depth > 0:
            self._thread = threading.Thread(
                target=_produce_forever,
                args=(produce, self._queue, self._stop),
                daemon=True,
                name="input-prefetch",
            )
            self._thread.start()

    def __next__(self) -> Any:
        if self._closed:
            raise StopIteration
        if self._thread is None:
            self._k += 1
            return self._produce(self._k - 1)
        item = self._queue.get()
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        return item

    def close(self) -> None:
        """Stops the thread (waiting for the batch it is building) and ends the iteration."""
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self._stop.set()
