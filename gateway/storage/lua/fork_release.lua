-- fork_release.lua: drop one fork's reference on its source (section 4.2).
-- When the last reference goes and the source was deleted or has expired, the
-- source is removed too, and its own source is returned so the caller can
-- continue the cascade up the fork chain (each step on its own slot).
-- Releasing a fork that holds no reference changes nothing.
-- KEYS: 1 meta, 2 data, 3 producers, 4 forks (of the source)
-- ARGV: 1 the fork's path
-- Reply: {'held'} | {'released'} | {'deleted', its fork source path or ''}
--        | {'not_member'} | {'missing'}
local meta_key = KEYS[1]
local m = hgetall(meta_key)
if next(m) == nil then return {'missing'} end
if redis.call('SREM', KEYS[4], ARGV[1]) == 0 then return {'not_member'} end
local refs = redis.call('HINCRBY', meta_key, 'refs', -1)
if refs > 0 then return {'held'} end
if refs < 0 then redis.call('HSET', meta_key, 'refs', 0) end
local now = now_ms()
if m.del == '1' or is_expired(m, now) then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
  return {'deleted', m.fsrc or ''}
end
-- Unpinned: hand expiry back to Redis.
m.refs = '0'
touch(KEYS, m, m.acc and tonumber(m.acc) or now)
return {'released'}
