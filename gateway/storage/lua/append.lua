-- append.lua: appends and closes (POST, sections 5.2, 5.2.1 and 5.3), with
-- idempotent-producer validation, for every request the gateway issued in one
-- event-loop turn: its group commit (gateway/store.py, Store.append). Requests
-- are applied in the order given, each exactly as if it ran alone: it sees what
-- the requests before it wrote, and gets its own entry, offset and answer.
-- Validation and the append are one step, so requests of one producer may
-- arrive on any replica in any order.
--
-- One run costs Redis a fixed price (the script call, TIME) plus a few commands
-- per stream and one XADD per append: on a busy gateway most of an append's
-- Redis time is that fixed price, so sharing it is where throughput comes from.
-- The streams of one run share a hash slot in Redis Cluster (the gateway
-- batches per stream there); on a standalone Redis any streams may share it.
--
-- KEYS: 3 per stream, for stream 1, 2, ...: meta, data, producers
-- ARGV: 1 the number of streams S, 2 the server's default retention max age
--       in seconds, 3 its default max bytes ('' or '0' for none); then 2 per
--       stream: its wake-up channel, and
--       '1' to have its wake-up message returned (the caller has readers of it
--       and wakes them without waiting for the message); then per request:
--       stream number (1..S), its form, and the form's fields:
--         ''  a plain append (no close, Stream-Seq or producer; most requests):
--             request media type, data, JSON message count ('' for bytes)
--         'x' any request: request media type, '1' if there is a body, '1' to
--             close, Stream-Seq or '', Producer-Id or '', Producer-Epoch,
--             Producer-Seq, data, JSON message count
--       (Every ARGV value costs Redis a Lua string: most requests need 5, not 11.)
-- Reply: {replies, messages, trimmed}: trimmed is how many entries retention
-- removed in this run, summed over its streams (XTRIM's counts; 0 when none
-- was trimmed); messages holds, per stream, the wake-up message published for
-- it if it was asked for, else ''; replies holds one reply per request, in
-- order:
--   tail                                    a plain append (no producer, no
--                                           close) appended: its id alone
--   {'ok', tail, closed, epoch, seq}        appended and/or closed
--   {'dup', tail, closed, epoch, last_seq}  producer duplicate, nothing written
--   {'closed_noop', tail, '1'}              close-only on a closed stream
--   {'closed', tail, '1'}                   stream is closed: 409
--   {'stale_epoch', tail, closed, epoch}    {'epoch_seq', tail}
--   {'seq_gap', tail, '', expected, received}
--   {'ct_mismatch', tail}  {'seq_conflict', tail}  {'not_found'}  {'gone'}
--
-- Retention: after a stream's appends, its oldest entries beyond its max age
-- or max bytes are trimmed (see trim below), at most TRIM_BATCH of them per
-- run, and only once the stream is over its limit by some slack, so most runs
-- only compare two numbers.
local nstreams = tonumber(ARGV[1])
local default_max_age, default_max_bytes = ARGV[2], ARGV[3]
-- Most deployments set no default: then only streams created with a limit of
-- their own look any further (two table lookups per stream, no calls).
local default_retention = (tonumber(default_max_age) or 0) > 0
  or (tonumber(default_max_bytes) or 0) > 0
local now = now_ms()
local now_id = string.format('%d-0', now)  -- for next_id

-- Per stream, loaded on its first request: its metadata (kept current as
-- requests apply, and written back once at the end), its producers' states,
-- and what its wake-up needs.
local streams = {}

local function stream(s)
  local st = streams[s]
  if st then return st end
  local m = hgetall(KEYS[3 * s - 2])
  -- Tables for producers are made only when a request has one (see
  -- producer_state): every table costs a plain append's run measurably.
  st = {m = m, prev = m.tail, appends = 0}
  if next(m) == nil then
    st.refusal = {'not_found'}
  elseif is_gone(KEYS[3 * s - 2], m, now) then
    st.refusal = {'gone'}
  end
  streams[s] = st
  return st
end

-- A producer's last accepted {epoch, seq}, or false if it has none.
local function producer_state(st, s, pid)
  if not st.producers then
    -- producers: their last {epoch, seq} as read or written in this run;
    -- states: those to write back, as HSET's field-value pairs.
    st.producers, st.states = {}, {}
  end
  local state = st.producers[pid]
  if state == nil then
    state = false
    local stored = redis.call('HGET', KEYS[3 * s], pid)
    if stored then
      local colon = string.find(stored, ':', 1, true)
      state = {tonumber(string.sub(stored, 1, colon - 1)), tonumber(string.sub(stored, colon + 1))}
    end
    st.producers[pid] = state
  end
  return state
end

-- One request: its stream number s, media type, whether it has a body and
-- closes, Stream-Seq, producer id/epoch/seq, data and JSON message count.
local function apply(s, media_type, has_body, close, stream_seq, pid, epoch_s, seq_s, data, count)
  local st = stream(s)
  if st.refusal then return st.refusal end
  local m = st.m
  local tail = m.tail

  local epoch, seq, state_epoch, state_seq
  if pid ~= '' then
    epoch, seq = tonumber(epoch_s), tonumber(seq_s)
    local state = producer_state(st, s, pid)
    if state then state_epoch, state_seq = state[1], state[2] end
  end

  if m.closed == '1' then
    if pid ~= '' then
      -- A retry of the request that closed the stream is a duplicate, not an error.
      if m.closer == pid .. ':' .. epoch_s .. ':' .. seq_s then
        return {'dup', tail, '1', epoch_s, string.format('%.0f', state_seq or seq)}
      end
      if state_epoch and epoch < state_epoch then
        return {'stale_epoch', tail, '1', string.format('%.0f', state_epoch)}
      end
    end
    if close and not has_body then return {'closed_noop', tail, '1'} end
    return {'closed', tail, '1'}
  end

  if has_body and m.mt ~= media_type then return {'ct_mismatch', tail} end

  if pid ~= '' then
    if state_epoch == nil then
      if seq ~= 0 then return {'seq_gap', tail, '', '0', seq_s} end
    elseif epoch < state_epoch then
      return {'stale_epoch', tail, '', string.format('%.0f', state_epoch)}
    elseif epoch > state_epoch then
      if seq ~= 0 then return {'epoch_seq', tail} end
    elseif seq <= state_seq then
      return {'dup', tail, '', epoch_s, string.format('%.0f', state_seq)}
    elseif seq ~= state_seq + 1 then
      return {'seq_gap', tail, '', string.format('%.0f', state_seq + 1), seq_s}
    end
  end

  if stream_seq ~= '' and m.seq and byte_cmp(stream_seq, m.seq) <= 0 then
    return {'seq_conflict', tail}
  end

  if has_body then
    tail = next_id(tail, now, now_id)
    if count ~= '' then
      redis.call('XADD', KEYS[3 * s - 1], tail, 'd', data, 'n', count)
    else
      redis.call('XADD', KEYS[3 * s - 1], tail, 'd', data)
    end
    m.tail = tail
    st.appends = st.appends + 1
    st.data = data
    if m.b then
      local size = #data
      m.b = tonumber(m.b) + size
      if size > tonumber(m.mx) then m.mx, st.grew = size, true end
      -- Streams that retention trims also track the largest entry since mxe.
      if m.mxe and size > tonumber(m.mxn) then m.mxn, st.grew = size, true end
    end
  end
  st.dirty = true
  if stream_seq ~= '' then
    m.seq = stream_seq
    st.wrote_seq = true
  end
  if close then
    m.closed = '1'
    st.wrote_closed = true
    if pid ~= '' then m.closer = pid .. ':' .. epoch_s .. ':' .. seq_s end
  end
  if pid ~= '' then
    st.producers[pid] = {epoch, seq}
    st.states[#st.states + 1] = pid
    st.states[#st.states + 1] = epoch_s .. ':' .. seq_s
  end
  if pid == '' and not close then return tail end  -- the common case, kept short
  return {'ok', tail, close and '1' or '', epoch_s, seq_s}
end

-- Retention (section 4: servers may drop data older than a limit while the
-- stream continues). Entries leave from the head only, so what remains is
-- always one contiguous range after meta.trim, and a read from before it gets
-- 410 instead of silently skipping data. Trimming starts only when the stream
-- is over a limit by a sixteenth (bytes), or its oldest entry is over the age
-- by a sixteenth of it (at most a minute), and takes at most TRIM_BATCH entries
-- per run: a stream far over its limit (a lowered limit, a burst) is brought
-- back over the next runs instead of holding Redis for one long one. Streams
-- that forks read are not trimmed: every fork reads its source from the
-- source's earliest entry up to its fork offset.
local TRIM_BATCH = 128
-- Entries the trims of this run removed, for the reply (the gateway counts
-- them in its metrics).
local trimmed_entries = 0

local function trim_due(m, max_age_ms, max_bytes)
  if max_bytes > 0 and m.b and tonumber(m.b) > max_bytes + math.floor(max_bytes / 16) then
    return true
  end
  if max_age_ms > 0 then
    local slack = math.min(math.floor(max_age_ms / 16), 60000)
    return now >= (tonumber(m.first) or 0) + max_age_ms + slack
  end
  return false
end

-- Trim the head of stream s's data; updates m.trim, m.first, m.b and the
-- largest entry's size (st.grew when it changed). Every trimmed entry passes
-- through Lua once (its size keeps m.b exact), and as few others as can be:
-- the age pass asks XRANGE for the expired entries only, the size pass for
-- as many as the excess needs at the average size (plus one, to see where
-- the retained range starts).
local function trim(s, st, m, max_age_ms, max_bytes)
  local bytes = tonumber(m.b)
  local left = TRIM_BATCH
  local dropped, kept, first = nil, nil, 0
  if max_age_ms > 0 then
    -- An entry expires once its ms part is below the cutoff; the range end
    -- 'ms' covers every sequence number of that ms.
    local cutoff = now - max_age_ms
    local last = string.format('%d', cutoff - 1)
    local batch = redis.call('XRANGE', KEYS[3 * s - 1], '-', last, 'COUNT', left)
    for _, entry in ipairs(batch) do
      dropped = entry[1]
      if bytes then bytes = bytes - #entry[2][2] end
    end
    left = left - #batch
    -- Caught up: every entry left is from the cutoff on.
    if left > 0 then first = cutoff end
  end
  if max_bytes > 0 and bytes and bytes > max_bytes and left > 0 then
    local count = redis.call('XLEN', KEYS[3 * s - 1]) - (TRIM_BATCH - left)
    local average = math.max(1, bytes / math.max(1, count))
    local start = dropped and '(' .. dropped or '-'
    while left > 0 and not kept do
      local wanted = math.min(left, math.floor((bytes - max_bytes) / average) + 2)
      local batch = redis.call('XRANGE', KEYS[3 * s - 1], start, '+', 'COUNT', wanted)
      for _, entry in ipairs(batch) do
        -- Over the limit: drop, but never the newest entry.
        if bytes <= max_bytes or entry[1] == m.tail then
          kept = entry[1]
          break
        end
        dropped = entry[1]
        bytes = bytes - #entry[2][2]
        left = left - 1
      end
      if #batch < wanted then break end
      if not kept then start = '(' .. dropped end
    end
  end
  if kept then
    first = split_id(kept)
  elseif dropped then
    first = math.max(first, split_id(dropped))  -- both bounds from below
  end
  m.first = first > 0 and first or now
  if not dropped then return false end
  local ms, seq = split_id(dropped)
  -- XTRIM MINID drops the entries before the threshold: up to `dropped`.
  trimmed_entries = trimmed_entries
    + redis.call('XTRIM', KEYS[3 * s - 1], 'MINID', kept or string.format('%d-%d', ms, seq + 1))
  m.trim = dropped
  if bytes then m.b = bytes end
  -- mx must stay an upper bound of the retained entries' sizes without
  -- reading them all: it covers the entries up to mxe, and mxn those after.
  -- Once the trim passes mxe, mxn covers everything retained: it becomes
  -- mx, and a new span starts at the tail. So mx comes down within two
  -- trims of its largest entry leaving (read.lua sizes pages from it).
  if m.b and (not m.mxe or id_cmp(dropped, m.mxe) >= 0) then
    if m.mxe then m.mx = m.mxn end
    m.mxe, m.mxn = m.tail, 0
    st.grew = true
  end
  return true
end

local replies = {}
local a = 2 * nstreams + 4
while a <= #ARGV do
  if ARGV[a + 1] == '' then
    replies[#replies + 1] = apply(tonumber(ARGV[a]), ARGV[a + 2], true, false, '', '', '', '',
                                  ARGV[a + 3], ARGV[a + 4])
    a = a + 5
  else
    replies[#replies + 1] = apply(tonumber(ARGV[a]), ARGV[a + 2], ARGV[a + 3] == '1',
                                  ARGV[a + 4] == '1', ARGV[a + 5], ARGV[a + 6], ARGV[a + 7],
                                  ARGV[a + 8], ARGV[a + 9], ARGV[a + 10])
    a = a + 11
  end
end

-- Write back each changed stream once, and wake its readers once.
local messages = {}
for s = 1, nstreams do
  messages[s] = ''
  local st = streams[s]
  if st and st.dirty then
    local m = st.m
    local fields = {'tail', m.tail}
    local trimmed = false
    if st.appends > 0 and (default_retention or m.rage or m.rbytes) and refs_of(m) == 0 then
      local max_age_ms = retention_limit(m.rage, default_max_age) * 1000
      local max_bytes = retention_limit(m.rbytes, default_max_bytes)
      if (max_age_ms > 0 or max_bytes > 0) and trim_due(m, max_age_ms, max_bytes) then
        trimmed = trim(s, st, m, max_age_ms, max_bytes)
        if max_age_ms > 0 then
          fields[#fields + 1] = 'first'
          fields[#fields + 1] = string.format('%d', m.first)
        end
        if trimmed then
          fields[#fields + 1] = 'trim'
          fields[#fields + 1] = m.trim
        end
      end
    end
    -- The byte count changes with every append; the largest entry seldom
    -- does (and the entry count is the data's XLEN): written only as needed,
    -- as each field written costs this hot path measurably.
    if m.b and (st.appends > 0 or trimmed) then
      fields[#fields + 1] = 'b'
      fields[#fields + 1] = string.format('%d', m.b)
      if st.grew then
        fields[#fields + 1] = 'mx'
        fields[#fields + 1] = string.format('%d', m.mx)
        if m.mxe then
          fields[#fields + 1] = 'mxe'
          fields[#fields + 1] = m.mxe
          fields[#fields + 1] = 'mxn'
          fields[#fields + 1] = string.format('%d', m.mxn)
        end
      end
    end
    if st.wrote_seq then
      fields[#fields + 1] = 'seq'
      fields[#fields + 1] = m.seq
    end
    if st.wrote_closed then
      fields[#fields + 1] = 'closed'
      fields[#fields + 1] = '1'
      if m.closer then
        fields[#fields + 1] = 'closer'
        fields[#fields + 1] = m.closer
      end
    end
    redis.call('HSET', KEYS[3 * s - 2], unpack(fields))
    if m.c then
      -- Earlier versions kept the entry count here; it is the data's XLEN now,
      -- and a stale copy would mislead whoever inspects the hash.
      redis.call('HDEL', KEYS[3 * s - 2], 'c')
    end
    if st.states and #st.states > 0 then
      -- Later states of one producer overwrite earlier ones, as HSET applies
      -- field-value pairs in order.
      redis.call('HSET', KEYS[3 * s], unpack(st.states))
    end
    if m.ttl or m.exp then
      touch({KEYS[3 * s - 2], KEYS[3 * s - 1], KEYS[3 * s]}, m, now)
    end
    -- A single small append travels in its wake-up ('+prev next closed\ndata'),
    -- so a reader waiting at the previous tail answers without reading it back;
    -- otherwise the wake-up is the new tail, and readers read.
    local closed = st.wrote_closed
    local message = closed and (m.tail .. ' closed') or m.tail
    if st.appends == 1 and #st.data <= 16384 then
      message = '+' .. st.prev .. ' ' .. m.tail .. ' ' .. (closed and '1' or '') .. '\n'
        .. st.data
    end
    redis.call('PUBLISH', ARGV[2 * s + 2], message)
    if ARGV[2 * s + 3] == '1' then messages[s] = message end
  end
end
return {replies, messages, trimmed_entries}
