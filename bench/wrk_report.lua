-- wrk -s bench/wrk_report.lua ...: after the run, one line on stdout that
-- scripts/bench-http.sh parses (key=value, latencies in microseconds):
--   wrk_report requests=N secs=S rps=R p50_us=A p99_us=B max_us=C
--              connect=E read=F write=G timeout=H non2xx=I bytes=J
-- non2xx is wrk's status error count: responses with a status above 399
-- (wrk counts no others; none of the benchmarked servers sends 1xx or 3xx).
-- Only done() is defined, so wrk's request path stays its plain C one.

done = function(summary, latency, requests)
   local e = summary.errors
   local secs = summary.duration / 1e6
   io.write(string.format(
      "wrk_report requests=%d secs=%.3f rps=%.1f p50_us=%.0f p99_us=%.0f max_us=%.0f" ..
      " connect=%d read=%d write=%d timeout=%d non2xx=%d bytes=%d\n",
      summary.requests, secs, summary.requests / secs,
      latency:percentile(50), latency:percentile(99), latency.max,
      e.connect, e.read, e.write, e.timeout, e.status, summary.bytes))
end
