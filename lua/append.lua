-- append.lua: append and/or close, with idempotent-producer validation
-- (POST, sections 5.2, 5.2.1 and 5.3). Validation and the append are one step,
-- so requests of one producer may arrive on any replica in any order.
-- KEYS: 1 meta, 2 data, 3 producers, 4 forks (unused)
-- ARGV: 1 request media type, 2 '1' if there is a body, 3 '1' to close,
--       4 Stream-Seq or '', 5 Producer-Id or '', 6 Producer-Epoch, 7 Producer-Seq,
--       8 data, 9 JSON message count ('' for bytes), 10 wake-up channel
-- Reply: {status, tail, closed, ...}
--   {'ok', tail, closed, epoch, seq}        appended and/or closed
--   {'dup', tail, closed, epoch, last_seq}  producer duplicate, nothing written
--   {'closed_noop', tail, '1'}              close-only on a closed stream
--   {'closed', tail, '1'}                   stream is closed: 409
--   {'stale_epoch', tail, closed, epoch}    {'epoch_seq', tail}
--   {'seq_gap', tail, '', expected, received}
--   {'ct_mismatch', tail}  {'seq_conflict', tail}  {'not_found'}  {'gone'}
local meta_key, data_key, producers_key = KEYS[1], KEYS[2], KEYS[3]
local has_body = ARGV[2] == '1'
local close = ARGV[3] == '1'
local stream_seq = ARGV[4]
local pid = ARGV[5]

local m = hgetall(meta_key)
if next(m) == nil then return {'not_found'} end
local now = now_ms()
if is_gone(meta_key, m, now) then return {'gone'} end
local tail = m.tail

local epoch, seq, state_epoch, state_seq
if pid ~= '' then
  epoch, seq = tonumber(ARGV[6]), tonumber(ARGV[7])
  local state = redis.call('HGET', producers_key, pid)
  if state then
    local colon = string.find(state, ':', 1, true)
    state_epoch = tonumber(string.sub(state, 1, colon - 1))
    state_seq = tonumber(string.sub(state, colon + 1))
  end
end

if m.closed == '1' then
  if pid ~= '' then
    -- A retry of the request that closed the stream is a duplicate, not an error.
    if m.closer == pid .. ':' .. ARGV[6] .. ':' .. ARGV[7] then
      return {'dup', tail, '1', ARGV[6], string.format('%.0f', state_seq or seq)}
    end
    if state_epoch and epoch < state_epoch then
      return {'stale_epoch', tail, '1', string.format('%.0f', state_epoch)}
    end
  end
  if close and not has_body then return {'closed_noop', tail, '1'} end
  return {'closed', tail, '1'}
end

if has_body and m.mt ~= ARGV[1] then return {'ct_mismatch', tail} end

if pid ~= '' then
  if state_epoch == nil then
    if seq ~= 0 then return {'seq_gap', tail, '', '0', ARGV[7]} end
  elseif epoch < state_epoch then
    return {'stale_epoch', tail, '', string.format('%.0f', state_epoch)}
  elseif epoch > state_epoch then
    if seq ~= 0 then return {'epoch_seq', tail} end
  elseif seq <= state_seq then
    return {'dup', tail, '', ARGV[6], string.format('%.0f', state_seq)}
  elseif seq ~= state_seq + 1 then
    return {'seq_gap', tail, '', string.format('%.0f', state_seq + 1), ARGV[7]}
  end
end

if stream_seq ~= '' and m.seq and byte_cmp(stream_seq, m.seq) <= 0 then
  return {'seq_conflict', tail}
end

if has_body then
  tail = next_id(tail, now)
  if ARGV[9] ~= '' then
    redis.call('XADD', data_key, tail, 'd', ARGV[8], 'n', ARGV[9])
  else
    redis.call('XADD', data_key, tail, 'd', ARGV[8])
  end
end

local fields = {'tail', tail}
if stream_seq ~= '' then
  fields[#fields + 1] = 'seq'
  fields[#fields + 1] = stream_seq
end
if close then
  fields[#fields + 1] = 'closed'
  fields[#fields + 1] = '1'
  if pid ~= '' then
    fields[#fields + 1] = 'closer'
    fields[#fields + 1] = pid .. ':' .. ARGV[6] .. ':' .. ARGV[7]
  end
end
redis.call('HSET', meta_key, unpack(fields))
if pid ~= '' then
  redis.call('HSET', producers_key, pid, ARGV[6] .. ':' .. ARGV[7])
end
touch(KEYS, m, now)
-- The wake-up carries a small append itself ('+prev next closed\ndata'), so a
-- reader waiting at the previous tail answers without reading it back.
local message = close and (tail .. ' closed') or tail
if has_body and #ARGV[8] <= 16384 then
  message = '+' .. m.tail .. ' ' .. tail .. ' ' .. (close and '1' or '') .. '\n' .. ARGV[8]
end
redis.call('PUBLISH', ARGV[10], message)
return {'ok', tail, close and '1' or '', ARGV[6], ARGV[7]}
