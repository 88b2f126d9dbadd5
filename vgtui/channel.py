"""A bounded, thread-safe hand-off from the trainer to a consumer that never blocks the trainer.

When the consumer falls behind, the oldest records are dropped and counted: the newest data is
what a monitor must show, and the training loop must never wait for a slow screen.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class Channel(Generic[T]):
    def __init__(self, maxlen: int = 2048):
        if maxlen < 1:
            raise ValueError("maxlen must be at least 1")
        self._items: deque[T] = deque()
        self._maxlen = maxlen
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.dropped = 0

    @property
    def maxlen(self) -> int:
        return self._maxlen

    def put(self, item: T) -> None:
        """Append; if full, drop the oldest item and count it. Never blocks for long."""
        with self._lock:
            if len(self._items) >= self._maxlen:
                self._items.popleft()
                self.dropped += 1
            self._items.append(item)
        self._ready.set()

    def drain(self, limit: int | None = None) -> list[T]:
        """Everything pending (or the oldest ``limit``), in order."""
        with self._lock:
            if limit is None or limit >= len(self._items):
                items = list(self._items)
                self._items.clear()
            else:
                items = [self._items.popleft() for _ in range(limit)]
            if not self._items:
                self._ready.clear()
        return items

    def wait(self, timeout: float | None = None) -> bool:
        """Block until something is pending (for headless consumers); True if so."""
        return self._ready.wait(timeout)

    def __len__(self) -> int:
        return len(self._items)
