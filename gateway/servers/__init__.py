"""Servers: the adapters that carry the request interface (gateway/web/request.py)
over ASGI, RSGI and the native HTTP/1.1 + HTTP/2 server, and the one object
every supported server can be pointed at (``gateway.main:app``)."""

from __future__ import annotations

from gateway.web.app import Gateway

from .asgi import AsgiApp
from .rsgi import RsgiApp


class ServedApp(AsgiApp, RsgiApp):
    """The gateway as an ASGI and an RSGI application at once, so that
    ``hypercorn gateway.main:app``, ``granian --interface rsgi gateway.main:app``
    and the native server (which uses ``.gateway`` directly) all serve one object."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway


__all__ = ["AsgiApp", "RsgiApp", "ServedApp"]
