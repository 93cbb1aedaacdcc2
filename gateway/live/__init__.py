"""Layer 3, live: wake-ups (one pub/sub connection per process) and live reads
(long-poll and SSE) without HTTP. Imports storage and protocol.
"""
