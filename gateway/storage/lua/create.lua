-- create.lua: create a stream, or confirm an identical one (PUT, section 5.1).
-- KEYS: 1 meta, 2 data, 3 producers, 4 forks
-- ARGV: 1 content type, 2 media type, 3 ttl seconds or '', 4 expires-at ms or '',
--       5 '1' to create closed, 6 fork source path or '', 7 fork offset id or '',
--       8 fork sub-offset or '', 9 initial tail id ('0-0', or the fork offset),
--       10 retention max age seconds or '', 11 retention max bytes or '' ('0':
--       keep everything), 12 the server's default max age, 13 its default
--       max bytes ('' or '0' for none: compared with the stream's, not stored),
--       14.. initial entries as pairs: data, JSON message count ('' for bytes)
-- Reply: {'created', tail, closed} | {'exists', tail, closed, content type}
--        | {'conflict'} | {'gone'}
local meta_key = KEYS[1]
local data_key = KEYS[2]
local now = now_ms()

-- An optional argument: nil when not given.
local function given(i)
  return ARGV[i] ~= '' and ARGV[i] or nil
end

local m = hgetall(meta_key)
if next(m) ~= nil then
  if is_gone(meta_key, m, now) then return {'gone'} end
  if m.mt ~= ARGV[2] or (m.ttl or '') ~= ARGV[3] or (m.exp or '') ~= ARGV[4]
      or (m.closed or '') ~= ARGV[5] or (m.fsrc or '') ~= ARGV[6]
      or (m.foff or '') ~= ARGV[7] or (m.fsub or '') ~= ARGV[8]
      -- Retention compares as it applies: unset means the server default.
      or retention_limit(m.rage, ARGV[12]) ~= retention_limit(given(10), ARGV[12])
      or retention_limit(m.rbytes, ARGV[13]) ~= retention_limit(given(11), ARGV[13]) then
    return {'conflict'}
  end
  return {'exists', m.tail, m.closed or '', m.ct}
end

-- No meta: clear whatever a previous incarnation may have left behind, so a
-- re-created stream never shows old entries or old producer state.
redis.call('DEL', data_key, KEYS[3], KEYS[4])

local tail = ARGV[9]
local bytes, largest = 0, 0
for i = 14, #ARGV, 2 do
  bytes, largest = bytes + #ARGV[i], math.max(largest, #ARGV[i])
  local id = next_id(tail, now)
  if ARGV[i + 1] ~= '' then
    redis.call('XADD', data_key, id, 'd', ARGV[i], 'n', ARGV[i + 1])
  else
    redis.call('XADD', data_key, id, 'd', ARGV[i])
  end
  tail = id
end

local fields = {'ct', ARGV[1], 'mt', ARGV[2], 'tail', tail, 'ctime', now,
                'b', bytes, 'mx', largest}
local optional = {ttl = ARGV[3], exp = ARGV[4], closed = ARGV[5],
                  fsrc = ARGV[6], foff = ARGV[7], fsub = ARGV[8],
                rage = ARGV[10], rbytes = ARGV[11]}
for name, value in pairs(optional) do
  if value ~= '' then
    fields[#fields + 1] = name
    fields[#fields + 1] = value
  end
end
redis.call('HSET', meta_key, unpack(fields))
m = {ttl = optional.ttl ~= '' and optional.ttl or nil,
     exp = optional.exp ~= '' and optional.exp or nil}
touch(KEYS, m, now)
return {'created', tail, ARGV[5]}
