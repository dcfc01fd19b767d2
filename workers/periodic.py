"""A chore run every few seconds on a thread of its own, so that a slow one (a database sweep, a
broker probe) never delays another: above all lease renewal, whose delay would let a live job
be reclaimed and run twice."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Periodic:
    """Calls `chore` every `interval` seconds (the first time after `first_delay`, by default
    one interval). A failed call is logged and the chore runs again at the next tick."""

    def __init__(self, name: str, interval: float, chore: Callable[[], None],
                 first_delay: float | None = None) -> None:
        self.name = name
        self._interval = interval
        self._first_delay = interval if first_delay is None else first_delay
        self._chore = chore
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self._interval + 5)

    def _run(self) -> None:
        delay = self._first_delay
        while not self._stop.wait(delay):
            delay = self._interval
            try:
                self._chore()
            except Exception:
                log.exception("%s failed; it runs again in %.1f s", self.name, self._interval)
