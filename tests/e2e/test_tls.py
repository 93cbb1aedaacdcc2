"""HTTPS from the console script's own server (``--certfile``/``--keyfile``).

Certificates are made per run by ``trustme`` (a throw-away CA). Checked over
real loopback sockets: HTTP/1.1 and HTTP/2 chosen by ALPN (and HTTP/1.1 for a
client without ALPN), base URLs that say https, the certificate taken from the
environment, clear start-up errors for unusable files, and the clients that
never finish a handshake or speak plain HTTP to the TLS port: closed, without
an error in the log, while everyone else is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
import trustme
from support.gateway_server import GatewayServer

pytestmark = pytest.mark.timeout(60)

READ_TIMEOUT_S = 2.0  # --read-timeout of `gw`: the handshake gets as long
KEEP_ALIVE_S = 1.0  # --keep-alive-timeout of `gw`
SWEEP_S = 1.0
PLAIN = {"content-type": "text/plain"}
SCRIPT = os.path.join(os.path.dirname(sys.executable), "durable-streams-gateway")


class Certs:
    def __init__(self, directory: Path) -> None:
        ca = trustme.CA()
        issued = ca.issue_cert("127.0.0.1", "localhost")
        self.ca = str(directory / "ca.pem")
        self.cert = str(directory / "cert.pem")
        self.key = str(directory / "key.pem")
        self.other_key = str(directory / "other-key.pem")
        ca.cert_pem.write_to_path(self.ca)
        # The certificate file holds the chain: leaf first, then intermediates.
        with open(self.cert, "wb") as chain:
            for pem in issued.cert_chain_pems:
                chain.write(pem.bytes())
        issued.private_key_pem.write_to_path(self.key)
        ca.issue_cert("localhost").private_key_pem.write_to_path(self.other_key)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def gw(redis_url: str, certs: Certs) -> Iterator[GatewayServer]:
    args = [
        "--certfile",
        certs.cert,
        "--keyfile",
        certs.key,
        "--read-timeout",
        f"{READ_TIMEOUT_S:g}",
        "--keep-alive-timeout",
        f"{KEEP_ALIVE_S:g}",
    ]
    env = {"DS_SSE_KEEPALIVE_MS": "500"}
    with GatewayServer(
        redis_url=redis_url, server="console-script", args=args, env=env, tls_ca=certs.ca
    ) as server:
        yield server


def _log(gw: GatewayServer) -> str:
    with open(gw.log_path, encoding="utf-8", errors="replace") as log:
        return log.read()


def _assert_quiet_log(gw: GatewayServer) -> None:
    log = _log(gw)
    assert "Traceback" not in log and "[ERROR]" not in log, log[-4000:]
    # The event loop's complaints about what a TLS client did (writes after its
    # close_notify, say) are noise too.
    assert "[WARNING] asyncio" not in log, log[-4000:]


def _stream_url(gw: GatewayServer, name: str) -> str:
    return f"{gw.url}/v1/stream/tls-{name}-{time.monotonic_ns()}"


def _hello_bytes() -> bytes:
    """The first flight of a real TLS client (its ClientHello record)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16"  # a handshake record
    return hello


def _closed_within(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Read until the server closes; what it sent and how long that took."""
    sock.settimeout(timeout)
    started = time.monotonic()
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += chunk
    return received, time.monotonic() - started


# -- HTTPS over HTTP/1.1 and HTTP/2 -------------------------------------------------------


def test_https_over_http1_says_https_in_location(gw: GatewayServer) -> None:
    stream = _stream_url(gw, "h1")
    with httpx.Client(verify=gw.ssl_context(), http2=False, timeout=10) as http:
        created = http.put(stream, headers=PLAIN, content=b"hello")
        assert (created.http_version, created.status_code) == ("HTTP/1.1", 201)
        assert created.headers["location"] == stream
        assert created.headers["location"].startswith("https://127.0.0.1:")
        assert http.post(stream, headers=PLAIN, content=b" world").status_code == 204
        read = http.get(stream, params={"offset": "-1"})
        assert (read.status_code, read.text) == (200, "hello world")
    _assert_quiet_log(gw)


async def test_https_over_h2_serves_appends_and_a_live_sse_reader(gw: GatewayServer) -> None:
    stream = _stream_url(gw, "h2")
    async with httpx.AsyncClient(verify=gw.ssl_context(), http2=True, timeout=10) as http:
        created = await http.put(stream, headers=PLAIN, content=b"first")
        assert (created.http_version, created.status_code) == ("HTTP/2", 201)
        assert created.headers["location"] == stream
        tail = created.headers["stream-next-offset"]

        connected = asyncio.Event()

        async def sse_until_second() -> str:
            seen = ""
            params = {"offset": tail, "live": "sse"}
            async with http.stream("GET", stream, params=params) as response:
                assert response.http_version == "HTTP/2"
                assert response.headers["content-type"] == "text/event-stream"
                connected.set()
                async for chunk in response.aiter_text():
                    seen += chunk
                    if "data:second" in seen:
                        return seen
            return seen

        reader = asyncio.create_task(sse_until_second())
        await asyncio.wait_for(connected.wait(), 10)
        appended = await http.post(stream, headers=PLAIN, content=b"second")
        assert (appended.http_version, appended.status_code) == ("HTTP/2", 204)
        assert "data:second" in await asyncio.wait_for(reader, 10)
    _assert_quiet_log(gw)


def test_alpn_offers_h2_and_http11_and_a_client_without_alpn_gets_http11(
    gw: GatewayServer,
) -> None:
    assert gw.port is not None
    for offered, chosen in ((["h2", "http/1.1"], "h2"), (["http/1.1"], "http/1.1"), (None, None)):
        context = gw.ssl_context()
        if offered is not None:
            context.set_alpn_protocols(offered)
        with (
            socket.create_connection(("127.0.0.1", gw.port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            assert tls.selected_alpn_protocol() == chosen
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
            if chosen == "h2":
                continue
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer, _ = _closed_within(tls, 10)
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]


# -- clients that do not complete a handshake ---------------------------------------------


@pytest.mark.parametrize("sent", ["nothing", "half a ClientHello"])
def test_a_stalled_handshake_is_closed_after_the_read_timeout(gw: GatewayServer, sent: str) -> None:
    assert gw.port is not None
    first = b"" if sent == "nothing" else _hello_bytes()[:20]
    connecting = time.monotonic()  # the server's handshake clock starts after this
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        if first:
            sock.sendall(first)
        # Others are served meanwhile.
        with httpx.Client(verify=gw.ssl_context(), timeout=10) as http:
            assert http.get(f"{gw.url}/healthz").status_code == 200
        received, _ = _closed_within(sock, READ_TIMEOUT_S + SWEEP_S + 10)
        waited = time.monotonic() - connecting
    assert received == b""
    assert READ_TIMEOUT_S - 0.05 <= waited <= READ_TIMEOUT_S + 10, waited
    _assert_quiet_log(gw)


@pytest.mark.parametrize("sent", ["nothing", "half a request head"])
def test_after_the_handshake_the_http_timeouts_apply(gw: GatewayServer, sent: str) -> None:
    """An idle TLS connection is closed after the keep-alive timeout; one whose
    request head stalls gets a 408 after the read timeout."""
    assert gw.port is not None
    with (
        socket.create_connection(("127.0.0.1", gw.port), timeout=10) as raw,
        gw.ssl_context().wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        started = time.monotonic()
        if sent == "nothing":
            received, _ = _closed_within(tls, KEEP_ALIVE_S + SWEEP_S + 10)
            assert received == b""
            low, high = KEEP_ALIVE_S, KEEP_ALIVE_S + SWEEP_S + 5
        else:
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            received, _ = _closed_within(tls, READ_TIMEOUT_S + SWEEP_S + 10)
            assert received.startswith(b"HTTP/1.1 408 "), received[:200]
            low, high = READ_TIMEOUT_S, READ_TIMEOUT_S + SWEEP_S + 5
        waited = time.monotonic() - started
    assert low - 0.05 <= waited <= high, waited
    _assert_quiet_log(gw)


@pytest.mark.parametrize("alpn", ["http/1.1", "h2"])
def test_a_client_closing_tls_under_live_readers_leaves_no_noise(
    gw: GatewayServer, alpn: str
) -> None:
    """The client ends TLS (close_notify) while its SSE readers wait, and then
    the stream gets appends: the server closes its side in turn, quietly."""
    assert gw.port is not None
    stream = _stream_url(gw, f"close-notify-{alpn.replace('/', '')}")
    with httpx.Client(verify=gw.ssl_context(), timeout=10) as http:
        assert http.put(stream, headers=PLAIN).status_code == 201
        target = stream.removeprefix(gw.url) + "?offset=now&live=sse"
        context = gw.ssl_context()
        context.set_alpn_protocols([alpn])
        with (
            socket.create_connection(("127.0.0.1", gw.port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            assert tls.selected_alpn_protocol() == alpn
            if alpn == "h2":
                client = h2.connection.H2Connection(
                    h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
                )
                client.initiate_connection()
                readers = 20
                for _ in range(readers):
                    client.send_headers(
                        client.get_next_available_stream_id(),
                        [
                            (":method", "GET"),
                            (":path", target),
                            (":scheme", "https"),
                            (":authority", f"127.0.0.1:{gw.port}"),
                        ],
                        end_stream=True,
                    )
                tls.sendall(client.data_to_send())
                answered = 0
                while answered < readers:
                    events = client.receive_data(tls.recv(65536))
                    answered += sum(isinstance(e, h2.events.ResponseReceived) for e in events)
                    tls.sendall(client.data_to_send())
            else:
                tls.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                assert tls.recv(65536).startswith(b"HTTP/1.1 200 ")
            # close_notify; then appends wake the readers of the closing connection.
            tls.setblocking(False)
            # Sent at once; what follows (waiting for the server's, or unread
            # frames in its way) fails one way or another without blocking.
            with contextlib.suppress(ssl.SSLError):
                tls.unwrap()
            for n in range(10):
                assert http.post(stream, headers=PLAIN, content=b"x%d" % n).status_code == 204
            tls.settimeout(10)
            with contextlib.suppress(ssl.SSLError, OSError):
                tls.unwrap()  # the server's close_notify (or its close) arrives
    # The server has dealt with the connection: it serves the next one.
    with httpx.Client(verify=gw.ssl_context(), timeout=10) as http:
        assert http.get(f"{gw.url}/healthz").status_code == 200
    _assert_quiet_log(gw)


def test_plain_http_to_the_tls_port_is_refused_quietly(gw: GatewayServer) -> None:
    assert gw.port is not None
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        received, waited = _closed_within(sock, 10)
    assert not received.startswith(b"HTTP/"), received[:200]
    assert waited < READ_TIMEOUT_S, waited  # refused at once, not timed out
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{gw.port}/healthz", timeout=5)
    with httpx.Client(verify=gw.ssl_context(), timeout=10) as http:
        assert http.get(f"{gw.url}/healthz").status_code == 200
    _assert_quiet_log(gw)


def test_an_untrusting_client_fails_its_handshake_without_server_errors(
    gw: GatewayServer,
) -> None:
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{gw.url}/healthz", timeout=5)  # the system CAs do not know ours
    _assert_quiet_log(gw)


# -- graceful stop ------------------------------------------------------------------------


async def test_sigterm_ends_live_readers_over_tls_and_exits(redis_url: str, certs: Certs) -> None:
    """On SIGTERM the live readers of both protocols get their final control
    event over TLS and the process exits promptly, even with a client stuck
    in its handshake and an idle TLS connection open."""
    args = ["--certfile", certs.cert, "--keyfile", certs.key]
    server = GatewayServer(redis_url=redis_url, server="console-script", args=args, tls_ca=certs.ca)
    with server:
        assert server.proc is not None and server.port is not None
        stream = _stream_url(server, "stop")
        stalled = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        idle = server.ssl_context().wrap_socket(
            socket.create_connection(("127.0.0.1", server.port), timeout=10),
            server_hostname="127.0.0.1",
        )
        clients = [
            httpx.AsyncClient(verify=server.ssl_context(), http2=h2, timeout=30)
            for h2 in (False, True)
        ]
        try:
            created = await clients[0].put(stream, headers=PLAIN)
            assert created.status_code == 201
            connected = [asyncio.Event() for _ in clients]

            async def sse_events(http: httpx.AsyncClient, ready: asyncio.Event) -> str:
                received = ""
                params = {"offset": "now", "live": "sse"}
                async with http.stream("GET", stream, params=params) as response:
                    assert response.status_code == 200
                    ready.set()
                    async for chunk in response.aiter_text():
                        received += chunk
                return received

            readers = [
                asyncio.create_task(sse_events(http, ready))
                for http, ready in zip(clients, connected, strict=True)
            ]
            await asyncio.wait_for(asyncio.gather(*(ready.wait() for ready in connected)), 10)
            signalled = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            events = await asyncio.wait_for(asyncio.gather(*readers), 5)
            for received in events:
                assert "event: control" in received and "streamNextOffset" in received
            code = await asyncio.to_thread(server.proc.wait, 10)
            exited = time.monotonic() - signalled
        finally:
            for http in clients:
                await http.aclose()
            stalled.close()
            idle.close()
    print(f"\nTLS gateway exited {exited:.2f} s after SIGTERM with code {code}")
    assert code == 0
    # Bound as in deploy/README.md; the idle TLS connection that never answers
    # close_notify costs gateway.servers.native.tls.SHUTDOWN_TIMEOUT_S of it.
    assert exited < 5.0, exited
    _assert_quiet_log(server)


# -- configuration ------------------------------------------------------------------------


def test_certificate_and_key_from_the_environment(redis_url: str, certs: Certs) -> None:
    env = {"DS_TLS_CERTFILE": certs.cert, "DS_TLS_KEYFILE": certs.key}
    with GatewayServer(
        redis_url=redis_url, server="console-script", env=env, tls_ca=certs.ca
    ) as server:
        stream = _stream_url(server, "env")
        with httpx.Client(verify=server.ssl_context(), timeout=10) as http:
            created = http.put(stream, headers=PLAIN)
        assert (created.status_code, created.headers["location"]) == (201, stream)
        assert "serving https://" in _log(server)


def _refused_start(args: list[str], env: dict[str, str] | None = None) -> str:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DS_TLS_")}
    # An unreachable Redis: these must fail before any Redis is needed.
    environment["REDIS_URL"] = "redis://127.0.0.1:1/0"
    environment.update(env or {})
    done = subprocess.run(
        [SCRIPT, "--host", "127.0.0.1", "--port", "1", *args],
        env=environment,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    return done.stderr


def test_start_up_refuses_unusable_certificates_clearly(certs: Certs, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    assert "does not match the certificate" in _refused_start(
        ["--certfile", certs.cert, "--keyfile", certs.other_key]
    )
    assert f"cannot read the TLS key file {missing}" in _refused_start(
        ["--certfile", certs.cert, "--keyfile", missing]
    )
    assert "both a certificate and its key" in _refused_start(["--certfile", certs.cert])
    assert "both a certificate and its key" in _refused_start([], env={"DS_TLS_KEYFILE": certs.key})
    assert "must hold PEM certificates" in _refused_start(
        ["--certfile", certs.key, "--keyfile", certs.key]
    )
    assert "--server native only" in _refused_start(
        ["--certfile", certs.cert, "--keyfile", certs.key, "--server", "hypercorn"]
    )
