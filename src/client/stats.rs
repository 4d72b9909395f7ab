//! Latency histogram, error-detail rate limiting and the one-line summary.

use hdrhistogram::Histogram;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Highest trackable latency (60 s) in microseconds; larger values saturate.
const MAX_US: u64 = 60_000_000;

/// Per-thread latency recorder (microseconds), mergeable.
pub struct Latency {
    h: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    /// An empty recorder: 1 µs to 60 s, 3 significant digits.
    pub fn new() -> Self {
        Latency { h: Histogram::new_with_bounds(1, MAX_US, 3).expect("histogram bounds") }
    }

    /// Record one latency sample.
    pub fn record(&mut self, d: Duration) {
        let us = (d.as_micros().min(MAX_US as u128) as u64).max(1);
        self.h.saturating_record(us);
    }

    /// Adds every sample of `other` (e.g. another thread's recorder).
    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides, so this cannot fail.
        let _ = self.h.add(&other.h);
    }

    /// Samples recorded.
    pub fn len(&self) -> u64 {
        self.h.len()
    }

    /// Whether no sample was recorded.
    pub fn is_empty(&self) -> bool {
        self.h.is_empty()
    }

    /// Value at quantile `q` (0.0..=1.0) in µs; 0 when empty.
    pub fn quantile_us(&self, q: f64) -> u64 {
        if self.h.is_empty() {
            0
        } else {
            self.h.value_at_quantile(q)
        }
    }

    /// Largest sample in µs; 0 when empty.
    pub fn max_us(&self) -> u64 {
        if self.h.is_empty() {
            0
        } else {
            self.h.max()
        }
    }

    /// Mean in µs; 0.0 when empty.
    pub fn mean_us(&self) -> f64 {
        if self.h.is_empty() {
            0.0
        } else {
            self.h.mean()
        }
    }
}

/// Shared error counter that logs only the first few error details.
pub struct ErrLog {
    seen: AtomicU64,
    limit: u64,
}

impl ErrLog {
    /// Logs the first `limit` details, then one "suppressed" line, then
    /// only counts. `const`, so it can be a `static`.
    pub const fn new(limit: u64) -> Self {
        ErrLog { seen: AtomicU64::new(0), limit }
    }

    /// Log one error detail (only the first `limit` are printed).
    pub fn report(&self, msg: fmt::Arguments<'_>) {
        let n = self.seen.fetch_add(1, Ordering::Relaxed);
        if n < self.limit {
            log::warn!("{msg}");
        } else if n == self.limit {
            log::warn!("(further error details suppressed)");
        }
    }

    /// How many error details were reported (logged or not).
    pub fn count(&self) -> u64 {
        self.seen.load(Ordering::Relaxed)
    }
}

/// Result of one client run; `Display` gives the one summary line.
#[derive(Debug, Clone)]
pub struct Summary {
    /// "unary", "stream" or "rpc".
    pub mode: &'static str,
    /// Connections (connection slots with `short`).
    pub conns: usize,
    /// Requests per connection (per connection slot with `short`).
    pub requests: usize,
    /// `Some(short)` for rpc runs (selects the rpc line format), `None` for pair mode.
    pub short: Option<bool>,
    /// Well-formed responses that passed every check.
    pub ok: u64,
    /// Requests without a well-formed response (connect/IO/parse/short-read/mismatch).
    pub errors: u64,
    /// Well-formed responses that violated the alternation check (pair mode).
    pub breaks: u64,
    /// e.g. `xor(7000,7001)` / `alternate(7000,7002)`; empty for rpc.
    pub check: String,
    /// Wall time of the run in seconds (connections are made before the
    /// clock starts, except with `short`).
    pub secs: f64,
    /// Median latency in µs (0 without samples, as for every latency).
    pub p50_us: u64,
    /// 99th percentile latency in µs.
    pub p99_us: u64,
    /// 99.9th percentile latency in µs.
    pub p999_us: u64,
    /// Largest latency in µs.
    pub max_us: u64,
    /// Mean latency in µs.
    pub mean_us: f64,
}

impl Summary {
    /// Build a summary; latency fields are filled from `lat`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        mode: &'static str,
        conns: usize,
        requests: usize,
        short: Option<bool>,
        ok: u64,
        errors: u64,
        breaks: u64,
        check: String,
        secs: f64,
        lat: &Latency,
    ) -> Summary {
        Summary {
            mode,
            conns,
            requests,
            short,
            ok,
            errors,
            breaks,
            check,
            secs,
            p50_us: lat.quantile_us(0.50),
            p99_us: lat.quantile_us(0.99),
            p999_us: lat.quantile_us(0.999),
            max_us: lat.max_us(),
            mean_us: lat.mean_us(),
        }
    }

    /// Requests expected in total.
    pub fn expected(&self) -> u64 {
        self.conns as u64 * self.requests as u64
    }

    /// errors == 0 && breaks == 0 && ok == conns * requests
    pub fn passed(&self) -> bool {
        self.errors == 0 && self.breaks == 0 && self.ok == self.expected()
    }

    /// Successful responses per second of wall time.
    pub fn rps(&self) -> f64 {
        if self.secs > 0.0 {
            self.ok as f64 / self.secs
        } else {
            0.0
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.short {
            Some(short) => write!(
                f,
                "{} conns={} requests={} short={} ok={} errors={} secs={:.3} rps={:.0} p50_us={} p99_us={} max_us={}",
                self.mode,
                self.conns,
                self.requests,
                short,
                self.ok,
                self.errors,
                self.secs,
                self.rps(),
                self.p50_us,
                self.p99_us,
                self.max_us
            ),
            None => write!(
                f,
                "{} conns={} requests={} ok={} errors={} breaks={} check={} secs={:.3} rps={:.0} p50_us={} p99_us={} max_us={}",
                self.mode,
                self.conns,
                self.requests,
                self.ok,
                self.errors,
                self.breaks,
                self.check,
                self.secs,
                self.rps(),
                self.p50_us,
                self.p99_us,
                self.max_us
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lat(samples: &[u64]) -> Latency {
        let mut l = Latency::new();
        for &s in samples {
            l.record(Duration::from_micros(s));
        }
        l
    }

    #[test]
    fn unary_line_format() {
        let s = Summary::new(
            "unary",
            100,
            1000,
            None,
            100_000,
            0,
            0,
            "xor(7000,7001)".into(),
            1.234,
            &lat(&[100, 101, 532]),
        );
        let line = s.to_string();
        assert!(line.starts_with(
            "unary conns=100 requests=1000 ok=100000 errors=0 breaks=0 check=xor(7000,7001) secs=1.234 rps=81037 p50_us="
        ), "{line}");
        assert!(s.passed());
    }

    #[test]
    fn rpc_line_format() {
        let s = Summary::new("rpc", 100, 1000, Some(false), 100_000, 0, 0, String::new(), 1.234, &lat(&[101]));
        assert_eq!(
            s.to_string(),
            "rpc conns=100 requests=1000 short=false ok=100000 errors=0 secs=1.234 rps=81037 p50_us=101 p99_us=101 max_us=101"
        );
    }

    #[test]
    fn passed_rules() {
        let l = Latency::new();
        let mk = |ok, e, b| Summary::new("unary", 2, 3, None, ok, e, b, String::new(), 1.0, &l);
        assert!(mk(6, 0, 0).passed());
        assert!(!mk(5, 1, 0).passed());
        assert!(!mk(5, 0, 1).passed());
        assert!(!mk(5, 0, 0).passed());
        assert_eq!(mk(0, 0, 0).p50_us, 0);
    }

    #[test]
    fn quantiles() {
        let samples: Vec<u64> = (1..=1000).collect();
        let l = lat(&samples);
        let p50 = l.quantile_us(0.5);
        let p99 = l.quantile_us(0.99);
        assert!((499..=501).contains(&p50), "{p50}");
        assert!((989..=991).contains(&p99), "{p99}");
        let mut m = Latency::new();
        m.merge(&l);
        m.merge(&lat(&[5]));
        assert_eq!(m.len(), 1001);
        // sub-microsecond samples are clamped to 1
        let mut z = Latency::new();
        z.record(Duration::from_nanos(10));
        assert_eq!(z.quantile_us(0.5), 1);
    }
}
