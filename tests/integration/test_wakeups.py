"""``gateway.wakeups.WakeHub`` against a real redis-server.

The hub is built the way the gateway builds it (``Backend.pubsub`` in
gateway/backend.py): a redis-py pub/sub client without read timeout and without
redis-py's own retries, so that the hub itself notices and repairs a broken
connection. The module runs its own
redis-server so that ``CLIENT LIST`` and ``CLIENT KILL TYPE pubsub`` see only
this module's connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from support.procs import free_port
from support.redis_server import RedisServer

from gateway.live import wakeups
from gateway.live.wakeups import HUB_CHANNEL, WakeHub, Watch

pytestmark = pytest.mark.timeout(30)

HUB_CLIENT_NAME = "wake-hub-under-test"


@pytest.fixture(scope="module")
def own_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
async def admin(own_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(own_redis.url, socket_timeout=5)
    try:
        yield client
    finally:
        await client.aclose()


def listener_client(url: str) -> aioredis.Redis:
    """The gateway's wake-up listener client (see gateway/backend.py)."""
    pool = aioredis.ConnectionPool.from_url(
        url,
        socket_timeout=None,
        socket_connect_timeout=1.0,
        retry=Retry(NoBackoff(), 0),
        client_name=HUB_CLIENT_NAME,
    )
    return aioredis.Redis(connection_pool=pool)


@pytest.fixture
async def make_hub() -> AsyncIterator[Callable[[str], Awaitable[WakeHub]]]:
    started: list[tuple[WakeHub, aioredis.Redis]] = []

    async def start(url: str) -> WakeHub:
        client = listener_client(url)
        hub = WakeHub(client.pubsub)
        await hub.start()
        started.append((hub, client))
        return hub

    yield start
    for hub, client in started:
        await hub.stop()
        await client.aclose()
        # The pool was passed in, so aclose() leaves it open: close every
        # connection it handed out (including any the hub lost track of).
        await client.connection_pool.disconnect()


@pytest.fixture
async def hub(
    make_hub: Callable[[str], Awaitable[WakeHub]], own_redis: RedisServer, admin: aioredis.Redis
) -> WakeHub:
    """A started hub whose listener is connected (as on a gateway that has been up a while)."""
    started = await make_hub(own_redis.url)
    await eventually(lambda: _listening(admin), 3, "the hub's pub/sub connection")
    return started


async def _listening(admin: aioredis.Redis) -> bool:
    return [c["sub"] for c in await hub_connections(admin)] == ["1"]


async def eventually(
    check: Callable[[], Awaitable[bool]], within_s: float = 3.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        assert time.monotonic() < deadline, f"{what} not reached within {within_s}s"
        await asyncio.sleep(0.01)


async def numsub(admin: aioredis.Redis, channel: str) -> int:
    return dict(await admin.pubsub_numsub(channel))[channel.encode()]


async def hub_connections(admin: aioredis.Redis) -> list[dict]:
    return [c for c in await admin.client_list() if c.get("name") == HUB_CLIENT_NAME]


class SlowProxy:
    """A TCP proxy to Redis that holds every new connection back for ``delay_s``
    before it connects upstream: a slow network, so a connect takes a while."""

    def __init__(self, upstream_port: int, delay_s: float) -> None:
        self.upstream_port = upstream_port
        self.delay_s = delay_s
        self.accepted = 0
        self.first_accepted = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.first_accepted.set()
        self._writers.append(writer)
        await asyncio.sleep(self.delay_s)  # the simulated network latency
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers.append(up_writer)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await src.read(65536):
                dst.write(chunk)
                await dst.drain()
        dst.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        if self._server is not None:
            await self._server.wait_closed()


async def woken(event: asyncio.Event, within_s: float = 2.0) -> bool:
    try:
        await asyncio.wait_for(event.wait(), within_s)
        return True
    except TimeoutError:
        return False


# -- subscribing and waking -------------------------------------------------------------


async def test_watch_returns_once_the_subscription_is_confirmed(
    hub: WakeHub, admin: aioredis.Redis
) -> None:
    async with hub.watch("ch:confirm", 2) as watch:
        assert watch.subscribed.is_set()
        # Confirmed means Redis already delivers to us: no publish can be missed.
        assert await numsub(admin, "ch:confirm") == 1
        assert await admin.publish("ch:confirm", "x") == 1
    assert await numsub(admin, HUB_CHANNEL) == 1
    assert hub.channels == 1  # lingers after the last reader left


async def test_publish_wakes_every_reader_of_the_channel_only(
    hub: WakeHub, admin: aioredis.Redis
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        watches = [await stack.enter_async_context(hub.watch("ch:a", 2)) for _ in range(20)]
        other = await stack.enter_async_context(hub.watch("ch:b", 2))
        assert len({id(w) for w in watches}) == 1, "one Watch per channel, shared by readers"
        event, other_event = watches[0].event, other.event

        waiters = [asyncio.create_task(event.wait()) for _ in range(20)]
        assert await admin.publish("ch:a", "1-0") == 1
        await asyncio.wait_for(asyncio.gather(*waiters), 10)
        # The woken event is replaced: readers capturing from now on wait for the next one.
        assert watches[0].event is not event and not watches[0].event.is_set()
        assert not other_event.is_set()


async def test_a_watch_captured_before_a_publish_is_woken(
    hub: WakeHub, admin: aioredis.Redis
) -> None:
    async with hub.watch("ch:race", 2) as watch:
        captured = watch.event  # what a reader does before its read
        assert await admin.publish("ch:race", "1-0") == 1
        # ... the reader's read runs here, finds nothing, and only then waits.
        await eventually(lambda: asyncio.sleep(0, captured.is_set()), 1, "wake-up")
        assert captured.is_set()
        # The next capture waits for the next publish, and gets it.
        second = watch.event
        assert not second.is_set()
        await admin.publish("ch:race", "2-0")
        assert await woken(second)


async def test_an_own_append_wakes_readers_once_from_its_reply_and_pub_sub(
    hub: WakeHub, admin: aioredis.Redis
) -> None:
    """The wake-up of an append made here is delivered from the script's reply
    (``deliver``) and again by pub/sub: readers wake once, whichever comes
    first; other messages (and a repeated 'deleted') wake them every time."""
    async with hub.watch("ch:own", 2) as watch:
        assert hub.watching("ch:own") and not hub.watching("ch:nobody")
        message = b"+0-0 5-0 \nhello"
        first = watch.event
        hub.deliver("ch:own", message)  # from the reply: at once, no round trip
        assert first.is_set() and first.pushed is not None and first.pushed.data == b"hello"
        second = watch.event
        assert await admin.publish("ch:own", message) == 1  # the same append via pub/sub
        # Pub/sub first, then the reply: again one wake-up. Pub/sub delivers in
        # order, so when this next append wakes `second`, the repeat above was
        # handled before it: had the repeat woken `second`, it would carry "hello".
        assert await admin.publish("ch:own", b"+5-0 6-0 \nagain") == 1
        assert await woken(second)
        assert second.pushed is not None and second.pushed.data == b"again"
        third = watch.event
        hub.deliver("ch:own", b"+5-0 6-0 \nagain")
        assert not third.is_set()
        # A different append, and 'deleted' each time it comes, wake readers.
        hub.deliver("ch:own", b"7-0 closed")
        assert third.is_set()
        for _ in range(2):
            event = watch.event
            assert await admin.publish("ch:own", "deleted") == 1
            assert await woken(event)


# -- reconnection ---------------------------------------------------------------------------


# redis-py reconnects a PubSub connection that died under a SUBSCRIBE and leaves
# the old StreamWriter to the garbage collector ("unclosed StreamWriter"); the
# tests that kill the connection collect it themselves and ignore that warning.
leaks_a_writer = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@leaks_a_writer
async def test_reconnects_after_client_kill_and_wakes_every_watch(
    hub: WakeHub, admin: aioredis.Redis
) -> None:
    channels = [f"ch:kill:{i}" for i in range(3)]
    async with contextlib.AsyncExitStack() as stack:
        watches: list[Watch] = [
            await stack.enter_async_context(hub.watch(ch, 2)) for ch in channels
        ]
        before = [w.event for w in watches]
        reconnects = hub.reconnects

        assert await admin.client_kill_filter(_type="pubsub") == 1
        # Published while the hub is (probably) not subscribed: lost by Redis ...
        await admin.publish(channels[0], "lost-0")
        # ... but every watch is woken, so every reader re-reads.
        for event in before:
            assert await woken(event), "a watch was not woken after the connection dropped"
        await eventually(lambda: asyncio.sleep(0, hub.reconnects > reconnects), 2, "reconnect")

        # Re-subscribed on a new connection: publishes wake again.
        for watch in watches:
            assert await woken(watch.subscribed)
        await eventually(lambda: _all_subscribed(admin, channels), 3, "re-subscription")
        for watch, channel in zip(watches, channels, strict=True):
            event = watch.event
            assert await admin.publish(channel, "after") == 1
            assert await woken(event)
        assert len(await hub_connections(admin)) == 1
    gc.collect()


async def _all_subscribed(admin: aioredis.Redis, channels: list[str]) -> bool:
    counts = dict(await admin.pubsub_numsub(*channels))
    return all(counts[c.encode()] == 1 for c in channels)


@leaks_a_writer
async def test_a_reader_arriving_during_the_outage_is_subscribed_on_reconnect(
    hub: WakeHub, admin: aioredis.Redis
) -> None:
    async with hub.watch("ch:first", 2):
        pass
    await admin.client_kill_filter(_type="pubsub")
    # Whether or not the hub has reconnected yet, this watch must become active.
    async with hub.watch("ch:late", 3) as watch:
        assert watch.subscribed.is_set()
        assert await numsub(admin, "ch:late") == 1
        event = watch.event
        await admin.publish("ch:late", "x")
        assert await woken(event)
    gc.collect()


async def test_a_reader_arriving_while_the_listener_connects_is_confirmed(
    make_hub: Callable[[str], Awaitable[WakeHub]], own_redis: RedisServer, admin: aioredis.Redis
) -> None:
    """A long-poll that arrives while the wake-up listener is (re)connecting --
    right after start-up or after any reconnect -- must get its subscription
    confirmed on the listener's one connection. (The connect is made slow here so
    that the reader reliably lands in that window.)"""
    proxy = SlowProxy(own_redis.port, delay_s=0.3)
    url = await proxy.start()
    try:
        hub = await make_hub(url)
        await asyncio.wait_for(proxy.first_accepted.wait(), 2)  # the listener is connecting
        try:
            async with hub.watch("ch:early", 2) as watch:
                assert watch.subscribed.is_set()
        except TimeoutError:
            pytest.fail(
                "subscription never confirmed: the SUBSCRIBE went out on another connection; "
                f"pub/sub connections now: {await hub_connections(admin)}"
            )
        conns = await hub_connections(admin)
        assert [c["sub"] for c in conns] == ["2"], (
            f"expected one pub/sub connection (hub channel + ch:early), got {conns}"
        )
    finally:
        await proxy.close()


async def test_watch_times_out_when_redis_is_unreachable(
    make_hub: Callable[[str], Awaitable[WakeHub]],
) -> None:
    hub = await make_hub(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        async with hub.watch("ch:nowhere", 0.3):
            pytest.fail("a watch without a subscription must not be entered")
    assert time.monotonic() - start < 10.0  # the 0.3 s bound, not a hang
    assert hub.reconnects >= 1  # keeps trying in the background


async def test_stop_wakes_every_watch(hub: WakeHub) -> None:
    async with hub.watch("ch:stop", 2) as watch:
        event = watch.event
        await hub.stop()
        assert event.is_set()


# -- idle channels and connection count -----------------------------------------------------------


async def test_idle_channels_are_unsubscribed_after_the_linger_period(
    make_hub: Callable[[str], Awaitable[WakeHub]],
    own_redis: RedisServer,
    admin: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(wakeups, "LINGER_S", 0.3)
    monkeypatch.setattr(wakeups, "HEALTH_INTERVAL_S", 0.1)
    hub = await make_hub(own_redis.url)
    await eventually(lambda: _listening(admin), 3, "the hub's pub/sub connection")
    async with hub.watch("ch:busy", 2) as busy:
        async with hub.watch("ch:idle", 2):
            pass
        left = time.monotonic()
        # Still subscribed right after the last reader left (the next long-poll is cheap).
        assert await numsub(admin, "ch:idle") == 1
        await eventually(lambda: _gone(admin, "ch:idle"), 3, "unsubscription of ch:idle")
        assert time.monotonic() - left >= 0.3
        # A channel with a reader is never dropped, however long it waits: once
        # a channel left after ch:idle was dropped too, the sweep has passed
        # ch:busy at least once more with its linger period over.
        async with hub.watch("ch:idle-later", 2):
            pass
        await eventually(lambda: _gone(admin, "ch:idle-later"), 3, "unsubscription")
        assert await numsub(admin, "ch:busy") == 1
        assert busy.subscribed.is_set()
    assert hub.channels >= 1

    # A dropped channel is subscribed again by its next reader, and wakes it.
    async with hub.watch("ch:idle", 2) as again:
        assert await numsub(admin, "ch:idle") == 1
        event = again.event
        await admin.publish("ch:idle", "x")
        assert await woken(event)
    await eventually(lambda: _gone(admin, "ch:busy"), 3, "unsubscription of ch:busy")
    # Health pings kept the connection: no reconnect happened.
    assert hub.reconnects == 0


async def _gone(admin: aioredis.Redis, channel: str) -> bool:
    return await numsub(admin, channel) == 0


async def test_one_connection_whatever_the_number_of_watches(
    hub: WakeHub, admin: aioredis.Redis
) -> None:
    async with hub.watch("ch:warmup", 2):
        pass
    baseline = len(await admin.client_list())
    channels = [f"ch:many:{i}" for i in range(100)]
    async with contextlib.AsyncExitStack() as stack:
        watches = await asyncio.gather(
            *(stack.enter_async_context(hub.watch(channels[i % 100], 5)) for i in range(500))
        )
        assert all(w.subscribed.is_set() for w in watches)
        assert len(await admin.client_list()) == baseline
        (conn,) = await hub_connections(admin)
        assert conn["flags"] == "P"  # the pub/sub connection
        assert int(conn["sub"]) == 1 + 1 + 100  # hub channel, warm-up, 100 streams
        # One publish reaches one subscriber (the hub) and wakes all 5 readers.
        events = {w.channel: w.event for w in watches}
        for channel in channels:
            assert await admin.publish(channel, "x") == 1
        for event in events.values():
            assert await woken(event)
    assert len(await admin.client_list()) == baseline


# -- waiting: Wake generations and shared alarms ----------------------------------------------


async def test_an_alarm_resolves_false_at_its_time_never_early() -> None:
    alarms = wakeups.Alarms(resolution_s=0.05)
    wake = wakeups.Wake()
    when = alarms.time() + 0.12
    fut, slot = alarms.arm(wake, when)
    try:
        assert await asyncio.wait_for(fut, 1) is False
    finally:
        alarms.disarm(wake, fut, slot)
    assert alarms.time() >= when
    assert alarms.time() - when < 1.0  # about one slot late, plus a loaded machine's scheduling


async def test_a_wake_resolves_true_and_its_waiters_leave_the_alarm() -> None:
    alarms = wakeups.Alarms(resolution_s=0.05)
    wake = wakeups.Wake()
    when = alarms.time() + 5
    armed = [alarms.arm(wake, when) for _ in range(1000)]
    # One timer for all of them: they share the slot.
    assert len(alarms._slots) == 1
    wake.set()
    assert all(fut.done() and fut.result() is True for fut, _ in armed)
    for fut, slot in armed:
        alarms.disarm(wake, fut, slot)
    assert alarms._slots[armed[0][1]] == set()
    # Arming on a generation that is already set resolves at once, with no timer.
    fut, slot = alarms.arm(wake, alarms.time() + 5)
    assert fut.result() is True
    alarms.disarm(wake, fut, slot)


async def test_a_cancelled_waiter_is_dropped_by_wake_and_alarm() -> None:
    alarms = wakeups.Alarms(resolution_s=0.05)
    wake = wakeups.Wake()
    fut, slot = alarms.arm(wake, alarms.time() + 0.1)

    async def reader() -> None:
        try:
            await fut
        finally:
            alarms.disarm(wake, fut, slot)

    task = asyncio.create_task(reader())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fut.cancelled()
    assert not wake._waiters and not alarms._slots[slot]
    wake.set()  # nothing left to resolve, nothing raises
    # The slot's timer runs and removes it.
    await eventually(lambda: asyncio.sleep(0, slot not in alarms._slots), 5, "the slot's removal")
