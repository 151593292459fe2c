"""Download streams a server runs at once, each with a deadline: slow or stalled readers cannot take every worker.

A response stream holds a gRPC worker thread for as long as its reader takes, and a reader that never
reads holds it for ever. Streams therefore take a slot (refused at once when none is free, so that
workers stay free for health checks and training calls), and a stream still running at its deadline is
cancelled, which frees its worker.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .errors import Overloaded


class StreamSlots:
    """At most `limit` concurrent response streams, each cancelled after `deadline_s` seconds."""

    def __init__(self, limit: int, deadline_s: float):
        if limit < 1 or deadline_s <= 0:
            raise ValueError(f"download streams: need a limit >= 1 and a deadline > 0 s, got {limit} and {deadline_s}")
        self.limit, self.deadline_s = limit, deadline_s
        self._free = threading.BoundedSemaphore(limit)

    def take(self, context) -> Callable[[], None]:
        """Takes a slot for the stream of `context`; returns its release (idempotent). Raises Overloaded when none is free."""
        if not self._free.acquire(blocking=False):
            raise Overloaded(
                f"the server is already serving its maximum of {self.limit} downloads; retry in a few seconds"
            )
        timer = threading.Timer(self.deadline_s, context.cancel)  # cancelling wakes a worker blocked on a full window
        timer.daemon = True
        once = threading.Lock()

        def release() -> None:
            if once.acquire(blocking=False):  # the stream's end and the RPC's termination callback both call it
                timer.cancel()
                self._free.release()

        context.add_callback(release)  # runs however the RPC ends: done, cancelled, or the client gone
        timer.start()
        return release
