"""The Lua scripts: loaded once at start-up, called by SHA.

One file per atomic operation lives in ``gateway/storage/lua/`` (package data,
read with ``importlib.resources``, so a wheel and a source checkout behave the
same); ``_lib.lua`` (shared helpers) is prepended to each stream script. Each script is
registered with ``SCRIPT LOAD`` when the gateway starts and called with
``EVALSHA``; if Redis has lost its script cache (a restart, ``SCRIPT FLUSH``, a
failover) the call falls back to loading it again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError

from .client import RedisClient, ReplicaWait

# The scripts on one stream's keys (KEYS: meta, data, producers, forks).
STREAM_OPERATIONS = (
    "create",
    "append",
    "read",
    "delete",
    "fork_acquire",
    "fork_release",
)
# The scripts on one principal's rate-limit or live-reader key (see quotas.py).
QUOTA_OPERATIONS = ("rate_limit", "live_lease")
OPERATIONS = STREAM_OPERATIONS + QUOTA_OPERATIONS


def read_lua(name: str) -> str:
    """The source of ``lua/<name>.lua``."""
    return (resources.files(__package__) / "lua" / f"{name}.lua").read_text(encoding="utf-8")


class Script:
    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(
        self,
        client: RedisClient,
        keys: list[str],
        args: list[Any],
        wait: ReplicaWait | None = None,
    ) -> Any:
        if wait is None:
            return await self.finish(client, self.start(client, keys, args), keys, args)
        pending = self.start_waiting(client, keys, args, wait)
        return await self.finish(client, pending, keys, args, wait)

    def start(self, client: RedisClient, keys: list[str], args: list[Any]) -> Awaitable[Any]:
        """Issue the call now and return its reply's awaitable (to ``finish``).
        With the pipelined client the command is queued at once; others send it
        when awaited."""
        return client.evalsha(self.sha, len(keys), *keys, *args)

    def start_waiting(
        self, client: RedisClient, keys: list[str], args: list[Any], wait: ReplicaWait
    ) -> Awaitable[Any]:
        """``start``, followed on the same connection by Redis WAIT: the reply
        comes once ``wait.replicas`` replicas have the script's writes."""
        return client.evalsha_wait(wait, self.sha, len(keys), *keys, *args)

    async def finish(
        self,
        client: RedisClient,
        pending: Awaitable[Any],
        keys: list[str],
        args: list[Any],
        wait: ReplicaWait | None = None,
    ) -> Any:
        """The reply of a ``start``ed (or ``start_waiting``) call, loading the
        script first if Redis had lost it."""
        try:
            return await pending
        except NoScriptError:
            await client.script_load(self.source)
            if wait is None:
                return await client.evalsha(self.sha, len(keys), *keys, *args)
            return await client.evalsha_wait(wait, self.sha, len(keys), *keys, *args)


class Scripts:
    def __init__(self) -> None:
        lib = read_lua("_lib")
        for name in STREAM_OPERATIONS:
            setattr(self, name, Script(name, lib + "\n" + read_lua(name)))
        # The quota scripts stand alone: they run on every limited request,
        # and need none of the stream helpers.
        for name in QUOTA_OPERATIONS:
            setattr(self, name, Script(name, read_lua(name)))

    def all(self) -> list[Script]:
        return [getattr(self, name) for name in OPERATIONS]

    async def load(self, client: RedisClient) -> None:
        for script in self.all():
            await client.script_load(script.source)

    # Attributes set in __init__, declared for readers and type checkers.
    create: Script
    append: Script
    read: Script
    delete: Script
    fork_acquire: Script
    fork_release: Script
    rate_limit: Script
    live_lease: Script
