-- read.lua: stream metadata plus one page of entries (GET and HEAD, sections
-- 5.5-5.8). The entries come back as an array and the gateway joins them:
-- Redis' Lua hashes every byte of every string it creates, and table.concat
-- builds a large page through a series of ever longer intermediate strings,
-- which cost more than the XRANGEs.
-- KEYS: 1 meta, 2 data, 3 producers, 4 forks (unused)
-- ARGV: 1 read entries after this id, or '' for metadata only,
--       2 page size in bytes, 3 most entries in the page,
--       4 read no entry after this id, or '' (bounds reads of a fork's source),
--       5 mode: 'read' (a client read: resets a sliding TTL), 'head' (does not),
--               'source' (a fork reading its source: sees soft-deleted streams too),
--       6 '1' if the page already holds entries (then even the first entry here
--         must fit the byte budget),
--       7 '1' to let the gateway fetch the page with a plain XRANGE where it can
--         (see below),
--       8 '1' to read from the earliest retained entry when the offset is
--         before it (offset=-1), instead of answering 'trimmed'
-- Reply: {status, content type, tail, closed, ttl, expires-at, fork source,
--         fork offset, entries, last id, '1' if more entries follow in range, count,
--         retention max age, retention max bytes (as set at creation, or ''),
--         id of the last entry trimmed by retention or ''}
--   entries: the page's entry data in order (the gateway joins them with ','
--   for JSON streams, where each entry holds comma-joined messages, and with
--   nothing otherwise).
--   status: 'ok', 'fork' (the range starts before the fork offset: read the
--   source first), 'xrange' (no entries here: XRANGE up to the tail, COUNT
--   count, and cut the page at the byte budget; from the last id, which is
--   where the read starts), 'trimmed' (the range starts before the earliest
--   retained entry: 410), 'not_found', 'gone'
local meta_key, data_key = KEYS[1], KEYS[2]
local after, max_bytes, max_entries = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local upto, mode, continuing = ARGV[4], ARGV[5], ARGV[6] == '1'
local plan = ARGV[7] == '1'
local from_earliest = ARGV[8] == '1'

local m = hgetall(meta_key)
if next(m) == nil then return {'not_found'} end
local now = now_ms()
if mode ~= 'source' then
  if is_gone(meta_key, m, now) then return {'gone'} end
  if mode == 'read' and m.ttl then touch(KEYS, m, now) end
end

local function reply(status, entries, last, more, count)
  return {status, m.ct, m.tail, m.closed or '', m.ttl or '', m.exp or '',
          m.fsrc or '', m.foff or '', entries, last, more, count,
          m.rage or '', m.rbytes or '', m.trim or ''}
end

if after == '' then return reply('ok', {}, m.tail, '', 0) end
-- Retention trimmed the entries up to m.trim (append.lua): a reader at m.trim
-- has everything before the retained range, one before it has missed data.
if m.trim and id_cmp(after, m.trim) < 0 then
  if not from_earliest then return reply('trimmed', {}, m.trim, '', 0) end
  after = m.trim
end
if m.foff and id_cmp(after, m.foff) < 0 then return reply('fork', {}, after, '', 0) end

-- Every byte a script reads passes through Lua strings twice (XRANGE's reply
-- into Lua, the script's reply out of it), which costs Redis about four times
-- what a plain XRANGE of the same entries costs. Where the stream's statistics
-- (create.lua, append.lua) can size the page, the gateway fetches it itself:
-- enough entries to fill it at the average size, never more than four pages'
-- worth at the largest. Where that would make pages much smaller than the
-- ones read here (a few entries far larger than the rest), read here.
-- At the tail (a live reader waiting for the next append): nothing to fetch.
if id_cmp(after, m.tail) >= 0 then return reply('ok', {}, after, '', 0) end

if plan and m.b and upto == '' then
  local entries = redis.call('XLEN', data_key)
  if entries > 0 then
    local average = math.max(1, math.floor(tonumber(m.b) / entries))
    local natural = math.min(max_entries, math.floor(max_bytes / average) + 1)
    local wanted = math.min(natural, math.floor(4 * max_bytes / math.max(1, tonumber(m.mx))))
    if wanted >= 8 and wanted >= math.floor(natural / 4) then
      return reply('xrange', {}, after, '', wanted)
    end
  end
end

local parts, size, count, last, more = {}, 0, 0, after, ''
local start, stop = '(' .. after, upto ~= '' and upto or '+'
-- Fetch in batches sized to what the page can still hold: XRANGE copies every
-- entry it returns, so fetching far past the byte budget costs real time. A
-- batch also stays near BATCH_BYTES: Redis gathers a command's whole reply in
-- one growing buffer before handing it to Lua, which gets slower than linear
-- beyond about a megabyte, while a further XRANGE costs only microseconds.
local BATCH_BYTES = 262144
local batch_size = math.min(max_entries, 4)
while true do
  local batch = redis.call('XRANGE', data_key, start, stop, 'COUNT', batch_size)
  for _, entry in ipairs(batch) do
    local fields = entry[2]
    local data = fields[2]
    if (count > 0 or continuing) and (size + #data > max_bytes or count >= max_entries) then
      more = '1'
      break
    end
    parts[#parts + 1] = data
    size = size + #data
    count = count + 1
    last = entry[1]
  end
  if more == '1' or #batch < batch_size then break end
  if count >= max_entries then
    more = '1'
    break
  end
  start = '(' .. last
  -- Entries seen so far predict how many more fit (plus one to detect the end).
  local average = math.max(1, size / count)
  batch_size = math.max(1, math.min(max_entries - count, 256,
                                    math.floor((max_bytes - size) / average) + 1,
                                    math.floor(BATCH_BYTES / average)))
end
return reply('ok', parts, last, more, count)
