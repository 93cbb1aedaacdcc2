"""Wake-ups for live readers without a Redis connection per reader.

Every append script PUBLISHes the stream's new tail on the stream's wake channel.
Each replica holds ONE pub/sub connection, subscribed to the channels of the
streams that have live readers on this replica (and for a short while after the
last one leaves, so a client's next long-poll does not pay a new SUBSCRIBE).
A message bumps that stream's ``Watch``, which wakes every waiting reader; the
readers then re-read through one shared read (``Live._shared_read``), so one
append costs one Redis read per replica, however many readers wait.

No wake-up can be lost:
- a reader captures the watch's current event *before* it reads, so an append
  that lands between its read and its wait still sets the event it waits on;
- a reader only reads after its channel's subscription is confirmed;
- when the pub/sub connection drops, the listener reconnects, re-subscribes and
  then wakes every watch, so readers re-check whatever they might have missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple

from gateway import metrics

log = logging.getLogger("gateway.wakeups")

# How long a channel stays subscribed after its last reader left.
LINGER_S = 10.0
# Wake-up messages remembered per watch, to recognise the second copy of one.
RECENT_MESSAGES = 8
# Ping the pub/sub connection this often; reconnect if it stays silent 3x as long.
HEALTH_INTERVAL_S = 5.0
HUB_CHANNEL = "ds:wake-hub"


class Wake:
    """One generation of a stream's wake-ups: set by the next append (or
    re-check) on the stream, then replaced by a fresh one.

    It answers like an ``asyncio.Event`` (``is_set``, ``wait``), but a waiting
    reader costs one future in a set instead of a coroutine, a future and a
    deque entry: with thousands of idle readers per process, that is what their
    memory is made of.
    """

    __slots__ = ("_fired", "_waiters", "page", "pushed")

    def __init__(self) -> None:
        self._fired = False
        self._waiters: set[asyncio.Future[bool]] = set()
        # What the append that set this generation carried (see Pushed), and the
        # page readers built from it (shared, so they share its SSE chunk).
        self.pushed: Pushed | None = None
        self.page: Any = None

    def is_set(self) -> bool:
        return self._fired

    def set(self) -> None:
        if self._fired:
            return
        self._fired = True
        waiters, self._waiters = self._waiters, set()
        if metrics.LOCAL is not None:
            metrics.LOCAL.woken += len(waiters)
        for fut in waiters:
            if not fut.done():
                fut.set_result(True)

    def add_waiter(self, fut: asyncio.Future[bool]) -> None:
        """Resolve ``fut`` with True when this generation is set (at once if it is)."""
        if self._fired:
            if not fut.done():
                fut.set_result(True)
        else:
            self._waiters.add(fut)

    def discard_waiter(self, fut: asyncio.Future[bool]) -> None:
        self._waiters.discard(fut)

    async def wait(self) -> bool:
        if self._fired:
            return True
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.add(fut)
        try:
            return await fut
        finally:
            self._waiters.discard(fut)


class Pushed(NamedTuple):
    """A small append as its wake-up message carries it (lua/append.lua):
    the entry ``tail`` directly follows ``prev`` (Redis entry ids)."""

    prev: str
    tail: str
    closed: bool
    data: bytes

    @classmethod
    def parse(cls, message: Any) -> Pushed | None:
        if not isinstance(message, bytes) or not message.startswith(b"+"):
            return None  # a bare tail, 'deleted', or a large append: readers read
        head, _, data = message[1:].partition(b"\n")
        prev, tail, closed = head.decode().split(" ")
        return cls(prev, tail, closed == "1", data)


class Alarms:
    """Shared timers for waiting readers: one event-loop timer per slot of
    ``resolution_s`` seconds, however many readers wait for a time in it.

    ``arm`` returns a future that resolves True when ``wake`` is set, or False
    at (or up to ``resolution_s`` after) ``when`` (event-loop time), whichever
    comes first. The caller must ``disarm`` it when done, cancelled or not.
    """

    __slots__ = ("_loop", "_resolution", "_slots")

    def __init__(self, resolution_s: float = 0.1) -> None:
        self._resolution = resolution_s
        self._slots: dict[int, set[asyncio.Future[bool]]] = {}
        # The loop of the first use, kept: on Python 3.11 every
        # asyncio.get_running_loop() is a getpid() system call, and a fan-out
        # asks for the time once per woken reader.
        self._loop: asyncio.AbstractEventLoop | None = None

    def loop(self) -> asyncio.AbstractEventLoop:
        """The running event loop (kept from the first use)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def time(self) -> float:
        """Now, on the clock of ``arm``'s ``when`` (the running loop's)."""
        return self.loop().time()

    def arm(self, wake: Wake, when: float) -> tuple[asyncio.Future[bool], int]:
        loop = self.loop()
        fut: asyncio.Future[bool] = loop.create_future()
        slot = math.ceil(when / self._resolution)  # never early
        wake.add_waiter(fut)
        if not fut.done():
            waiters = self._slots.get(slot)
            if waiters is None:
                waiters = self._slots[slot] = set()
                loop.call_at(slot * self._resolution, self._fire, slot)
            waiters.add(fut)
        return fut, slot

    def disarm(self, wake: Wake, fut: asyncio.Future[bool], slot: int) -> None:
        wake.discard_waiter(fut)
        waiters = self._slots.get(slot)
        if waiters is not None:
            waiters.discard(fut)

    def _fire(self, slot: int) -> None:
        for fut in self._slots.pop(slot, ()):
            if not fut.done():
                fut.set_result(False)


class Watch:
    """The wake-up state of one stream on this replica."""

    __slots__ = ("channel", "event", "idle_since", "readers", "recent", "subscribed")

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.event = Wake()
        self.readers = 0
        self.subscribed = asyncio.Event()
        self.idle_since = time.monotonic()
        # The latest wake-up messages delivered, by their first line (unique per
        # append: it names the new tail): the same message arrives twice for
        # this replica's own appends, from the script's reply and from pub/sub.
        # A short list, made on first use: every watch of every idle stream has one.
        self.recent: list[bytes] | None = None

    def deliver(self, message: bytes) -> None:
        """Wake readers for a wake-up message, unless it was delivered already."""
        head = message.partition(b"\n")[0]
        if head == b"deleted":  # not an append's: may come again (a new stream)
            self.wake()
            return
        recent = self.recent
        if recent is None:
            recent = self.recent = []
        elif head in recent:
            recent.remove(head)  # both copies are in: it will not come again
            return
        recent.append(head)
        if len(recent) > RECENT_MESSAGES:
            del recent[0]
        self.wake(Pushed.parse(message))

    def wake(self, pushed: Pushed | None = None) -> None:
        # Replace, then set: readers that captured the old generation wake up,
        # readers that capture from now on wait for the next change.
        event, self.event = self.event, Wake()
        event.pushed = pushed
        event.set()


class WakeHub:
    def __init__(self, connect: Callable[[], Any]) -> None:
        """``connect()`` returns a new redis.asyncio PubSub object."""
        self._connect = connect
        self._watches: dict[str, Watch] = {}
        self._conn: Any = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._last_heard = time.monotonic()
        self.reconnects = 0
        self._was_connected = True  # so the first failure is reported
        self._tasks: set[asyncio.Task[None]] = set()

    # -- life cycle ------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="wake-hub")

    async def stop(self) -> None:
        self._closing = True
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self._drop_connection()
        for watch in self._watches.values():
            watch.wake()

    def wake_all(self) -> None:
        for watch in list(self._watches.values()):
            watch.wake()

    @property
    def channels(self) -> int:
        return len(self._watches)

    # -- readers -----------------------------------------------------------------

    async def join(self, channel: str, within_s: float) -> Watch:
        """Hold a watch on ``channel``; returns once its subscription is active.
        Every successful join must be followed by one ``leave``.

        Raises TimeoutError if the subscription cannot be confirmed in
        ``within_s`` seconds (Redis unreachable).
        """
        watch = self._watches.get(channel)
        if watch is None:
            watch = self._watches[channel] = Watch(channel)
            # While disconnected, the listener subscribes it when it reconnects.
            if self._conn is not None:
                await self._send("SUBSCRIBE", channel)
        watch.readers += 1
        if not watch.subscribed.is_set():
            try:
                await asyncio.wait_for(watch.subscribed.wait(), within_s)
            except BaseException:
                self.leave(watch)
                raise
        return watch

    def try_join(self, channel: str) -> Watch | None:
        """``join`` without waiting: the watch on ``channel`` if its subscription
        is active now, else None (nothing is subscribed then)."""
        watch = self._watches.get(channel)
        if watch is None or not watch.subscribed.is_set():
            return None
        watch.readers += 1
        return watch

    # -- this replica's own appends ---------------------------------------------------

    def watching(self, channel: str) -> bool:
        """Whether readers here may wait on ``channel`` (Store asks, per append)."""
        watch = self._watches.get(channel)
        return watch is not None and watch.subscribed.is_set()

    def deliver(self, channel: str, message: bytes) -> None:
        """The wake-up message of an append made here, from its script's reply:
        readers wake now rather than when the message comes back through
        pub/sub (which then wakes nobody a second time)."""
        watch = self._watches.get(channel)
        if watch is not None and watch.subscribed.is_set():
            watch.deliver(message)

    def leave(self, watch: Watch) -> None:
        watch.readers -= 1
        if watch.readers == 0:
            watch.idle_since = time.monotonic()

    @contextlib.asynccontextmanager
    async def watch(self, channel: str, within_s: float) -> AsyncIterator[Watch]:
        """``join`` and ``leave`` as a context manager."""
        watch = await self.join(channel, within_s)
        try:
            yield watch
        finally:
            self.leave(watch)

    # -- the listener --------------------------------------------------------------

    async def _send(self, command: str, *channels: str) -> None:
        pubsub = self._conn
        if pubsub is None:
            return
        try:
            if command == "SUBSCRIBE":
                await pubsub.subscribe(*channels)
            elif command == "UNSUBSCRIBE":
                await pubsub.unsubscribe(*channels)
            else:
                await pubsub.ping()
        except Exception:  # the listener notices the broken connection and recovers
            log.debug("pub/sub %s failed", command, exc_info=True)

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        for watch in self._watches.values():
            watch.subscribed.clear()
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.aclose()

    async def _run(self) -> None:
        backoff = 0.05
        while not self._closing:
            try:
                await self._listen()
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Warn once per outage, not once per reconnection attempt.
                level = logging.WARNING if self._was_connected else logging.DEBUG
                log.log(level, "wake-up listener lost its Redis connection: %s", exc)
                self._was_connected = False
            await self._drop_connection()
            if self._closing:
                return
            # Whatever was published while we were away, readers re-check now
            # (they re-read, find nothing new, and wait again).
            self.wake_all()
            self.reconnects += 1
            if metrics.LOCAL is not None:
                metrics.LOCAL.pubsub_reconnects.inc()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def _listen(self) -> None:
        pubsub = self._connect()
        # Connect before publishing the PubSub to readers: a SUBSCRIBE sent while
        # it has no connection yet would open a second one that nobody reads.
        await pubsub.connect()
        self._conn = pubsub
        self._last_heard = time.monotonic()
        # The hub's own channel keeps the connection subscribed (so reads block)
        # even while no stream has live readers here.
        await pubsub.subscribe(HUB_CHANNEL, *self._watches)
        if not self._was_connected:
            log.info("wake-up listener connected (%d channels)", len(self._watches))
            self._was_connected = True
        housekeeping = asyncio.create_task(self._housekeeping(pubsub))
        try:
            while True:
                message = await pubsub.get_message(timeout=None)
                self._last_heard = time.monotonic()
                if message is not None:
                    self._dispatch(message)
        finally:
            housekeeping.cancel()

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        channel = message.get("channel")
        if isinstance(channel, bytes):
            channel = channel.decode()
        watch = self._watches.get(channel) if isinstance(channel, str) else None
        if kind == "message":
            if watch is not None:
                data = message.get("data")
                if isinstance(data, bytes):
                    watch.deliver(data)
                else:
                    watch.wake()
        elif kind == "subscribe":
            if watch is not None:
                watch.subscribed.set()
                # Readers re-check on every (re-)subscription: whatever was
                # published while the channel was not subscribed is read now.
                watch.wake()
            elif isinstance(channel, str) and channel != HUB_CHANNEL:
                self._spawn(self._send("UNSUBSCRIBE", channel))
        elif kind == "unsubscribe":
            if watch is not None and isinstance(channel, str):
                # A reader arrived while this channel was being dropped as idle.
                self._spawn(self._send("SUBSCRIBE", channel))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _housekeeping(self, conn: Any) -> None:
        """Health pings and lazy unsubscription of idle channels."""
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            if time.monotonic() - self._last_heard > 3 * HEALTH_INTERVAL_S:
                log.warning(
                    "wake-up listener heard nothing for %.0f s; reconnecting", 3 * HEALTH_INTERVAL_S
                )
                with contextlib.suppress(Exception):
                    await conn.aclose()
                return
            await self._send("PING")
            now = time.monotonic()
            idle = [
                w.channel
                for w in self._watches.values()
                if w.readers == 0 and now - w.idle_since > LINGER_S
            ]
            for channel in idle:
                del self._watches[channel]
            if idle:
                await self._send("UNSUBSCRIBE", *idle)
