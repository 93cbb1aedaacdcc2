"""Stop signals: before a server handles them, and while it does.

Before a server installs its own handlers, ``exit_on_stop_signals`` makes
SIGTERM/SIGINT unwind start-up through its ``finally`` blocks (which stop the
embedded Redis). A server that takes over asks ``stop_requested`` whether such
a signal came in and was lost: Python ignores an exception raised inside a
finalizer (``__del__``, a weakref callback), so a SystemExit the handler raised
there would otherwise leave start-up going on to serve for ever.

End live reads as soon as a hosting server is told to stop.

ASGI and RSGI servers (hypercorn, granian) stop accepting on SIGTERM but wait
for open requests before they run the app's shutdown; without this, every
long-poll and SSE connection would hold a stopping replica for up to its full
lifetime. Readers get a valid protocol response (a 204, or a final SSE control
event) and resume elsewhere. The native server (gateway/servers/native/)
handles its signals itself and calls ``drain`` directly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger("gateway")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_requested: int | None = None  # the stop signal received before a server took over


def exit_on_stop_signals() -> None:
    """Until a server installs its own handlers, SIGTERM and SIGINT raise
    SystemExit (status 128 + the signal), and the signal is remembered for
    ``stop_requested``. One raised where Python ignores exceptions is not
    reported as an error: the server acts on it once it handles signals."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _exit_on_signal)
    report = sys.unraisablehook

    def unraisable(info: Any) -> None:
        if info.exc_type is SystemExit and _requested is not None:
            log.debug("a stop signal arrived inside a finalizer; acting on it later")
            return
        report(info)

    sys.unraisablehook = unraisable


def _exit_on_signal(signum: int, _frame: object) -> None:
    global _requested
    _requested = signum
    log.info("%s: stopping", signal.Signals(signum).name)
    raise SystemExit(128 + signum)


def stop_requested() -> int | None:
    """The stop signal received before the server's own handlers were installed
    (its SystemExit was lost if the caller runs at all), or None."""
    return _requested


def exit_if_stop_requested() -> None:
    """For a server about to install its own handlers: exit now, as the signal
    that came in before asked."""
    if _requested is not None:
        raise SystemExit(128 + _requested)


def drain_on_signals(drain: Callable[[], None]) -> None:
    """Call ``drain`` on SIGTERM/SIGINT, and let the server's own handling go
    on as before.

    The hook is a Python-level signal handler that calls the previous one. Event
    loops (asyncio, uvloop) learn of signals through the wake-up fd, which the
    interpreter writes whichever Python handler is installed, so a server's
    ``loop.add_signal_handler`` keeps working underneath.
    """
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        previous = signal.getsignal(sig)

        def on_signal(signum: int, frame: Any, previous: Any = previous) -> None:
            loop.call_soon_threadsafe(_announce_and_drain, signum, drain)
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                # Nobody else handles it: exit the way the default action would,
                # after giving live readers a moment to receive their responses.
                loop.call_soon_threadsafe(loop.call_later, 1.0, _exit_now, signum)

        try:
            signal.signal(sig, on_signal)
        except ValueError:
            return  # not the main thread: lifespan shutdown drains instead


def _announce_and_drain(signum: int, drain: Callable[[], None]) -> None:
    log.info("signal %s: ending live reads", signal.Signals(signum).name)
    drain()


def _exit_now(sig: int) -> None:
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
