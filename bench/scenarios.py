"""The five scenarios. Each takes a running server and returns {measure key: value}.

(a) appends/s with wrk (one stream; 1,000 streams)      higher is better
(b) append -> live delivery latency, long-poll and SSE   lower is better
(c) catch-up read throughput of a large stream, paged    higher is better
(d) SSE fan-out: memory per idle reader, time to last    lower is better
(e) JSON-mode batched appends, messages/s                higher is better
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from bench.httpc import Conn, Dechunker, SseParser
from bench.procs import CpuMeter, die_with_parent
from bench.servers import ROOT, Running

PREFIX = "/v1/stream"
WRK = os.environ.get("BENCH_WRK", "wrk")
LUA = ROOT / "bench" / "lua" / "append.lua"


@dataclass(frozen=True)
class Measure:
    key: str
    scenario: str
    label: str
    unit: str
    higher_is_better: bool
    digits: int = 0


def measures_for(opts) -> list[Measure]:
    ms = [
        Measure("a_one", "a", "appends/s, 1 stream (wrk, 32 conns, 100 B)", "appends/s", True),
        Measure(
            "a_many",
            "a",
            f"appends/s, {opts.streams:,} streams (wrk, 32 conns, 100 B)",
            "appends/s",
            True,
        ),
        Measure("b_lp_p50", "b", "append→delivery p50, long-poll", "ms", False, 2),
        Measure("b_lp_p99", "b", "append→delivery p99, long-poll", "ms", False, 2),
        Measure("b_sse_p50", "b", "append→delivery p50, SSE", "ms", False, 2),
        Measure("b_sse_p99", "b", "append→delivery p99, SSE", "ms", False, 2),
        Measure(
            "c_mbps",
            "c",
            f"catch-up read of a {opts.catchup_mb:g} MiB stream, paged",
            "MB/s",
            True,
            1,
        ),
    ]
    for n in opts.readers:
        ms.append(Measure(f"d_mem_{n}", "d", f"memory per idle SSE reader, {n:,} readers",
                          "KiB", False, 1))  # fmt: skip
        ms.append(Measure(f"d_last_{n}", "d", f"append→last of {n:,} SSE readers",
                          "ms", False, 1))  # fmt: skip
    ms.append(
        Measure(
            "e_msgs",
            "e",
            f"JSON batched appends ({opts.json_batch} msgs/POST, wrk 32 conns)",
            "messages/s",
            True,
        )
    )
    return ms


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


# --------------------------------------------------------------------------- set-up


async def create_streams(srv: Running, paths: list[str], content_type: str, conns: int = 8):
    """PUT every path (201 expected), over a few keep-alive connections."""
    queue = list(paths)

    async def worker() -> None:
        conn = Conn(srv.host, srv.port)
        try:
            while queue:
                path = queue.pop()
                resp = await conn.request("PUT", path, {"Content-Type": content_type})
                if resp.status not in (200, 201):
                    raise RuntimeError(f"PUT {path}: {resp.status} {resp.body[:200]!r}")
        finally:
            await conn.close()

    await asyncio.gather(*(worker() for _ in range(min(conns, len(paths)))))


# --------------------------------------------------------------------------- wrk


def run_wrk(
    srv: Running, path: str, streams: int, content_type: str, body: bytes, seconds: float, opts
) -> dict:
    with tempfile.NamedTemporaryFile(prefix="ds-bench-body-", delete=False) as f:
        f.write(body)
        body_file = f.name
    args = [
        WRK, f"-t{opts.wrk_threads}", f"-c{opts.connections}", f"-d{max(1, round(seconds))}s",
        "--timeout", "5s", "-s", str(LUA), f"http://{srv.host}:{srv.port}",
        "--", path, str(streams), content_type, body_file,
    ]  # fmt: skip
    meter = CpuMeter(srv.cpu_groups())
    try:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        meter.start()
        t0 = time.monotonic()
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            out, err = proc.communicate(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise RuntimeError("wrk did not finish in time") from None
        cpu = meter.stop()
        # Only wrk is reaped meanwhile, so the children's rusage delta is wrk's.
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu["wrk"] = round(
            (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime)
            / max(time.monotonic() - t0, 1e-9),
            3,
        )
    finally:
        os.unlink(body_file)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited {proc.returncode}: {err.strip()[-500:]}")
    line = next((x for x in out.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"no WRKJSON line from wrk:\n{out[-1000:]}\n{err[-500:]}")
    result = json.loads(line[len("WRKJSON ") :])
    duration = result["duration_us"] / 1e6
    ok = result["requests"] - result["status_errors"]
    result["ok_per_s"] = ok / duration if duration else 0.0
    result["cpu"] = cpu
    if result["status_errors"] or result["connect_errors"] or result["timeouts"]:
        result["warning"] = (
            f"{result['status_errors']} non-2xx, {result['connect_errors']} connect errors, "
            f"{result['timeouts']} timeouts out of {result['requests']} requests"
        )
    return result


def scenario_a(srv: Running, opts, tag: str) -> tuple[dict, dict]:
    base = f"{PREFIX}/bench-{tag}/a"
    one, warm = f"{base}/one", f"{base}/warm"
    many = [f"{base}/many/{i}" for i in range(opts.streams)]
    asyncio.run(create_streams(srv, [one, warm, *many], "text/plain"))
    body = (b"0123456789" * ((opts.body_bytes + 9) // 10))[: opts.body_bytes]
    if opts.warmup > 0:
        run_wrk(srv, warm, 1, "text/plain", body, opts.warmup, opts)
    r_one = run_wrk(srv, one, 1, "text/plain", body, opts.duration, opts)
    r_many = run_wrk(srv, f"{base}/many/", opts.streams, "text/plain", body, opts.duration, opts)
    return (
        {"a_one": r_one["ok_per_s"], "a_many": r_many["ok_per_s"]},
        {"a_one": r_one, "a_many": r_many},
    )


def scenario_e(srv: Running, opts, tag: str) -> tuple[dict, dict]:
    path = f"{PREFIX}/bench-{tag}/e/json"
    asyncio.run(create_streams(srv, [path], "application/json"))
    batch = [
        {"id": i, "user": f"u{i % 7}", "type": "chat.message", "text": "hello durable streams"}
        for i in range(opts.json_batch)
    ]
    body = json.dumps(batch, separators=(",", ":")).encode()
    r = run_wrk(srv, path, 1, "application/json", body, opts.duration, opts)
    r["body_bytes"] = len(body)
    return {"e_msgs": r["ok_per_s"] * opts.json_batch}, {"e_msgs": r}


# --------------------------------------------------------------------------- (b) latency

SEQ_RE = re.compile(rb"m(\d{8});")


def _latency_body(seq: int, size: int) -> bytes:
    head = b"m%08d;" % seq
    return head + b"x" * max(0, size - len(head))


async def _writer(srv: Running, path: str, rate: float, seconds: float, sent: dict, size: int):
    """Appends at a steady rate on a few connections; records the send time of each."""
    conns: asyncio.Queue[Conn] = asyncio.Queue()
    for _ in range(4):
        conns.put_nowait(Conn(srv.host, srv.port))
    count = int(rate * seconds)
    errors = []

    async def post(seq: int) -> None:
        conn = await conns.get()
        try:
            sent[seq] = time.perf_counter()
            resp = await conn.request(
                "POST", path, {"Content-Type": "text/plain"}, _latency_body(seq, size)
            )
            if resp.status != 204:
                errors.append(resp.status)
        finally:
            conns.put_nowait(conn)

    tasks = []
    t0 = time.perf_counter()
    for seq in range(count):
        delay = t0 + seq / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(post(seq)))
    await asyncio.gather(*tasks)
    while not conns.empty():
        await conns.get_nowait().close()
    if errors:
        raise RuntimeError(f"{len(errors)} appends failed, e.g. status {errors[0]}")
    return count


async def _latency_run(srv: Running, path: str, mode: str, opts) -> dict:
    setup = Conn(srv.host, srv.port)
    resp = await setup.request("PUT", path, {"Content-Type": "text/plain"})
    await setup.close()
    if resp.status != 201:
        raise RuntimeError(f"PUT {path}: {resp.status}")
    tail = resp.headers["stream-next-offset"]
    sent: dict[int, float] = {}
    received: dict[int, float] = {}
    ready = asyncio.Event()
    reader_conn = Conn(srv.host, srv.port, timeout=60)

    expected = int(opts.latency_rate * opts.latency_seconds)
    all_received = asyncio.Event()

    def record(payload: bytes, now: float) -> None:
        for m in SEQ_RE.findall(payload):
            received.setdefault(int(m), now)
        if len(received) >= expected:
            all_received.set()

    async def long_poll_reader() -> None:
        offset, cursor = tail, None
        first = True
        while True:
            q = f"{path}?offset={offset}&live=long-poll" + (f"&cursor={cursor}" if cursor else "")
            await reader_conn.send("GET", q)
            if first:
                # The request is on the wire; give the server a moment to park it.
                first = False
                asyncio.get_running_loop().call_later(0.3, ready.set)
            status, headers = await reader_conn.read_head()
            body = await reader_conn.read_body("GET", status, headers)
            now = time.perf_counter()
            if status == 200:
                record(body, now)
            elif status != 204:
                raise RuntimeError(f"long-poll: {status} {body[:200]!r}")
            offset = headers["stream-next-offset"]
            cursor = headers.get("stream-cursor")

    async def sse_reader() -> None:
        await reader_conn.send(
            "GET", f"{path}?offset=now&live=sse", {"Accept": "text/event-stream"}
        )
        status, headers = await reader_conn.read_head()
        if status != 200:
            raise RuntimeError(f"SSE: status {status}")
        chunked = headers.get("transfer-encoding", "").lower() == "chunked"
        dechunker, parser = Dechunker(), SseParser()
        assert reader_conn.reader is not None
        while True:
            data = await reader_conn.reader.read(65536)
            now = time.perf_counter()
            if not data:
                raise RuntimeError("SSE connection closed by the server")
            for event, text in parser.feed(dechunker.feed(data) if chunked else data):
                if event == "control":
                    ready.set()
                elif event == "data":
                    record(text.encode(), now)

    reader = asyncio.create_task(long_poll_reader() if mode == "long-poll" else sse_reader())
    try:
        await asyncio.wait_for(ready.wait(), 10)
        count = await _writer(
            srv, path, opts.latency_rate, opts.latency_seconds, sent, opts.body_bytes
        )
        if len(received) < count:
            all_in = asyncio.ensure_future(all_received.wait())
            await asyncio.wait([all_in, reader], timeout=5, return_when=asyncio.FIRST_COMPLETED)
            all_in.cancel()
        if reader.done() and reader.exception():
            raise reader.exception()  # type: ignore[misc]
    finally:
        # Python 3.11's wait_for can swallow a cancellation that races with its
        # inner read completing: the long-poll loop would then go on forever.
        while not reader.done():
            reader.cancel()
            await asyncio.wait([reader], timeout=1)
        if not reader.cancelled():
            reader.exception()  # retrieved: not logged as never retrieved
        await reader_conn.close()
    lat = [(received[s] - sent[s]) * 1000 for s in sent if s in received]
    if not lat:
        raise RuntimeError(f"{mode}: no append was delivered")
    return {
        "count": count,
        "delivered": len(lat),
        "missing": count - len(lat),
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "max_ms": max(lat),
    }


def scenario_b(srv: Running, opts, tag: str) -> tuple[dict, dict]:
    base = f"{PREFIX}/bench-{tag}/b"
    lp = asyncio.run(_latency_run(srv, f"{base}/long-poll", "long-poll", opts))
    sse = asyncio.run(_latency_run(srv, f"{base}/sse", "sse", opts))
    values = {
        "b_lp_p50": lp["p50_ms"],
        "b_lp_p99": lp["p99_ms"],
        "b_sse_p50": sse["p50_ms"],
        "b_sse_p99": sse["p99_ms"],
    }
    for name, r in (("long-poll", lp), ("sse", sse)):
        if r["missing"]:
            r["warning"] = f"{name}: {r['missing']} of {r['count']} appends not delivered in time"
    return values, {"b_long_poll": lp, "b_sse": sse}


# --------------------------------------------------------------------------- (c) catch-up


async def _catchup(srv: Running, path: str, opts) -> dict:
    chunk = opts.catchup_chunk
    appends = math.ceil(opts.catchup_mb * 1024 * 1024 / chunk)
    await create_streams(srv, [path], "application/octet-stream")
    body = os.urandom(chunk)
    todo = list(range(appends))
    t_fill = time.perf_counter()

    async def filler() -> None:
        conn = Conn(srv.host, srv.port, timeout=60)
        try:
            while todo:
                todo.pop()
                resp = await conn.request(
                    "POST", path, {"Content-Type": "application/octet-stream"}, body
                )
                if resp.status != 204:
                    raise RuntimeError(f"fill append: {resp.status} {resp.body[:200]!r}")
        finally:
            await conn.close()

    await asyncio.gather(*(filler() for _ in range(4)))
    fill_s = time.perf_counter() - t_fill
    expected = appends * chunk

    conn = Conn(srv.host, srv.port, timeout=120)
    total = pages = 0
    offset = "-1"
    t0 = time.perf_counter()
    try:
        while True:
            resp = await conn.request("GET", f"{path}?offset={offset}")
            if resp.status != 200:
                raise RuntimeError(f"catch-up read: {resp.status} {resp.body[:200]!r}")
            total += len(resp.body)
            pages += 1
            offset = resp.headers["stream-next-offset"]
            if resp.headers.get("stream-up-to-date") == "true":
                break
            if pages > 100_000:
                raise RuntimeError("catch-up read does not end")
        elapsed = time.perf_counter() - t0
    finally:
        await conn.close()
    if total != expected:
        raise RuntimeError(f"catch-up read {total} bytes, expected {expected}")
    return {
        "bytes": total,
        "pages": pages,
        "seconds": elapsed,
        "mb_per_s": total / 1e6 / elapsed,
        "fill_seconds": fill_s,
        "appends": appends,
    }


def scenario_c(srv: Running, opts, tag: str) -> tuple[dict, dict]:
    r = asyncio.run(_catchup(srv, f"{PREFIX}/bench-{tag}/c/big", opts))
    return {"c_mbps": r["mb_per_s"]}, {"c": r}


# --------------------------------------------------------------------------- (d) fan-out


async def _read_json_line(stream: asyncio.StreamReader, limit_s: float, what: str) -> dict:
    line = await asyncio.wait_for(stream.readline(), limit_s)
    if not line:
        raise RuntimeError(f"fan-out client exited before {what}")
    return json.loads(line)


async def _fanout(srv: Running, path: str, n: int, base: tuple[int, int | None], opts) -> dict:
    base_rss, base_redis = base
    await create_streams(srv, [path], "text/plain")
    marker = f"FANOUT-{uuid.uuid4().hex}"
    procs = max(1, min(opts.fanout_procs, n))
    shares = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
    workers = []
    try:
        t_open = time.perf_counter()
        for count in shares:
            workers.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "bench.fanout_client",
                    "--host",
                    srv.host,
                    "--port",
                    str(srv.port),
                    "--path",
                    path,
                    "--count",
                    str(count),
                    "--marker",
                    marker,
                    "--concurrency",
                    str(opts.fanout_concurrency),
                    "--stall-timeout",
                    str(opts.fanout_stall_timeout),
                    preexec_fn=die_with_parent,
                    limit=1 << 24,  # the delivery report lists every reader's time
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    cwd=str(ROOT),
                )
            )
        readies = [
            await _read_json_line(w.stdout, opts.fanout_open_timeout, "ready") for w in workers
        ]
        open_s = time.perf_counter() - t_open
        ready = sum(r["ready"] for r in readies)
        failed = sum(r["failed"] for r in readies)
        stalled = any(r.get("stalled") for r in readies)
        if ready == 0:
            raise RuntimeError("no SSE reader could connect")
        await asyncio.sleep(opts.fanout_settle)
        rss_after = srv.server_rss_kib()
        redis_after = srv.redis_rss_kib()

        # With readers stuck (a server that stopped taking requests) the append
        # may hang as well: give it a short deadline then.
        conn = Conn(srv.host, srv.port, timeout=5.0 if stalled else 30.0)
        t0 = time.monotonic()
        try:
            resp = await conn.request("POST", path, {"Content-Type": "text/plain"}, marker.encode())
        except TimeoutError:
            resp = None
        finally:
            await conn.close()
        post_ms = (time.monotonic() - t0) * 1000
        if resp is not None and resp.status != 204:
            raise RuntimeError(f"fan-out append: {resp.status}")

        async def collect(w) -> dict:
            try:
                return await _read_json_line(w.stdout, opts.fanout_deliver_timeout, "delivery")
            except TimeoutError:
                w.stdin.write(b"report\n")
                await w.stdin.drain()
                return await _read_json_line(w.stdout, 30, "report")

        if resp is None:
            for w in workers:
                w.stdin.write(b"report\n")
            reports = [await _read_json_line(w.stdout, 30, "report") for w in workers]
        else:
            reports = await asyncio.gather(*(collect(w) for w in workers))
        times = [t for r in reports for t in r["times"]]
        lost = sum(r["lost"] for r in reports)
        delays = sorted((t - t0) * 1000 for t in times)
        result = {
            "readers": n,
            "ready": ready,
            "failed_to_open": failed,
            "stalled": stalled,
            "delivered": len(times),
            "lost_connections": lost,
            "open_seconds": open_s,
            "rss_before_kib": base_rss,
            "rss_after_kib": rss_after,
            "kib_per_reader": (rss_after - base_rss) / ready,
            "redis_rss_before_kib": base_redis,
            "redis_rss_after_kib": redis_after,
            "post_ms": post_ms if resp is not None else None,
            "first_ms": delays[0] if delays else None,
            "p50_ms": percentile(delays, 50) if delays else None,
            "p99_ms": percentile(delays, 99) if delays else None,
            "last_ms": delays[-1] if delays else None,
        }
        problems = []
        if ready < n:
            problems.append(
                f"only {ready:,} of {n:,} SSE readers were served"
                + (
                    " (then the server took no new request: the other readers got no answer "
                    f"for {opts.fanout_stall_timeout:g} s and were given up)"
                    if stalled
                    else f" ({failed:,} failed to connect)"
                )
            )
        if resp is None:
            problems.append("the append got no answer within 5 s either")
        elif len(times) < ready:
            problems.append(f"{ready - len(times):,} of {ready:,} readers did not get the append")
        result["complete"] = not problems
        if problems:
            result["warning"] = f"{n:,} readers: " + "; ".join(problems)
        return result
    finally:
        for w in workers:
            if w.returncode is None:
                try:
                    w.stdin.write(b"close\n")
                    await w.stdin.drain()
                    w.stdin.close()
                except (BrokenPipeError, ConnectionResetError):
                    pass
        for w in workers:
            try:
                await asyncio.wait_for(w.wait(), 30)
            except TimeoutError:
                w.kill()
                await w.wait()


async def _sse_warmup(srv: Running, path: str) -> None:
    """One SSE reader gets one append, so first-use costs are not counted per reader."""
    await create_streams(srv, [path], "text/plain")
    reader = Conn(srv.host, srv.port)
    writer = Conn(srv.host, srv.port)
    try:
        await reader.send("GET", f"{path}?offset=now&live=sse", {"Accept": "text/event-stream"})
        status, _ = await reader.read_head()
        if status != 200:
            raise RuntimeError(f"SSE warm-up: status {status}")
        assert reader.reader is not None
        await asyncio.wait_for(reader.reader.readuntil(b"upToDate"), 10)
        await writer.request("POST", path, {"Content-Type": "text/plain"}, b"warm-up")
        await asyncio.wait_for(reader.reader.readuntil(b"warm-up"), 10)
    finally:
        await reader.close()
        await writer.close()


def scenario_d(srv: Running, opts, tag: str) -> tuple[dict, dict]:
    """Each reader count on a freshly started server (and Redis), so the memory
    figures carry neither the heap of the scenarios before nor of a smaller fan-out."""
    values, details = {}, {}
    capped: int | None = None  # readers served when a smaller fan-out already stalled
    for n in sorted(opts.readers):
        if capped is None:
            srv.restart()
            asyncio.run(_sse_warmup(srv, f"{PREFIX}/bench-{tag}/d/warm-up"))
            time.sleep(opts.fanout_settle)
            base = (srv.server_rss_kib(), srv.redis_rss_kib())
        if capped is not None:
            # The server stopped taking requests at fewer readers: more would stall too.
            values[f"d_mem_{n}"] = values[f"d_last_{n}"] = None
            details[f"d_{n}"] = {
                "readers": n,
                "skipped": True,
                "warning": f"{n:,} readers: not run, as the server had stopped taking new "
                f"requests at {capped:,} readers in the smaller fan-out",
            }
            continue
        r = asyncio.run(_fanout(srv, f"{PREFIX}/bench-{tag}/d/{n}", n, base, opts))
        details[f"d_{n}"] = r
        if r.get("stalled"):
            capped = r["ready"]
        if r["complete"]:
            values[f"d_mem_{n}"] = r["kib_per_reader"]
            values[f"d_last_{n}"] = r["last_ms"]
        else:  # no figure for N readers when fewer were served; the details keep what was seen
            values[f"d_mem_{n}"] = values[f"d_last_{n}"] = None
        time.sleep(opts.fanout_settle)  # let the server finish closing the readers
    return values, details


SCENARIOS = {
    "a": scenario_a,
    "b": scenario_b,
    "c": scenario_c,
    "d": scenario_d,
    "e": scenario_e,
}
# Order within one server run: the fan-out last, as closing thousands of
# connections would disturb whatever runs right after it.
RUN_ORDER = ["a", "e", "b", "c", "d"]


def wrk_version() -> str:
    try:
        out = subprocess.run([WRK, "-v"], capture_output=True, text=True, timeout=10)
        return (out.stdout + out.stderr).splitlines()[0].split(" Copyright")[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


__all__ = ["RUN_ORDER", "SCENARIOS", "Measure", "Path", "measures_for", "wrk_version"]
