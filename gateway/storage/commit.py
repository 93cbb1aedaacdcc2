"""Group commit: the appends a process issues in one event-loop turn go to Redis
as one run of lua/append.lua.

Each append in a run gets exactly what it would get alone (the script applies
them in order, each seeing what the ones before it wrote). On a standalone Redis
appends to any streams share a run; on Redis Cluster, where one script's keys
must share a hash slot, only appends to the same stream do.

With DS_WAIT_REPLICAS each run is followed by one Redis WAIT on its connection,
so a run's appends are acknowledged once the replicas have all of them: one
WAIT per run, not per append. Without it a run is its script call alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from gateway import metrics

from .client import RedisClient, ReplicaWait
from .errors import storage_errors
from .keys import StreamKeys
from .replies import AppendRunReply
from .scripts import Script

# At most this many appends, and this many bytes of their data, in one script
# run: a run holds Redis for its whole length, so a crowded turn is split over
# several runs rather than stalling every other client for one long one.
MAX_BATCH_APPENDS = 64
MAX_BATCH_BYTES = 1024 * 1024
# A batch goes to Redis at the end of its turn, or as soon as it holds this many
# appends: on a busy gateway a turn handles dozens of requests, and Redis then
# works on the first of them while the gateway is still parsing the rest,
# instead of both taking turns to be idle (measured under wrk over 1,000
# streams: 20-30% more appends/s, the machine's idle time 35% -> 15%).
SEND_AT_APPENDS = 16


class LocalWakes(Protocol):
    """Who wakes this process's live readers (gateway/live/wakeups.py, WakeHub):
    told of the wake-ups of its own appends as soon as their script returns,
    instead of when Redis' pub/sub message comes back."""

    def watching(self, channel: str) -> bool: ...

    def deliver(self, channel: str, message: bytes) -> None: ...


class _Batch:
    """The appends of one script run: its KEYS (three per stream), the
    streams' wake-up channels (and whether their wake-up message is wanted
    back), each append's ARGV fields, and each append's waiter."""

    __slots__ = ("args", "keys", "loop", "reply", "sent", "size", "streams", "waiters", "wakes")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.keys: list[str] = []
        self.wakes: list[str] = []  # per stream: wake-up channel, '1' or ''
        self.streams: dict[str, int] = {}  # path -> its number in the script (1-based)
        self.args: list[Any] = []
        self.waiters: list[asyncio.Future[Any]] = []
        self.size = 0
        self.reply: Awaitable[Any] | None = None  # once sent: its reply
        self.sent: list[Any] = []  # once sent: the ARGV it was sent with

    def has_room(self, size: int) -> bool:
        return len(self.waiters) < MAX_BATCH_APPENDS and self.size + size <= MAX_BATCH_BYTES

    def add(
        self,
        path: str,
        keys: StreamKeys,
        item: tuple[Any, ...],
        size: int,
        local: LocalWakes | None,
    ) -> asyncio.Future[Any]:
        number = self.streams.get(path)
        if number is None:
            number = self.streams[path] = len(self.streams) + 1
            self.keys += (keys.meta, keys.data, keys.producers)
            self.wakes.append(keys.wake)
            self.wakes.append("1" if local is not None and local.watching(keys.wake) else "")
        self.args.append(number)
        self.args += item
        self.size += size
        waiter: asyncio.Future[Any] = self.loop.create_future()
        self.waiters.append(waiter)
        return waiter

    def argv(self, retention: tuple[str, str]) -> list[Any]:
        return [len(self.streams), *retention, *self.wakes, *self.args]


class GroupCommit:
    def __init__(
        self,
        client: RedisClient,
        script: Script,
        keys_of: Callable[[str], StreamKeys],
        *,
        per_stream: bool,
        local_wakes: LocalWakes | None,
        retention: tuple[int, int] = (0, 0),
        wait: ReplicaWait | None = None,
    ) -> None:
        """``retention``: the server's default max age (seconds) and max bytes
        of a stream, 0 for none (append.lua trims the streams' heads)."""
        self.client = client
        self.wait = wait
        self.script = script
        self.keys_of = keys_of
        self.per_stream = per_stream
        self.local_wakes = local_wakes
        self.retention = (str(retention[0]), str(retention[1]))
        # The batch collecting this turn's appends, by path (per_stream) or
        # under "" for all streams; and the commits in flight.
        self._batches: dict[str, _Batch] = {}
        self._commits: set[asyncio.Task[None]] = set()

    def submit(self, path: str, item: tuple[Any, ...], size: int) -> asyncio.Future[Any]:
        """Add one append to the batch of this event-loop turn (starting one if
        there is none, or it is full) and return the future of its reply."""
        group = path if self.per_stream else ""
        batch = self._batches.get(group)
        if batch is None or not batch.has_room(size):
            loop = asyncio.get_running_loop()
            batch = self._batches[group] = _Batch(loop)
            # The commit runs once the requests already scheduled in this turn
            # have had their turn, so theirs join this batch. It is a task of
            # its own: no request's cancellation can stop the others' commit.
            task = loop.create_task(self._commit(group, batch))
            self._commits.add(task)
            task.add_done_callback(self._commits.discard)
        waiter = batch.add(path, self.keys_of(path), item, size, self.local_wakes)
        if len(batch.waiters) >= SEND_AT_APPENDS:
            self._send(group, batch)
            self.client.flush()
        return waiter

    def _send(self, group: str, batch: _Batch) -> None:
        """Issue the batch's script run (once); its commit task awaits the reply."""
        if self._batches.get(group) is batch:
            del self._batches[group]
        if batch.reply is None:
            if metrics.LOCAL is not None:
                metrics.LOCAL.batches.observe(len(batch.waiters))
            batch.sent = batch.argv(self.retention)
            if self.wait is None:
                batch.reply = self.script.start(self.client, batch.keys, batch.sent)
            else:
                batch.reply = self.script.start_waiting(
                    self.client, batch.keys, batch.sent, self.wait
                )

    async def _commit(self, group: str, batch: _Batch) -> None:
        self._send(group, batch)  # at the end of the turn, unless sent already
        assert batch.reply is not None
        try:
            async with storage_errors:
                reply = await self.script.finish(
                    self.client, batch.reply, batch.keys, batch.sent, self.wait
                )
        except Exception as exc:
            for waiter in batch.waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
            return
        except BaseException:
            for waiter in batch.waiters:
                waiter.cancel()
            raise
        run = AppendRunReply.parse(reply)
        local = self.local_wakes
        if local is not None:
            # Readers first: they are woken (and answer) before the writers.
            for channel, message in zip(batch.wakes[::2], run.messages, strict=True):
                if message:
                    local.deliver(channel, message)
        for waiter, one in zip(batch.waiters, run.replies, strict=True):
            if not waiter.done():
                waiter.set_result(one)
        # Trims are rare (a stream over its limit by a sixteenth, at most a
        # batch per run): counted directly, after the waiters have their replies.
        if run.trimmed and metrics.LOCAL is not None:
            metrics.LOCAL.retention_trimmed.inc(run.trimmed)
