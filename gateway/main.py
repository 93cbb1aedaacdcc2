"""``hypercorn gateway.main:app`` (or any ASGI or RSGI server) serves this application.

To serve the gateway inside another ASGI application (Starlette, FastAPI), mount
``app`` (or a ``ServedApp(Gateway(settings))`` of your own) under a path: it
serves the paths below its mount point.
"""

from __future__ import annotations

import logging

from gateway.servers import ServedApp
from gateway.web.app import Gateway

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

app = ServedApp(Gateway())
