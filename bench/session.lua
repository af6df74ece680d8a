-- wrk script: one cookie jar per connection, or one cookie shared by all.
-- wrk keeps one Lua state per thread, so the harness runs as many threads as
-- connections: a thread's jar is then its connection's.
-- BENCH_COOKIE set: every connection sends that cookie (the shared mode).
local cookie = os.getenv("BENCH_COOKIE")
local path = os.getenv("BENCH_PATH") or "/inc"
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function request()
  local headers = {}
  if cookie then
    headers["Cookie"] = "session=" .. cookie
  end
  return wrk.format("GET", path, headers)
end

function response(status, headers, body)
  if status ~= 200 then
    failed = (failed or 0) + 1
  end
  if not cookie then
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
