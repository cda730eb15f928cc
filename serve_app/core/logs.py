"""Prompt logs in Ray Serve's throughput-optimized mode.

That mode buffers each replica's request-path log records (``logging.handlers.MemoryHandler``, 1,000
records) and writes them only when the buffer fills or an ERROR comes: on a quiet replica, a request's
log lines could wait for hours. ``flush_every`` writes the buffers out at a fixed interval from a daemon
thread, so a line reaches the replica's log file within about a second and the buffering still saves
writes under load.
"""

from __future__ import annotations

import logging
import logging.handlers
import threading

_started = False
_lock = threading.Lock()


def _buffers() -> list[logging.handlers.MemoryHandler]:
    loggers = [logging.getLogger(), logging.getLogger("ray.serve")]
    return [h for lg in loggers for h in lg.handlers if isinstance(h, logging.handlers.MemoryHandler)]


def in_replica(flush_every_s: float = 1.0) -> None:
    """A replica's logs: its buffered records written within ``flush_every_s`` (``flush_every``), and the
    tracebacks it logs readable (``ray_internals.print_to_files_as_print_does``)."""
    from serve_app.core import ray_internals

    ray_internals.print_to_files_as_print_does()
    flush_every(flush_every_s)


def flush_every(interval_s: float = 1.0) -> None:
    """Start (once per process) a daemon thread that flushes the buffered log handlers."""
    global _started
    with _lock:
        if _started:
            return
        _started = True

    def run() -> None:
        stop = threading.Event()
        while not stop.wait(interval_s):
            for handler in _buffers():
                handler.flush()  # MemoryHandler.flush takes the handler's own lock

    threading.Thread(target=run, name="log-flush", daemon=True).start()
