"""HTTP/2 clients that abuse the console script's server (gateway/http2.py),
over real loopback sockets against the real gateway and a real Redis.

Each attack runs beside a well-behaved client on another connection (a
``LatencyProbe``), which must be answered in under a second throughout; the
attack itself must be bounded (a GOAWAY with ENHANCE_YOUR_CALM, a disconnect
after the write timeout, memory within a budget); and no client's misbehaviour
may put an ERROR line or a traceback in the gateway's log.

Classes of abuse: rapid reset (CVE-2023-44487), responses the client never
takes (a zero flow-control window, or a socket it never reads), and floods of
control frames (PING, SETTINGS, WINDOW_UPDATE, empty DATA, HEADERS).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
import redis
from hyperframe.frame import DataFrame, HeadersFrame, RstStreamFrame
from support.gateway_server import GatewayServer
from support.h2_raw import (
    CANCEL,
    ENHANCE_YOUR_CALM,
    MAX_WINDOW,
    NO_ERROR,
    LatencyProbe,
    RawH2,
    rss_kib,
    server_holds,
)

pytestmark = pytest.mark.timeout(90)

KEEP_ALIVE_S = 2.0  # --keep-alive-timeout
READ_TIMEOUT_S = 3.0  # --read-timeout: also how long a response may stay unread
SWEEP_S = 1.0  # the server checks deadlines once a second
WORST_LATENCY_S = 1.0  # the well-behaved client's bound
INITIAL_WINDOW_SIZE = 0x4  # SETTINGS identifier

ARGS = ["--keep-alive-timeout", f"{KEEP_ALIVE_S:g}", "--read-timeout", f"{READ_TIMEOUT_S:g}"]
ENV = {"DS_LONG_POLL_TIMEOUT_MS": "20000", "DS_MAX_READ_BYTES": str(1024 * 1024)}


@pytest.fixture(scope="module")
def gw(redis_url: str) -> Iterator[GatewayServer]:
    with GatewayServer(redis_url=redis_url, env=ENV, server="console-script", args=ARGS) as server:
        yield server


@pytest.fixture
def fresh_gw(redis_url: str) -> Iterator[GatewayServer]:
    """A gateway of its own, for a test that measures the worker's memory."""
    with GatewayServer(redis_url=redis_url, env=ENV, server="console-script", args=ARGS) as server:
        yield server


@pytest.fixture(autouse=True)
def clean_logs(request: pytest.FixtureRequest) -> Iterator[None]:
    """Whatever a test sends, the gateways it used log no traceback and no error."""
    servers = [
        request.getfixturevalue(name) for name in ("gw", "fresh_gw") if name in request.fixturenames
    ]
    marks = [os.path.getsize(server.log_path) for server in servers]
    yield
    for server, mark in zip(servers, marks, strict=True):
        with open(server.log_path, "rb") as log:
            log.seek(mark)
            new = log.read().decode("utf-8", "replace")
        assert "Traceback" not in new and "[ERROR]" not in new, new[-4000:]


def create(server: GatewayServer, body: bytes = b"probe") -> str:
    """A new stream holding ``body``; returns its path."""
    path = f"/v1/stream/abuse-{time.monotonic_ns()}"
    response = httpx.put(
        f"{server.url}{path}", content=body, headers={"content-type": "text/plain"}, timeout=10
    )
    assert response.status_code == 201, response.text
    return path


def probe_for(server: GatewayServer) -> LatencyProbe:
    return LatencyProbe(f"{server.url}{create(server)}?offset=-1")


def assert_served(probe: LatencyProbe) -> None:
    assert not probe.failures, probe.failures[:5]
    assert probe.worst_s < WORST_LATENCY_S, probe.worst_s


# -- 1. rapid reset --------------------------------------------------------------------


def test_rapid_reset_flood_gets_goaway_enhance_your_calm(gw: GatewayServer) -> None:
    """HEADERS + RST_STREAM pairs: every reset stream frees its slot at once in
    h2's count, so only a budget of resets per connection stops the flood."""
    path = create(gw) + "?offset=-1"
    pairs = 0
    with probe_for(gw) as probe, RawH2(gw.port) as attacker:
        goaway = None
        while pairs < 20_000 and goaway is None:
            batch = []
            for _ in range(100):
                stream_id = attacker.next_stream_id
                batch.append(attacker.headers_frame(path) + RawH2.rst_frame(stream_id))
            if not attacker.send(b"".join(batch)):
                break
            pairs += 100
            goaway = attacker.goaway(0)
        if goaway is None:
            goaway = attacker.goaway(5)
    print(f"rapid reset: {pairs} pairs sent, GOAWAY {goaway}, probe worst {probe.worst_s:.3f}s")
    assert goaway is not None, f"no GOAWAY after {pairs} reset streams"
    assert goaway.error_code == ENHANCE_YOUR_CALM
    assert pairs <= 5_000, pairs
    assert_served(probe)


def test_reset_long_polls_end_at_once(gw: GatewayServer) -> None:
    """Long-polls the client resets stop waiting at once: the connection is
    then idle, and closes after the keep-alive timeout rather than after the
    long-poll timeout (20 s here)."""
    path = create(gw) + "?offset=now&live=long-poll"
    channel_hint = path.split("?")[0].rsplit("/", 1)[1]
    with RawH2(gw.port) as client:
        ids = [client.request(path) for _ in range(50)]
        # The long-polls wait once the stream's wake channel is subscribed.
        deadline = time.monotonic() + 10
        with redis.Redis.from_url(gw.redis_url) as check:
            while not check.pubsub_channels(f"*{channel_hint}*"):
                assert time.monotonic() < deadline, "the long-polls never started waiting"
                time.sleep(0.02)
        time.sleep(0.2)  # the last of the 50 joins the same watch
        assert client.send(b"".join(RawH2.rst_frame(stream_id) for stream_id in ids))
        reset_at = time.monotonic()
        goaway = client.goaway(KEEP_ALIVE_S + 5)
        took = time.monotonic() - reset_at
        print(f"reset long-polls: GOAWAY {goaway} after {took:.2f}s")
    assert goaway is not None and goaway.error_code == NO_ERROR
    assert took < KEEP_ALIVE_S + 1.5, took


# -- 2. unread responses ---------------------------------------------------------------


@pytest.mark.parametrize("attack", ["zero-window", "unread-socket"])
def test_unread_responses_cost_bounded_memory_and_time_out(
    fresh_gw: GatewayServer, attack: str
) -> None:
    """1,000 requests for a 512 KiB stream on one connection, none of whose
    responses the client takes: the worker holds under 50 MB for them, and
    drops the connection once the write timeout has passed."""
    path = create(fresh_gw, os.urandom(512 * 1024)) + "?offset=-1"
    settings = {INITIAL_WINDOW_SIZE: 0 if attack == "zero-window" else MAX_WINDOW}
    rcvbuf = 16384 if attack == "unread-socket" else None
    before = rss_kib(fresh_gw.pid)
    peak = before
    with (
        probe_for(fresh_gw) as probe,
        RawH2(fresh_gw.port, settings=settings, rcvbuf=rcvbuf) as attacker,
    ):
        if attack == "unread-socket":
            attacker.send(RawH2.window_update_frame(0, MAX_WINDOW - 65535))
        client_port = attacker.sock.getsockname()[1]
        assert attacker.send(b"".join(attacker.headers_frame(path) for _ in range(1000)))
        sent_at = time.monotonic()
        while time.monotonic() - sent_at < READ_TIMEOUT_S + SWEEP_S + 5:
            peak = max(peak, rss_kib(fresh_gw.pid))
            if not server_holds(fresh_gw.port, client_port):
                break
            if attack == "zero-window":
                for _ in attacker.frames(0.05):
                    pass  # HEADERS of responses whose DATA cannot come
            else:
                time.sleep(0.05)
        released = time.monotonic() - sent_at
        assert not server_holds(fresh_gw.port, client_port), "never disconnected"
    print(
        f"{attack}: RSS {before} -> peak {peak} KiB (+{(peak - before) / 1024:.1f} MiB), "
        f"released after {released:.2f}s, probe worst {probe.worst_s:.3f}s"
    )
    assert (peak - before) < 50 * 1024, (before, peak)
    assert released > READ_TIMEOUT_S - 0.5, released
    assert_served(probe)


def test_a_held_back_stream_the_client_resets_no_longer_counts(gw: GatewayServer) -> None:
    """The write timeout is for data held back: once the client resets the
    only stream it does not take, its connection lives on (here a long-poll
    keeps it from being idle)."""
    big = create(gw, os.urandom(256 * 1024))
    poll = create(gw) + "?offset=now&live=long-poll"
    with RawH2(gw.port, settings={INITIAL_WINDOW_SIZE: 0}) as client:
        client_port = client.sock.getsockname()[1]
        client.request(poll)
        held_back = client.request(big + "?offset=-1")
        response_headers = [
            frame
            for frame in client.frames(2)
            if frame.stream_id == held_back and isinstance(frame, HeadersFrame)
        ]
        assert response_headers, "no response to the request held back"
        assert client.send(RawH2.rst_frame(held_back))
        for _ in client.frames(READ_TIMEOUT_S + SWEEP_S + 1.5):
            pass
        assert not client.closed and server_holds(gw.port, client_port)


def test_a_request_body_that_stops_coming_is_reset_after_the_read_timeout(
    gw: GatewayServer,
) -> None:
    """As on HTTP/1.1, a client gets --read-timeout between bytes of its
    request: a stalled body is reset (CANCEL), its connection serves on."""
    path = create(gw)
    with RawH2(gw.port) as client:
        frame = HeadersFrame(client.next_stream_id)
        stalled = client.next_stream_id
        client.next_stream_id += 2
        frame.data = client.encoder.encode(
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":authority", "127.0.0.1"),
                (":path", path),
                ("content-type", "text/plain"),
                ("content-length", "10"),
            ]
        )
        frame.flags.add("END_HEADERS")
        assert client.send(frame.serialize() + RawH2.data_frame(stalled, b"12345"))
        sent_at = time.monotonic()
        reset = None
        for received in client.frames(READ_TIMEOUT_S + SWEEP_S + 3):
            if isinstance(received, RstStreamFrame) and received.stream_id == stalled:
                reset = received
                break
        took = time.monotonic() - sent_at
        assert reset is not None and reset.error_code == CANCEL, reset
        assert READ_TIMEOUT_S - 0.5 < took < READ_TIMEOUT_S + SWEEP_S + 1, took
        served = client.request(path + "?offset=-1")
        answered = False
        for received in client.frames(5):
            if received.stream_id == served and "END_STREAM" in received.flags:
                answered = True
                break
        assert answered, "the connection no longer serves"


def test_frames_split_at_every_byte_are_served(gw: GatewayServer) -> None:
    """Frames are handed to h2 whole or in pieces as they arrive: a client
    whose every byte comes in a read of its own is served like any other."""
    path = create(gw, b"one byte at a time")
    with RawH2(gw.port) as client:
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream_id = client.next_stream_id
        data = client.headers_frame(path + "?offset=-1") + RawH2.ping_frame(7)
        for index in range(len(data)):
            assert client.send(data[index : index + 1])
            time.sleep(0.002)
        body = b""
        for frame in client.frames(5):
            if frame.stream_id == stream_id and isinstance(frame, DataFrame):
                body += frame.data
            if client.ended:
                break
    assert body == b"one byte at a time"


# -- 3. control-frame floods -----------------------------------------------------------


def _flood_frames(kind: str, attacker: RawH2, sse_path: str, post_path: str) -> Iterator[bytes]:
    """Batches of the flood's frames, after whatever opens the flood."""
    if kind == "ping":
        # Beside an SSE stream the client keeps open.
        yield attacker.headers_frame(sse_path)
        n = 0
        while True:
            yield b"".join(RawH2.ping_frame(n + i) for i in range(200))
            n += 200
    elif kind == "settings":
        while True:
            yield RawH2.settings_frame() * 200
    elif kind == "window_update":
        while True:
            yield RawH2.window_update_frame(0, 1) * 200
    elif kind == "empty_data":
        stream_id = attacker.next_stream_id
        yield attacker.headers_frame(post_path, method="POST", end_stream=False)
        while True:
            yield RawH2.data_frame(stream_id) * 200
    elif kind == "headers":
        # Requests whose bodies never come, as fast as the socket takes them:
        # their handlers wait, and once as many streams are open as allowed,
        # every further one is refused, which counts as a reset.
        while True:
            yield b"".join(
                attacker.headers_frame(post_path, method="POST", end_stream=False)
                for _ in range(200)
            )
    else:
        raise ValueError(kind)


@pytest.mark.parametrize("kind", ["ping", "settings", "window_update", "empty_data", "headers"])
def test_control_frame_flood_gets_goaway_enhance_your_calm(gw: GatewayServer, kind: str) -> None:
    stream = create(gw)
    sse_path = f"{stream}?offset=now&live=sse"
    post_path = stream
    frames_sent = 0
    with probe_for(gw) as probe, RawH2(gw.port, timeout=2.0) as attacker:
        goaway = None
        for batch in _flood_frames(kind, attacker, sse_path, post_path):
            if frames_sent >= 200_000 or not attacker.send(batch):
                break
            frames_sent += 200
            goaway = attacker.goaway(0)  # reads what came back
            if goaway is not None:
                break
        if goaway is None:
            goaway = attacker.goaway(READ_TIMEOUT_S + SWEEP_S + 3)
    print(
        f"{kind} flood: {frames_sent} frames sent, GOAWAY {goaway}, "
        f"probe worst {probe.worst_s:.3f}s"
    )
    assert goaway is not None, f"no GOAWAY after {frames_sent} frames"
    assert goaway.error_code == ENHANCE_YOUR_CALM
    assert_served(probe)
