"""The gateway mounted inside a Starlette application (its place as a host, as in
a FastAPI app), served by hypercorn on a real socket: the host's own routes keep
working, streams are served below the mount point, and the URLs the gateway
names (Location, Stream-Forked-From) include it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest
from support.gateway_server import GatewayServer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def host(redis_url: str) -> Iterator[GatewayServer]:
    env = {"PYTHONPATH": "tests", "DS_LONG_POLL_TIMEOUT_MS": "2000"}
    with GatewayServer(redis_url=redis_url, env=env, app="support.starlette_host:app") as server:
        yield server


async def test_the_host_keeps_its_routes_and_the_gateway_serves_below_its_mount(
    host: GatewayServer,
) -> None:
    path = f"mounted/{uuid.uuid4().hex}"
    url = f"{host.url}/streams/v1/stream/{path}"
    async with httpx.AsyncClient(timeout=5) as http:
        assert (await http.get(f"{host.url}/")).text == "the host application\n"
        created = await http.put(url, headers={"Content-Type": "text/plain"})
        assert created.status_code == 201
        assert created.headers["location"] == url
        await http.post(url, content=b"hello ", headers={"Content-Type": "text/plain"})
        await http.post(url, content=b"world", headers={"Content-Type": "text/plain"})
        read = await http.get(url, params={"offset": "-1"})
        assert read.content == b"hello world"
        # Not mounted at the top: the same path without the mount point is the host's 404.
        assert (await http.get(f"{host.url}/v1/stream/{path}")).status_code == 404


async def test_forks_name_their_source_under_the_mount_point(host: GatewayServer) -> None:
    source = f"mounted/{uuid.uuid4().hex}"
    base = f"{host.url}/streams/v1/stream"
    async with httpx.AsyncClient(timeout=5) as http:
        await http.put(f"{base}/{source}", headers={"Content-Type": "text/plain"})
        await http.post(f"{base}/{source}", content=b"a", headers={"Content-Type": "text/plain"})
        fork = await http.put(
            f"{base}/{source}-fork",
            headers={
                "Content-Type": "text/plain",
                "Stream-Forked-From": f"/streams/v1/stream/{source}",
            },
        )
        assert fork.status_code == 201, fork.text
        read = await http.get(f"{base}/{source}-fork", params={"offset": "-1"})
        assert read.content == b"a"


async def test_live_reads_work_under_the_mount_point(host: GatewayServer) -> None:
    url = f"{host.url}/streams/v1/stream/mounted/{uuid.uuid4().hex}"
    async with httpx.AsyncClient(timeout=10) as http:
        created = await http.put(url, headers={"Content-Type": "text/plain"})
        tail = created.headers["stream-next-offset"]
        async with http.stream("GET", url, params={"offset": tail, "live": "sse"}) as sse:
            assert sse.status_code == 200
            await http.post(url, content=b"live!", headers={"Content-Type": "text/plain"})
            async for line in sse.aiter_lines():
                if line == "data:live!":
                    break
            else:
                pytest.fail("the SSE response ended without the append")
