"""Metrics and the request log, against the real console script over real sockets.

- ``--metrics-port``: every worker's counts add up on the separate port (``--workers
  2``), live-reader gauges follow readers and forget a killed worker's readers,
  the main port has no /metrics unless DS_METRICS=1;
- the request log: one line per request, text or JSON, with the request id taken
  in or made (and returned on every response), credentials never written, live
  reads logged when they end; a stdout nobody reads drops lines (counted, and
  marked in the log) and never stops the gateway.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import h2.events
import httpx
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection

from gateway.servers.native.server import MIN_WORKER_LIFETIME_S
from tests.support.gateway_server import GatewayServer
from tests.support.procs import free_port, stop_process

OCTET = {"Content-Type": "application/octet-stream"}
WAIT_S = 20.0  # generous: metrics are flushed once a second, CI machines are slow


def wait_for(what: str, check: Callable[[], object], timeout: float = WAIT_S) -> object:
    """Poll ``check`` until it returns something truthy; fail with ``what``."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def scrape(url: str) -> dict[str, float]:
    """Samples of a Prometheus text page: 'name{labels}' -> value (labels as sent)."""
    response = httpx.get(url, timeout=5)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, float] = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def sample(samples: dict[str, float], name: str, **labels: str) -> float:
    """The value of one sample, its labels in any order (0 when absent)."""
    wanted = {f'{key}="{value}"' for key, value in labels.items()}
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base == name and set(filter(None, rest.rstrip("}").split(","))) == wanted:
            return value
    return 0.0


def log_lines(gw: GatewayServer) -> list[str]:
    return Path(gw.log_path).read_text(errors="replace").splitlines()


def request_lines(gw: GatewayServer) -> list[str]:
    return [line for line in log_lines(gw) if " request_id=" in line]


@pytest.fixture(scope="module")
def workers2(redis_url: str) -> Iterator[tuple[GatewayServer, str]]:
    port = free_port()
    with GatewayServer(
        redis_url=redis_url,
        server="console-script",
        args=["--workers", "2", "--metrics-port", str(port)],
        env={"DS_LONG_POLL_TIMEOUT_MS": "20000"},
    ) as gw:
        yield gw, f"http://127.0.0.1:{port}/metrics"


def test_counts_of_both_workers_add_up_on_the_metrics_port(
    workers2: tuple[GatewayServer, str],
) -> None:
    gw, metrics_url = workers2
    path = f"/v1/stream/metrics-{uuid.uuid4().hex}"
    assert httpx.put(gw.url + path, headers=OCTET).status_code == 201
    before = sample(
        scrape(metrics_url), "durable_streams_requests_total", operation="append", status="204"
    )
    # Each append on a new connection, until both workers have answered some
    # (the request ids of one process share a prefix).
    prefixes: set[str] = set()
    appended = 0
    while appended < 400 and (len(prefixes) < 2 or appended < 20):
        response = httpx.post(gw.url + path, content=b"x" * 100, headers=OCTET)
        assert response.status_code == 204
        prefixes.add(response.headers["x-request-id"].rsplit("-", 1)[0])
        appended += 1
    assert len(prefixes) == 2, "one worker answered all 400 appends"

    def counted() -> float:
        samples = scrape(metrics_url)
        value = sample(samples, "durable_streams_requests_total", operation="append", status="204")
        return value - before == appended and value

    wait_for(f"{appended} appends counted", counted)
    samples = scrape(metrics_url)
    assert (
        sample(samples, "durable_streams_request_duration_seconds_count", operation="append")
        >= appended
    )
    assert sample(samples, "durable_streams_received_bytes_total", operation="append") >= (
        100 * appended
    )
    assert sample(samples, "durable_streams_group_commit_batch_appends_count") >= appended / 64
    assert sample(samples, "durable_streams_redis_command_duration_seconds_count") > 0
    # Not on the main port unless DS_METRICS=1 says so.
    assert httpx.get(gw.url + "/metrics").status_code == 404


def test_live_reader_gauge_follows_readers_and_forgets_a_killed_worker(
    workers2: tuple[GatewayServer, str],
) -> None:
    gw, metrics_url = workers2
    path = f"/v1/stream/metrics-{uuid.uuid4().hex}"
    created = httpx.put(gw.url + path, headers=OCTET)
    offset = created.headers["stream-next-offset"]
    with (
        httpx.Client(timeout=30) as client,
        client.stream("GET", f"{gw.url}{path}?offset={offset}&live=sse") as sse,
    ):
        assert sse.status_code == 200
        wait_for(
            "one SSE reader",
            lambda: sample(scrape(metrics_url), "durable_streams_live_readers", mode="sse") == 1,
        )
        # The worker holding the reader dies without a word: its gauge goes.
        workers = _children(gw.pid)
        assert len(workers) == 2
        holder = [pid for pid in workers if _holds_connection_from(pid, sse)]
        assert len(holder) == 1, "cannot tell which worker holds the reader"
        # (A worker that dies young stops the supervisor instead: wait until it is not.)
        wait_for(
            "the worker to outlive its start-up window",
            lambda: _age_s(holder[0]) > MIN_WORKER_LIFETIME_S + 0.5,
        )
        os.kill(holder[0], signal.SIGKILL)
        wait_for(
            "the killed worker's reader forgotten",
            lambda: sample(scrape(metrics_url), "durable_streams_live_readers", mode="sse") == 0,
        )
    # The supervisor started another worker; both serve again.
    wait_for("a new worker", lambda: len(_children(gw.pid)) == 2)


def _children(pid: int | None) -> list[int]:
    assert pid is not None
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        found += [int(child) for child in children]
    return [child for child in found if _is_worker(child)]


def _age_s(pid: int) -> float:
    started_ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime_s = float(Path("/proc/uptime").read_text().split()[0])
    return uptime_s - started_ticks / os.sysconf("SC_CLK_TCK")


def _is_worker(pid: int) -> bool:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    return b"serve_metrics" not in command


def _holds_connection_from(pid: int, response: httpx.Response) -> bool:
    """Whether process ``pid`` has the server side of ``response``'s connection open."""
    stream = response.extensions["network_stream"]
    local_port = stream.get_extra_info("client_addr")[1]
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:
            continue
        match = re.fullmatch(r"socket:\[(\d+)\]", target)
        if match:
            inodes.add(match.group(1))
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port = int(fields[2].split(":")[1], 16)
        if remote_port == local_port and fields[9] in inodes:
            return True
    return False


def _exporter_of(pid: int | None) -> int:
    assert pid is not None
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in map(int, (task / "children").read_text().split()):
            if not _is_worker(child):
                return child
    raise AssertionError("no metrics exporter process")


def test_the_metrics_port_outlasts_clients_that_connect_and_send_nothing(
    workers2: tuple[GatewayServer, str],
) -> None:
    """Each such client used to hold a thread of the exporter for ever: a
    flood of them grew it without bound. Now it holds at most
    METRICS_CONNECTIONS_MAX at once, each for METRICS_IO_TIMEOUT_S."""
    from gateway.cli import METRICS_CONNECTIONS_MAX, METRICS_IO_TIMEOUT_S

    gw, metrics_url = workers2
    exporter = _exporter_of(gw.proc.pid if gw.proc else None)
    port = int(urllib.parse.urlsplit(metrics_url).port or 0)
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(500)]
    try:
        time.sleep(0.5)
        threads = len(list(Path(f"/proc/{exporter}/task").iterdir()))
        assert threads <= METRICS_CONNECTIONS_MAX + 4, threads
        # The oldest of them are closed once they have waited too long.
        idle[0].settimeout(METRICS_IO_TIMEOUT_S + 10)
        started = time.monotonic()
        assert idle[0].recv(1) == b""
        assert time.monotonic() - started < METRICS_IO_TIMEOUT_S + 5
    finally:
        for sock in idle:
            sock.close()

    # Scrapes are answered again as soon as the flood has gone.
    def scraped() -> bool:
        try:
            return bool(scrape(metrics_url))
        except httpx.HTTPError:
            return False  # (refused while the slots were still taken)

    wait_for("a scrape", scraped)
    assert "[ERROR]" not in Path(gw.log_path).read_text()


@pytest.mark.parametrize(
    ("env", "args", "reason"),
    [
        ({"REDIS_SENTINELS": "sentinel-0"}, [], "REDIS_SENTINELS: expected host:port"),
        ({"REDIS_SENTINELS": "s:26379,s:99999"}, [], "REDIS_SENTINELS: expected host:port"),
        ({"DS_METRICS_PORT": "99999"}, [], "DS_METRICS_PORT must be <= 65535"),
        ({}, ["--metrics-port", "70000"], "--metrics-port: must be a port number"),
        ({}, ["--port", "-1"], "--port: must be a port number"),
        ({"DS_INSTANCE_ID": "pod 7"}, [], "DS_INSTANCE_ID must be 1-64 letters"),
    ],
    ids=[
        "sentinel-no-port",
        "sentinel-port",
        "metrics-port-env",
        "metrics-port",
        "port",
        "instance",
    ],
)
def test_a_malformed_setting_stops_the_start_with_its_reason(
    tmp_path: Path, env: dict[str, str], args: list[str], reason: str
) -> None:
    """Refused before anything starts, not by a worker's traceback later."""
    script = Path(sys.executable).parent / "durable-streams-gateway"
    done = subprocess.run(
        [str(script), "--host", "127.0.0.1", "--port", str(free_port()), *args],
        env={**os.environ, "DS_DATA_DIR": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert reason in done.stderr
    assert "Traceback" not in done.stderr


def test_metrics_on_the_main_port_with_ds_metrics(redis_url: str) -> None:
    with GatewayServer(redis_url=redis_url, env={"DS_METRICS": "1"}) as gw:
        path = f"/v1/stream/metrics-{uuid.uuid4().hex}"
        httpx.put(gw.url + path, headers=OCTET)
        httpx.get(f"{gw.url}{path}?offset=-1")
        samples = scrape(gw.url + "/metrics")
        assert (
            sample(samples, "durable_streams_requests_total", operation="create", status="201") == 1
        )
        assert (
            sample(samples, "durable_streams_requests_total", operation="read", status="200") == 1
        )


@pytest.fixture(scope="module")
def text_log(redis_url: str) -> Iterator[GatewayServer]:
    with GatewayServer(
        redis_url=redis_url,
        server="console-script",
        env={"DS_INSTANCE_ID": "replica-7", "DS_LONG_POLL_TIMEOUT_MS": "600"},
    ) as gw:
        yield gw


def test_one_text_line_per_request_with_the_request_id_taken_in(text_log: GatewayServer) -> None:
    gw = text_log
    path = f"/v1/stream/log-{uuid.uuid4().hex}"
    response = httpx.put(gw.url + path, headers={**OCTET, "X-Request-Id": "trace-42.a:b"})
    assert response.headers["x-request-id"] == "trace-42.a:b"
    line = wait_for(
        "the request's log line",
        lambda: [line for line in request_lines(gw) if "request_id=trace-42.a:b" in line],
    )
    assert len(line) == 1
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z instance=replica-7 request_id=trace-42\.a:b "
        rf'method=PUT path="{re.escape(path)}" status=201 received_bytes=0 sent_bytes=0 '
        r"duration_us=\d+",
        line[0],
    ), line[0]


@pytest.mark.parametrize(
    "server, http2",
    [
        ("hypercorn", False),
        ("console-script", False),
        ("console-script", True),
        ("console-script-rsgi", False),
        ("console-script-asgi", False),
    ],
    ids=["hypercorn", "native-http1", "native-http2", "granian-rsgi", "granian-asgi"],
)
def test_every_server_returns_the_request_id_and_logs_what_it_sent(
    redis_url: str, server: str, http2: bool
) -> None:
    """Each server adds the request id to its responses and notes the status and
    body bytes it sent (gateway/web/request.py's Response): a whole response, a
    HEAD, and an SSE stream, whose bytes are counted chunk by chunk."""
    with (
        GatewayServer(redis_url=redis_url, server=server, env={"DS_ACCESS_LOG": "1"}) as gw,
        httpx.Client(http1=not http2, http2=http2, timeout=10) as http,
    ):
        path = f"/v1/stream/log-{uuid.uuid4().hex}"
        body = b"0123456789" * 7
        tag = uuid.uuid4().hex[:8]
        created = http.put(gw.url + path, headers={**OCTET, "X-Request-Id": f"{tag}-put"})
        assert created.headers["x-request-id"] == f"{tag}-put"
        appended = http.post(
            gw.url + path, content=body, headers={**OCTET, "X-Request-Id": f"{tag}-post"}
        )
        assert appended.status_code == 204
        http.post(gw.url + path, headers={**OCTET, "Stream-Closed": "true"})
        read = http.get(f"{gw.url}{path}?offset=-1", headers={"X-Request-Id": f"{tag}-get"})
        assert read.headers["x-request-id"] == f"{tag}-get" and read.content == body
        head = http.head(gw.url + path, headers={"X-Request-Id": f"{tag}-head"})
        assert head.headers["x-request-id"] == f"{tag}-head"
        with http.stream(
            "GET", f"{gw.url}{path}?offset=-1&live=sse", headers={"X-Request-Id": f"{tag}-sse"}
        ) as sse:
            assert sse.headers["x-request-id"] == f"{tag}-sse"
            streamed = b"".join(sse.iter_raw())  # the stream is closed: the SSE ends
        made = http.get(gw.url + "/healthz").headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{12}-\d+", made)

        def line_of(request_id: str) -> str:
            lines = wait_for(
                f"the log line of {request_id}",
                lambda: [line for line in request_lines(gw) if f"request_id={request_id} " in line],
            )
            assert isinstance(lines, list) and len(lines) == 1, lines
            return str(lines[0])

        def fields(line: str) -> dict[str, str]:
            return dict(re.findall(r"(status|received_bytes|sent_bytes)=(\d+)", line))

        assert fields(line_of(f"{tag}-put"))["status"] == "201"
        assert fields(line_of(f"{tag}-post")) == {
            "status": "204",
            "received_bytes": str(len(body)),
            "sent_bytes": "0",
        }
        assert fields(line_of(f"{tag}-get")) == {
            "status": "200",
            "received_bytes": "0",
            "sent_bytes": str(len(body)),
        }
        assert fields(line_of(f"{tag}-head"))["sent_bytes"] == "0"
        sse_line = fields(line_of(f"{tag}-sse"))
        assert sse_line["status"] == "200"
        assert int(sse_line["sent_bytes"]) == len(streamed) > len(body)
        assert fields(line_of(made))["status"] == "200"


def test_a_bad_request_id_is_replaced_and_errors_carry_one_too(text_log: GatewayServer) -> None:
    gw = text_log
    for bad in ("x" * 129, "two words", 'quote"d', "new\tline"):
        response = httpx.get(
            f"{gw.url}/v1/stream/missing-{uuid.uuid4().hex}", headers={"X-Request-Id": bad}
        )
        assert response.status_code == 404
        made = response.headers["x-request-id"]
        assert made != bad and re.fullmatch(r"[0-9a-f]{12}-[0-9a-f]+", made)
    assert httpx.get(gw.url + "/healthz").headers["x-request-id"]


def test_tokens_are_never_logged(text_log: GatewayServer) -> None:
    gw = text_log
    secret = uuid.uuid4().hex
    path = f"/v1/stream/log-{uuid.uuid4().hex}"
    httpx.put(gw.url + path, headers=OCTET)
    response = httpx.get(
        f"{gw.url}{path}?offset=-1&token={secret}&signature={secret}x&Access_Token={secret}y"
        f"&%74oken={secret}w&si%67={secret}v",  # (names the gateway reads decoded)
        headers={"Authorization": f"Bearer {secret}z", "X-Request-Id": "redaction"},
    )
    assert response.status_code == 200
    line = wait_for(
        "the request's log line",
        lambda: [line for line in request_lines(gw) if "request_id=redaction" in line],
    )
    assert (
        'path="' + path + "?offset=-1&token=REDACTED&signature=REDACTED&Access_Token=REDACTED"
        "&%74oken=REDACTED&si%67=REDACTED"
    ) in line[0]
    assert secret not in Path(gw.log_path).read_text()


def test_the_longest_url_logs_one_line_a_pipe_keeps_whole(text_log: GatewayServer) -> None:
    """Lines of at most PIPE_BUF bytes: workers sharing a pipe never interleave them."""
    gw = text_log
    secret = uuid.uuid4().hex
    path = f"/v1/stream/log-{uuid.uuid4().hex}/" + "%C3%A9" * 1500  # 'é' x 1,500
    query = f"offset=-1&token={secret}&" + "x=%01&" * 500
    response = httpx.get(f"{gw.url}{path}?{query}", headers={"X-Request-Id": "long-" + "u" * 120})
    assert response.status_code == 404
    line = wait_for(
        "the request's log line",
        lambda: [line for line in request_lines(gw) if "request_id=long-" in line],
    )
    assert len(line) == 1
    assert len(line[0].encode()) + 1 <= select.PIPE_BUF  # (with its newline)
    assert re.search(
        r'path="/v1/stream/log-[0-9a-f]+/é+\.\.\.\(\d+ characters\)" status=404 ', line[0]
    )
    assert secret not in Path(gw.log_path).read_text()


@pytest.mark.parametrize("server", ["hypercorn", "console-script-rsgi"])
def test_any_method_a_server_lets_through_logs_a_line_a_pipe_keeps_whole(
    redis_url: str, server: str
) -> None:
    """hypercorn and granian pass any token as a method to the gateway (a 405)."""
    with GatewayServer(redis_url=redis_url, server=server, env={"DS_ACCESS_LOG": "1"}) as gw:
        parsed = urllib.parse.urlsplit(gw.url)
        with socket.create_connection((parsed.hostname, parsed.port), timeout=10) as sock:
            sock.sendall(
                b"M" * 5000 + b" /v1/stream/x HTTP/1.1\r\nHost: x\r\n"
                b"X-Request-Id: long-method\r\nContent-Length: 0\r\n\r\n"
            )
            answer = b""
            while b"\r\n" not in answer and (chunk := sock.recv(100)):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 405"), answer
        line = wait_for(
            "the request's log line",
            lambda: [line for line in request_lines(gw) if "request_id=long-method " in line],
        )
        assert len(line[0].encode()) + 1 <= select.PIPE_BUF
        assert f" method={'M' * 32}... path=" in line[0]


def _h2_status_declaring(url: str, path: str, declared: str) -> int:
    """An HTTP/2 POST (prior knowledge) whose headers declare ``declared`` as
    its length, without a body: the response's status."""
    parsed = urllib.parse.urlsplit(url)
    with socket.create_connection((parsed.hostname, parsed.port), timeout=10) as sock:
        conn = H2Connection(H2Configuration(client_side=True))
        conn.initiate_connection()
        headers = [
            (":method", "POST"),
            (":path", path),
            (":scheme", "http"),
            (":authority", parsed.netloc),
            ("content-type", "application/octet-stream"),
            ("content-length", declared),
        ]
        conn.send_headers(1, headers)
        sock.sendall(conn.data_to_send())
        while True:
            data = sock.recv(65536)
            assert data, "the connection closed before a response"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    return int(dict(event.headers)[b":status"])
            sock.sendall(conn.data_to_send())


def test_a_made_up_content_length_breaks_neither_metrics_nor_the_log(redis_url: str) -> None:
    """HTTP/2 lets a declared length of hundreds of digits through to a 413;
    counted as it was, it made every later metrics flush fail (an overflow in
    prometheus_client), and its line outgrew what a pipe keeps whole."""
    with GatewayServer(redis_url=redis_url, server="console-script", env={"DS_METRICS": "1"}) as gw:
        path = f"/v1/stream/length-{uuid.uuid4().hex}"
        httpx.put(gw.url + path, headers=OCTET)
        assert _h2_status_declaring(gw.url, path, "9" * 400) == 413
        assert httpx.post(gw.url + path, content=b"12345", headers=OCTET).status_code == 204

        def received() -> bool:
            samples = scrape(gw.url + "/metrics")
            return sample(samples, "durable_streams_received_bytes_total", operation="append") == 5

        wait_for("the append's 5 bytes counted", received)
        refused = [line for line in request_lines(gw) if "status=413" in line]
        assert len(refused) == 1
        assert " received_bytes=0 " in refused[0]
        log = Path(gw.log_path).read_text()
        assert "[ERROR]" not in log and "Traceback" not in log, log[-3000:]


def test_a_long_poll_is_logged_when_it_ends(text_log: GatewayServer) -> None:
    gw = text_log
    path = f"/v1/stream/log-{uuid.uuid4().hex}"
    offset = httpx.put(gw.url + path, headers=OCTET).headers["stream-next-offset"]
    response = httpx.get(
        f"{gw.url}{path}?offset={offset}&live=long-poll",
        headers={"X-Request-Id": "waiting"},
        timeout=30,
    )
    assert response.status_code == 204  # the 600 ms timeout
    line = wait_for(
        "the long-poll's log line",
        lambda: [line for line in request_lines(gw) if "request_id=waiting" in line],
    )
    duration_us = int(re.search(r"duration_us=(\d+)", line[0]).group(1))  # type: ignore[union-attr]
    assert 500_000 <= duration_us < 30_000_000
    assert "status=204" in line[0]


def test_json_lines(redis_url: str) -> None:
    with GatewayServer(
        redis_url=redis_url, server="console-script", env={"DS_LOG_FORMAT": "json"}
    ) as gw:
        path = f"/v1/stream/log-{uuid.uuid4().hex}"
        httpx.put(gw.url + path, headers=OCTET)
        httpx.post(
            gw.url + path + "?token=hush", content=b"12345", headers={**OCTET, "X-Request-Id": "j1"}
        )

        def entry() -> dict[str, object] | None:
            for line in log_lines(gw):
                if line.startswith("{") and '"j1"' in line:
                    return json.loads(line)
            return None

        logged = wait_for("the JSON line", entry)
        assert isinstance(logged, dict)
        assert logged["request_id"] == "j1"
        assert logged["method"] == "POST"
        assert logged["path"] == path
        assert logged["query"] == "token=REDACTED"
        assert logged["status"] == 204
        assert logged["received_bytes"] == 5
        assert logged["instance"]
        assert isinstance(logged["duration_us"], int)


def test_no_access_log(redis_url: str) -> None:
    with GatewayServer(
        redis_url=redis_url, server="console-script", args=["--no-access-log"]
    ) as gw:
        response = httpx.get(gw.url + "/healthz")
        assert response.status_code == 200
        assert "x-request-id" not in response.headers
        gw.stop()
        assert request_lines(gw) == []


def test_auth_refusals_are_counted_and_their_tokens_not_logged(redis_url: str) -> None:
    secret = "s" * 40
    with GatewayServer(
        redis_url=redis_url,
        server="console-script",
        env={"DS_METRICS": "1", "DS_AUTH": "jwt", "DS_JWT_SECRET": secret},
    ) as gw:
        url = f"{gw.url}/v1/stream/private-{uuid.uuid4().hex}"
        bad_token = "not.a." + uuid.uuid4().hex
        assert httpx.get(url).status_code == 401
        assert httpx.get(f"{url}?offset=-1&token={bad_token}").status_code == 401
        samples = scrape(gw.url + "/metrics")
        assert (
            sample(
                samples, "durable_streams_auth_refusals_total", status="401", reason="Unauthorized"
            )
            == 2
        )
        assert (
            sample(samples, "durable_streams_requests_total", operation="read", status="401") == 2
        )
        wait_for(
            "both log lines",
            lambda: len([line for line in request_lines(gw) if "status=401" in line]) == 2,
        )
        assert bad_token not in Path(gw.log_path).read_text()


def test_redis_failures_are_counted_by_type(redis_url: str) -> None:
    # Nothing listens on this port: every stream request is a fast 503.
    with GatewayServer(
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        env={"DS_METRICS": "1", "DS_REDIS_CONNECT_TIMEOUT_MS": "200"},
    ) as gw:
        url = f"{gw.url}/v1/stream/unreachable-{uuid.uuid4().hex}"
        for _ in range(3):
            assert httpx.get(f"{url}?offset=-1", timeout=10).status_code == 503
        samples = scrape(gw.url + "/metrics")
        assert sample(samples, "durable_streams_redis_errors_total", error="ConnectionError") >= 3
        assert (
            sample(samples, "durable_streams_requests_total", operation="read", status="503") == 3
        )


def unread_gateway(
    redis_url: str, options: list[str], stderr: int = subprocess.DEVNULL
) -> tuple[subprocess.Popen[bytes], str]:
    """The console script with its stdout a pipe this test does not read (yet)."""
    port = free_port()
    script = os.path.join(os.path.dirname(sys.executable), "durable-streams-gateway")
    proc = subprocess.Popen(
        [script, "--host", "127.0.0.1", "--port", str(port), *options],
        # 64 KiB of lines held (the least): ~400 KB of lines overflow it.
        env={**os.environ, "REDIS_URL": redis_url, "DS_ACCESS_LOG_BUFFER_BYTES": "65536"},
        stdout=subprocess.PIPE,
        stderr=stderr,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("the gateway", lambda: _healthy(url))
    except BaseException:
        stop_process(proc)
        raise
    return proc, url


def fill_the_pipe(url: str, appends: int = 3000) -> int:
    """``appends`` appends, each answered: ~400 KB of log lines, six times what
    a pipe holds."""
    stream = f"{url}/v1/stream/unread-log-{uuid.uuid4().hex}"
    with httpx.Client(timeout=10) as client:
        assert client.put(stream, headers=OCTET).status_code == 201
        for number in range(appends):
            response = client.post(stream, content=b"%d," % number, headers=OCTET)
            assert response.status_code == 204, (number, response.text)
        assert client.get(stream + "?offset=-1").content.count(b",") == appends
    return appends


def test_a_stdout_nobody_reads_never_stalls_the_gateway(redis_url: str) -> None:
    """The request log goes to a pipe whose reader never reads: the pipe fills
    after a few hundred lines (before, the worker then stopped answering). The
    gateway keeps answering, counts what it drops, and once the pipe is read the
    log says where lines are missing."""
    metrics_port = free_port()
    proc, url = unread_gateway(
        redis_url, ["--metrics-port", str(metrics_port), "--log-level", "warning"]
    )
    try:
        appends = fill_the_pipe(url)
        dropped = wait_for(
            "dropped lines counted",
            lambda: sample(
                scrape(f"http://127.0.0.1:{metrics_port}/metrics"),
                "durable_streams_request_log_dropped_lines_total",
            ),
        )
        assert isinstance(dropped, float) and dropped > 0

        # Now read: the lines that were kept, a notice at each gap, and what
        # comes after (the requests above plus the scrapes and health checks).
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        httpx.get(url + "/healthz?after=1", timeout=10)
        out = b""

        def read_until_after() -> bool:
            nonlocal out
            chunk = proc.stdout.read() if proc.stdout is not None else None
            out += chunk or b""
            return b"after=1" in out

        wait_for("the log to resume", read_until_after)
        lines = out.decode().splitlines()
        notices = [line for line in lines if line.startswith("request log: ")]
        assert notices, lines[-5:]
        assert sum(int(line.split()[2]) for line in notices) == dropped
        appended = [line for line in lines if "method=POST" in line]
        assert 0 < len(appended) < appends
        assert len(appended) + dropped >= appends
    finally:
        code = stop_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()
    assert code == 0


def test_stdout_and_stderr_on_one_pipe_nobody_reads_never_stall_the_gateway(
    redis_url: str,
) -> None:
    """``2>&1`` into a pipe nobody reads (a stalled log shipper). The request
    log fills the pipe; then clients send HTTP/2 garbage, each connection
    logged (at debug level here) on stderr. Before, the first message that
    did not fit blocked the worker for good: no request was answered any more.
    Now the gateway's messages are dropped like request-log lines, every
    client gets its answer, and the gateway stops within seconds."""
    proc, url = unread_gateway(redis_url, ["--log-level", "debug"], stderr=subprocess.STDOUT)
    port = int(url.rsplit(":", 1)[1])
    try:
        fill_the_pipe(url)
        # ~150 KB of stderr lines, one per connection: a DATA frame on stream 0.
        garbage = H2_PREFACE + b"\x00\x00\x03\x00\x00\x00\x00\x00\x00abc"
        for number in range(1500):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(garbage)
                answer = b""
                while chunk := sock.recv(4096):  # SETTINGS, GOAWAY, then closed
                    answer += chunk
                assert answer, number
        assert _healthy(url)
        started = time.monotonic()
        code = stop_process(proc, timeout=20)
        took = time.monotonic() - started
    finally:
        stop_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()
    assert code == 0, f"exit code {code} after {took:.1f} s"
    assert took < 15


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
