"""Layer 4, web: the request interface every server adapter implements, the
handlers, routing, and the application's life cycle. Imports live, storage and
protocol; never a server adapter.
"""
