"""Durable Streams gateway: the Durable Streams protocol over HTTP, with every stream in Redis."""

__version__ = "0.1.0"
