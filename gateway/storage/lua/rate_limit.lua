-- rate_limit.lua: count requests against a principal's rate for one operation
-- (GCRA, the generic cell rate algorithm: the key holds the theoretical
-- arrival time, TAT, of the next request; a period's worth of requests may
-- come at once, then they refill evenly). One call takes the requests of one
-- principal and operation that a replica received in one event-loop turn.
-- KEYS: 1 the principal's rate key for the operation
-- ARGV: 1 emission interval in µs (the period divided by the count),
--       2 the period in µs, 3 how many requests
-- Reply: {allowed, wait}: how many of them are within the rate (and counted),
--        and for the others the ms to wait before the next one would be
local rate_key = KEYS[1]
local interval = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local requests = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', rate_key) or 0) or 0
if tat < now then tat = now end
-- Request i (1-based) passes when tat + i * interval - period <= now.
local allowed = requests
if interval > 0 then
  allowed = math.min(requests, math.floor((now + period - tat) / interval))
end
if allowed < 0 then allowed = 0 end
if allowed > 0 then
  tat = tat + allowed * interval
  -- %.0f: tostring would print the µs clock in exponent form and lose digits.
  redis.call('SET', rate_key, string.format('%.0f', tat), 'PX',
    math.max(1, math.ceil((tat - now) / 1000)))
end
local wait = 0
if allowed < requests then
  wait = math.max(1, math.ceil((tat + interval - period - now) / 1000))
end
return {allowed, wait}
