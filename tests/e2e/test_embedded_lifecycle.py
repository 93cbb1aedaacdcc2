"""The embedded redis-server stops with the gateway, however the gateway stops.

Each test runs the real console script (or hypercorn with the app's lifespan)
with no REDIS_URL and a temporary DS_DATA_DIR, stops it one way, and then looks
for any process still working in that directory (``/proc/PID/cwd``): the
redis-server and its watchdog must both be gone within a bound. Where the stop
lets Redis flush its AOF, a second start on the same directory reads back what
was written before.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from support.gateway_server import REPO_ROOT
from support.procs import free_port, spawn, stop_process, tail

pytestmark = pytest.mark.timeout(120)

START_TIMEOUT_S = 30.0
# The gateway's own stop, or the watchdog's (it looks four times a second, then
# redis-server flushes its AOF): generous for a loaded 2-core machine.
GONE_TIMEOUT_S = 20.0
EXIT_TIMEOUT_S = 30.0
POLL_S = 0.02
# gateway/server.py: a worker that dies younger than this stops the whole server.
MIN_WORKER_LIFETIME_S = 5.0

CONSOLE_SCRIPT = os.path.join(os.path.dirname(sys.executable), "durable-streams-gateway")


def _processes_in(data_dir: Path) -> dict[int, str]:
    """pid -> command name of every process whose working directory is ``data_dir``."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/cwd") != str(data_dir):
                continue
            with open(f"/proc/{entry}/comm", encoding="utf-8") as fh:
                found[int(entry)] = fh.read().strip()
        except OSError:  # exited meanwhile, or a zombie (no cwd): gone either way
            continue
    return found


def _wait_for(condition: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(POLL_S)


def _children_of(pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            children.append(int(entry))
    return children


def _workers_of(pid: int) -> list[int]:
    """The server's worker processes: children running its command line. (The
    embedded-Redis watchdog is a child too, with another command line; with
    setproctitle installed granian titles its workers "<its title> worker-N".)"""
    main = _cmdline(pid)
    return [child for child in _children_of(pid) if main and _cmdline(child).startswith(main)]


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().rstrip(b"\0")  # (a retitled process pads it with NULs)
    except OSError:
        return b""


class Gateway:
    """The gateway on a free loopback port with an embedded Redis in ``data_dir``."""

    def __init__(
        self, data_dir: Path, log_path: Path, command: str, workers: int, server: str
    ) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if command == "console-script":
            self.args = [CONSOLE_SCRIPT, "--host", "127.0.0.1", "--port", str(self.port)]
            self.args += ["--workers", str(workers), "--server", server]
            # A worker that does not stop is killed after this (granian), well
            # within EXIT_TIMEOUT_S.
            self.args += ["--graceful-timeout", "5"]
        else:  # hypercorn: the app's lifespan starts the embedded Redis in its worker
            self.args = [sys.executable, "-m", "hypercorn", "gateway.main:app"]
            self.args += ["--bind", f"127.0.0.1:{self.port}"]
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "REDIS_CLUSTER_URL")}
        env.update(DS_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1")
        self.proc = spawn(self.args, log_path, env=env, cwd=REPO_ROOT, append=True)

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        with httpx.Client(timeout=2.0) as client:
            while True:
                assert self.proc.poll() is None, f"gateway exited early:\n{self.log()}"
                with contextlib.suppress(httpx.TransportError):
                    if client.get(f"{self.url}/healthz").status_code == 200:
                        return
                assert time.monotonic() < deadline, f"gateway not healthy:\n{self.log()}"
                time.sleep(POLL_S)

    def wait_exit(self) -> int:
        try:
            return self.proc.wait(EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"gateway did not exit:\n{self.log()}") from None

    def log(self) -> str:
        return tail(self.log_path)

    def append(self, stream: str, body: str) -> None:
        with httpx.Client(timeout=10.0) as client:
            target = f"{self.url}/v1/stream/{stream}"
            created = client.put(target, headers={"content-type": "text/plain"})
            assert created.status_code in (200, 201), created.text
            appended = client.post(target, content=body, headers={"content-type": "text/plain"})
            assert appended.status_code in (200, 204), appended.text

    def read(self, stream: str) -> str:
        with httpx.Client(timeout=10.0) as client:
            response = client.get(f"{self.url}/v1/stream/{stream}", params={"offset": "-1"})
            assert response.status_code == 200, response.text
            return response.text


@pytest.fixture
def lifecycle(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    """Starts gateways on one data dir; afterwards nothing of theirs is left running."""
    data_dir = (tmp_path / "data").resolve()
    data_dir.mkdir()
    started: list[Gateway] = []

    def start(
        command: str = "console-script",
        workers: int = 1,
        healthy: bool = True,
        server: str = "native",
    ) -> Gateway:
        gateway = Gateway(data_dir, tmp_path / "gateway.log", command, workers, server)
        started.append(gateway)
        if healthy:
            gateway.wait_healthy()
        return gateway

    yield start
    for gateway in started:
        stop_process(gateway.proc)
    # Never leave a redis-server behind, even when the test failed (by pid only).
    for pid in _processes_in(data_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _assert_nothing_left(gateway: Gateway) -> None:
    try:
        _wait_for(
            lambda: not _processes_in(gateway.data_dir),
            GONE_TIMEOUT_S,
            "no process left in the data dir",
        )
    except AssertionError:
        left = _processes_in(gateway.data_dir)
        raise AssertionError(f"left running in the data dir: {left}\n{gateway.log()}") from None
    assert not (gateway.data_dir / "embedded.json").exists()


def _assert_data_survived(start: Callable[..., Gateway], stream: str, body: str) -> None:
    again = start()
    assert again.read(stream) == body
    again.proc.send_signal(signal.SIGTERM)
    assert again.wait_exit() == 0
    _assert_nothing_left(again)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_embedded_redis_and_the_data_survives(
    lifecycle: Callable[..., Gateway], signum: int, workers: int
) -> None:
    gateway = lifecycle(workers=workers)
    gateway.append("kept", "before the stop")

    gateway.proc.send_signal(signum)
    assert gateway.wait_exit() == 0, gateway.log()
    _assert_nothing_left(gateway)
    assert "ERROR" not in gateway.log() and "Traceback" not in gateway.log()
    _assert_data_survived(lifecycle, "kept", "before the stop")


@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_of_the_gateway_main_process_stops_the_embedded_redis(
    lifecycle: Callable[..., Gateway], workers: int
) -> None:
    # With --workers 1 the main process is the worker; with 2 its workers get
    # SIGTERM from the kernel (PR_SET_PDEATHSIG) and stop on their own. Either
    # way the watchdog then finds no gateway attached and stops redis-server,
    # which flushes its AOF.
    gateway = lifecycle(workers=workers)
    gateway.append("kept", "before the kill")

    gateway.proc.kill()
    assert gateway.wait_exit() == -signal.SIGKILL
    _assert_nothing_left(gateway)
    _assert_data_survived(lifecycle, "kept", "before the kill")


def test_a_killed_worker_is_replaced_and_redis_still_stops_with_the_gateway(
    lifecycle: Callable[..., Gateway],
) -> None:
    gateway = lifecycle(workers=2)
    gateway.append("kept", "before the crash")

    def workers() -> list[int]:
        return _workers_of(gateway.proc.pid)

    first = _wait_for(lambda: len(workers()) == 2 and workers(), 10, "two workers")
    # The supervisor treats a worker dying younger than this as a failed start.
    time.sleep(MIN_WORKER_LIFETIME_S + 0.5)
    os.kill(first[0], signal.SIGKILL)
    _wait_for(lambda: len(workers()) == 2 and first[0] not in workers(), 20, "a replacement worker")
    with httpx.Client(timeout=10.0) as client:
        for _ in range(4):  # whichever worker answers, Redis is still there
            response = client.get(f"{gateway.url}/v1/stream/kept", params={"offset": "-1"})
            assert response.text == "before the crash"

    gateway.proc.send_signal(signal.SIGTERM)
    assert gateway.wait_exit() == 0, gateway.log()
    _assert_nothing_left(gateway)
    _assert_data_survived(lifecycle, "kept", "before the crash")


@pytest.mark.parametrize("server", ["granian", "hypercorn"])
def test_the_other_servers_stop_the_embedded_redis_on_sigterm_and_on_sigkill(
    lifecycle: Callable[..., Gateway], server: str
) -> None:
    gateway = lifecycle(workers=2, server=server)
    gateway.append("kept", f"served by {server}")
    gateway.proc.send_signal(signal.SIGTERM)
    assert gateway.wait_exit() == 0, gateway.log()
    _assert_nothing_left(gateway)

    # Granian's forked workers hold the embedded Redis; hypercorn runs as a child
    # process. Killed outright, the console script takes both down with it.
    gateway = lifecycle(workers=2, server=server)
    assert gateway.read("kept") == f"served by {server}"
    children = _children_of(gateway.proc.pid)
    assert children
    gateway.proc.kill()
    gateway.wait_exit()
    _wait_for(
        lambda: not any(_cmdline(pid) for pid in children),
        GONE_TIMEOUT_S,
        "the killed gateway's children gone",
    )
    _assert_nothing_left(gateway)
    _assert_data_survived(lifecycle, "kept", f"served by {server}")


def _redis_server_runs(data_dir: Path) -> bool:
    return "redis-server" in _processes_in(data_dir).values()


@pytest.mark.parametrize(
    ("moment", "server", "workers"),
    [
        ("watchdog started", "native", 1),
        ("redis-server started", "native", 1),
        ("redis-server answered", "native", 1),
        ("workers forked", "native", 2),
        # Granian used to wait forever for a worker that got SIGTERM while starting.
        ("workers forked", "granian", 2),
        # `hypercorn gateway.main:app`: the app's lifespan starts the embedded Redis.
        ("watchdog started", "hypercorn-lifespan", 1),
        ("redis-server answered", "hypercorn-lifespan", 1),
    ],
)
def test_sigterm_during_start_up_stops_the_embedded_redis(
    lifecycle: Callable[..., Gateway], moment: str, server: str, workers: int
) -> None:
    first = lifecycle()
    first.append("kept", "from an earlier run")
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait_exit() == 0
    _assert_nothing_left(first)

    data_dir = first.data_dir
    reached: dict[str, Callable[[], bool]] = {
        "watchdog started": lambda: bool(_processes_in(data_dir)),
        "redis-server started": lambda: _redis_server_runs(data_dir),
        # The app's start-up (scripts, pub/sub listener) runs after this.
        "redis-server answered": lambda: (data_dir / "embedded.json").exists(),
    }
    if server == "hypercorn-lifespan":
        starting = lifecycle(command="hypercorn", healthy=False)
    else:
        starting = lifecycle(healthy=False, server=server, workers=workers)
    reached["workers forked"] = lambda: workers == len(_workers_of(starting.proc.pid))
    _wait_for(reached[moment], START_TIMEOUT_S, moment)
    starting.proc.send_signal(signal.SIGTERM)
    code = starting.wait_exit()
    if server != "hypercorn-lifespan":  # (hypercorn's own exit status is its business)
        assert code in (0, 128 + signal.SIGTERM), starting.log()
    _assert_nothing_left(starting)
    assert "Traceback" not in starting.log()
    _assert_data_survived(lifecycle, "kept", "from an earlier run")


def test_hypercorn_lifespan_stops_the_embedded_redis_on_sigterm(
    lifecycle: Callable[..., Gateway],
) -> None:
    gateway = lifecycle(command="hypercorn")
    gateway.append("kept", "served by hypercorn")

    gateway.proc.send_signal(signal.SIGTERM)
    assert gateway.wait_exit() == 0, gateway.log()
    _assert_nothing_left(gateway)
    _assert_data_survived(lifecycle, "kept", "served by hypercorn")


def test_hypercorn_killed_outright_leaves_no_embedded_redis(
    lifecycle: Callable[..., Gateway],
) -> None:
    gateway = lifecycle(command="hypercorn")
    gateway.append("kept", "served by hypercorn")

    # SIGKILL to hypercorn's whole process group: master and worker, no lifespan shutdown.
    os.killpg(gateway.proc.pid, signal.SIGKILL)
    gateway.wait_exit()
    _assert_nothing_left(gateway)
    _assert_data_survived(lifecycle, "kept", "served by hypercorn")
