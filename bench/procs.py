"""Process helpers: free ports, start/stop by pid, and RSS/CPU of a process tree.

Everything here addresses processes by the pid we started; nothing looks
processes up by name.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable

CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the bench process dies."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (inherited by children)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def tree_pids(roots: Iterable[int]) -> list[int]:
    """The given pids and all their descendants that are alive now."""
    children = _children_map()
    seen: list[int] = []
    pending = [p for p in roots if p]
    while pending:
        pid = pending.pop()
        if pid in seen or not os.path.exists(f"/proc/{pid}"):
            continue
        seen.append(pid)
        pending.extend(children.get(pid, ()))
    return seen


def rss_kib(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime of the given processes (all their threads), in seconds."""
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


class CpuMeter:
    """CPU time used by groups of process trees between start() and stop()."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = {name: tree_pids(roots) for name, roots in groups.items()}
        self.t0 = 0.0
        self.c0: dict[str, float] = {}

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.c0 = {name: cpu_seconds(pids) for name, pids in self.groups.items()}

    def stop(self) -> dict[str, float]:
        """Cores used on average by each group (1.0 = one core fully busy)."""
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        return {
            name: round((cpu_seconds(pids) - self.c0[name]) / elapsed, 3)
            for name, pids in self.groups.items()
        }


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the process we started, then SIGKILL it and any descendants left."""
    if proc.poll() is not None:
        return
    descendants = [p for p in tree_pids([proc.pid]) if p != proc.pid]
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(5)
    # Workers of a server we started (granian/hypercorn children) by pid.
    deadline = time.monotonic() + 5
    for pid in descendants:
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            if _is_zombie(pid):
                break
            time.sleep(0.05)
        if os.path.exists(f"/proc/{pid}") and not _is_zombie(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] == b"Z"


def tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""
