"""The storage seam: every stream operation, backed by Redis.

The HTTP layer talks only to ``Store``. Each method is one atomic Lua script on
the stream's own hash slot, except the operations that span two streams (fork
creation, the deletes that cascade up a fork chain, and reads that stitch a fork
onto its source), which are sequences of single-slot scripts ordered so that a
crash between steps can only leak a reference, never lose data. Redis errors are
translated to protocol errors here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from redis import exceptions as redis_errors

from . import headers, jsonmode
from . import offsets as off
from .errors import BadRequest, Conflict, Forbidden, Gone, NotFound, Unavailable
from .keys import StreamKeys, stream_keys
from .scripts import Script, Scripts

# A fork chain is walked one level per round trip; bound it against cycles and
# absurd depths (a fork of a fork of ... 64 deep).
MAX_FORK_DEPTH = 64

# Most appends in one page, whatever the byte budget. Redis turns every entry a
# script reads into Lua values at a few microseconds each and serves nobody else
# meanwhile, so a page of tiny appends costs Redis time per entry, not per byte:
# this keeps one read's script to about ten milliseconds.
MAX_PAGE_ENTRIES = 4096


class StreamInfo(NamedTuple):
    """What HEAD reports (section 5.5); also the metadata of every read."""

    content_type: str
    tail: str  # offset token
    closed: bool
    ttl: int | None
    expires_at: int | None  # epoch ms

    @property
    def is_json(self) -> bool:
        return headers.is_json(self.content_type)


class Page(NamedTuple):
    """One read: the stream's metadata and the data after an offset."""

    info: StreamInfo
    body: bytes  # concatenated bytes, or comma-joined JSON messages
    next_offset: str
    more: bool  # True when the page was cut at the size limit

    @property
    def up_to_date(self) -> bool:
        return not self.more and self.next_offset >= self.info.tail

    @property
    def at_closed_tail(self) -> bool:
        return self.info.closed and self.up_to_date


@dataclass(frozen=True)
class CreateRequest:
    content_type: str
    ttl: int | None = None
    expires_at: int | None = None
    closed: bool = False
    entries: tuple[tuple[bytes, int | None], ...] = ()  # (data, JSON message count)
    fork_source: str | None = None
    fork_offset: str | None = None  # offset token, None for the source's tail
    fork_sub_offset: int | None = None


@dataclass(frozen=True)
class CreateResult:
    created: bool
    info_tail: str
    closed: bool
    content_type: str


class AppendRequest(NamedTuple):
    media_type: str
    body: bytes | None  # None for close-only
    json_count: int | None
    close: bool
    stream_seq: str | None
    producer: headers.Producer | None


class AppendResult(NamedTuple):
    status: str  # 'ok', 'dup', 'closed_noop'
    tail: str
    closed: bool
    producer_epoch: str | None
    producer_seq: str | None


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


_UNAVAILABLE = (
    TimeoutError,
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    redis_errors.ReadOnlyError,
    redis_errors.ClusterDownError,
    redis_errors.TryAgainError,
    redis_errors.MaxConnectionsError,
    redis_errors.RedisClusterException,
    OSError,
)


class _StorageErrors:
    """Translate Redis failures into the protocol's 503, once, at this boundary.

    A plain class rather than ``@asynccontextmanager``: it wraps every storage
    call, and a generator-based manager costs a generator per use.
    """

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None:
            return False
        if isinstance(exc, _UNAVAILABLE):
            raise Unavailable() from exc
        if isinstance(exc, redis_errors.ResponseError) and str(exc).startswith(
            ("OOM", "MASTERDOWN", "LOADING", "NOREPLICAS")
        ):
            raise Unavailable() from exc
        return False


_storage_errors = _StorageErrors()


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
    """Who wakes this process's live readers (gateway/wakeups.py, WakeHub):
    told of the wake-ups of its own appends as soon as their script returns,
    instead of when Redis' pub/sub message comes back."""

    def watching(self, channel: str) -> bool: ...

    def deliver(self, channel: str, message: bytes) -> None: ...


class _Batch:
    """The appends of one script run of lua/append.lua: its KEYS (three per
    stream), the streams' wake-up channels (and whether their wake-up message
    is wanted back), each append's ARGV fields, and each append's waiter."""

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

    def argv(self) -> list[Any]:
        return [len(self.streams), *self.wakes, *self.args]


class Store:
    def __init__(
        self,
        client: Any,
        key_prefix: str,
        max_read_bytes: int,
        limiter: asyncio.Semaphore | None = None,
        *,
        batch_per_stream: bool = False,
        local_wakes: LocalWakes | None = None,
    ) -> None:
        """``batch_per_stream``: commit only appends to the same stream together
        (Redis Cluster, where one script's keys must share a hash slot);
        otherwise appends to any streams share a script run. ``local_wakes``:
        told of the wake-ups of this process's appends as their scripts return."""
        self.local_wakes = local_wakes
        self.client = client
        self._limiter = limiter
        self.key_prefix = key_prefix
        self.max_read_bytes = max_read_bytes
        self.scripts = Scripts()
        self._batch_per_stream = batch_per_stream
        # The batch collecting this turn's appends, by path (batch_per_stream)
        # or under "" for all streams; and the commits in flight.
        self._batches: dict[str, _Batch] = {}
        self._commits: set[asyncio.Task[None]] = set()

    def _limited(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """Holds a slot of the Redis concurrency limit, if there is one."""
        return self._limiter or contextlib.nullcontext()

    async def _run(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        async with self._limited():
            return await script(self.client, keys, args)

    def keys(self, path: str) -> StreamKeys:
        return stream_keys(self.key_prefix, path)

    async def load_scripts(self) -> None:
        async with _storage_errors:
            await self.scripts.load(self.client)

    async def ping(self) -> bool:
        async with _storage_errors:
            return bool(await self.client.ping())

    # -- create (section 5.1) and fork (section 4.2) ----------------------------

    async def create(self, path: str, req: CreateRequest) -> CreateResult:
        async with _storage_errors:
            if req.fork_source is None:
                if req.fork_sub_offset is not None:
                    raise BadRequest("Stream-Fork-Sub-Offset requires Stream-Forked-From")
                return await self._create(path, req, base_tail=off.ZERO_ID)
            return await self._create_fork(path, req)

    async def _create(
        self,
        path: str,
        req: CreateRequest,
        *,
        base_tail: str,
        fork_offset_id: str = "",
        prefix: tuple[bytes, int | None] | None = None,
        retry: bool = True,
    ) -> CreateResult:
        k = self.keys(path)
        entries = ([prefix] if prefix else []) + list(req.entries)
        args: list[Any] = [
            req.content_type,
            headers.media_type(req.content_type),
            "" if req.ttl is None else str(req.ttl),
            "" if req.expires_at is None else str(req.expires_at),
            "1" if req.closed else "",
            req.fork_source or "",
            fork_offset_id,
            "" if not req.fork_sub_offset else str(req.fork_sub_offset),
            base_tail,
        ]
        for data, count in entries:
            args += [data, "" if count is None else str(count)]
        reply = await self._run(self.scripts.create, k.all, args)
        status = _s(reply[0])
        if status == "conflict":
            raise Conflict("stream exists with a different configuration")
        if status == "gone":
            if retry and await self._collect(path):
                return await self._create(
                    path,
                    req,
                    base_tail=base_tail,
                    fork_offset_id=fork_offset_id,
                    prefix=prefix,
                    retry=False,
                )
            raise Conflict("stream was deleted and its path is still in use by forks")
        tail = off.from_entry_id(_s(reply[1]))
        content_type = _s(reply[3]) if status == "exists" else req.content_type
        return CreateResult(status == "created", tail, _s(reply[2]) == "1", content_type)

    async def _create_fork(self, path: str, req: CreateRequest) -> CreateResult:
        assert req.fork_source is not None
        source = req.fork_source
        if source == path:
            raise BadRequest("a stream cannot be forked from itself")
        sub = req.fork_sub_offset or 0
        if sub > 0 and req.fork_offset is None:
            raise BadRequest("Stream-Fork-Sub-Offset needs an explicit Stream-Fork-Offset")
        offset_id = "" if req.fork_offset is None else off.parse(req.fork_offset, "fork offset")
        requested_mt = headers.media_type(req.content_type) if req.content_type else ""
        sk = self.keys(source)
        acquire_args = [requested_mt, offset_id, path]
        reply = await self._run(self.scripts.fork_acquire, sk.all, acquire_args)
        status = await self._status(source, reply[0])
        if status == "not_found":
            raise NotFound("fork source stream not found")
        if status == "gone":
            raise Conflict("fork source stream has been deleted")
        if status == "ct_mismatch":
            raise Conflict("Content-Type differs from the source stream's")
        if status == "beyond_tail":
            raise BadRequest("Stream-Fork-Offset is beyond the source stream's tail")
        content_type, fork_offset_id = _s(reply[1]), _s(reply[3])
        source_ttl, source_exp = _s(reply[4]), _s(reply[5])
        registered = _s(reply[6]) == "1"  # False when this fork path held a reference already
        created = False
        try:
            prefix = None
            if sub > 0:
                prefix = await self._sub_offset_prefix(source, fork_offset_id, sub)
            ttl, expires_at = req.ttl, req.expires_at
            if ttl is None and expires_at is None:
                # Section 4.2's table: a fork without its own expiry inherits the source's.
                ttl = int(source_ttl) if source_ttl else None
                expires_at = int(source_exp) if source_exp else None
            fork_req = CreateRequest(
                content_type=req.content_type or content_type,
                ttl=ttl,
                expires_at=expires_at,
                closed=req.closed,
                entries=req.entries,
                fork_source=source,
                fork_offset=None,
                fork_sub_offset=sub or None,
            )
            result = await self._create(
                path,
                fork_req,
                base_tail=fork_offset_id,
                fork_offset_id=fork_offset_id,
                prefix=prefix,
            )
            created = result.created
            return result
        finally:
            if registered and not created and not await self._is_fork_of(path, source):
                # This request registered the fork but no fork of this source
                # stands at the path (the request was refused): give the
                # reference back. (A concurrent identical PUT may have created
                # it; then the reference is that fork's and stays.)
                await self._release(source, path)

    async def _sub_offset_prefix(
        self, source: str, anchor_id: str, sub: int
    ) -> tuple[bytes, int | None]:
        """The part of the source's next append that a sub-offset fork inherits."""
        page = await self._read(source, anchor_id, "", 1, "source")
        if page.next_offset == off.from_entry_id(anchor_id) or not page.body:
            raise BadRequest("Stream-Fork-Sub-Offset points past the end of the source")
        if page.info.is_json:
            messages = jsonmode.split(page.body)
            if sub > len(messages):
                raise BadRequest("Stream-Fork-Sub-Offset is past the next message boundary")
            return jsonmode.join(messages[:sub]), sub
        if sub > len(page.body):
            raise BadRequest("Stream-Fork-Sub-Offset is past the next data boundary")
        return page.body[:sub], None

    # -- append and close (sections 5.2, 5.3) ----------------------------------

    def _enqueue(self, path: str, item: tuple[Any, ...], size: int) -> asyncio.Future[Any]:
        """Add one append to the batch of this event-loop turn (starting one if
        there is none, or it is full) and return the future of its reply."""
        group = path if self._batch_per_stream else ""
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
        waiter = batch.add(path, self.keys(path), item, size, self.local_wakes)
        if len(batch.waiters) >= SEND_AT_APPENDS:
            self._send(group, batch)
            flush = getattr(self.client, "flush", None)  # the pipelined client's
            if flush is not None:
                flush()
        return waiter

    def _send(self, group: str, batch: _Batch) -> None:
        """Issue the batch's script run (once); its commit task awaits the reply."""
        if self._batches.get(group) is batch:
            del self._batches[group]
        if batch.reply is None:
            batch.sent = batch.argv()
            batch.reply = self.scripts.append.start(self.client, batch.keys, batch.sent)

    async def _commit(self, group: str, batch: _Batch) -> None:
        self._send(group, batch)  # at the end of the turn, unless sent already
        script = self.scripts.append
        assert batch.reply is not None
        try:
            async with _storage_errors, self._limited():
                reply = await script.finish(self.client, batch.reply, batch.keys, batch.sent)
        except Exception as exc:
            for waiter in batch.waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
            return
        except BaseException:
            for waiter in batch.waiters:
                waiter.cancel()
            raise
        replies, messages = reply
        local = self.local_wakes
        if local is not None:
            # Readers first: they are woken (and answer) before the writers.
            for channel, message in zip(batch.wakes[::2], messages, strict=True):
                if message:
                    local.deliver(channel, message)
        for waiter, reply in zip(batch.waiters, replies, strict=True):
            if not waiter.done():
                waiter.set_result(reply)

    async def append(self, path: str, req: AppendRequest) -> AppendResult:
        """Append and/or close. Every append of one event-loop turn (on a
        standalone Redis, or of one stream on Redis Cluster) is committed in one
        script run (lua/append.lua): the group commit, which gives each append
        exactly what it would get alone."""
        p = req.producer
        count = "" if req.json_count is None else str(req.json_count)
        item: tuple[Any, ...]
        if req.body is not None and not req.close and not req.stream_seq and p is None:
            item = ("", req.media_type, req.body, count)  # a plain append: its short form
        else:
            item = (
                "x",
                req.media_type,
                "1" if req.body is not None else "",
                "1" if req.close else "",
                req.stream_seq or "",
                p.id if p else "",
                str(p.epoch) if p else "",
                str(p.seq) if p else "",
                req.body or b"",
                count,
            )
        reply = await self._enqueue(path, item, len(req.body or b""))
        if type(reply) is bytes:  # a plain append's reply: its entry id alone
            return AppendResult("ok", off.from_entry_id(reply.decode()), False, None, None)
        status = await self._status(path, reply[0])
        if status == "not_found":
            raise NotFound("stream not found")
        if status == "gone":
            raise Gone("stream has been deleted")
        reply = [*reply, "", "", "", ""]  # replies vary in length; pad the tail fields
        tail = off.from_entry_id(_s(reply[1]))
        closed = _s(reply[2]) == "1"
        base: dict[str, str] = {"Stream-Next-Offset": tail}
        if closed:
            base["Stream-Closed"] = "true"
        if status == "closed":
            raise Conflict("stream is closed", base)
        if status == "ct_mismatch":
            raise Conflict("Content-Type does not match the stream's", base)
        if status == "seq_conflict":
            raise Conflict("Stream-Seq must increase", base)
        if status == "stale_epoch":
            raise Forbidden("stale producer epoch", {**base, "Producer-Epoch": _s(reply[3])})
        if status == "epoch_seq":
            raise BadRequest("a new producer epoch must start at Producer-Seq 0")
        if status == "seq_gap":
            raise Conflict(
                "producer sequence gap",
                {
                    **base,
                    "Producer-Expected-Seq": _s(reply[3]),
                    "Producer-Received-Seq": _s(reply[4]),
                },
            )
        epoch = _s(reply[3]) if p else None
        seq = _s(reply[4]) if p else None
        return AppendResult(status, tail, closed, epoch, seq)

    # -- delete (section 5.4) --------------------------------------------------

    async def delete(self, path: str) -> None:
        k = self.keys(path)
        async with _storage_errors:
            reply = await self._run(self.scripts.delete, k.all, [k.wake])
            status = await self._status(path, reply[0])
            if status == "not_found":
                raise NotFound("stream not found")
            if status == "gone":
                raise Gone("stream has been deleted")
            if status == "deleted" and _s(reply[1]):
                await self._release(_s(reply[1]), path)

    async def _release(self, source: str, fork: str) -> None:
        """Drop ``fork``'s reference on ``source``; cascade clean-up up the chain."""
        async with _storage_errors:
            for _ in range(MAX_FORK_DEPTH):
                keys = self.keys(source).all
                reply = await self._run(self.scripts.fork_release, keys, [fork])
                if _s(reply[0]) != "deleted" or not _s(reply[1]):
                    return
                source, fork = _s(reply[1]), source

    async def _is_fork_of(self, path: str, source: str) -> bool:
        async with _storage_errors:
            owner = await self.client.execute_command("HGET", self.keys(path).meta, "fsrc")
        return owner is not None and _s(owner) == source

    async def _collect(self, path: str) -> bool:
        """Drop references held by forks that no longer exist (a fork that
        expired runs no code that could release its source), then report
        whether ``path`` was only being kept for them and is now gone.

        Called when a client meets a soft-deleted or expired-but-pinned stream,
        so such a stream is cleaned up on the next access to its path.
        """
        k = self.keys(path)
        async with _storage_errors:
            forks = await self.client.execute_command("SMEMBERS", k.forks)
            for raw in forks or []:
                fork = _s(raw)
                if not await self._is_fork_of(fork, path):
                    await self._release(path, fork)
            return not await self.client.execute_command("EXISTS", k.meta)

    # -- reads (sections 5.5-5.8) ----------------------------------------------

    async def head(self, path: str) -> StreamInfo:
        async with _storage_errors:
            page = await self._read(path, "", "", 1, "head")
        return page.info

    async def read(self, path: str, offset: str | None, *, large: bool = False) -> Page:
        """One page after ``offset`` (a token), or metadata only at the tail (None).

        ``large``: a catch-up read, which may be a long run of large pages: where
        read.lua can size the page from the stream's statistics, the page comes
        from a plain XRANGE instead of through Lua (see read.lua). Live reads,
        mostly at the tail, skip that second round trip."""
        after = "" if offset is None else off.to_entry_id(offset)
        async with _storage_errors:
            return await self._read(path, after, "", MAX_PAGE_ENTRIES, "read", plan=large)

    async def _xrange(
        self, path: str, info: StreamInfo, after: str, budget: int, wanted: int
    ) -> _Range:
        """The page after id ``after`` as read.lua planned it: up to the tail it
        just reported (what is appended meanwhile waits for the next page, so
        the page and its metadata agree), cut at the byte budget as read.lua
        cuts it."""
        tail = off.to_entry_id(info.tail)
        async with self._limited():
            batch = await self.client.execute_command(
                "XRANGE", self.keys(path).data, "(" + after, tail, "COUNT", wanted
            )
        entries: list[bytes] = []
        used, last = 0, after
        for entry_id, fields in batch:
            # [field, value, ...] from the pipelined client; redis-py's clients
            # parse XRANGE entries into dicts.
            data = fields[b"d"] if isinstance(fields, dict) else fields[1]
            if entries and used + len(data) > budget:
                break
            entries.append(data)
            used += len(data)
            last = _s(entry_id)
        more = bool(entries) and (
            len(entries) < len(batch)
            or (len(batch) == wanted and off.id_key(last) < off.id_key(tail))
        )
        return _Range(info, entries, used, last, more)

    async def _read(
        self, path: str, after: str, upto: str, max_entries: int, mode: str, plan: bool = False
    ) -> Page:
        r = await self._read_range(
            path, after, upto, self.max_read_bytes, max_entries, mode, depth=0, plan=plan
        )
        # The page's one copy of its data (a single entry is not even copied).
        body = (b"," if r.info.is_json else b"").join(r.entries)
        return Page(r.info, body, off.from_entry_id(r.last), r.more)

    async def _status(self, path: str, status: Any) -> str:
        """A script's status for ``path``, 'gone' becoming 'not_found' when the
        stream was only kept for forks that no longer exist (see _collect)."""
        status = _s(status)
        if status == "gone" and await self._collect(path):
            return "not_found"
        return status

    async def _info(self, path: str, reply: list[Any]) -> StreamInfo:
        """The stream's metadata from a read.lua reply; NotFound or Gone if
        the read found no stream."""
        status = await self._status(path, reply[0])
        if status == "not_found":
            raise NotFound("stream not found")
        if status == "gone":
            raise Gone("stream has been deleted")
        return StreamInfo(
            content_type=_s(reply[1]),
            tail=off.from_entry_id(_s(reply[2])),
            closed=_s(reply[3]) == "1",
            ttl=int(reply[4]) if _s(reply[4]) else None,
            expires_at=int(reply[5]) if _s(reply[5]) else None,
        )

    async def _read_range(
        self,
        path: str,
        after: str,
        upto: str,
        budget: int,
        max_entries: int,
        mode: str,
        depth: int,
        continuing: bool = False,
        plan: bool = False,
    ) -> _Range:
        """Entries of ``path`` after id ``after`` (and not after id ``upto``),
        stitching in the fork source's entries when the range starts before the
        fork offset (forks share their source's offset space, section 8)."""
        if depth > MAX_FORK_DEPTH:
            raise Conflict("fork chain too deep")
        reply = await self._run(
            self.scripts.read,
            self.keys(path).all,
            [
                after,
                budget,
                max_entries,
                upto,
                mode,
                "1" if continuing else "",
                "1" if plan else "",
            ],
        )
        info = await self._info(path, reply)
        status = _s(reply[0])
        if status == "xrange":
            return await self._xrange(path, info, after, budget, int(reply[11]))
        if status == "ok":
            entries: list[bytes] = reply[8]
            size = sum(map(len, entries))
            return _Range(info, entries, size, _s(reply[9]), _s(reply[10]) == "1")
        # status == 'fork': the range starts in data inherited from the source.
        source, fork_offset = _s(reply[6]), _s(reply[7])
        bound = fork_offset
        if upto and off.id_key(upto) < off.id_key(fork_offset):
            bound = upto
        src = await self._read_range(source, after, bound, budget, max_entries, "source", depth + 1)
        if src.more or bound != fork_offset:
            return _Range(info, src.entries, src.size, src.last, src.more)
        # The inherited range ends at the fork offset; go on with the fork's own
        # entries while the page has room (only an empty page takes an entry
        # larger than the budget: every page holds at least one).
        room, entries_left = budget - src.size, max_entries - len(src.entries)
        if entries_left <= 0 or room <= 0:
            own_data = info.tail > off.from_entry_id(fork_offset)
            return _Range(info, src.entries, src.size, fork_offset, own_data)
        own = await self._read_range(
            path, fork_offset, upto, room, entries_left, mode, depth, continuing=bool(src.entries)
        )
        entries = src.entries + own.entries
        return _Range(info, entries, src.size + own.size, own.last, own.more)


class _Range(NamedTuple):
    info: StreamInfo
    entries: list[bytes]  # the data of each entry read, in order (joined into the page body)
    size: int  # bytes in entries
    last: str  # entry id of the last entry read (or where the range started)
    more: bool
