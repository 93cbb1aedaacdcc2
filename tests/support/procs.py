"""Small process helpers shared by the server wrappers.

Every server a test starts gets its own process group (``start_new_session``)
so that stopping it by pid also stops anything it forked (hypercorn's worker,
a redis AOF-rewrite child), and asks the kernel to SIGTERM it if the process
that started it dies, so a crashed or killed pytest never leaves servers behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn``: SIGTERM this child when its parent goes away (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(
    args: list[str],
    log_path: str | os.PathLike[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    append: bool = False,
) -> subprocess.Popen[bytes]:
    """Start a server: its output (stdout and stderr) to ``log_path``, fresh or
    (``append``) after a ``$ command`` line; its own process group; SIGTERM
    when this process dies."""
    with open(log_path, "ab" if append else "wb") as log:
        if append:
            log.write(f"$ {' '.join(map(str, args))}\n".encode())
            log.flush()
        return subprocess.Popen(
            args,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    There is a small window before the server binds it; callers that start a
    server on it detect a lost race by the server exiting early.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> int | None:
    """SIGTERM the process group led by ``proc``; SIGKILL it after ``timeout``.

    ``proc`` must have been started with ``start_new_session=True`` (its pid is
    then its process-group id). Returns the exit code.
    """
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
    # The leader is gone; its children (if any survived) still hold the group.
    _signal_group(proc.pid, signal.SIGKILL)
    return proc.returncode


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def tail(path: str | os.PathLike[str], max_bytes: int = 8000) -> str:
    """The last ``max_bytes`` of a log file, for failure messages."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - max_bytes))
            return fh.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"<could not read {path}: {exc}>"
