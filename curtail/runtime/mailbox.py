"""The command channel between the coordinator and each site's rank-0 worker.

One small threaded actor holds, per site, a queue of commands (coordinator → site) and a
queue of results (site → coordinator). Blocking ``get`` calls wait on a condition variable
inside the actor, so a site worker idles cheaply while the coordinator decides; ``get``
returns None after ``timeout_s`` so callers can check on the other side between waits (a
dead site is a detected failure, not a hang).
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

import ray


@ray.remote(num_cpus=0, max_concurrency=64)
class Mailbox:
    def __init__(self) -> None:
        self._queues: dict[tuple[str, str], collections.deque[Any]] = collections.defaultdict(collections.deque)
        self._ready = threading.Condition()

    def put(self, site: str, queue: str, message: Any) -> None:
        with self._ready:
            self._queues[(site, queue)].append(message)
            self._ready.notify_all()

    def get(self, site: str, queue: str, timeout_s: float) -> Any | None:
        """The oldest message of ``queue`` for ``site``, or None after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._ready:
            while not self._queues[(site, queue)]:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._ready.wait(remaining)
            return self._queues[(site, queue)].popleft()

    def clear(self, site: str) -> None:
        """Drop anything left for a site (before its worker group restarts)."""
        with self._ready:
            self._queues.pop((site, "command"), None)
            self._queues.pop((site, "result"), None)
