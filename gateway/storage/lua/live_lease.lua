-- live_lease.lua: take a lease for one live reader (long-poll or SSE) of a
-- principal, unless the principal already holds the most it may. Leases last
-- a live read's longest lifetime plus a margin: a reader releases its lease
-- (ZREM) when it ends, and a crashed replica's leases expire by themselves.
-- KEYS: 1 the principal's live-reader set (reader id -> lease expiry, epoch ms)
-- ARGV: 1 reader id, 2 lease length in ms, 3 most readers at once
-- Reply: 0 when the lease is taken, else the ms until the earliest lease expires
local readers_key = KEYS[1]
local reader = ARGV[1]
local lease_ms = tonumber(ARGV[2])
local most = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', readers_key, '-inf', now)
if redis.call('ZCARD', readers_key) >= most then
  local earliest = redis.call('ZRANGE', readers_key, 0, 0, 'WITHSCORES')
  return math.max(1, tonumber(earliest[2]) - now)
end
redis.call('ZADD', readers_key, now + lease_ms, reader)
-- The set lives as long as its longest lease.
if redis.call('PTTL', readers_key) < lease_ms then
  redis.call('PEXPIRE', readers_key, lease_ms)
end
return 0
