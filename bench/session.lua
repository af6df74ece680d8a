-- wrk script: one cookie jar per connection, one cookie shared by all, or
-- cookies of sessions already stored.
-- wrk keeps one Lua state per thread, so the harness runs as many threads as
-- connections: a thread's jar is then its connection's.
-- BENCH_COOKIE set: every connection sends that cookie (the shared mode).
-- BENCH_COOKIES set: a file of stored sessions' cookies, one a line; every
-- request picks one at random (the scale runs).
local cookie = os.getenv("BENCH_COOKIE")
local cookie_file = os.getenv("BENCH_COOKIES")
local path = os.getenv("BENCH_PATH") or "/inc"
local cookies = nil
local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("id", #threads)
end

function init(args)
  if cookie_file then
    cookies = {}
    for line in io.lines(cookie_file) do
      table.insert(cookies, line)
    end
    math.randomseed(os.time() * 100 + id)
  end
end

function request()
  local headers = {}
  if cookies then
    headers["Cookie"] = "session=" .. cookies[math.random(#cookies)]
  elseif cookie then
    headers["Cookie"] = "session=" .. cookie
  end
  return wrk.format("GET", path, headers)
end

function response(status, headers, body)
  if status ~= 200 then
    failed = (failed or 0) + 1
  end
  if not cookie and not cookies then
    local set = headers["Set-Cookie"] or headers["set-cookie"]
    if set then
      cookie = set:match("session=([^;]+)")
    end
  end
end

function done(summary, latency, requests)
  local failures = 0
  for _, thread in ipairs(threads) do
    failures = failures + (thread:get("failed") or 0)
  end
  io.write(string.format(
    'BENCH {"requests": %d, "seconds": %.3f, "p50_us": %d, "p99_us": %d, "failed": %d, "socket_errors": %d}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50), latency:percentile(99), failures,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
