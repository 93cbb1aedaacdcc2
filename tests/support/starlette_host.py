"""A Starlette application hosting the gateway under ``/streams``, beside a route
of its own: ``hypercorn support.starlette_host:app`` (tests/e2e/test_mounted.py)."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from gateway.servers import ServedApp
from gateway.web.app import Gateway

gateway = ServedApp(Gateway())


async def home(request: Request) -> PlainTextResponse:
    return PlainTextResponse("the host application\n")


async def healthz(request: Request) -> PlainTextResponse:
    # The host's own health check (the test harness waits for it); the lifespan
    # has started the gateway by the time any request is served.
    return PlainTextResponse("ok\n")


app = Starlette(
    routes=[Route("/", home), Route("/healthz", healthz), Mount("/streams", app=gateway)],
    lifespan=gateway.lifespan,
)
