"""The storage seam: every stream operation, backed by Redis.

The HTTP layer talks only to ``Store``. Each method is one atomic Lua script on
the stream's own hash slot, except the operations that span two streams (fork
creation, the deletes that cascade up a fork chain, and reads that stitch a fork
onto its source), which are sequences of single-slot scripts ordered so that a
crash between steps can only leak a reference, never lose data. Redis errors are
translated to protocol errors here and nowhere else.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from gateway.protocol import headers, jsonmode, offsets
from gateway.protocol.errors import BadRequest, Conflict, Forbidden, Gone, NotFound

from .client import RedisClient, ReplicaWait
from .commit import GroupCommit, LocalWakes
from .errors import storage_errors
from .keys import StreamKeys, stream_keys
from .models import AppendRequest, AppendResult, CreateRequest, CreateResult, Page, StreamInfo
from .replies import AppendReply, CreateReply, DeleteReply, ForkAcquireReply, ReadReply, text
from .scripts import Scripts

__all__ = ["MAX_FORK_DEPTH", "MAX_PAGE_ENTRIES", "Store"]

# A fork chain is walked one level per round trip; bound it against cycles and
# absurd depths (a fork of a fork of ... 64 deep).
MAX_FORK_DEPTH = 64

# Most appends in one page, whatever the byte budget. Redis turns every entry a
# script reads into Lua values at a few microseconds each and serves nobody else
# meanwhile, so a page of tiny appends costs Redis time per entry, not per byte:
# this keeps one read's script to about ten milliseconds.
MAX_PAGE_ENTRIES = 4096


class Store:
    """Every stream operation, each one atomic Lua script on the stream's slot
    (or, across two streams, a sequence of them; see the module docstring)."""

    def __init__(
        self,
        client: RedisClient,
        key_prefix: str,
        max_read_bytes: int,
        *,
        batch_per_stream: bool = False,
        local_wakes: LocalWakes | None = None,
        retention: tuple[int, int] = (0, 0),
        wait: ReplicaWait | None = None,
    ) -> None:
        """``batch_per_stream``: commit only appends to the same stream together
        (Redis Cluster, where one script's keys must share a hash slot);
        otherwise appends to any streams share a script run. ``local_wakes``:
        told of the wake-ups of this process's appends as their scripts return.
        ``retention``: the default max age (seconds) and max bytes of streams
        created without their own, 0 for none.
        ``wait``: acknowledge writes (creates, appends, deletes, fork references)
        only once that many replicas have them (Redis WAIT, DS_WAIT_REPLICAS)."""
        self.client = client
        self.wait = wait
        self.key_prefix = key_prefix
        self.max_read_bytes = max_read_bytes
        self.retention = retention
        self.scripts = Scripts()
        self.commits = GroupCommit(
            client,
            self.scripts.append,
            self.keys,
            per_stream=batch_per_stream,
            local_wakes=local_wakes,
            retention=retention,
            wait=wait,
        )

    def keys(self, path: str) -> StreamKeys:
        return stream_keys(self.key_prefix, path)

    async def load_scripts(self) -> None:
        async with storage_errors:
            await self.scripts.load(self.client)

    async def ping(self) -> bool:
        async with storage_errors:
            return bool(await self.client.ping())

    # -- create (section 5.1) and fork (section 4.2) ----------------------------

    async def create(self, path: str, req: CreateRequest) -> CreateResult:
        async with storage_errors:
            if req.fork_source is None:
                if req.fork_sub_offset is not None:
                    raise BadRequest("Stream-Fork-Sub-Offset requires Stream-Forked-From")
                return await self._create(path, req, base_tail=offsets.ZERO_ID)
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
            _optional(req.retention_max_age),
            _optional(req.retention_max_bytes),
            *self.retention,
        ]
        for data, count in entries:
            args += [data, "" if count is None else str(count)]
        reply = CreateReply.parse(
            await self.scripts.create(self.client, self.keys(path).all, args, self.wait)
        )
        if reply.status == "conflict":
            raise Conflict("stream exists with a different configuration")
        if reply.status == "gone":
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
        content_type = reply.content_type if reply.status == "exists" else req.content_type
        return CreateResult(
            reply.status == "created", offsets.from_entry_id(reply.tail), reply.closed, content_type
        )

    async def _create_fork(self, path: str, req: CreateRequest) -> CreateResult:
        assert req.fork_source is not None
        source = req.fork_source
        if source == path:
            raise BadRequest("a stream cannot be forked from itself")
        sub = req.fork_sub_offset or 0
        if sub > 0 and req.fork_offset is None:
            raise BadRequest("Stream-Fork-Sub-Offset needs an explicit Stream-Fork-Offset")
        offset_id = "" if req.fork_offset is None else offsets.parse(req.fork_offset, "fork offset")
        requested_mt = headers.media_type(req.content_type) if req.content_type else ""
        acquired = ForkAcquireReply.parse(
            await self.scripts.fork_acquire(
                self.client, self.keys(source).all, [requested_mt, offset_id, path], self.wait
            )
        )
        status = await self._status(source, acquired.status)
        if status == "not_found":
            raise NotFound("fork source stream not found")
        if status == "gone":
            raise Conflict("fork source stream has been deleted")
        if status == "ct_mismatch":
            raise Conflict("Content-Type differs from the source stream's")
        if status == "beyond_tail":
            raise BadRequest("Stream-Fork-Offset is beyond the source stream's tail")
        if status == "trimmed":
            raise BadRequest(
                "Stream-Fork-Offset is before the source stream's earliest retained position"
            )
        fork_offset_id = acquired.fork_offset
        created = False
        try:
            prefix = None
            if sub > 0:
                prefix = await self._sub_offset_prefix(source, fork_offset_id, sub)
            ttl, expires_at = req.ttl, req.expires_at
            if ttl is None and expires_at is None:
                # Section 4.2's table: a fork without its own expiry inherits the source's.
                ttl = int(acquired.ttl) if acquired.ttl else None
                expires_at = int(acquired.expires_at) if acquired.expires_at else None
            fork_req = CreateRequest(
                content_type=req.content_type or acquired.content_type,
                ttl=ttl,
                expires_at=expires_at,
                closed=req.closed,
                entries=req.entries,
                fork_source=source,
                fork_offset=None,
                fork_sub_offset=sub or None,
                retention_max_age=req.retention_max_age,
                retention_max_bytes=req.retention_max_bytes,
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
            # acquired.registered is False when this fork path held a reference already.
            if acquired.registered and not created and not await self._is_fork_of(path, source):
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
        if page.next_offset == offsets.from_entry_id(anchor_id) or not page.body:
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

    async def append(self, path: str, req: AppendRequest) -> AppendResult:
        """Append and/or close. Every append of one event-loop turn (on a
        standalone Redis, or of one stream on Redis Cluster) is committed in one
        script run (lua/append.lua, gateway/storage/commit.py): the group
        commit, which gives each append exactly what it would get alone."""
        producer = req.producer
        count = "" if req.json_count is None else str(req.json_count)
        item: tuple[Any, ...]
        if req.body is not None and not req.close and not req.stream_seq and producer is None:
            item = ("", req.media_type, req.body, count)  # a plain append: its short form
        else:
            item = (
                "x",
                req.media_type,
                "1" if req.body is not None else "",
                "1" if req.close else "",
                req.stream_seq or "",
                producer.id if producer else "",
                str(producer.epoch) if producer else "",
                str(producer.seq) if producer else "",
                req.body or b"",
                count,
            )
        raw = await self.commits.submit(path, item, len(req.body or b""))
        if type(raw) is bytes:  # a plain append's reply: its entry id alone
            return AppendResult("ok", offsets.from_entry_id(raw.decode()), False, None, None)
        reply = AppendReply.parse(raw)
        status = await self._status(path, reply.status)
        if status == "not_found":
            raise NotFound("stream not found")
        if status == "gone":
            raise Gone("stream has been deleted")
        tail = offsets.from_entry_id(reply.tail)
        base: dict[str, str] = {"Stream-Next-Offset": tail}
        if reply.closed:
            base["Stream-Closed"] = "true"
        if status == "closed":
            raise Conflict("stream is closed", base)
        if status == "ct_mismatch":
            raise Conflict("Content-Type does not match the stream's", base)
        if status == "seq_conflict":
            raise Conflict("Stream-Seq must increase", base)
        if status == "stale_epoch":
            raise Forbidden("stale producer epoch", {**base, "Producer-Epoch": reply.epoch})
        if status == "epoch_seq":
            raise BadRequest("a new producer epoch must start at Producer-Seq 0")
        if status == "seq_gap":
            raise Conflict(
                "producer sequence gap",
                {**base, "Producer-Expected-Seq": reply.epoch, "Producer-Received-Seq": reply.seq},
            )
        if producer is None:
            return AppendResult(status, tail, reply.closed, None, None)
        return AppendResult(status, tail, reply.closed, reply.epoch, reply.seq)

    # -- delete (section 5.4) --------------------------------------------------

    async def delete(self, path: str) -> None:
        k = self.keys(path)
        async with storage_errors:
            reply = DeleteReply.parse(
                await self.scripts.delete(self.client, k.all, [k.wake], self.wait)
            )
            status = await self._status(path, reply.status)
            if status == "not_found":
                raise NotFound("stream not found")
            if status == "gone":
                raise Gone("stream has been deleted")
            if status == "deleted" and reply.fork_source:
                await self._release(reply.fork_source, path)

    async def _release(self, source: str, fork: str) -> None:
        """Drop ``fork``'s reference on ``source``; cascade clean-up up the chain."""
        async with storage_errors:
            for _ in range(MAX_FORK_DEPTH):
                keys = self.keys(source).all
                reply = DeleteReply.parse(
                    await self.scripts.fork_release(self.client, keys, [fork], self.wait)
                )
                if reply.status != "deleted" or not reply.fork_source:
                    return
                source, fork = reply.fork_source, source

    async def _is_fork_of(self, path: str, source: str) -> bool:
        async with storage_errors:
            owner = await self.client.execute_command("HGET", self.keys(path).meta, "fsrc")
        return owner is not None and text(owner) == source

    async def _collect(self, path: str) -> bool:
        """Drop references held by forks that no longer exist (a fork that
        expired runs no code that could release its source), then report
        whether ``path`` was only being kept for them and is now gone.

        Called when a client meets a soft-deleted or expired-but-pinned stream,
        so such a stream is cleaned up on the next access to its path.
        """
        k = self.keys(path)
        async with storage_errors:
            forks = await self.client.execute_command("SMEMBERS", k.forks)
            for raw in forks or []:
                fork = text(raw)
                if not await self._is_fork_of(fork, path):
                    await self._release(path, fork)
            return not await self.client.execute_command("EXISTS", k.meta)

    # -- reads (sections 5.5-5.8) ----------------------------------------------

    async def head(self, path: str) -> StreamInfo:
        async with storage_errors:
            page = await self._read(path, "", "", 1, "head")
        return page.info

    async def read(self, path: str, offset: str | None, *, large: bool = False) -> Page:
        """One page after ``offset`` (a token), or metadata only at the tail (None).
        ``-1`` reads from the earliest retained position; any other offset before
        it is Gone (section 5.6: retention).

        ``large``: a catch-up read, which may be a long run of large pages: where
        read.lua can size the page from the stream's statistics, the page comes
        from a plain XRANGE instead of through Lua (see read.lua). Live reads,
        mostly at the tail, skip that second round trip."""
        earliest = offset == offsets.BEGINNING
        if offset is None:
            after = ""
        else:
            after = offsets.ZERO_ID if earliest else offsets.to_entry_id(offset)
        async with storage_errors:
            return await self._read(
                path, after, "", MAX_PAGE_ENTRIES, "read", plan=large, earliest=earliest
            )

    async def _xrange(
        self, path: str, info: StreamInfo, after: str, budget: int, wanted: int
    ) -> _Range:
        """The page after id ``after`` as read.lua planned it: up to the tail it
        just reported (what is appended meanwhile waits for the next page, so
        the page and its metadata agree), cut at the byte budget as read.lua
        cuts it."""
        tail = offsets.to_entry_id(info.tail)
        batch = await self.client.execute_command(
            "XRANGE", self.keys(path).data, "(" + after, tail, "COUNT", wanted
        )
        entries: list[bytes] = []
        used, last = 0, after
        for entry_id, fields in batch:
            data = fields[1]  # fields: [b"d", data, ...]
            if entries and used + len(data) > budget:
                break
            entries.append(data)
            used += len(data)
            last = text(entry_id)
        more = bool(entries) and (
            len(entries) < len(batch)
            or (len(batch) == wanted and offsets.id_key(last) < offsets.id_key(tail))
        )
        return _Range(info, entries, used, last, more)

    async def _read(
        self,
        path: str,
        after: str,
        upto: str,
        max_entries: int,
        mode: str,
        plan: bool = False,
        earliest: bool = False,
    ) -> Page:
        r = await self._read_range(
            path,
            after,
            upto,
            self.max_read_bytes,
            max_entries,
            mode,
            depth=0,
            plan=plan,
            earliest=earliest,
        )
        # The page's one copy of its data (a single entry is not even copied).
        body = (b"," if r.info.is_json else b"").join(r.entries)
        return Page(r.info, body, offsets.from_entry_id(r.last), r.more)

    async def _status(self, path: str, status: str) -> str:
        """A script's status for ``path``, 'gone' becoming 'not_found' when the
        stream was only kept for forks that no longer exist (see _collect)."""
        if status == "gone" and await self._collect(path):
            return "not_found"
        return status

    async def _info(self, path: str, reply: ReadReply) -> StreamInfo:
        """The stream's metadata from a read.lua reply; NotFound or Gone if
        the read found no stream."""
        status = await self._status(path, reply.status)
        if status == "not_found":
            raise NotFound("stream not found")
        if status == "gone":
            raise Gone("stream has been deleted")
        return StreamInfo(
            content_type=reply.content_type,
            tail=offsets.from_entry_id(reply.tail),
            closed=reply.closed,
            ttl=reply.ttl,
            expires_at=reply.expires_at,
            retention_max_age=_limit(reply.retention_max_age, self.retention[0]),
            retention_max_bytes=_limit(reply.retention_max_bytes, self.retention[1]),
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
        earliest: bool = False,
    ) -> _Range:
        """Entries of ``path`` after id ``after`` (and not after id ``upto``),
        stitching in the fork source's entries when the range starts before the
        fork offset (forks share their source's offset space, section 8).
        ``earliest``: a range starting before the earliest retained entry
        starts there (offset=-1) rather than being Gone."""
        if depth > MAX_FORK_DEPTH:
            raise Conflict("fork chain too deep")
        continued, planned = "1" if continuing else "", "1" if plan else ""
        args = [after, budget, max_entries, upto, mode, continued, planned, "1" if earliest else ""]
        reply = ReadReply.parse(await self.scripts.read(self.client, self.keys(path).all, args))
        info = await self._info(path, reply)
        if reply.status == "trimmed":
            raise Gone(
                "offset is before the earliest retained position "
                f"{offsets.from_entry_id(reply.last)} (retention): read from offset=-1"
            )
        if reply.status == "xrange":
            # From reply.last: where the read starts (-1 starts at the earliest).
            return await self._xrange(path, info, reply.last, budget, reply.entry_count)
        if reply.status == "ok":
            size = sum(map(len, reply.entries))
            return _Range(info, reply.entries, size, reply.last, reply.more)
        # status == 'fork': the range starts in data inherited from the source.
        source, fork_offset = reply.fork_source, reply.fork_offset
        bound = fork_offset
        if upto and offsets.id_key(upto) < offsets.id_key(fork_offset):
            bound = upto
        src = await self._read_range(
            source, after, bound, budget, max_entries, "source", depth + 1, earliest=earliest
        )
        if src.more or bound != fork_offset:
            return _Range(info, src.entries, src.size, src.last, src.more)
        # The inherited range ends at the fork offset; go on with the fork's own
        # entries while the page has room (only an empty page takes an entry
        # larger than the budget: every page holds at least one).
        room, entries_left = budget - src.size, max_entries - len(src.entries)
        if entries_left <= 0 or room <= 0:
            own_data = info.tail > offsets.from_entry_id(fork_offset)
            return _Range(info, src.entries, src.size, fork_offset, own_data)
        own = await self._read_range(
            path, fork_offset, upto, room, entries_left, mode, depth, continuing=bool(src.entries)
        )
        entries = src.entries + own.entries
        return _Range(info, entries, src.size + own.size, own.last, own.more)


def _optional(value: int | None) -> str:
    return "" if value is None else str(value)


def _limit(stored: str, default: int) -> int | None:
    """A retention limit in force: the stream's own, else the default; None for none."""
    value = int(stored) if stored else default
    return value or None


class _Range(NamedTuple):
    info: StreamInfo
    entries: list[bytes]  # the data of each entry read, in order (joined into the page body)
    size: int  # bytes in entries
    last: str  # entry id of the last entry read (or where the range started)
    more: bool
