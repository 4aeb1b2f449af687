//! nginx's `max_fails` / `fail_timeout` for servers pdgate chooses itself
//! (the SGLang mode's server lists), shared by every worker: a server that
//! failed `max_fails` times in a row (no answer: unreachable, timed out,
//! cut off) is left out for `fail_timeout`; after that one request may try
//! it again, and a success clears the count. All state is two atomics of a
//! slot, so it lives in a shared zone and needs no lock.

use std::sync::atomic::{AtomicU64, Ordering};

use super::slots::SlotTable;

/// `max_fails` when not configured (nginx's default).
pub const DEFAULT_MAX_FAILS: u64 = 1;
/// `fail_timeout` when not configured, in ms (nginx's default, 10 s).
pub const DEFAULT_FAIL_TIMEOUT_MS: u64 = 10_000;

/// The failure state of one server.
#[derive(Debug, Clone, Copy)]
pub struct FailWindow<'a> {
    /// Failures in a row.
    fails: &'a AtomicU64,
    /// Left out until this time (ms, nginx's clock); 0: available.
    until: &'a AtomicU64,
}

impl<'a> FailWindow<'a> {
    pub fn new(fails: &'a AtomicU64, until: &'a AtomicU64) -> Self {
        FailWindow { fails, until }
    }

    /// The failure state kept in slot `i` of `table` (its request and
    /// token counters: the slot is keyed for this purpose alone).
    pub fn in_slot(table: &SlotTable<'a>, i: usize) -> Option<Self> {
        table.atomics(i).map(|(fails, until)| FailWindow { fails, until })
    }

    /// May be chosen at `now_ms`.
    pub fn available(&self, now_ms: u64) -> bool {
        self.until.load(Ordering::Relaxed) <= now_ms
    }

    /// The server gave no answer at `now_ms`. Returns true when this
    /// failure left it out (for `fail_timeout_ms`). `max_fails` 0 counts
    /// nothing, as nginx's `max_fails=0`.
    pub fn failed(&self, now_ms: u64, max_fails: u64, fail_timeout_ms: u64) -> bool {
        if max_fails == 0 {
            return false;
        }
        let n = self.fails.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= max_fails {
            self.fails.store(0, Ordering::Relaxed);
            self.until.store(now_ms.saturating_add(fail_timeout_ms), Ordering::Relaxed);
            return true;
        }
        false
    }

    /// The server answered: its failures in a row are forgotten.
    pub fn succeeded(&self) {
        if self.fails.load(Ordering::Relaxed) != 0 {
            self.fails.store(0, Ordering::Relaxed);
        }
    }
}

/// `fail_timeout`-style durations: `500ms`, `10s`, `1m`, `1h`, or a bare
/// number of seconds (nginx's time syntax for one unit). `None` when invalid.
pub fn parse_duration_ms(v: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(v).ok()?;
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3_600_000)
    } else {
        (s, 1000)
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    num.parse::<u64>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_is_left_out_after_max_fails_in_a_row_for_the_timeout() {
        let (f, u) = (AtomicU64::new(0), AtomicU64::new(0));
        let w = FailWindow::new(&f, &u);
        assert!(w.available(1000));
        assert!(!w.failed(1000, 2, 500));
        assert!(w.available(1000));
        w.succeeded();
        assert!(!w.failed(1100, 2, 500));
        assert!(w.failed(1200, 2, 500));
        assert!(!w.available(1200));
        assert!(!w.available(1699));
        assert!(w.available(1700));
        // One more failure after the window: out again at once (count was reset).
        assert!(!w.failed(1800, 2, 500));
        assert!(w.failed(1900, 2, 500));
        assert!(!w.available(2000));
    }

    #[test]
    fn max_fails_zero_never_leaves_a_server_out() {
        let (f, u) = (AtomicU64::new(0), AtomicU64::new(0));
        let w = FailWindow::new(&f, &u);
        for t in 0..10 {
            assert!(!w.failed(t, 0, 10_000));
        }
        assert!(w.available(10));
    }

    #[test]
    fn durations() {
        for (v, want) in [
            ("500ms", Some(500)),
            ("10s", Some(10_000)),
            ("10", Some(10_000)),
            ("2m", Some(120_000)),
            ("1h", Some(3_600_000)),
            ("0", Some(0)),
            ("", None),
            ("s", None),
            ("-1s", None),
            ("1.5s", None),
            ("10x", None),
            ("99999999999999999999s", None),
        ] {
            assert_eq!(parse_duration_ms(v.as_bytes()), want, "{v}");
        }
    }
}
