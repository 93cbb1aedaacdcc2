-- _lib.lua: helpers shared by every script. gateway/scripts.py prepends this file
-- to each operation's script before SCRIPT LOAD, so each script stays one atomic
-- operation while the helpers are written once.
--
-- Meta hash fields (see gateway/keys.py):
--   ct    content type as the creator sent it     mt   its media type, lower case
--   tail  id of the last entry ("ms-seq"; "0-0" when empty, the fork offset for forks)
--   closed "1" once closed                        closer "producer:epoch:seq" that closed it
--   ttl   sliding TTL in seconds                  exp  absolute expiry, epoch ms
--   acc   last access, epoch ms (TTL streams)     seq  last Stream-Seq
--   fsrc  source path of a fork                   foff fork offset id   fsub sub-offset
--   refs  number of forks reading this stream     del  "1" when soft-deleted
--   b, mx the bytes of the entries in the stream's own data, and the largest
--         one's (their number is the data's XLEN; streams created before these
--         existed lack them: see read.lua)
--   rage, rbytes  retention set at creation: max age in seconds, max bytes of
--         data ('0': keep everything; absent: the server default applies)
--   trim  id of the last entry trimmed by retention: offsets before it are
--         gone (410), the offset at it is the earliest readable position
--   mxe, mxn  (streams retention trimmed) mx covers the entries up to id mxe,
--         mxn the entries after it; see append.lua
--   first ms part of the oldest retained entry's id, or a lower bound of it
--         (when the next age trim is due; see append.lua)

-- Scripts read the clock and then write: replicate their effects, not the script.
-- (The default since Redis 5; a no-op that is kept for clarity on 6.2.)
pcall(redis.replicate_commands)

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function hgetall(key)
  local flat = redis.call('HGETALL', key)
  local m = {}
  for i = 1, #flat, 2 do
    m[flat[i]] = flat[i + 1]
  end
  return m
end

local function split_id(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end

-- -1, 0 or 1 as entry id a sorts before, with or after b.
local function id_cmp(a, b)
  local ams, aseq = split_id(a)
  local bms, bseq = split_id(b)
  if ams ~= bms then return ams < bms and -1 or 1 end
  if aseq ~= bseq then return aseq < bseq and -1 or 1 end
  return 0
end

-- The id of the next entry: time based like XADD '*', but always after `tail`,
-- which for a fork starts at the fork offset rather than at the stream's last id.
-- now_id, if given, is '<now>-0' formatted once by a caller making many ids
-- (most are the first of their stream in that millisecond). The sequence part
-- is parsed only when needed, and '%d' formats through an integer, far cheaper
-- than '%.0f' (ids have at most 16 digits a part, see gateway/offsets.py).
local function next_id(tail, now, now_id)
  local dash = string.find(tail, '-', 1, true)
  local ms = tonumber(string.sub(tail, 1, dash - 1))
  if now > ms then return now_id or string.format('%d-0', now) end
  return string.format('%d-%d', ms, tonumber(string.sub(tail, dash + 1)) + 1)
end

-- Byte-wise comparison (Lua's < on strings follows the server's locale).
local function byte_cmp(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y and -1 or 1 end
  end
  if #a == #b then return 0 end
  return #a < #b and -1 or 1
end

-- A retention limit as a number, 0 for none: the stream's own setting
-- (`explicit`, '0' meaning none) or else the server default.
local function retention_limit(explicit, default)
  return tonumber(explicit or default) or 0
end

local function refs_of(m)
  return tonumber(m.refs) or 0
end

-- While no fork reads a stream, Redis key expiry enforces its TTL/Expires-At.
-- Once forks pin it, its keys persist and expiry is judged here instead.
local function is_expired(m, now)
  if m.exp and now >= tonumber(m.exp) then return true end
  if m.ttl and m.acc and now >= tonumber(m.acc) + tonumber(m.ttl) * 1000 then return true end
  return false
end

-- A stream that clients may no longer address directly: deleted while forks
-- still read it, or expired while pinned by forks.
local function is_gone(meta_key, m, now)
  if m.del == '1' then return true end
  if refs_of(m) > 0 and is_expired(m, now) then
    redis.call('HSET', meta_key, 'del', '1')
    return true
  end
  return false
end

-- Record an access and re-arm Redis expiry on every key of the stream
-- (sliding TTL). keys = {meta, data, producers}.
local function touch(keys, m, now)
  if m.ttl then
    redis.call('HSET', keys[1], 'acc', now)
  end
  if refs_of(m) > 0 then return end
  local at = nil
  if m.exp then at = tonumber(m.exp) end
  if m.ttl then at = now + tonumber(m.ttl) * 1000 end
  if at then
    for i = 1, 3 do
      redis.call('PEXPIREAT', keys[i], string.format('%.0f', at))
    end
  end
end
