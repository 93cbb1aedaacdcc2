"""What metrics and the request log cost an append.

Console-script gateways (one worker each) on one Redis (AOF everysec): one with
both off (``--no-access-log``) and, beside it, each ``--on`` configuration
(default: metrics on ``--metrics-port`` and the request log on, to a file). wrk
POSTs 100-byte bodies to 1,000 streams (bench/lua/append.lua), alternating
between them, and each round prints appends/s and the gateway's CPU time per
append (from /proc; steadier than appends/s on a shared machine) as ratios to
the gateway with both off::

    python bench/telemetry_cost.py [--rounds 5] [--duration 10] [--pin]
    python bench/telemetry_cost.py --pin --on "--metrics-port 8833" \
        --on "--no-access-log --metrics-port 8843" --on ""   # both, metrics, log

Needs ``redis-server`` and ``wrk`` on PATH.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "durable-streams-gateway"
STREAMS = 1000


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_ready(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"gateway on {port} did not start")


def wrk(port: int, pid: int, duration: int, body: str, pin: list[str]) -> tuple[float, float]:
    """(appends/s, gateway CPU microseconds per append)"""
    before = cpu_seconds(pid)
    out = subprocess.run(
        [
            *pin,
            "wrk",
            "-t2",
            "-c32",
            f"-d{duration}s",
            "-s",
            str(ROOT / "bench/lua/append.lua"),
            f"http://127.0.0.1:{port}",
            "--",
            "/v1/stream/b",
            str(STREAMS),
            "application/octet-stream",
            body,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    used = cpu_seconds(pid) - before
    if os.environ.get("BENCH_DEBUG"):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        print(port, "utime", fields[11], "stime", fields[12], "minflt", fields[7], file=sys.stderr)
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    if "Non-2xx" in out:
        raise RuntimeError(out)
    return rate, used / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument(
        "--pin",
        action="store_true",
        help="gateways on CPU 1, Redis and wrk on CPU 0: the gateway is the bottleneck, "
        "so appends/s show its CPU cost in full (and vary less)",
    )
    parser.add_argument(
        "--on",
        action="append",
        help="a measured gateway's options, repeatable: each is run beside the one with "
        "both off in every round (default: --metrics-port 8833, request log on)",
    )
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="ds-telemetry-bench-")
    body = os.path.join(work, "body")
    Path(body).write_bytes(b"x" * 100)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        pin_gateway = ["taskset", "-c", "1"] if args.pin else []
        pin_load = ["taskset", "-c", "0"] if args.pin else []
        redis = subprocess.Popen(
            [
                *pin_load,
                *("redis-server", "--port", "6397", "--dir", work, "--save", ""),
                *("--appendonly", "yes", "--appendfsync", "everysec"),
            ],
            stdout=subprocess.DEVNULL,
        )
        procs.append(redis)
        env = {**os.environ, "REDIS_URL": "redis://127.0.0.1:6397/0", "DS_INSTANCE_ID": "bench"}
        common = [*pin_gateway, str(SCRIPT), "--host", "127.0.0.1", "--log-level", "warning"]
        with open(os.path.join(work, "off.log"), "wb") as off_log:
            off = subprocess.Popen(
                [*common, "--port", "8831", "--no-access-log"], env=env, stdout=off_log
            )
        procs.append(off)
        ons: list[tuple[str, int, subprocess.Popen[bytes]]] = []
        for index, options in enumerate(args.on or ["--metrics-port 8833"]):
            port = 8832 + 10 * index
            with open(os.path.join(work, f"on{index}.log"), "wb") as on_log:
                on = subprocess.Popen(
                    [*common, "--port", str(port), *options.split()], env=env, stdout=on_log
                )
            procs.append(on)
            ons.append((options, port, on))
        wait_ready(8831)
        for _, port, _ in ons:
            wait_ready(port)
        conn = http.client.HTTPConnection("127.0.0.1", 8831)
        for i in range(STREAMS):
            conn.request(
                "PUT", f"/v1/stream/b{i}", headers={"Content-Type": "application/octet-stream"}
            )
            conn.getresponse().read()
        wrk(8831, off.pid, 3, body, pin_load)  # warm-up
        for _, port, on in ons:
            wrk(port, on.pid, 3, body, pin_load)
        rates: dict[str, list[float]] = {options: [] for options, _, _ in ons}
        cpus: dict[str, list[float]] = {options: [] for options, _, _ in ons}
        for number in range(1, args.rounds + 1):
            off_rate, off_cpu = wrk(8831, off.pid, args.duration, body, pin_load)
            line = f"round {number}: off {off_rate:7.0f}/s {off_cpu:5.1f} us CPU/append"
            for options, port, on in ons:
                on_rate, on_cpu = wrk(port, on.pid, args.duration, body, pin_load)
                rates[options].append(on_rate / off_rate)
                cpus[options].append(on_cpu / off_cpu)
                line += (
                    f" | [{options}] {on_rate:7.0f}/s {on_cpu:5.1f} us: "
                    f"x{rates[options][-1]:.3f} appends/s, x{cpus[options][-1]:.3f} CPU"
                )
            print(line, flush=True)
        for options, _, _ in ons:
            print(
                f"median [{options}]: appends/s on/off {statistics.median(rates[options]):.3f}, "
                f"CPU per append on/off {statistics.median(cpus[options]):.3f}"
            )
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


if __name__ == "__main__":
    main()
