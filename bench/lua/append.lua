-- wrk script of bench/ scenarios (a) and (e): POST one fixed body per request.
--
--   wrk ... -s bench/lua/append.lua http://127.0.0.1:PORT -- PATH STREAMS CONTENT_TYPE BODY_FILE
--
-- STREAMS = 1: every request appends to PATH.
-- STREAMS = N > 1: each request appends to PATH .. i, i picked at random in
-- 0..N-1 per request (the N streams are created beforehand).
-- done() prints one line "WRKJSON {...}" that bench/ parses.

local threads = {}

function setup(thread)
   thread:set("tid", #threads + 1)
   table.insert(threads, thread)
end

local path, streams, headers, body, fixed

function init(args)
   path = args[1]
   streams = tonumber(args[2])
   headers = { ["Content-Type"] = args[3] }
   -- bench/run --auth jwt: the token the gateway configs expect.
   local token = os.getenv("BENCH_AUTH_TOKEN")
   if token and token ~= "" then
      headers["Authorization"] = "Bearer " .. token
   end
   local f = assert(io.open(args[4], "rb"))
   body = f:read("*a")
   f:close()
   math.randomseed(os.time() * 1000 + (tid or 0) * 7919)
   if streams <= 1 then
      fixed = wrk.format("POST", path, headers, body)
   end
end

function request()
   if fixed then
      return fixed
   end
   return wrk.format("POST", path .. (math.random(streams) - 1), headers, body)
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'WRKJSON {"requests":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,' ..
      '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p99_us":%d,' ..
      '"max_us":%d}\n',
      summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(99), latency.max))
end
