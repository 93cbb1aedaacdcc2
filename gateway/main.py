"""``hypercorn gateway.main:app`` (or any ASGI server) serves this application."""

from __future__ import annotations

import logging

from .app import Gateway

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

app = Gateway()
