//! `--rebalance`: which worker gives up connections, and how many.
//!
//! The signal is each worker's own measure of its load: the share of time
//! its event loop spent in callbacks, reported with every heartbeat answer
//! (every 250 ms). Every 500 ms the master compares the live workers. When
//! the busiest is at least [`MIN_HOT`] busy and [`MIN_GAP`] busier than the
//! idlest, it asks the busiest to move enough of its busy connections to
//! even the two out; the worker picks them by requests served since the
//! last order, skips those moved to it less than a second ago, and
//! releases each between requests. The master hands them to the idlest
//! worker. A worker that was just asked is left alone for [`SETTLE`], so
//! the figures can show the effect before the next decision. An even load
//! never moves anything.
use std::time::{Duration, Instant};

/// The busiest worker must be at least this busy.
pub const MIN_HOT: f64 = 0.5;
/// ...and this much busier than the idlest.
pub const MIN_GAP: f64 = 0.3;
/// A worker that was asked to move connections is not asked again for this long.
pub const SETTLE: Duration = Duration::from_millis(1500);
/// A load report older than this counts as idle (nothing to report).
pub const STALE: Duration = Duration::from_secs(1);

/// What the decision looks at, per live worker.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub index: usize,
    /// 0 to 1.
    pub busy: f64,
    /// Open connections.
    pub open: u64,
    /// Asked to move connections less than [`SETTLE`] ago.
    pub settling: bool,
}

/// The order to give, if any: (the busy worker, connections to move, the
/// idle worker they should go to).
pub fn decide(loads: &[Load]) -> Option<(usize, usize, usize)> {
    let hot = loads.iter().max_by(|a, b| a.busy.total_cmp(&b.busy))?;
    let cold = loads.iter().filter(|l| l.index != hot.index).min_by(|a, b| a.busy.total_cmp(&b.busy))?;
    if hot.settling || hot.busy < MIN_HOT || hot.busy - cold.busy < MIN_GAP || hot.open < 2 {
        return None;
    }
    // Move the share of its connections that evens the two out, assuming
    // the load is spread over them: hot keeps (hot + cold) / 2.
    let share = (hot.busy - cold.busy) / (2.0 * hot.busy);
    let k = ((hot.open as f64) * share).round().max(1.0) as usize;
    Some((hot.index, k.min(hot.open as usize / 2).max(1), cold.index))
}

/// Whether `at` (a worker's last order) is recent enough to leave it alone.
pub fn settling(at: Option<Instant>) -> bool {
    at.is_some_and(|t| t.elapsed() < SETTLE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(index: usize, busy: f64, open: u64) -> Load {
        Load { index, busy, open, settling: false }
    }

    #[test]
    fn a_skew_moves_half_of_the_hot_workers_connections_to_the_idle_one() {
        assert_eq!(decide(&[load(0, 1.0, 20), load(1, 0.0, 20)]), Some((0, 10, 1)));
        assert_eq!(decide(&[load(0, 0.1, 20), load(1, 0.9, 20), load(2, 0.5, 4)]), Some((1, 9, 0)));
    }

    #[test]
    fn an_even_or_light_load_moves_nothing() {
        assert_eq!(decide(&[load(0, 0.95, 20), load(1, 0.9, 20)]), None);
        assert_eq!(decide(&[load(0, 0.4, 20), load(1, 0.0, 20)]), None, "nobody is busy");
        assert_eq!(decide(&[load(0, 1.0, 1), load(1, 0.0, 0)]), None, "one connection: nowhere to go");
        assert_eq!(decide(&[load(0, 1.0, 20)]), None, "one worker");
        let mut hot = load(0, 1.0, 20);
        hot.settling = true;
        assert_eq!(decide(&[hot, load(1, 0.0, 20)]), None, "just asked");
    }
}
