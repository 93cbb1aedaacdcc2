-- rate_limit.lua: count one request against a principal's rate for one
-- operation (GCRA, the generic cell rate algorithm: the key holds the
-- theoretical arrival time, TAT, of the next request; a period's worth of
-- requests may come at once, then they refill evenly).
-- KEYS: 1 the principal's rate key for the operation
-- ARGV: 1 emission interval in µs (the period divided by the count),
--       2 the period in µs
-- Reply: 0 when the request is within the rate (and counted), else the ms to
--        wait before the next one would be
local rate_key = KEYS[1]
local interval = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', rate_key) or 0) or 0
if tat < now then tat = now end
local next_tat = tat + interval
local wait = next_tat - period - now
if wait > 0 then return math.ceil(wait / 1000) end
-- %.0f: tostring would print the µs clock in exponent form and lose digits.
redis.call('SET', rate_key, string.format('%.0f', next_tat), 'PX',
  math.ceil((next_tat - now) / 1000))
return 0
