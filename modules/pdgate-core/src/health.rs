//! Active health of the engines: the `pd_health_check` settings, what a
//! probe's outcome means, each peer's health in a table of atomics that
//! lives in a shared zone (one writer, the prober; every worker reads it),
//! and the lease that makes one worker of the whole nginx the prober and
//! lets another take over when it dies.
//!
//! A peer is **up** after `passes` good probes in a row and **down** after
//! `fails` bad ones; a peer never probed yet is **unknown** and, like a down
//! one, takes no traffic (readiness: an engine that is still loading, or a
//! peer new to the configuration, waits for its first passes). When probing
//! stops (no prober for three intervals, e.g. every worker stuck), results
//! go stale and every peer is eligible again: stale health must never keep
//! a cluster down.
//!
//! vLLM and SGLang health alike read as "2xx is good": vLLM's `/health`
//! answers 200 once its engine is up (before that no server listens, so the
//! connection is refused) and 503 when the engine died; SGLang's answers 503
//! while loading or unhealthy. A refused, reset or timed-out probe, a
//! non-2xx status and an answer that is not HTTP are all bad.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// What a health probe and a metrics scrape share: how often, how long,
/// which path and port (`interval=`, `timeout=`, `uri=`, `port=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// Between two probes of a peer, ms.
    pub interval_ms: u64,
    /// A probe without a whole answer by then fails, ms.
    pub timeout_ms: u64,
    /// The path asked for.
    pub uri: Vec<u8>,
    /// Ask this port instead of the peer's.
    pub port: Option<u16>,
}

impl Probe {
    /// Probes of `uri` every `interval_ms`, within a second.
    pub fn new(interval_ms: u64, uri: &[u8]) -> Probe {
        Probe { interval_ms, timeout_ms: 1_000, uri: uri.to_vec(), port: None }
    }

    /// Sets parameter `name` to `value` when it is one of the shared ones
    /// (`Ok(false)`: it is not).
    pub fn set(&mut self, name: &[u8], value: &[u8]) -> Result<bool, String> {
        use crate::conf::{invalid_value, path, port, positive_ms, A_PATH, A_PORT, POSITIVE_TIME};
        let bad = |why: &str| invalid_value(name, value, why);
        match name {
            b"interval" => {
                self.interval_ms = positive_ms(value).ok_or_else(|| bad(POSITIVE_TIME))?
            }
            b"timeout" => self.timeout_ms = positive_ms(value).ok_or_else(|| bad(POSITIVE_TIME))?,
            b"uri" => self.uri = path(value).ok_or_else(|| bad(A_PATH))?,
            b"port" => self.port = Some(port(value).ok_or_else(|| bad(A_PORT))?),
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The timeout must fit in the interval.
    pub fn check(&self) -> Result<(), String> {
        if self.timeout_ms > self.interval_ms {
            return Err(format!(
                "timeout ({} ms) is longer than interval ({} ms)",
                self.timeout_ms, self.interval_ms
            ));
        }
        Ok(())
    }

    /// Results older than this are stale: three intervals and a timeout
    /// without one.
    pub fn stale_ms(&self) -> u64 {
        self.interval_ms.saturating_mul(3).saturating_add(self.timeout_ms)
    }

    /// The `GET` sent: HTTP/1.0, so the answer ends with the connection and
    /// has no chunked body.
    pub fn request(&self, host: &[u8], agent: &[u8], accept: &[u8]) -> Vec<u8> {
        let mut r = Vec::with_capacity(64 + self.uri.len() + host.len());
        r.extend_from_slice(b"GET ");
        r.extend_from_slice(&self.uri);
        r.extend_from_slice(b" HTTP/1.0\r\nHost: ");
        r.extend_from_slice(host);
        r.extend_from_slice(b"\r\nUser-Agent: ");
        r.extend_from_slice(agent);
        r.extend_from_slice(b"\r\nAccept: ");
        r.extend_from_slice(accept);
        r.extend_from_slice(b"\r\n\r\n");
        r
    }
}

/// `pd_health_check`'s settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckConf {
    /// Every 2 s, within 1 s, `GET /health`.
    pub probe: Probe,
    /// Bad probes in a row that put an up peer down.
    pub fails: u32,
    /// Good probes in a row that put a down (or unknown) peer up.
    pub passes: u32,
}

impl Default for CheckConf {
    fn default() -> Self {
        CheckConf { probe: Probe::new(2_000, b"/health"), fails: 2, passes: 1 }
    }
}

/// A `pd_health_check` argument that does not parse; reads like nginx's own
/// messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckConfError(pub String);

impl fmt::Display for CheckConfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CheckConfError {}

impl CheckConf {
    /// Parses `interval=2s timeout=1s fails=2 passes=1 uri=/health port=N`
    /// (any subset, any order; each at most once).
    pub fn parse(args: &[&[u8]]) -> Result<CheckConf, CheckConfError> {
        use crate::conf::{invalid_value, number, parameters};
        let mut c = CheckConf::default();
        parameters(args, |name, value| {
            if c.probe.set(name, value)? {
                return Ok(true);
            }
            let n = match name {
                b"fails" | b"passes" => number(value, 1, 1000).ok_or_else(|| {
                    invalid_value(name, value, ", it must be a number from 1 to 1000")
                })? as u32,
                _ => return Ok(false),
            };
            if name == b"fails" {
                c.fails = n;
            } else {
                c.passes = n;
            }
            Ok(true)
        })
        .and_then(|()| c.probe.check())
        .map_err(CheckConfError)?;
        Ok(c)
    }

    /// Results older than this are stale (see the module doc).
    pub fn stale_ms(&self) -> u64 {
        self.probe.stale_ms()
    }

    /// The `GET` request a probe sends.
    pub fn request(&self, host: &[u8]) -> Vec<u8> {
        self.probe.request(host, b"pdgate-health", b"*/*")
    }
}

/// How a probe ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An HTTP answer with this status.
    Status(u16),
    /// Connection refused (a vLLM engine still loading has no server yet).
    Refused,
    /// Connection reset or closed before a status line.
    Closed,
    /// No whole status line within the timeout.
    TimedOut,
    /// Bytes that are not an HTTP status line.
    Garbage,
}

impl Outcome {
    pub fn is_good(self) -> bool {
        matches!(self, Outcome::Status(s) if (200..300).contains(&s))
    }

    /// For logs and status pages.
    pub fn describe(self) -> String {
        match self {
            Outcome::Status(s) => format!("status {s}"),
            Outcome::Refused => "connection refused".into(),
            Outcome::Closed => "connection closed without an answer".into(),
            Outcome::TimedOut => "timed out".into(),
            Outcome::Garbage => "not an HTTP answer".into(),
        }
    }
}

/// What the first bytes of an answer say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusLine {
    /// A whole status line `HTTP/1.x NNN ...` with this code.
    Code(u16),
    /// Not whole yet; may still become one.
    Partial,
    /// Cannot start a status line.
    Invalid,
}

/// Reads the status line at the start of `buf` (the bytes received so far).
pub fn status_line(buf: &[u8]) -> StatusLine {
    const PREFIX: &[u8] = b"HTTP/1.";
    for (i, &b) in buf.iter().enumerate().take(13) {
        let ok = match i {
            0..=6 => b == PREFIX[i],
            7 => matches!(b, b'0' | b'1'),
            8 => b == b' ',
            9..=11 => b.is_ascii_digit(),
            _ => matches!(b, b' ' | b'\r' | b'\n'),
        };
        if !ok {
            return StatusLine::Invalid;
        }
    }
    // A status line longer than this is not one (looked for only there, so
    // the verdict on a prefix never changes as more bytes come).
    const MAX_LINE: usize = 1024;
    if !buf[..buf.len().min(MAX_LINE)].contains(&b'\n') {
        return if buf.len() >= MAX_LINE { StatusLine::Invalid } else { StatusLine::Partial };
    }
    let code = buf[9..12].iter().fold(0u16, |a, &d| a * 10 + u16::from(d - b'0'));
    if (100..=599).contains(&code) {
        StatusLine::Code(code)
    } else {
        StatusLine::Invalid
    }
}

/// A peer's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Not probed yet (or not since it joined): takes no traffic.
    Unknown,
    Up,
    Down,
}

impl Status {
    fn from_bits(b: u64) -> Status {
        match b & 3 {
            1 => Status::Up,
            2 => Status::Down,
            _ => Status::Unknown,
        }
    }

    fn bits(self) -> u64 {
        match self {
            Status::Unknown => 0,
            Status::Up => 1,
            Status::Down => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Status::Unknown => "unknown",
            Status::Up => "up",
            Status::Down => "down",
        }
    }
}

/// One peer's row: written by the prober alone, read by every worker.
#[repr(C)]
#[derive(Debug, Default)]
pub struct HealthRow {
    /// [`crate::balance::slots::peer_key`] of the peer; 0 while free.
    pub key: AtomicU64,
    /// Status in bits 0-1, the current streak (good or bad probes in a
    /// row, whichever the last was) in bits 8-39, the last probe good in
    /// bit 2.
    state: AtomicU64,
    /// When the last probe ended (ms, nginx's clock); 0: never.
    checked_ms: AtomicU64,
    /// When the status last changed (ms).
    changed_ms: AtomicU64,
    /// When the row was claimed (ms): the start of its readiness wait.
    since_ms: AtomicU64,
    /// Results older than this are stale ([`CheckConf::stale_ms`]).
    stale_ms: AtomicU64,
    /// Probes, and bad ones, ever.
    probes: AtomicU64,
    bad: AtomicU64,
    /// The last probe's duration (µs) and outcome (see [`encode_outcome`]).
    latency_us: AtomicU64,
    outcome: AtomicU64,
}

/// Bytes per row.
pub const ROW_BYTES: usize = std::mem::size_of::<HealthRow>();

fn encode_outcome(o: Outcome) -> u64 {
    match o {
        Outcome::Status(s) => u64::from(s),
        Outcome::Refused => 1,
        Outcome::Closed => 2,
        Outcome::TimedOut => 3,
        Outcome::Garbage => 4,
    }
}

fn decode_outcome(v: u64) -> Option<Outcome> {
    match v {
        0 => None,
        1 => Some(Outcome::Refused),
        2 => Some(Outcome::Closed),
        3 => Some(Outcome::TimedOut),
        4 => Some(Outcome::Garbage),
        s => u16::try_from(s).ok().map(Outcome::Status),
    }
}

/// What a status page shows of a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub status: Status,
    pub eligible: bool,
    pub checked_ago_ms: Option<u64>,
    pub changed_ms: u64,
    pub probes: u64,
    pub bad: u64,
    pub latency_us: u64,
    pub last: Option<Outcome>,
}

/// A change of status a probe caused (for the error log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub from: Status,
    pub to: Status,
}

impl HealthRow {
    pub fn status(&self) -> Status {
        Status::from_bits(self.state.load(Ordering::Relaxed))
    }

    /// May take traffic at `now_ms` (see the module doc).
    pub fn eligible(&self, now_ms: u64) -> bool {
        if self.status() == Status::Up {
            return true;
        }
        let last = match self.checked_ms.load(Ordering::Relaxed) {
            0 => self.since_ms.load(Ordering::Relaxed),
            t => t,
        };
        now_ms.saturating_sub(last) > self.stale_ms.load(Ordering::Relaxed)
    }

    /// Whether `pd_health_check` claimed the row (a row only scraped for
    /// `pd_engine_metrics` has no health).
    pub fn is_checked(&self) -> bool {
        self.stale_ms.load(Ordering::Relaxed) != 0
    }

    /// When the last probe ended (ms); 0: never.
    pub fn checked_ms(&self) -> u64 {
        self.checked_ms.load(Ordering::Relaxed)
    }

    /// Records a probe that ended at `now_ms` after `latency_us`; returns
    /// the change of status it caused, if any. Only the prober calls this.
    pub fn record(
        &self,
        outcome: Outcome,
        now_ms: u64,
        latency_us: u64,
        conf: &CheckConf,
    ) -> Option<Change> {
        let good = outcome.is_good();
        let old = self.state.load(Ordering::Relaxed);
        let status = Status::from_bits(old);
        let was_good = old & 4 != 0;
        let streak = if self.checked_ms.load(Ordering::Relaxed) != 0 && was_good == good {
            ((old >> 8) & 0xffff_ffff).saturating_add(1).min(0xffff_ffff)
        } else {
            1
        };
        let next = match (status, good) {
            (Status::Up, false) if streak >= u64::from(conf.fails) => Status::Down,
            (Status::Unknown | Status::Down, true) if streak >= u64::from(conf.passes) => {
                Status::Up
            }
            // A peer never up that keeps failing is down (not unknown)
            // once it failed as often as an up one would have to.
            (Status::Unknown, false) if streak >= u64::from(conf.fails) => Status::Down,
            (s, _) => s,
        };
        self.state.store(next.bits() | if good { 4 } else { 0 } | (streak << 8), Ordering::Relaxed);
        self.checked_ms.store(now_ms.max(1), Ordering::Relaxed);
        self.stale_ms.store(conf.stale_ms(), Ordering::Relaxed);
        self.probes.fetch_add(1, Ordering::Relaxed);
        if !good {
            self.bad.fetch_add(1, Ordering::Relaxed);
        }
        self.latency_us.store(latency_us, Ordering::Relaxed);
        self.outcome.store(encode_outcome(outcome), Ordering::Relaxed);
        if next != status {
            self.changed_ms.store(now_ms, Ordering::Relaxed);
            return Some(Change { from: status, to: next });
        }
        None
    }

    pub fn snapshot(&self, now_ms: u64) -> Snapshot {
        let checked = self.checked_ms.load(Ordering::Relaxed);
        Snapshot {
            status: self.status(),
            eligible: self.eligible(now_ms),
            checked_ago_ms: (checked != 0).then(|| now_ms.saturating_sub(checked)),
            changed_ms: self.changed_ms.load(Ordering::Relaxed),
            probes: self.probes.load(Ordering::Relaxed),
            bad: self.bad.load(Ordering::Relaxed),
            latency_us: self.latency_us.load(Ordering::Relaxed),
            last: decode_outcome(self.outcome.load(Ordering::Relaxed)),
        }
    }
}

/// A table of rows keyed by peer identity, as in a shared zone (rows
/// survive a reload and are found again by key; a peer new to the
/// configuration claims a free row and starts unknown).
#[derive(Debug, Clone, Copy)]
pub struct HealthTable<'a> {
    rows: &'a [HealthRow],
}

impl<'a> HealthTable<'a> {
    pub fn new(rows: &'a [HealthRow]) -> Self {
        HealthTable { rows }
    }

    /// The row of `key`, if it has one.
    pub fn find(&self, key: u64) -> Option<&'a HealthRow> {
        self.find_index(key).map(|i| &self.rows[i])
    }

    /// The index of `key`'s row, if it has one (the same index holds its
    /// engine row, see [`HealthZone::engine`]).
    pub fn find_index(&self, key: u64) -> Option<usize> {
        let n = self.rows.len();
        if n == 0 || key == 0 {
            return None;
        }
        let start = (key % n as u64) as usize;
        for k in 0..n {
            let i = (start + k) % n;
            match self.rows[i].key.load(Ordering::Acquire) {
                0 => return None,
                x if x == key => return Some(i),
                _ => {}
            }
        }
        None
    }

    /// The row of `key`, claimed (at `now_ms`, stale after `stale_ms`
    /// without a probe) when it has none; `None` when the table is full.
    pub fn find_or_claim(&self, key: u64, now_ms: u64, stale_ms: u64) -> Option<&'a HealthRow> {
        self.find_or_claim_index(key, now_ms, stale_ms).map(|i| &self.rows[i])
    }

    /// [`find_or_claim`](Self::find_or_claim)'s index.
    pub fn find_or_claim_index(&self, key: u64, now_ms: u64, stale_ms: u64) -> Option<usize> {
        let n = self.rows.len();
        if n == 0 || key == 0 {
            return None;
        }
        let start = (key % n as u64) as usize;
        for k in 0..n {
            let i = (start + k) % n;
            let row = &self.rows[i];
            match row.key.compare_exchange(0, key, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    row.since_ms.store(now_ms, Ordering::Relaxed);
                    row.stale_ms.store(stale_ms, Ordering::Relaxed);
                    return Some(i);
                }
                Err(x) if x == key => return Some(i),
                Err(_) => {}
            }
        }
        None
    }
}

/// What the health checks know of one peer of a checked upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// `server … down` in the configuration: neither probed nor turned up.
    ConfiguredDown,
    /// No row (the table is full): not gated, takes traffic as without checks.
    Unchecked,
    Checked(Snapshot),
}

impl Seen {
    /// May take traffic now.
    pub fn eligible(&self) -> bool {
        match self {
            Seen::ConfiguredDown => false,
            Seen::Unchecked => true,
            Seen::Checked(s) => s.eligible,
        }
    }
}

/// One peer of a checked upstream, as the status page and readiness see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerHealth {
    pub upstream: Vec<u8>,
    pub peer: Vec<u8>,
    pub seen: Seen,
}

/// The `pd_health_status` page: the prober's pid (0: none), then a line per
/// peer.
pub fn status_text(prober: u64, peers: &[PeerHealth]) -> String {
    use std::fmt::Write;
    let mut s = format!("prober pid {prober}\n");
    for ph in peers {
        let (u, p) = (String::from_utf8_lossy(&ph.upstream), String::from_utf8_lossy(&ph.peer));
        let _ = match ph.seen {
            Seen::ConfiguredDown => writeln!(s, "upstream {u} peer {p} down (configured)"),
            Seen::Unchecked => writeln!(s, "upstream {u} peer {p} unchecked (health table full)"),
            Seen::Checked(x) => writeln!(
                s,
                "upstream {u} peer {p} {} eligible={} probes={} bad={} last=\"{}\" checked_ago_ms={} latency_us={}",
                x.status.name(),
                u8::from(x.eligible),
                x.probes,
                x.bad,
                x.last.map_or_else(|| "none".to_owned(), Outcome::describe),
                x.checked_ago_ms.map_or_else(|| "-".to_owned(), |a| a.to_string()),
                x.latency_us
            ),
        };
    }
    s
}

/// `pd_health_ready`: Ok when each upstream of `names` (every checked one
/// when empty) has a peer that may take traffic; else the message naming
/// the first that has none.
pub fn readiness(names: &[Vec<u8>], peers: &[PeerHealth]) -> Result<(), String> {
    let mut wanted: Vec<&[u8]> = names.iter().map(Vec::as_slice).collect();
    if wanted.is_empty() {
        for ph in peers {
            if !wanted.contains(&ph.upstream.as_slice()) {
                wanted.push(&ph.upstream);
            }
        }
    }
    match wanted.iter().find(|w| !peers.iter().any(|ph| ph.upstream == **w && ph.seen.eligible())) {
        Some(w) => Err(format!("no healthy server in upstream \"{}\"", String::from_utf8_lossy(w))),
        None => Ok(()),
    }
}

/// Rows of a [`HealthZone`]: peers checked at once, all upstreams together.
pub const ZONE_ROWS: usize = 4096;

const ZONE_MAGIC: u64 = 0x7064_6761_7465_4802;

/// The shared zone of the health checks and engine metrics: the lease,
/// each peer's health row and, at the same index, its engine row.
#[repr(C)]
pub struct HealthZone {
    magic: AtomicU64,
    pub lease: Lease,
    rows: [HealthRow; ZONE_ROWS],
    engines: [crate::engine::EngineRow; ZONE_ROWS],
}

impl HealthZone {
    /// Claims all-zero memory or recognises a zone of this layout.
    pub fn attach(&self) -> bool {
        crate::shm::attach(&self.magic, ZONE_MAGIC)
    }

    /// Whether it holds this layout (without claiming all-zero memory):
    /// for readers that find the zone by name.
    pub fn is_attached(&self) -> bool {
        crate::shm::holds(&self.magic, ZONE_MAGIC)
    }

    pub fn table(&self) -> HealthTable<'_> {
        HealthTable::new(&self.rows)
    }

    /// The engine row beside health row `i` (see [`HealthTable::find_index`]).
    pub fn engine(&self, i: usize) -> Option<&crate::engine::EngineRow> {
        self.engines.get(i)
    }
}

/// Which worker probes: the one holding the lease. A holder renews it every
/// time it looks; anyone may take a lease whose holder has not renewed it
/// for `ttl_ms` (it died, or hangs), and one compare-and-swap decides who.
#[repr(C)]
#[derive(Debug, Default)]
pub struct Lease {
    /// The holder's pid; 0: nobody.
    owner: AtomicU64,
    /// Its last renewal (ms).
    beat_ms: AtomicU64,
}

impl Lease {
    /// True when `pid` holds the lease after this call (renewed or taken).
    pub fn claim(&self, pid: u64, now_ms: u64, ttl_ms: u64) -> bool {
        let owner = self.owner.load(Ordering::Acquire);
        if owner == pid {
            self.beat_ms.store(now_ms, Ordering::Release);
            return true;
        }
        let beat = self.beat_ms.load(Ordering::Acquire);
        if owner != 0 && now_ms.saturating_sub(beat) <= ttl_ms {
            return false;
        }
        if self.owner.compare_exchange(owner, pid, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            self.beat_ms.store(now_ms, Ordering::Release);
            return true;
        }
        false
    }

    /// Gives the lease up if `pid` holds it (a worker that exits).
    pub fn release(&self, pid: u64) {
        let _ = self.owner.compare_exchange(pid, 0, Ordering::AcqRel, Ordering::Acquire);
    }

    pub fn owner(&self) -> u64 {
        self.owner.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(args: &[&str]) -> Result<CheckConf, String> {
        let v: Vec<&[u8]> = args.iter().map(|s| s.as_bytes()).collect();
        CheckConf::parse(&v).map_err(|e| e.to_string())
    }

    #[test]
    fn parses_settings_with_nginx_style_errors() {
        assert_eq!(conf(&[]).unwrap(), CheckConf::default());
        let c = conf(&[
            "interval=500ms",
            "timeout=200ms",
            "fails=3",
            "passes=2",
            "uri=/h?x=1",
            "port=9000",
        ])
        .unwrap();
        assert_eq!((c.probe.interval_ms, c.probe.timeout_ms, c.fails, c.passes), (500, 200, 3, 2));
        assert_eq!((c.probe.uri.as_slice(), c.probe.port), (&b"/h?x=1"[..], Some(9000)));
        assert_eq!(c.stale_ms(), 1700);
        for (args, msg) in [
            (&["interval"][..], "invalid parameter \"interval\""),
            (&["bogus=1"], "invalid parameter \"bogus=1\""),
            (&["interval=0"], "invalid parameter \"interval=0\", it must be a positive time such as 500ms or 2s"),
            (&["fails=0"], "invalid parameter \"fails=0\", it must be a number from 1 to 1000"),
            (&["uri=health"], "invalid parameter \"uri=health\", it must be a path starting with \"/\" without spaces"),
            (&["port=70000"], "invalid parameter \"port=70000\", it must be a port from 1 to 65535"),
            (&["fails=1", "fails=2"], "duplicate parameter \"fails\""),
            (&["interval=1s", "timeout=2s"], "timeout (2000 ms) is longer than interval (1000 ms)"),
        ] {
            assert_eq!(conf(args).unwrap_err(), msg, "{args:?}");
        }
    }

    #[test]
    fn probe_request() {
        let c = conf(&["uri=/metrics"]).unwrap();
        assert_eq!(
            c.request(b"127.0.0.1:8000"),
            b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1:8000\r\nUser-Agent: pdgate-health\r\nAccept: */*\r\n\r\n"
        );
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_line(b"HTTP/1.1 200 OK\r\n"), StatusLine::Code(200));
        assert_eq!(status_line(b"HTTP/1.0 503\r\n"), StatusLine::Code(503));
        assert_eq!(status_line(b"HTTP/1.1 204 No Content\n"), StatusLine::Code(204));
        for partial in [
            &b""[..],
            b"H",
            b"HTTP/1.",
            b"HTTP/1.1",
            b"HTTP/1.1 ",
            b"HTTP/1.1 20",
            b"HTTP/1.1 200 O",
        ] {
            assert_eq!(status_line(partial), StatusLine::Partial, "{partial:?}");
        }
        for bad in [
            &b"SSH-2.0"[..],
            b"HTTP/2 200",
            b"HTTP/1.1 2x0",
            b"HTTP/1.1 200x\r\n",
            b"HTTP/1.1 999 \r\n",
            b"HTTP/1.1x",
        ] {
            assert_eq!(status_line(bad), StatusLine::Invalid, "{bad:?}");
        }
        let mut long = b"HTTP/1.1 200 ".to_vec();
        long.resize(2000, b'a');
        assert_eq!(status_line(&long), StatusLine::Invalid);
        // A line end past 1,024 bytes comes too late (fuzz find: the verdict
        // on the first 1,024 bytes must stand).
        long.push(b'\n');
        assert_eq!(status_line(&long), StatusLine::Invalid);
        assert_eq!(status_line(&long[..1023]), StatusLine::Partial);
    }

    #[test]
    fn outcomes() {
        assert!(Outcome::Status(200).is_good() && Outcome::Status(299).is_good());
        for o in [
            Outcome::Status(503),
            Outcome::Status(302),
            Outcome::Refused,
            Outcome::Closed,
            Outcome::TimedOut,
            Outcome::Garbage,
        ] {
            assert!(!o.is_good(), "{o:?}");
            assert_eq!(decode_outcome(encode_outcome(o)), Some(o));
        }
    }

    #[test]
    fn readiness_up_down_and_back() {
        let c = conf(&["interval=1s", "timeout=500ms", "fails=2", "passes=2"]).unwrap();
        let rows: Vec<HealthRow> = (0..4).map(|_| HealthRow::default()).collect();
        let t = HealthTable::new(&rows);
        let r = t.find_or_claim(42, 1000, c.stale_ms()).unwrap();
        // New: unknown, no traffic until it passed twice.
        assert_eq!((r.status(), r.eligible(1000)), (Status::Unknown, false));
        assert_eq!(r.record(Outcome::Refused, 1100, 5, &c), None);
        assert_eq!(r.record(Outcome::Status(200), 2100, 5, &c), None);
        assert!(!r.eligible(2100));
        let up = r.record(Outcome::Status(200), 3100, 5, &c);
        assert_eq!(up, Some(Change { from: Status::Unknown, to: Status::Up }));
        assert!(r.eligible(3100));
        // One bad probe is not enough, two in a row are.
        assert_eq!(r.record(Outcome::TimedOut, 4100, 500_000, &c), None);
        assert!(r.eligible(4100));
        assert_eq!(r.record(Outcome::Status(200), 5100, 5, &c), None);
        assert_eq!(r.record(Outcome::Status(503), 6100, 5, &c), None);
        let down = r.record(Outcome::Closed, 7100, 5, &c);
        assert_eq!(down, Some(Change { from: Status::Up, to: Status::Down }));
        assert!(!r.eligible(7100));
        assert_eq!(r.record(Outcome::Status(200), 8100, 5, &c), None);
        assert_eq!(
            r.record(Outcome::Status(200), 9100, 5, &c),
            Some(Change { from: Status::Down, to: Status::Up })
        );
        let s = r.snapshot(9600);
        assert_eq!(
            (s.probes, s.bad, s.checked_ago_ms, s.last),
            (9, 4, Some(500), Some(Outcome::Status(200)))
        );
        // Found again by key (a reload), with its state.
        assert_eq!(t.find(42).map(HealthRow::status), Some(Status::Up));
        assert!(t.find(43).is_none());
    }

    #[test]
    fn a_peer_that_never_passes_goes_down_and_stale_results_fail_open() {
        let c = conf(&["interval=1s", "timeout=500ms", "fails=2"]).unwrap();
        let rows: Vec<HealthRow> = (0..2).map(|_| HealthRow::default()).collect();
        let t = HealthTable::new(&rows);
        let r = t.find_or_claim(7, 0, c.stale_ms()).unwrap();
        r.record(Outcome::Refused, 100, 1, &c);
        assert_eq!(
            r.record(Outcome::Refused, 1100, 1, &c),
            Some(Change { from: Status::Unknown, to: Status::Down })
        );
        // Nobody probes any more: after 3 intervals + the timeout it is eligible.
        assert!(!r.eligible(1100 + 3500));
        assert!(r.eligible(1100 + 3501));
        // A row never probed waits the same time from its claim.
        let fresh = t.find_or_claim(8, 10_000, c.stale_ms()).unwrap();
        assert!(!fresh.eligible(13_500) && fresh.eligible(13_501));
        // Full table.
        assert!(t.find_or_claim(9, 0, 1).is_none());
    }

    #[test]
    fn status_page_and_readiness() {
        let c = conf(&["interval=1s", "timeout=500ms", "fails=1"]).unwrap();
        let rows: Vec<HealthRow> = (0..2).map(|_| HealthRow::default()).collect();
        let t = HealthTable::new(&rows);
        let up = t.find_or_claim(1, 0, c.stale_ms()).unwrap();
        up.record(Outcome::Status(200), 100, 42, &c);
        let down = t.find_or_claim(2, 0, c.stale_ms()).unwrap();
        down.record(Outcome::Refused, 100, 7, &c);
        let ph = |u: &str, p: &str, seen| PeerHealth { upstream: u.into(), peer: p.into(), seen };
        let peers = [
            ph("p", "a:1", Seen::Checked(up.snapshot(300))),
            ph("p", "b:1", Seen::ConfiguredDown),
            ph("d", "c:1", Seen::Checked(down.snapshot(300))),
            ph("e", "x:1", Seen::Unchecked),
        ];
        assert_eq!(
            status_text(77, &peers),
            "prober pid 77\n\
             upstream p peer a:1 up eligible=1 probes=1 bad=0 last=\"status 200\" checked_ago_ms=200 latency_us=42\n\
             upstream p peer b:1 down (configured)\n\
             upstream d peer c:1 down eligible=0 probes=1 bad=1 last=\"connection refused\" checked_ago_ms=200 latency_us=7\n\
             upstream e peer x:1 unchecked (health table full)\n"
        );
        assert_eq!(readiness(&[b"p".to_vec(), b"e".to_vec()], &peers), Ok(()));
        let all = readiness(&[], &peers);
        assert_eq!(all, Err("no healthy server in upstream \"d\"".into()));
        let named = readiness(&[b"p".to_vec(), b"nope".to_vec()], &peers);
        assert_eq!(named, Err("no healthy server in upstream \"nope\"".into()));
    }

    #[test]
    fn zone_attaches_once() {
        // The zone is about 1 MB: built on a thread with room for it.
        let t = std::thread::Builder::new().stack_size(32 << 20).spawn(|| {
            let z = Box::new(HealthZone {
                magic: AtomicU64::new(0),
                lease: Lease::default(),
                rows: std::array::from_fn(|_| HealthRow::default()),
                engines: std::array::from_fn(|_| crate::engine::EngineRow::default()),
            });
            assert!(z.attach() && z.attach() && z.is_attached());
            z.magic.store(1, Ordering::Relaxed);
            assert!(!z.is_attached());
            assert!(!z.attach());
            let i = z.table().find_or_claim_index(5, 0, 10).unwrap();
            assert_eq!(z.table().find_index(5), Some(i));
            assert!(z.engine(i).is_some_and(|e| !e.scraped()));
            assert!(z.engine(ZONE_ROWS).is_none());
        });
        t.unwrap().join().unwrap();
    }

    #[test]
    fn one_prober_and_takeover() {
        let l = Lease::default();
        assert!(l.claim(100, 0, 3000));
        assert!(!l.claim(200, 1000, 3000));
        assert!(l.claim(100, 2000, 3000));
        // 100 stops renewing: 200 takes over after the ttl, not before.
        assert!(!l.claim(200, 5000, 3000));
        assert!(l.claim(200, 5001, 3000));
        assert_eq!(l.owner(), 200);
        assert!(!l.claim(100, 5002, 3000));
        // A holder that exits gives it up at once.
        l.release(100);
        assert_eq!(l.owner(), 200);
        l.release(200);
        assert!(l.claim(300, 5003, 3000));
    }
}
