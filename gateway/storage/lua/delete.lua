-- delete.lua: delete a stream (DELETE, section 5.4). A stream that forks still
-- read is soft-deleted: it answers 410 but keeps its data for the forks.
-- KEYS: 1 meta, 2 data, 3 producers, 4 forks
-- ARGV: 1 wake-up channel
-- Reply: {'deleted', fork source path or ''} | {'soft'} | {'not_found'} | {'gone'}
local meta_key = KEYS[1]
local m = hgetall(meta_key)
if next(m) == nil then return {'not_found'} end
if is_gone(meta_key, m, now_ms()) then return {'gone'} end
redis.call('PUBLISH', ARGV[1], 'deleted')
if refs_of(m) > 0 then
  redis.call('HSET', meta_key, 'del', '1')
  return {'soft'}
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
-- The caller releases this stream's reference on its fork source.
return {'deleted', m.fsrc or ''}
