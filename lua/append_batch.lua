-- append_batch.lua: plain appends (a body, and no producer, Stream-Seq or
-- close) to one stream, issued by concurrent requests in the same moment, in one
-- step: the group commit of a hot stream (gateway/store.py, AppendBatches).
-- Each append gets exactly what append.lua would give it alone; the state every
-- check reads (closed, content type) is the same for all of them.
-- KEYS: 1 meta, 2 data, 3 producers, 4 forks (unused)
-- ARGV: 1 request media type, 2 wake-up channel, 3 the first append's data,
--       4 its JSON message count ('' for bytes), then such a pair per further append
-- Reply: {'ok', tail_1, ..., tail_n}, or for all of them one of
--   {'closed', tail, '1'}  {'ct_mismatch', tail}  {'not_found'}  {'gone'}
local meta_key, data_key = KEYS[1], KEYS[2]

local m = hgetall(meta_key)
if next(m) == nil then return {'not_found'} end
local now = now_ms()
if is_gone(meta_key, m, now) then return {'gone'} end
local tail = m.tail
if m.closed == '1' then return {'closed', tail, '1'} end
if m.mt ~= ARGV[1] then return {'ct_mismatch', tail} end

local reply = {'ok'}
for i = 3, #ARGV, 2 do
  tail = next_id(tail, now)
  if ARGV[i + 1] ~= '' then
    redis.call('XADD', data_key, tail, 'd', ARGV[i], 'n', ARGV[i + 1])
  else
    redis.call('XADD', data_key, tail, 'd', ARGV[i])
  end
  reply[#reply + 1] = tail
end
redis.call('HSET', meta_key, 'tail', tail)
touch(KEYS, m, now)
-- One append alone travels in its wake-up, as in append.lua; for several,
-- readers read them back (one read per replica).
local message = tail
if #ARGV == 4 and #ARGV[3] <= 16384 then
  message = '+' .. m.tail .. ' ' .. tail .. ' \n' .. ARGV[3]
end
redis.call('PUBLISH', ARGV[2], message)
return reply
