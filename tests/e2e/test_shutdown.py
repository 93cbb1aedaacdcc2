"""Graceful shutdown: on SIGTERM a replica ends its live reads with valid protocol
responses (so clients resume on another replica) and exits within a bound.

Bound stated in deploy/README.md: live readers are answered within about one
second of SIGTERM and the process exits within five (measured figures are
printed; the asserted bounds leave room for a loaded machine).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest
from support.gateway_server import GatewayServer
from support.live import parked
from support.sse_reader import SSE, Event

ANSWER_BOUND_S = 10.0
EXIT_BOUND_S = 15.0


@pytest.fixture(
    params=["console-script", "console-script-rsgi", "console-script-asgi", "hypercorn-workers-0"]
)
def server(request, redis_url: str) -> Iterator[tuple[subprocess.Popen, str]]:
    env = {"DS_LONG_POLL_TIMEOUT_MS": "30000"}
    with GatewayServer(redis_url=redis_url, env=env, server=request.param) as gateway:
        assert gateway.proc is not None
        yield gateway.proc, gateway.url


async def test_sigterm_answers_live_readers_and_exits(server, redis_client) -> None:
    """A long-poll and an SSE reader, each on its own stream, are parked (their
    wake channels are subscribed) after the SSE reader had its first events
    (data and a control event). SIGTERM then answers the long-poll with a 204
    and sends the SSE reader one more control event, which ends its response;
    the process exits with status 0."""
    proc, url = server
    base = f"{url}/v1/stream"
    poll_path = f"shutdown-poll-{os.getpid()}-{time.monotonic_ns()}"
    sse_path = f"shutdown-sse-{os.getpid()}-{time.monotonic_ns()}"
    text = {"content-type": "text/plain"}
    async with httpx.AsyncClient(timeout=30) as http:
        assert (await http.put(f"{base}/{poll_path}", headers=text)).status_code == 201
        created = await http.put(f"{base}/{sse_path}", content=b"before", headers=text)
        assert created.status_code == 201
        tail = created.headers["stream-next-offset"]
        poll = asyncio.create_task(
            http.get(f"{base}/{poll_path}", params={"offset": "now", "live": "long-poll"})
        )
        async with http.stream(
            "GET", f"{base}/{sse_path}", params={"offset": "-1", "live": "sse"}
        ) as response:
            assert response.status_code == 200
            sse = SSE(response)
            first = await sse.next_event()
            assert (first.type, first.data) == ("data", "before")
            control = await sse.next_event()
            assert control.type == "control"
            assert control.json()["streamNextOffset"] == tail
            await parked(redis_client, poll_path)
            await parked(redis_client, sse_path)
            assert not poll.done()

            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)

            response_204 = await asyncio.wait_for(poll, ANSWER_BOUND_S)
            answered = time.monotonic() - signalled
            assert response_204.status_code == 204
            assert response_204.headers["stream-up-to-date"] == "true"
            assert response_204.headers["stream-next-offset"]
            # After SIGTERM: a final control event a client can resume from, then
            # the end of the response (comments aside).
            after: list[Event] = []
            async with asyncio.timeout(ANSWER_BOUND_S):
                while (event := await sse.next()) is not None:
                    if event.type != "comment":
                        after.append(event)
    assert [e.type for e in after] == ["control"], after
    assert after[0].json()["streamNextOffset"] == tail

    exit_code = await asyncio.to_thread(proc.wait, EXIT_BOUND_S)
    exited = time.monotonic() - signalled
    print(
        f"\nlong-poll answered {answered:.2f} s after SIGTERM; process exited after "
        f"{exited:.2f} s with code {exit_code}"
    )
    assert exit_code == 0
    assert exited < EXIT_BOUND_S


@pytest.mark.parametrize("server", ["console-script"], indirect=True)
async def test_sigterm_answers_live_readers_over_http2(server, redis_client) -> None:
    """The same over one HTTP/2 connection: the live responses arrive whole
    (the GOAWAY only follows once they are done), then the process exits."""
    proc, url = server
    path = f"shutdown-h2-{os.getpid()}-{time.monotonic_ns()}"
    stream = f"{url}/v1/stream/{path}"
    async with httpx.AsyncClient(http1=False, http2=True, timeout=30) as http:
        created = await http.put(stream, headers={"content-type": "text/plain"})
        assert (created.http_version, created.status_code) == ("HTTP/2", 201)
        polls = [
            asyncio.create_task(http.get(stream, params={"offset": "now", "live": "long-poll"}))
            for _ in range(3)
        ]
        await parked(redis_client, path)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        responses = await asyncio.wait_for(asyncio.gather(*polls), ANSWER_BOUND_S)
        assert [r.status_code for r in responses] == [204, 204, 204]
        assert all(r.headers["stream-up-to-date"] == "true" for r in responses)
    assert await asyncio.to_thread(proc.wait, EXIT_BOUND_S) == 0
    assert time.monotonic() - signalled < EXIT_BOUND_S
