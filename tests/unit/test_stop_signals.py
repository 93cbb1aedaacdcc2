"""A stop signal that arrives while the gateway starts is never lost.

Until a server installs its own handlers, SIGTERM raises SystemExit. Python
ignores an exception raised inside a finalizer (``__del__``, e.g. a Redis
client's parser collected during start-up), so that SystemExit can vanish and
start-up go on to serve for ever. Each server must act on it when it takes over.
These run a real server in a child process, with the signal delivered inside a
finalizer at a known point.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

EXIT_TIMEOUT_S = 20

STARTER = textwrap.dedent(
    """
    import signal, sys
    from gateway.servers.signals import exit_on_stop_signals

    exit_on_stop_signals()

    class Finalized:
        def __del__(self):
            signal.raise_signal(signal.SIGTERM)  # its handler's SystemExit is ignored here

    Finalized()
    print("start-up went on", flush=True)
    """
)

NATIVE = textwrap.dedent(
    """
    from gateway.servers.native.server import ServerOptions, run

    class App:
        async def startup(self):
            print("app started", flush=True)

        async def handle(self, request, response):
            pass

        def drain(self):
            pass

        async def shutdown(self):
            print("app shut down", flush=True)

    sys.exit(run(App, "127.0.0.1", 0, WORKERS, ServerOptions(graceful_timeout=1)))
    """
)

HANDOVER = textwrap.dedent(
    """
    from gateway.servers.signals import exit_if_stop_requested

    exit_if_stop_requested()
    print("served anyway", flush=True)
    """
)


def _run(script: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=EXIT_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the process did not stop: {exc.stdout!r} {exc.stderr!r}") from None


@pytest.mark.parametrize("workers", [1, 2])
def test_native_server_stops_on_a_signal_lost_during_start_up(workers: int) -> None:
    done = _run(STARTER + NATIVE.replace("WORKERS", str(workers)))
    assert "start-up went on" in done.stdout  # the SystemExit was indeed lost
    assert "Traceback" not in done.stderr, done.stderr
    assert "Exception ignored" not in done.stderr, done.stderr
    if workers == 1:
        # The worker is this process: it starts and stops the app, serves nothing.
        assert done.stdout.count("app started") == done.stdout.count("app shut down") == 1
    else:
        # The supervisor starts no worker at all.
        assert "app started" not in done.stdout
    assert done.returncode == 0, done.stderr


def test_a_server_taking_over_exits_as_the_lost_signal_asked() -> None:
    done = _run(STARTER + HANDOVER)
    assert "start-up went on" in done.stdout
    assert "served anyway" not in done.stdout
    assert done.returncode == 128 + 15, done.stderr


def test_without_a_signal_the_handover_goes_on() -> None:
    done = _run(HANDOVER)
    assert "served anyway" in done.stdout
    assert done.returncode == 0, done.stderr
