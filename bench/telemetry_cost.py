"""What metrics and the request log cost an append.

Console-script gateways (one worker each) on one Redis (AOF everysec): one with
both off (``--no-access-log``) and, beside it, each ``--on`` configuration
(default: metrics on ``--metrics-port`` and the request log on, to a file). wrk
POSTs 100-byte bodies to 1,000 streams (``--streams``; bench/lua/append.lua), alternating
between them, and each round prints appends/s and the gateway's CPU time per
append (from /proc; steadier than appends/s on a shared machine) as ratios to
the gateway with both off::

    python bench/telemetry_cost.py [--rounds 5] [--duration 10] [--pin]
    python bench/telemetry_cost.py --pin --on "--metrics-port 8833" \
        --on "--no-access-log --metrics-port 8843" --on ""   # both, metrics, log

``--side-by-side`` loads the gateway with both off and a measured one at the
same time, both on CPU 1, Redis and wrk on CPU 0, so that whatever else the
machine does slows both alike: on a shared machine whose rounds vary by +-20 %
one after the other, this A/B varies by 1-2 %. With ``--connections 64`` each
neither gateway ever waits, Linux splits the CPU evenly between them, and
appends/s on/off is the inverse of their CPU cost per append; with fewer, the
cheaper one idles at times and the other gets the rest (closer to what one
gateway alone under bench/run's 32 connections sees)::

    python bench/telemetry_cost.py --side-by-side --connections 64 --rounds 10 --duration 4
    python bench/telemetry_cost.py --side-by-side --connections 16 --streams 1 ...

The request log goes to a file, as in bench/run; ``--log-output pipe`` sends
it down a pipe that another process (``cat``, on the load CPU) reads, as a
container's log shipper would.

Options starting with ``NAME=value`` set the environment of that gateway
alone: ``--on "PYTHONPATH=/path/to/other/checkout --metrics-port 8833"`` runs
another commit's code (``--off`` likewise sets the reference gateway).

``--perf DIR`` (with ``--side-by-side``) samples both gateways with Linux
perf (``perf record -e cpu-clock``: time, where bench/instructions.py counts
instructions) while they take the same load, keeps the recordings in DIR, and
prints where the measured one spends more time per append, function by
function (kernel included): a lookup that misses the CPU caches shows up
there many times larger than its share of instructions::

    python bench/telemetry_cost.py --side-by-side --rounds 3 --duration 8 --perf /tmp/perf

Needs ``redis-server`` and ``wrk`` on PATH (``taskset`` for ``--pin`` and
``--side-by-side``; ``perf`` for ``--perf``).
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
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "durable-streams-gateway"
STREAMS = 1000


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_ready(
    port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30.0
) -> None:
    """Until the gateway on ``port`` answers /healthz (or ``proc`` exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the gateway exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"gateway on {port} did not start in {timeout:.0f} s")


def wrk(
    port: int,
    pid: int,
    duration: int,
    body: str,
    pin: list[str],
    connections: int = 32,
    streams: int = STREAMS,
) -> tuple[float, float]:
    """(appends/s, gateway CPU microseconds per append)"""
    before = cpu_seconds(pid)
    out = subprocess.run(
        [
            *pin,
            "wrk",
            f"-t{min(2, connections // 16)}",
            f"-c{connections}",
            f"-d{duration}s",
            "-s",
            str(ROOT / "bench/lua/append.lua"),
            f"http://127.0.0.1:{port}",
            "--",
            "/v1/stream/b",
            str(streams),
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


PERF_HZ = 4000  # samples per second of CPU time: one per 250 us


def perf_record(pid: int, path: str) -> subprocess.Popen[bytes]:
    """Samples of ``pid``'s CPU time into ``path``, until interrupted (SIGINT)."""
    command = ["perf", "record", "-q", "-e", "cpu-clock", "-F", str(PERF_HZ)]
    proc = subprocess.Popen(
        [*command, "-p", str(pid), "-o", path],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)  # (perf attaches)
    return proc


def perf_samples(paths: list[str]) -> Counter[str]:
    """Samples per function ("shared object: symbol") over the recordings."""
    samples: Counter[str] = Counter()
    for path in paths:
        report = subprocess.run(
            ["perf", "report", "-i", path, "--stdio", "--sort", "dso,sym", "-n", "--no-children"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for line in report.splitlines():
            match = re.match(r"\s+[\d.]+%\s+(\d+)\s+(\S+)\s+\[.\]\s+(.*)", line)
            if match:
                samples[f"{match.group(2)}: {match.group(3).strip()}"] += int(match.group(1))
    return samples


def print_perf_diff(
    off: Counter[str], off_appends: float, on: Counter[str], on_appends: float, top: int = 25
) -> None:
    """Where the measured gateway spends more (and less) time per append."""

    def micros(samples: float, appends: float) -> float:
        return samples * 1e6 / PERF_HZ / appends

    total_off, total_on = micros(off.total(), off_appends), micros(on.total(), on_appends)
    print(f"  sampled: off {total_off:.2f} us per append, on {total_on:.2f} us")
    rows = sorted(
        (
            (micros(on[name], on_appends) - micros(off[name], off_appends), name)
            for name in off | on
        ),
        reverse=True,
    )
    for delta, name in rows[:top]:
        print(f"  {delta:+7.3f} us  {name[:110]}")
    print("  ...")
    for delta, name in rows[-5:]:
        print(f"  {delta:+7.3f} us  {name[:110]}")


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
    parser.add_argument(
        "--side-by-side",
        action="store_true",
        help="load the reference and each measured gateway at the same time, sharing "
        "CPU 1: host noise hits both alike",
    )
    parser.add_argument(
        "--off",
        default="--no-access-log",
        help="the reference gateway's options (default: --no-access-log, metrics off)",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=32,
        help="wrk's connections to each gateway (default 32; side by side, 64 keeps both "
        "gateways busy all the time, so that they split the CPU evenly)",
    )
    parser.add_argument(
        "--streams",
        type=int,
        default=STREAMS,
        help="appends spread over this many streams (default 1,000; 1: all to one stream, "
        "as bench/run's a_one)",
    )
    parser.add_argument(
        "--log-output",
        choices=("file", "pipe"),
        default="file",
        help="where the gateways' standard output (the request log) goes: a file "
        "(default, as bench/run), or a pipe read by another process (a log shipper)",
    )
    parser.add_argument(
        "--perf",
        metavar="DIR",
        help="with --side-by-side: sample both gateways with perf (recordings kept in DIR) "
        "and print where the measured one spends more time per append, function by function",
    )
    args = parser.parse_args()
    if args.perf and not args.side_by_side:
        parser.error("--perf needs --side-by-side")
    if args.perf:
        os.makedirs(args.perf, exist_ok=True)
    if args.side_by_side:
        args.pin = True
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

        def start(options: str, port: int, log_name: str) -> subprocess.Popen[bytes]:
            words = options.split()
            own_env = dict(env)
            while words and "=" in words[0] and not words[0].startswith("-"):
                name, _, value = words.pop(0).partition("=")
                own_env[name] = value
            # Each its own keys: side by side, they share the Redis.
            own_env["DS_KEY_PREFIX"] = f"bench{port}:"
            if args.log_output == "pipe":
                # A log shipper's pipe: a reader on the load CPU.
                reader = subprocess.Popen(
                    [*pin_load, "cat"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                )
                assert reader.stdin is not None
                proc = subprocess.Popen(
                    [*common, "--port", str(port), *words], env=own_env, stdout=reader.stdin
                )
                reader.stdin.close()
                procs.extend((reader, proc))  # (stopped in reverse: the gateway first)
                return proc
            with open(os.path.join(work, log_name), "wb") as log:
                proc = subprocess.Popen(
                    [*common, "--port", str(port), *words], env=own_env, stdout=log
                )
            procs.append(proc)
            return proc

        off = start(args.off, 8831, "off.log")
        ons: list[tuple[str, int, subprocess.Popen[bytes]]] = []
        for index, options in enumerate(args.on or ["--metrics-port 8833"]):
            port = 8832 + 10 * index
            ons.append((options, port, start(options, port, f"on{index}.log")))
        wait_ready(8831)
        for _, port, _ in ons:
            wait_ready(port)
        for port in (8831, *(port for _, port, _ in ons)):
            conn = http.client.HTTPConnection("127.0.0.1", port)
            names = ["b"] if args.streams == 1 else [f"b{i}" for i in range(args.streams)]
            for name in names:
                conn.request(
                    "PUT",
                    f"/v1/stream/{name}",
                    headers={"Content-Type": "application/octet-stream"},
                )
                conn.getresponse().read()
        wrk(8831, off.pid, 3, body, pin_load, streams=args.streams)  # warm-up
        for _, port, on in ons:
            wrk(port, on.pid, 3, body, pin_load, streams=args.streams)
        # With --perf: each side's recordings and appends, per measured configuration.
        recorded: dict[str, dict[str, list[str]]] = {o: {"off": [], "on": []} for o, _, _ in ons}
        appended: dict[str, dict[str, float]] = {o: {"off": 0.0, "on": 0.0} for o, _, _ in ons}
        rates: dict[str, list[float]] = {options: [] for options, _, _ in ons}
        cpus: dict[str, list[float]] = {options: [] for options, _, _ in ons}
        for number in range(1, args.rounds + 1):
            line = f"round {number}:"
            if not args.side_by_side:
                off_rate, off_cpu = wrk(
                    8831, off.pid, args.duration, body, pin_load, args.connections, args.streams
                )
                line += f" off {off_rate:7.0f}/s {off_cpu:5.1f} us CPU/append"
            for index, (options, port, on) in enumerate(ons):
                if args.side_by_side:
                    perfs = []
                    if args.perf:
                        for side, pid in (("off", off.pid), ("on", on.pid)):
                            path = os.path.join(args.perf, f"{index}-{side}-{number}.data")
                            recorded[options][side].append(path)
                            perfs.append(perf_record(pid, path))
                    with ThreadPoolExecutor(2) as pool:
                        both = [
                            pool.submit(
                                wrk,
                                *(p, pid, args.duration, body, pin_load),
                                *(args.connections, args.streams),
                            )
                            for p, pid in ((8831, off.pid), (port, on.pid))
                        ]
                        (off_rate, off_cpu), (on_rate, on_cpu) = (f.result() for f in both)
                    for perf in perfs:
                        perf.send_signal(signal.SIGINT)
                        perf.wait(60)
                    appended[options]["off"] += off_rate * args.duration
                    appended[options]["on"] += on_rate * args.duration
                    line += f" off {off_rate:7.0f}/s {off_cpu:5.1f} us"
                else:
                    on_rate, on_cpu = wrk(
                        port, on.pid, args.duration, body, pin_load, args.connections
                    )
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
            if args.perf:
                print_perf_diff(
                    perf_samples(recorded[options]["off"]),
                    appended[options]["off"],
                    perf_samples(recorded[options]["on"]),
                    appended[options]["on"],
                )
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


if __name__ == "__main__":
    main()
