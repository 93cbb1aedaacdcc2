"""Instructions an append costs the gateway, counted by valgrind's callgrind.

Time on a shared machine varies by more than the changes worth measuring (a
per cent or two); the instructions a process executes do not. Each
configuration runs the console script (one worker) under callgrind on its own
Redis; a client sends exactly ``--appends`` 100-byte appends over
``--connections`` keep-alive connections, to one stream or spread over
``--streams``, after a warm-up, and the instructions counted while they ran
(user space only: the kernel's share, system calls and page faults, is not in
them) are divided by the appends::

    python bench/instructions.py                       # both off, against both on
    python bench/instructions.py --streams 1000 --connections 32
    python bench/instructions.py --config "off=--no-access-log" \\
        --config "old=PYTHONPATH=/path/to/other/checkout --metrics-port 9942" \\
        --config "new=--metrics-port 9941"             # another commit's code

Each ``--config NAME=OPTIONS`` is a name and the gateway's options; words of
the form ``NAME=value`` before them set that gateway's environment. Ratios are
to the first configuration.

Under callgrind the gateway runs about fifty times slower than it does, so
what runs on timers would run fifty times as often per append: the request
log's drain (every 50 ms) and the metrics flush (every second) are made rare,
and a batch is then drained when it holds 512 requests, as at full speed.
With one connection (the default) every append is one Redis command, so
nothing depends on how the appends happen to batch, and a configuration
repeats within about 0.3 %; with more, group commit batches them as timing
allows, which moves the count by about 1 % from run to run.

Needs ``valgrind`` (``callgrind_control``) and ``redis-server`` on PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from telemetry_cost import wait_ready  # (bench/, run as a script)

ROOT = Path(__file__).resolve().parents[1]
BODY = b"x" * 100
PREFIX = "/v1/stream/instructions-"

# Run instead of the console script: the timers made rare (see above), then its main.
GATEWAY = """
import sys
from gateway import metrics
from gateway.cli import main
from gateway.web import telemetry
metrics.FLUSH_INTERVAL_S = 3600.0
telemetry.BATCH_DELAY_S = 3600.0
sys.argv[0] = "durable-streams-gateway"
sys.exit(main())
"""


def create_streams(port: int, paths: list[str]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for path in paths:
        conn.request("PUT", path, headers={"Content-Type": "application/octet-stream"})
        response = conn.getresponse()
        response.read()
        if response.status not in (200, 201, 204):
            raise RuntimeError(f"PUT {path}: {response.status}")


async def append(port: int, paths: list[str], appends: int, connections: int, seed: int) -> None:
    """Exactly ``appends`` appends, each to a path picked at random."""
    pick = random.Random(seed)
    requests = [
        (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {len(BODY)}\r\n\r\n"
        ).encode()
        + BODY
        for path in paths
    ]

    async def one_connection(count: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(count):
            writer.write(pick.choice(requests))
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.1 204")):
                raise RuntimeError(f"append answered {head[:40]!r}")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if length and int(length.group(1)):
                await reader.readexactly(int(length.group(1)))
        writer.close()

    share, rest = divmod(appends, connections)
    await asyncio.gather(
        *(one_connection(share + (1 if i < rest else 0)) for i in range(connections))
    )


def total_instructions(out: Path) -> int:
    """The instructions counted: the dump's ``totals:`` line (its ``summary:``
    line is written before collection is switched on, as 0)."""
    for line in out.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {out}")


def measure(
    name: str, options: str, args: argparse.Namespace, work: Path, port: int, redis_port: int
) -> float:
    """Instructions per append of one configuration."""
    words = options.split()
    env = {
        **os.environ,
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "DS_INSTANCE_ID": "bench",
        "PYTHONPATH": str(ROOT),
    }
    while words and "=" in words[0] and not words[0].startswith("-"):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    out = work / f"{name}.callgrind"
    redis = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--dir", str(work), "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    gateway = None
    try:
        with open(work / f"{name}.log", "wb") as log:
            gateway = subprocess.Popen(
                [
                    *("valgrind", "--tool=callgrind", "--instr-atstart=no"),
                    f"--callgrind-out-file={out}",
                    *(sys.executable, "-c", GATEWAY),
                    *("--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"),
                    *words,
                ],
                env=env,
                # (python -c puts its working directory first on sys.path: one
                # without a checkout, so that PYTHONPATH decides which code runs)
                cwd=work,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_ready(port, gateway, timeout=180)  # (callgrind starts slowly)
        paths = [f"{PREFIX}{i}" for i in range(args.streams)]
        create_streams(port, paths)
        asyncio.run(append(port, paths, 1024, args.connections, seed=1))  # warm-up
        subprocess.run(
            ["callgrind_control", "-i", "on", str(gateway.pid)],
            check=True,
            capture_output=True,
        )
        asyncio.run(append(port, paths, args.appends, args.connections, seed=2))
        subprocess.run(
            ["callgrind_control", "-i", "off", str(gateway.pid)],
            check=True,
            capture_output=True,
        )
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(timeout=120)
    finally:
        for proc in (gateway, redis):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    appends: int = args.appends
    return total_instructions(out) / appends


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config",
        action="append",
        metavar="NAME=OPTIONS",
        help="a configuration (repeatable; default: off=--no-access-log, "
        "on=--metrics-port 9941, the request log on)",
    )
    parser.add_argument("--appends", type=int, default=5120)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--port", type=int, default=8851)
    parser.add_argument(
        "--keep",
        metavar="DIR",
        help="keep each configuration's callgrind file (NAME.callgrind) and log here, "
        "for callgrind_annotate",
    )
    args = parser.parse_args()
    configs = [c.partition("=")[::2] for c in args.config or []] or [
        ("off", "--no-access-log"),
        ("on", "--metrics-port 9941"),
    ]
    with tempfile.TemporaryDirectory(prefix="ds-instructions-") as scratch:
        work = Path(args.keep or scratch)
        work.mkdir(parents=True, exist_ok=True)
        first = None
        for name, options in configs:
            per_append = measure(name, options, args, work, args.port, args.port + 1)
            first = first or per_append
            print(
                f"{name:>12}: {per_append:9,.0f} instructions per append"
                f"  x{per_append / first:.3f}  (+{per_append - first:,.0f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
