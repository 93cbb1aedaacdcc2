"""The native HTTP/1.1 + HTTP/2 server: knows the request interface, nothing of
streams. ``server.py`` runs workers and connections; ``http1.py`` and
``http2.py`` are the connection protocols.
"""
