"""Layer 2, storage: the one store interface (``store.Store``) and its Redis side.

Key naming, the Lua scripts (one per atomic operation, in ``lua/``), group commit,
forks, the Redis clients behind one client protocol, and the embedded Redis for
development. Redis exceptions become protocol errors here (``errors.py``) and
nowhere else. Imports only gateway.protocol (and gateway.config).
"""
