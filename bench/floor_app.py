"""A do-nothing SSE server: what an idle SSE connection costs granian itself.

Served as ``granian --interface rsgi bench.floor_app:app`` by the bench config
``floor-granian`` (scenario d only). It speaks just enough of the protocol for
the fan-out client: ``PUT`` answers 201, ``/healthz`` 200, a ``GET`` opens an
event stream with one up-to-date control event and then waits, and a ``POST``
hands its body to every waiting reader as one data event. No storage, no
offsets: the memory per idle reader it shows is the floor under any app on
this server, the gateway included.
"""

from __future__ import annotations

import asyncio
from typing import Any

HEADERS = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]
READY = b'event: control\ndata:{"streamNextOffset":"0","upToDate":true}\n\n'


class FloorApp:
    def __init__(self) -> None:
        self._next: asyncio.Future[bytes] | None = None

    def _future(self) -> asyncio.Future[bytes]:
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        return self._next

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        if scope.method == "POST":
            body = await proto()
            waiting, self._next = self._next, None
            if waiting is not None:
                waiting.set_result(body)
            proto.response_empty(204, [])
        elif scope.method == "PUT":
            proto.response_empty(201, [])
        elif scope.path == "/healthz":
            proto.response_bytes(200, [], b"ok\n")
        else:
            stream = proto.response_stream(200, HEADERS)
            await stream.send_bytes(READY)
            data = await self._future()
            await stream.send_bytes(b"event: data\ndata:" + data + b"\n\n")
            await proto.client_disconnect()


app = FloorApp()
