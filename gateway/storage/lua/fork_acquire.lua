-- fork_acquire.lua: pin a source stream for a new fork (section 4.2).
-- Runs on the source's slot; the fork itself is created by create.lua on its own
-- slot afterwards (the two may live on different cluster nodes). A fork that is
-- then not created gives its reference back with fork_release.lua.
-- The source records its forks by path, so a fork that later disappears without
-- a DELETE (it expired) can be found and its reference dropped.
-- KEYS: 1 meta, 2 data, 3 producers, 4 forks (of the source)
-- ARGV: 1 media type the fork asked for, or '', 2 fork offset id, or '' for the tail,
--       3 the fork's path
-- Reply: {'ok', content type, media type, fork offset id, ttl, expires-at,
--         '1' if this fork was not registered yet}
--        | {'not_found'} | {'gone'} | {'ct_mismatch'} | {'beyond_tail'}
--        | {'trimmed'} (the fork offset is before the earliest retained entry)
-- While forks hold it (refs > 0) append.lua does not trim the source, so each
-- fork keeps the inherited range it had when created.
local meta_key = KEYS[1]
local m = hgetall(meta_key)
if next(m) == nil then return {'not_found'} end
local now = now_ms()
if is_gone(meta_key, m, now) then return {'gone'} end
if ARGV[1] ~= '' and ARGV[1] ~= m.mt then return {'ct_mismatch'} end
local fork_offset = ARGV[2] ~= '' and ARGV[2] or m.tail
if id_cmp(fork_offset, m.tail) > 0 then return {'beyond_tail'} end
if m.trim and id_cmp(fork_offset, m.trim) < 0 then return {'trimmed'} end
local added = redis.call('SADD', KEYS[4], ARGV[3])
if added == 1 and redis.call('HINCRBY', meta_key, 'refs', 1) == 1 then
  -- Pinned: from now on expiry is judged by is_expired, so the data outlives
  -- Redis key expiry for as long as forks read it.
  if m.ttl and not m.acc then redis.call('HSET', meta_key, 'acc', now) end
  for i = 1, 3 do redis.call('PERSIST', KEYS[i]) end
end
return {'ok', m.ct, m.mt, fork_offset, m.ttl or '', m.exp or '', added == 1 and '1' or ''}
