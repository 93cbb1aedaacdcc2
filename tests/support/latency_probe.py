"""A well-behaved client beside an attack, in a process of its own (so the
attacker's work in the test process cannot delay it): one GET after another,
each on a new HTTP/1.1 connection, recording the slowest answer.

Run as ``python -m support.latency_probe URL INTERVAL_S``: it prints ``ready``
once the first request has been answered, keeps going until its stdin
closes, answers three more requests, and prints one JSON line:
``{"worst_s": ..., "answered": ..., "failures": [...]}`` (a failure is any
error or a status other than 200).
"""

from __future__ import annotations

import json
import sys
import threading
import time

import httpx


def main(url: str, interval_s: float) -> None:
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    worst_s = 0.0
    answered = 0
    failures: list[str] = []
    stopping_at: int | None = None
    limits = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(timeout=5.0, limits=limits) as client:
        while stopping_at is None or answered < stopping_at:
            started = time.monotonic()
            try:
                response = client.get(url)
                if response.status_code != 200:
                    failures.append(f"HTTP {response.status_code}")
            except httpx.HTTPError as exc:
                failures.append(repr(exc))
            worst_s = max(worst_s, time.monotonic() - started)
            answered += 1
            if answered == 1:
                print("ready", flush=True)
            if stopping_at is None and stop.is_set():
                stopping_at = answered + 3
            time.sleep(interval_s)
    print(json.dumps({"worst_s": worst_s, "answered": answered, "failures": failures[:10]}))


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
