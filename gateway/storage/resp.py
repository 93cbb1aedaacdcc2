"""A lean, pipelined Redis client for the hot path (standalone Redis).

Every stream operation is a single EVALSHA, so the gateway needs far less than a
general client: pack a command, write it, and resolve a future when its reply
arrives. Commands from concurrent requests are written to a few long-lived
connections without waiting for earlier replies (pipelining), and hiredis
parses the replies in C. Compared with redis-py's pool this removes the
per-command connection checkout and most of the Python work per call.

Errors keep redis-py's exception types (ConnectionError, TimeoutError,
NoScriptError, ResponseError), so the store translates them exactly as before.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import hiredis
from redis import exceptions as redis_errors

from gateway import metrics

from .client import ReplicaWait

READER_BUFFER_BYTES = 1 << 20


class RespProtocol(asyncio.Protocol):
    """One connection: replies arrive in the order the commands were written."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        # Kept, not looked up per command: on Python 3.11 every
        # asyncio.get_running_loop() is a getpid() system call.
        self.loop = asyncio.get_running_loop()
        self.reader = hiredis.Reader()
        # hiredis frees its input buffer whenever more than maxbuf of it is
        # unused (16 KiB by default), so every large reply (a read page) grew a
        # new buffer from scratch. Keep up to 1 MiB per connection instead.
        self.reader.setmaxbuf(READER_BUFFER_BYTES)
        self.pending: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.outgoing: list[bytes] = []
        # True from this loop turn's first command until the turn's end: the
        # turn's commands stay on this connection, in the order issued, even
        # when some of them were written early (PipelinedClient.flush).
        self.in_turn = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        # Command latency: from the command's write to this reply's arrival.
        local = metrics.LOCAL
        observe = local.redis.observe if local is not None else None
        now = time.monotonic() if observe is not None else 0.0
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            if not self.pending:  # a reply nobody asked for: the stream is broken
                self.abort(redis_errors.ConnectionError("unexpected reply from Redis"))
                return
            future, sent_at = self.pending.popleft()
            if observe is not None:
                observe(now - sent_at)
            if future.done():
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(_response_error(str(reply)))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        error = redis_errors.ConnectionError(f"connection to Redis lost: {exc or 'closed'}")
        while self.pending:
            future, _ = self.pending.popleft()
            if not future.done():
                future.set_exception(error)

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        loop = self.loop
        future: asyncio.Future[Any] = loop.create_future()
        if self.closed or self.transport is None:
            future.set_exception(redis_errors.ConnectionError("connection to Redis closed"))
            return future
        # Commands issued in the same loop iteration leave in one write (one
        # syscall, one TCP segment) instead of one write each.
        if not self.in_turn:
            self.in_turn = True
            loop.call_soon(self._end_turn)
        self.outgoing.append(packed)
        self.pending.append((future, time.monotonic()))
        return future

    def _end_turn(self) -> None:
        self.in_turn = False
        self.flush()

    def flush(self) -> None:
        if self.outgoing and self.transport is not None and not self.closed:
            data = self.outgoing[0] if len(self.outgoing) == 1 else b"".join(self.outgoing)
            self.transport.write(data)
        self.outgoing.clear()

    def abort(self, error: Exception) -> None:
        self.closed = True
        while self.pending:
            future, _ = self.pending.popleft()
            if not future.done():
                future.set_exception(error)
        if self.transport is not None:
            self.transport.abort()


def _pack_wait(wait: ReplicaWait) -> bytes:
    command: tuple[Any, ...] = ("WAIT", wait.replicas, wait.timeout_ms)
    packed: bytes = hiredis.pack_command(command)
    return packed


async def _acknowledged(
    wait: ReplicaWait, script: asyncio.Future[Any], acknowledged: asyncio.Future[Any]
) -> Any:
    """The script's reply once WAIT counted enough replicas."""
    try:
        reply = await script
    except BaseException:
        # The script's error is the answer; WAIT's reply (or error) is dropped.
        if acknowledged.done():
            if not acknowledged.cancelled():
                acknowledged.exception()
        else:
            acknowledged.cancel()
        raise
    wait.check(await acknowledged)
    return reply


def _response_error(message: str) -> Exception:
    if message.startswith("NOSCRIPT"):
        return redis_errors.NoScriptError(message)
    if message.startswith("LOADING"):
        return redis_errors.BusyLoadingError(message)
    if message.startswith("READONLY"):
        return redis_errors.ReadOnlyError(message)
    return redis_errors.ResponseError(message)


class PipelinedClient:
    """A few pipelined connections to one standalone Redis."""

    def __init__(
        self,
        url: str,
        *,
        connections: int,
        connect_timeout: float,
        command_timeout: float,
        client_name: str | None = None,
    ) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("redis", "unix"):
            raise ValueError(f"unsupported Redis URL scheme for the pipelined client: {url}")
        query = parse_qs(parsed.query)
        self.unix_path = unquote(parsed.path) if parsed.scheme == "unix" else None
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 6379
        if parsed.scheme == "unix":
            self.db = int(query.get("db", ["0"])[0])
        else:
            self.db = int((parsed.path or "/0").lstrip("/") or 0)
        self.username = unquote(parsed.username) if parsed.username else None
        self.password = unquote(parsed.password) if parsed.password else None
        self.client_name = client_name
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._slots: list[RespProtocol | None] = [None] * max(1, connections)
        self._connecting: list[asyncio.Future[RespProtocol] | None] = [None] * len(self._slots)
        self._next = 0
        self._watchdog: asyncio.Task[None] | None = None

    # -- connections --------------------------------------------------------------

    async def _open(self) -> RespProtocol:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout):
            if self.unix_path is not None:
                _, protocol = await loop.create_unix_connection(RespProtocol, self.unix_path)
            else:
                _, protocol = await loop.create_connection(RespProtocol, self.host, self.port)
        setup: list[tuple[Any, ...]] = []
        if self.password is not None:
            auth = (
                ("AUTH", self.username, self.password) if self.username else ("AUTH", self.password)
            )
            setup.append(auth)
        if self.db:
            setup.append(("SELECT", self.db))
        if self.client_name:
            setup.append(("CLIENT", "SETNAME", self.client_name))
        try:
            async with asyncio.timeout(self.connect_timeout):
                for command in setup:
                    await protocol.send(hiredis.pack_command(command))
        except BaseException:
            protocol.abort(redis_errors.ConnectionError("Redis connection set-up failed"))
            raise
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = loop.create_task(self._watch_timeouts())
        return protocol

    async def _connection(self) -> RespProtocol:
        """The next connection in turn; (re)connects lazily."""
        index = self._next
        self._next = (self._next + 1) % len(self._slots)
        protocol = self._slots[index]
        if protocol is not None and not protocol.closed:
            return protocol
        pending = self._connecting[index]
        if pending is None:
            pending = asyncio.ensure_future(self._open())
            self._connecting[index] = pending
            try:
                protocol = await pending
            except (OSError, TimeoutError) as exc:
                raise redis_errors.ConnectionError(f"cannot connect to Redis: {exc}") from exc
            finally:
                self._connecting[index] = None
            self._slots[index] = protocol
            return protocol
        try:
            return await asyncio.shield(pending)
        except (OSError, TimeoutError) as exc:
            raise redis_errors.ConnectionError(f"cannot connect to Redis: {exc}") from exc

    async def _watch_timeouts(self) -> None:
        """Abort a connection whose oldest command waited too long: its replies can
        no longer be matched, and a stuck Redis must turn into fast 503s."""
        while True:
            await asyncio.sleep(min(0.25, self.command_timeout / 4))
            now = time.monotonic()
            for protocol in self._slots:
                if protocol is not None and protocol.pending:
                    if now - protocol.pending[0][1] > self.command_timeout:
                        protocol.abort(redis_errors.TimeoutError("Redis command timed out"))

    # -- commands -----------------------------------------------------------------------

    def execute_command(self, *args: Any) -> Awaitable[Any]:
        """Send a command; await the result for its reply.

        While the next connection in turn is up (nearly always) this returns the
        reply's future directly, with no coroutine in between: every storage
        call of every request comes through here.
        """
        protocol = self._slots[self._next]
        if protocol is None or protocol.closed or not protocol.in_turn:
            # The first command of this loop turn moves on to the next connection;
            # the turn's other commands join it, so they leave in one write (one
            # syscall here, one read in Redis) while turns still take turns.
            self._next = (self._next + 1) % len(self._slots)
            protocol = self._slots[self._next]
        if protocol is not None and not protocol.closed:
            return protocol.send(hiredis.pack_command(args))
        return self._connect_and_send(args)

    async def _connect_and_send(self, args: tuple[Any, ...]) -> Any:
        protocol = await self._connection()
        return await protocol.send(hiredis.pack_command(args))

    def evalsha_wait(
        self, wait: ReplicaWait, sha: str, numkeys: int, *keys_and_args: Any
    ) -> Awaitable[Any]:
        """EVALSHA and WAIT, written together on one connection (the one this
        turn's commands use, as in ``execute_command``)."""
        protocol = self._slots[self._next]
        if protocol is None or protocol.closed or not protocol.in_turn:
            self._next = (self._next + 1) % len(self._slots)
            protocol = self._slots[self._next]
        if protocol is None or protocol.closed:
            return self._connect_and_wait(wait, sha, numkeys, keys_and_args)
        script = protocol.send(hiredis.pack_command(("EVALSHA", sha, numkeys, *keys_and_args)))
        acknowledged = protocol.send(_pack_wait(wait))
        return _acknowledged(wait, script, acknowledged)

    async def _connect_and_wait(
        self, wait: ReplicaWait, sha: str, numkeys: int, keys_and_args: tuple[Any, ...]
    ) -> Any:
        protocol = await self._connection()
        script = protocol.send(hiredis.pack_command(("EVALSHA", sha, numkeys, *keys_and_args)))
        acknowledged = protocol.send(_pack_wait(wait))
        return await _acknowledged(wait, script, acknowledged)

    def flush(self) -> None:
        """Write the commands issued so far in this loop turn now, instead of at
        its end: Redis starts on them while the turn goes on."""
        for protocol in self._slots:
            if protocol is not None and protocol.outgoing:
                protocol.flush()

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Awaitable[Any]:
        return self.execute_command("EVALSHA", sha, numkeys, *keys_and_args)

    async def script_load(self, source: str) -> Any:
        return await self.execute_command("SCRIPT", "LOAD", source)

    async def ping(self) -> bool:
        return await self.execute_command("PING") in (b"PONG", "PONG")

    async def aclose(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(BaseException):
                await self._watchdog
        for protocol in self._slots:
            if protocol is not None and protocol.transport is not None:
                protocol.transport.close()
