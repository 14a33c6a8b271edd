-- wrk script for the sluice load bench: every request is the same small
-- OpenAI chat completion POST. Setting wrk.method/body/headers (rather than
-- a request() function) lets wrk build the request once and reuse it, so the
-- load generator spends as little CPU as possible per request.
wrk.method = "POST"
-- run.sh exports the body it benches (STREAM=1 asks for a stream).
wrk.body = os.getenv("BENCH_BODY") or '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}'
wrk.headers["Content-Type"] = "application/json"

-- No response() callback on purpose: defining one makes wrk hand every
-- response's headers and body to Lua, which costs load-generator CPU. wrk's
-- own counters already see bad statuses: summary.errors.status counts
-- responses with status > 399 (the bench upstream only ever answers 200, so
-- any 4xx/5xx means the proxy failed the request).

-- Called once after the run with the merged statistics of all threads.
-- Prints one machine-readable line that bench/run.sh greps for.
-- Latency values from wrk are in microseconds; summary.duration too.
done = function(summary, latency, requests)
  local e = summary.errors
  local errors = e.connect + e.read + e.write + e.timeout + e.status
  local secs = summary.duration / 1e6
  local ok = summary.requests - e.status
  io.write(string.format(
    "RESULT rps=%.1f p50_us=%d p99_us=%d errors=%d requests=%d ok_rps=%.1f " ..
    "connect_err=%d read_err=%d write_err=%d timeout_err=%d status_err=%d max_us=%d\n",
    summary.requests / secs,
    latency:percentile(50), latency:percentile(99),
    errors, summary.requests, ok / secs,
    e.connect, e.read, e.write, e.timeout, e.status, latency.max))
end
