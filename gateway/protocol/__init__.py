"""Layer 1, protocol: the Durable Streams protocol as pure logic, without I/O.

Offsets, request header parsing, JSON mode, SSE framing, cursors, stream paths and
the protocol errors as data. Imports nothing else of the gateway.
"""
