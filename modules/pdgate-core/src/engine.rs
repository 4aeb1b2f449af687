//! What the engines report of themselves (`pd_engine_metrics`): each
//! engine's Prometheus `/metrics`, scraped by the health prober (one worker
//! of the whole nginx), kept per peer in the health zone beside its health
//! row, and read by every balancer of every worker.
//!
//! A scrape is a moment; between two of them pdgate keeps placing and
//! finishing requests on the engine. Each row counts the requests pdgate
//! placed on the engine and those that ended, and the scrape keeps both
//! counts as they were when it was sent: a balancer sees the engine's
//! running and waiting requests **plus** what pdgate placed **minus** what
//! ended since (see [`EngineRow::view`]). Values older than
//! [`MetricsConf::stale_ms`] are not used.
//!
//! From two scrapes in a row while the engine had a waiting queue (it was
//! saturated, so it worked as fast as it can), the row learns the engine's
//! prefill throughput (prompt tokens per second) and its rate of finished
//! requests: `earliest_start` predicts from them when each engine can start
//! a request.
//!
//! One writer (the prober) publishes a scrape under a sequence number
//! (odd while writing); readers retry a torn read and never wait, so a
//! worker that dies mid-write leaves nothing held.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::prom::EngineLoad;

/// `pd_engine_metrics`'s settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConf {
    /// Every second, within a second, `GET /metrics`.
    pub probe: crate::health::Probe,
    /// Only samples of this `model_name` (or without one) count.
    pub model: Option<String>,
    /// KV cache usage (per mille) from which an engine counts as under
    /// pressure: balancers prefer engines below it.
    pub kv_high_permille: u64,
}

impl Default for MetricsConf {
    fn default() -> Self {
        MetricsConf {
            probe: crate::health::Probe::new(1_000, b"/metrics"),
            model: None,
            kv_high_permille: 950,
        }
    }
}

/// A `pd_engine_metrics` argument that does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfError(pub String);

impl fmt::Display for MetricsConfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for MetricsConfError {}

/// Bytes of a `/metrics` answer read at most (vLLM's page with all its
/// histograms is some tens of KB).
pub const MAX_ANSWER: usize = 4 << 20;

impl MetricsConf {
    /// Parses `interval=1s timeout=1s uri=/metrics port=N model=NAME
    /// kv_high=95` (any subset, any order, each at most once).
    pub fn parse(args: &[&[u8]]) -> Result<MetricsConf, MetricsConfError> {
        use crate::conf::{invalid_value, number, parameters};
        let mut c = MetricsConf::default();
        parameters(args, |name, value| {
            if c.probe.set(name, value)? {
                return Ok(true);
            }
            let bad = |why: &str| invalid_value(name, value, why);
            match name {
                b"model" => {
                    let m = std::str::from_utf8(value)
                        .ok()
                        .filter(|m| !m.is_empty() && m.len() <= 256)
                        .ok_or_else(|| bad(", it must be a model name"))?;
                    c.model = Some(m.to_owned());
                }
                b"kv_high" => {
                    c.kv_high_permille = number(value, 1, 100)
                        .ok_or_else(|| bad(", it must be a percentage from 1 to 100"))?
                        * 10;
                }
                _ => return Ok(false),
            }
            Ok(true)
        })
        .and_then(|()| c.probe.check())
        .map_err(MetricsConfError)?;
        Ok(c)
    }

    /// Values older than this are not used: three intervals and a timeout.
    pub fn stale_ms(&self) -> u64 {
        self.probe.stale_ms()
    }

    /// The `GET` a scrape sends.
    pub fn request(&self, host: &[u8]) -> Vec<u8> {
        self.probe.request(host, b"pdgate-metrics", b"text/plain")
    }
}

/// Why a scrape gave nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScrapeError {
    /// The answer's status was not 200.
    Status(u16),
    /// Not an HTTP answer, or no end of its header.
    Garbage,
    /// A 200 whose body has none of the metrics routing reads.
    NoMetrics,
}

impl ScrapeError {
    pub fn describe(self) -> String {
        match self {
            ScrapeError::Status(s) => format!("status {s}"),
            ScrapeError::Garbage => "not an HTTP answer".into(),
            ScrapeError::NoMetrics => "no vllm: or sglang: load metrics".into(),
        }
    }
}

/// Reads a whole HTTP/1.x answer to a scrape: the engine's load when it is
/// a 200 with load metrics in its body.
pub fn read_answer(answer: &[u8], model: Option<&str>) -> Result<EngineLoad, ScrapeError> {
    let code = match crate::health::status_line(answer) {
        crate::health::StatusLine::Code(c) => c,
        _ => return Err(ScrapeError::Garbage),
    };
    if code != 200 {
        return Err(ScrapeError::Status(code));
    }
    let body = match memchr::memmem::find(answer, b"\r\n\r\n") {
        Some(p) => &answer[p + 4..],
        None => match memchr::memmem::find(answer, b"\n\n") {
            Some(p) => &answer[p + 2..],
            None => return Err(ScrapeError::Garbage),
        },
    };
    let load = EngineLoad::read(body, model);
    if load.running.is_none() && load.waiting.is_none() && load.kv_usage.is_none() {
        return Err(ScrapeError::NoMetrics);
    }
    Ok(load)
}

/// One engine's row: written by the prober, read by every balancer; the
/// `placed`/`ended` counters are added to by every worker.
#[repr(C)]
#[derive(Debug, Default)]
pub struct EngineRow {
    /// Odd while the prober writes the fields below it.
    seq: AtomicU64,
    /// When the last good scrape ended (ms); 0: never.
    scraped_ms: AtomicU64,
    stale_ms: AtomicU64,
    running: AtomicU64,
    waiting: AtomicU64,
    kv_permille: AtomicU64,
    kv_high_permille: AtomicU64,
    /// Prefix-cache lookups and hits (tokens), as the engine counts them.
    prefix_queries: AtomicU64,
    prefix_hits: AtomicU64,
    /// `placed`/`ended` when the last good scrape was sent.
    placed_at: AtomicU64,
    ended_at: AtomicU64,
    /// Learned: prompt tokens per second, and finished requests per 1000
    /// s, when saturated; 0: not known.
    rate_tps: AtomicU64,
    finish_mps: AtomicU64,
    // Not under `seq`:
    /// Requests pdgate placed on the engine, and those that ended, ever.
    placed: AtomicU64,
    ended: AtomicU64,
    /// Scrapes, and failed ones, ever.
    scrapes: AtomicU64,
    failed: AtomicU64,
    /// The last scrape's duration (µs).
    latency_us: AtomicU64,
    // The prober's own memory of the previous good scrape (rate learning).
    prev_ms: AtomicU64,
    prev_prompt: AtomicU64,
    prev_finished: AtomicU64,
    prev_waiting: AtomicU64,
    /// When the prober last started a scrape (ms).
    attempt_ms: AtomicU64,
    /// 1 while the last scrape failed.
    failing: AtomicU64,
}

/// What a balancer reads of an engine (see [`EngineRow::view`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EngineView {
    /// A scrape younger than its stale age exists; nothing else counts
    /// without it.
    pub fresh: bool,
    /// The engine's running and waiting requests, plus pdgate's placed
    /// minus ended since the scrape.
    pub requests: u64,
    /// The engine's waiting requests at the scrape.
    pub waiting: u64,
    /// KV cache usage at or above the configured `kv_high`.
    pub pressured: bool,
    /// Learned prompt tokens per second (0: not known).
    pub rate_tps: u64,
    /// Learned finished requests per 1000 s (0: not known).
    pub finish_mps: u64,
}

/// A scrape as the status pages and gauges show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EngineSnapshot {
    pub scraped_ago_ms: Option<u64>,
    pub fresh: bool,
    pub running: u64,
    pub waiting: u64,
    pub kv_permille: u64,
    pub prefix_queries: u64,
    pub prefix_hits: u64,
    pub rate_tps: u64,
    pub finish_mps: u64,
    pub scrapes: u64,
    pub failed: u64,
    pub latency_us: u64,
    pub placed: u64,
    pub ended: u64,
}

/// Fraction of a new measurement in a learned rate.
const LEARN_NUM: u64 = 1;
const LEARN_DEN: u64 = 4;
/// Scrapes closer together than this teach nothing (ms).
const LEARN_MIN_MS: u64 = 100;

fn count(v: Option<f64>) -> u64 {
    v.map_or(0, |x| if x.is_finite() && x > 0.0 { x.round().min(1e15) as u64 } else { 0 })
}

fn ewma(old: u64, new: u64) -> u64 {
    if old == 0 {
        return new.max(1);
    }
    ((old * (LEARN_DEN - LEARN_NUM) + new * LEARN_NUM) / LEARN_DEN).max(1)
}

impl EngineRow {
    /// Whether a scrape is due at `now_ms` (`interval_ms` after the last
    /// one started, give or take `slack_ms`); marks it started when it is.
    /// Only the prober calls this.
    pub fn due(&self, now_ms: u64, interval_ms: u64, slack_ms: u64) -> bool {
        let last = self.attempt_ms.load(Ordering::Relaxed);
        if last != 0 && now_ms.saturating_sub(last) + slack_ms < interval_ms {
            return false;
        }
        self.attempt_ms.store(now_ms.max(1), Ordering::Relaxed);
        true
    }

    /// pdgate placed a request on the engine.
    pub fn placed(&self) {
        self.placed.fetch_add(1, Ordering::Relaxed);
    }

    /// A request pdgate placed on the engine ended.
    pub fn ended(&self) {
        self.ended.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters a scrape keeps as they are when it is sent.
    pub fn counters(&self) -> (u64, u64) {
        (self.placed.load(Ordering::Relaxed), self.ended.load(Ordering::Relaxed))
    }

    /// Records a failed scrape (the last good values age out on their own);
    /// true when the previous one was good (or there was none), a change
    /// worth a log line.
    pub fn failed(&self, latency_us: u64) -> bool {
        let was = self.failing.swap(1, Ordering::Relaxed);
        self.scrapes.fetch_add(1, Ordering::Relaxed);
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.latency_us.store(latency_us, Ordering::Relaxed);
        was == 0
    }

    /// Publishes a good scrape that ended at `now_ms`, sent when the
    /// counters were `sent` ([`counters`](Self::counters)); learns the
    /// rates when the engine was saturated at this scrape and the previous
    /// one; true when the previous scrape had failed. Only the prober
    /// calls this.
    pub fn store(
        &self,
        load: &EngineLoad,
        sent: (u64, u64),
        now_ms: u64,
        latency_us: u64,
        conf: &MetricsConf,
    ) -> bool {
        let now_ms = now_ms.max(1);
        let waiting = count(load.waiting);
        let prompt = count(load.prompt_tokens);
        let finished = count(load.finished);
        let (mut rate, mut finish) =
            (self.rate_tps.load(Ordering::Relaxed), self.finish_mps.load(Ordering::Relaxed));
        let prev_ms = self.prev_ms.load(Ordering::Relaxed);
        let dt = now_ms.saturating_sub(prev_ms);
        if prev_ms != 0
            && dt >= LEARN_MIN_MS
            && waiting > 0
            && self.prev_waiting.load(Ordering::Relaxed) > 0
        {
            let (pp, pf) = (
                self.prev_prompt.load(Ordering::Relaxed),
                self.prev_finished.load(Ordering::Relaxed),
            );
            if load.prompt_tokens.is_some() && prompt > pp {
                rate = ewma(rate, (prompt - pp).saturating_mul(1000) / dt);
            }
            if load.finished.is_some() && finished > pf {
                finish = ewma(finish, (finished - pf).saturating_mul(1_000_000) / dt);
            }
        }
        self.prev_ms.store(now_ms, Ordering::Relaxed);
        self.prev_prompt.store(prompt, Ordering::Relaxed);
        self.prev_finished.store(finished, Ordering::Relaxed);
        self.prev_waiting.store(waiting, Ordering::Relaxed);

        // Odd while writing, whatever a writer that died mid-write left.
        let w = (self.seq.load(Ordering::Relaxed) + 1) | 1;
        self.seq.store(w, Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Release);
        self.running.store(count(load.running), Ordering::Relaxed);
        self.waiting.store(waiting, Ordering::Relaxed);
        let kv = load.kv_usage.map_or(0.0, |k| k.clamp(0.0, 1.0));
        self.kv_permille.store((kv * 1000.0).round() as u64, Ordering::Relaxed);
        self.kv_high_permille.store(conf.kv_high_permille, Ordering::Relaxed);
        self.prefix_queries.store(count(load.prefix_queries), Ordering::Relaxed);
        self.prefix_hits.store(count(load.prefix_hits), Ordering::Relaxed);
        self.placed_at.store(sent.0, Ordering::Relaxed);
        self.ended_at.store(sent.1, Ordering::Relaxed);
        self.rate_tps.store(rate, Ordering::Relaxed);
        self.finish_mps.store(finish, Ordering::Relaxed);
        self.stale_ms.store(conf.stale_ms(), Ordering::Relaxed);
        self.scraped_ms.store(now_ms, Ordering::Relaxed);
        self.seq.store(w + 1, Ordering::Release);
        self.scrapes.fetch_add(1, Ordering::Relaxed);
        self.latency_us.store(latency_us, Ordering::Relaxed);
        self.failing.swap(0, Ordering::Relaxed) == 1
    }

    /// The fields under `seq`, read consistently (`None`: the prober kept
    /// writing through a few tries, or died while writing).
    fn read(&self) -> Option<Published> {
        for _ in 0..4 {
            let s1 = self.seq.load(Ordering::Acquire);
            if s1 % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
            let v = Published {
                scraped_ms: l(&self.scraped_ms),
                stale_ms: l(&self.stale_ms),
                running: l(&self.running),
                waiting: l(&self.waiting),
                kv_permille: l(&self.kv_permille),
                kv_high_permille: l(&self.kv_high_permille),
                prefix_queries: l(&self.prefix_queries),
                prefix_hits: l(&self.prefix_hits),
                placed_at: l(&self.placed_at),
                ended_at: l(&self.ended_at),
                rate_tps: l(&self.rate_tps),
                finish_mps: l(&self.finish_mps),
            };
            std::sync::atomic::fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) == s1 {
                return Some(v);
            }
        }
        None
    }

    /// Whether a scrape ever succeeded (a row a balancer should read).
    pub fn scraped(&self) -> bool {
        self.scraped_ms.load(Ordering::Relaxed) != 0
    }

    /// What a balancer sees at `now_ms` (see the module doc).
    pub fn view(&self, now_ms: u64) -> EngineView {
        let Some(v) = self.read() else { return EngineView::default() };
        if !v.fresh(now_ms) {
            return EngineView::default();
        }
        let (placed, ended) = self.counters();
        // Placed since the scrape, less ended since: ended may count
        // requests placed before it (the engine had them), so it can win.
        let since = placed.wrapping_sub(v.placed_at) as i64 - ended.wrapping_sub(v.ended_at) as i64;
        let queued = v.running.saturating_add(v.waiting) as i64;
        EngineView {
            fresh: true,
            requests: queued.saturating_add(since).max(0) as u64,
            waiting: v.waiting,
            pressured: v.kv_high_permille > 0 && v.kv_permille >= v.kv_high_permille,
            rate_tps: v.rate_tps,
            finish_mps: v.finish_mps,
        }
    }

    pub fn snapshot(&self, now_ms: u64) -> EngineSnapshot {
        let v = self.read().unwrap_or_default();
        let (placed, ended) = self.counters();
        EngineSnapshot {
            scraped_ago_ms: (v.scraped_ms != 0).then(|| now_ms.saturating_sub(v.scraped_ms)),
            fresh: v.fresh(now_ms),
            running: v.running,
            waiting: v.waiting,
            kv_permille: v.kv_permille,
            prefix_queries: v.prefix_queries,
            prefix_hits: v.prefix_hits,
            rate_tps: v.rate_tps,
            finish_mps: v.finish_mps,
            scrapes: self.scrapes.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            latency_us: self.latency_us.load(Ordering::Relaxed),
            placed,
            ended,
        }
    }
}

/// What a good scrape published (the fields under the row's `seq`).
#[derive(Debug, Clone, Copy, Default)]
struct Published {
    scraped_ms: u64,
    stale_ms: u64,
    running: u64,
    waiting: u64,
    kv_permille: u64,
    kv_high_permille: u64,
    prefix_queries: u64,
    prefix_hits: u64,
    placed_at: u64,
    ended_at: u64,
    rate_tps: u64,
    finish_mps: u64,
}

impl Published {
    /// A scrape exists and is not older than its stale age.
    fn fresh(&self, now_ms: u64) -> bool {
        self.scraped_ms != 0 && now_ms.saturating_sub(self.scraped_ms) <= self.stale_ms
    }
}

/// One line of an engine on the `pd_health_status` page.
pub fn status_line_text(s: &EngineSnapshot) -> String {
    format!(
        "engine running={} waiting={} kv={}.{}% prefix_hits={}/{} rate_tps={} finish_per_s={}.{:03} fresh={} scraped_ago_ms={} scrapes={} failed={} latency_us={} placed={} ended={}",
        s.running,
        s.waiting,
        s.kv_permille / 10,
        s.kv_permille % 10,
        s.prefix_hits,
        s.prefix_queries,
        s.rate_tps,
        s.finish_mps / 1000,
        s.finish_mps % 1000,
        u8::from(s.fresh),
        s.scraped_ago_ms.map_or_else(|| "-".to_owned(), |a| a.to_string()),
        s.scrapes,
        s.failed,
        s.latency_us,
        s.placed,
        s.ended
    )
}

/// One peer's health and engine on the `pd_metrics` page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerState {
    pub upstream: Vec<u8>,
    pub peer: Vec<u8>,
    /// With `pd_health_check`: may take traffic now.
    pub eligible: Option<bool>,
    /// With `pd_engine_metrics`, once scraped.
    pub engine: Option<EngineSnapshot>,
    /// With `pd_kv_events`, once subscribed.
    pub kv: Option<crate::kv::index::KvSnapshot>,
}

/// Appends the peers' health and engine gauges (Prometheus text) to `o`.
pub fn render_peer_gauges(o: &mut String, peers: &[PeerState]) {
    use std::fmt::Write;
    type Pick = fn(&PeerState) -> Option<String>;
    let gauges: [(&str, &str, Pick); 8] = [
        ("pdgate_peer_up", "1 while a health-checked peer may take traffic.", |p| {
            p.eligible.map(|e| u8::from(e).to_string())
        }),
        ("pdgate_engine_requests_running", "Requests the engine runs (its /metrics).", |p| {
            p.engine.filter(|e| e.fresh).map(|e| e.running.to_string())
        }),
        ("pdgate_engine_requests_waiting", "Requests the engine queues (its /metrics).", |p| {
            p.engine.filter(|e| e.fresh).map(|e| e.waiting.to_string())
        }),
        ("pdgate_engine_kv_cache_usage_ratio", "The engine's KV cache usage, 0 to 1.", |p| {
            p.engine
                .filter(|e| e.fresh)
                .map(|e| format!("{}.{:03}", e.kv_permille / 1000, e.kv_permille % 1000))
        }),
        ("pdgate_engine_prefill_tokens_per_second", "Learned prefill rate (0: not known).", |p| {
            p.engine.filter(|e| e.fresh).map(|e| e.rate_tps.to_string())
        }),
        ("pdgate_engine_metrics_age_seconds", "Age of the engine's last good scrape.", |p| {
            p.engine
                .and_then(|e| e.scraped_ago_ms)
                .map(|ms| format!("{}.{:03}", ms / 1000, ms % 1000))
        }),
        ("pdgate_kv_blocks", "KV blocks the engine holds, by its KV events.", |p| {
            p.kv.map(|k| k.blocks.to_string())
        }),
        ("pdgate_kv_events_age_seconds", "Age of the engine's last KV event batch.", |p| {
            p.kv.and_then(|k| k.age_ms).map(|ms| format!("{}.{:03}", ms / 1000, ms % 1000))
        }),
    ];
    for (name, help, pick) in gauges {
        let rows: Vec<(&PeerState, String)> =
            peers.iter().filter_map(|p| pick(p).map(|v| (p, v))).collect();
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (p, v) in rows {
            let _ = write!(o, "{name}{{upstream=\"");
            crate::metrics::label(o, &p.upstream);
            o.push_str("\",peer=\"");
            crate::metrics::label(o, &p.peer);
            let _ = writeln!(o, "\"}} {v}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(running: f64, waiting: f64, kv: f64) -> EngineLoad {
        EngineLoad {
            running: Some(running),
            waiting: Some(waiting),
            kv_usage: Some(kv),
            ..Default::default()
        }
    }

    #[test]
    fn conf_parses_and_refuses() {
        let c = MetricsConf::parse(&[
            b"interval=500ms",
            b"timeout=200ms",
            b"uri=/m",
            b"port=9",
            b"model=llama",
            b"kv_high=80",
        ])
        .unwrap();
        assert_eq!(
            (c.probe.interval_ms, c.probe.timeout_ms, c.probe.port, c.kv_high_permille),
            (500, 200, Some(9), 800)
        );
        assert_eq!((c.probe.uri.as_slice(), c.model.as_deref()), (&b"/m"[..], Some("llama")));
        assert_eq!(c.stale_ms(), 1_700);
        assert_eq!(MetricsConf::parse(&[]).unwrap(), MetricsConf::default());
        for (bad, msg) in [
            (&b"interval=0"[..], "invalid parameter \"interval=0\", it must be a positive time such as 500ms or 2s"),
            (b"kv_high=101", "invalid parameter \"kv_high=101\", it must be a percentage from 1 to 100"),
            (b"uri=metrics", "invalid parameter \"uri=metrics\", it must be a path starting with \"/\" without spaces"),
            (b"model=", "invalid parameter \"model=\", it must be a model name"),
            (b"every=1s", "invalid parameter \"every=1s\""),
            (b"interval", "invalid parameter \"interval\""),
        ] {
            assert_eq!(MetricsConf::parse(&[bad]).unwrap_err().0, msg);
        }
        assert_eq!(
            MetricsConf::parse(&[b"uri=/a", b"uri=/b"]).unwrap_err().0,
            "duplicate parameter \"uri\""
        );
        assert_eq!(
            MetricsConf::parse(&[b"interval=1s", b"timeout=2s"]).unwrap_err().0,
            "timeout (2000 ms) is longer than interval (1000 ms)"
        );
        let req = MetricsConf::default().request(b"10.0.0.1:8000");
        assert!(req.starts_with(b"GET /metrics HTTP/1.0\r\nHost: 10.0.0.1:8000\r\n"));
        assert!(req.ends_with(b"\r\n\r\n"));
    }

    #[test]
    fn answers() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nvllm:num_requests_running 3\nvllm:num_requests_waiting{model_name=\"a\"} 2\n";
        let l = read_answer(ok, None).unwrap();
        assert_eq!((l.running, l.waiting), (Some(3.0), Some(2.0)));
        assert_eq!(read_answer(ok, Some("b")).unwrap().waiting, None, "other model");
        assert_eq!(read_answer(b"HTTP/1.1 503 X\r\n\r\n", None), Err(ScrapeError::Status(503)));
        assert_eq!(read_answer(b"SSH-2.0\r\n", None), Err(ScrapeError::Garbage));
        assert_eq!(read_answer(b"HTTP/1.0 200 OK\r\nA: b", None), Err(ScrapeError::Garbage));
        assert_eq!(
            read_answer(b"HTTP/1.0 200 OK\r\n\r\nhttp_requests_total 5\n", None),
            Err(ScrapeError::NoMetrics)
        );
        assert_eq!(
            read_answer(b"HTTP/1.0 200 OK\n\nvllm:num_requests_waiting 1\n", None).unwrap().waiting,
            Some(1.0)
        );
    }

    #[test]
    fn view_adds_what_pdgate_did_since_the_scrape() {
        let row = EngineRow::default();
        let conf = MetricsConf::default();
        assert_eq!(row.view(10), EngineView::default(), "never scraped");
        row.placed();
        row.placed(); // two requests before the scrape: the engine counts them
        let sent = row.counters();
        row.store(&load(2.0, 1.0, 0.5), sent, 1_000, 300, &conf);
        let v = row.view(1_100);
        assert!(v.fresh);
        assert_eq!((v.requests, v.waiting, v.pressured), (3, 1, false));
        row.placed();
        row.placed();
        assert_eq!(row.view(1_100).requests, 5, "placed since the scrape");
        for _ in 0..3 {
            row.ended();
        }
        assert_eq!(row.view(1_100).requests, 2, "ended since, the older ones too");
        for _ in 0..9 {
            row.ended();
        }
        assert_eq!(row.view(1_100).requests, 0, "never below zero");
        assert!(!row.view(1_000 + conf.stale_ms() + 1).fresh, "stale values age out");
        row.store(&load(0.0, 0.0, 0.97), row.counters(), 2_000, 300, &conf);
        assert!(row.view(2_000).pressured);
        let s = row.snapshot(2_500);
        assert_eq!((s.scraped_ago_ms, s.kv_permille, s.scrapes, s.placed), (Some(500), 970, 2, 4));
        assert!(row.failed(7), "the first failure after good scrapes");
        assert!(!row.failed(7));
        assert!(row.store(&load(0.0, 0.0, 0.1), row.counters(), 2_400, 7, &conf), "back");
        let s = row.snapshot(2_500);
        assert_eq!((s.scrapes, s.failed, s.latency_us, s.fresh), (5, 2, 7, true));
        assert!(status_line_text(&s).starts_with("engine running=0 waiting=0 kv=10.0%"));
    }

    #[test]
    fn learns_rates_only_while_saturated() {
        let row = EngineRow::default();
        let conf = MetricsConf::default();
        let mut l = load(4.0, 0.0, 0.1);
        l.prompt_tokens = Some(1_000.0);
        l.finished = Some(10.0);
        row.store(&l, (0, 0), 1_000, 1, &conf);
        l.prompt_tokens = Some(5_000.0);
        l.finished = Some(20.0);
        row.store(&l, (0, 0), 2_000, 1, &conf);
        assert_eq!(row.view(2_000).rate_tps, 0, "no queue: the engine was not at its limit");
        l.waiting = Some(3.0);
        l.prompt_tokens = Some(9_000.0);
        row.store(&l, (0, 0), 3_000, 1, &conf);
        assert_eq!(row.view(3_000).rate_tps, 0, "queued at one end only");
        l.prompt_tokens = Some(17_000.0);
        l.finished = Some(24.0);
        row.store(&l, (0, 0), 5_000, 1, &conf);
        let v = row.view(5_000);
        assert_eq!((v.rate_tps, v.finish_mps), (4_000, 2_000), "8000 tokens and 4 requests in 2 s");
        l.prompt_tokens = Some(25_000.0);
        l.finished = Some(24.0);
        row.store(&l, (0, 0), 6_000, 1, &conf);
        let v = row.view(6_000);
        assert_eq!(v.rate_tps, 5_000, "a quarter of the new 8000 tok/s");
        assert_eq!(v.finish_mps, 2_000, "no finish in the interval: not learned");
        // A counter reset (engine restarted) teaches nothing.
        l.prompt_tokens = Some(100.0);
        row.store(&l, (0, 0), 7_000, 1, &conf);
        assert_eq!(row.view(7_000).rate_tps, 5_000);
    }

    #[test]
    fn peer_gauges() {
        let row = EngineRow::default();
        row.store(&load(3.0, 2.0, 0.25), (0, 0), 1_000, 1, &MetricsConf::default());
        let peers = [
            PeerState {
                upstream: b"p\"x".to_vec(),
                peer: b"10.0.0.1:8000".to_vec(),
                eligible: Some(true),
                engine: Some(row.snapshot(1_500)),
                kv: None,
            },
            PeerState {
                upstream: b"d".to_vec(),
                peer: b"b".to_vec(),
                eligible: Some(false),
                engine: None,
                kv: Some(crate::kv::index::KvSnapshot {
                    blocks: 42,
                    age_ms: Some(250),
                    ..Default::default()
                }),
            },
        ];
        let mut o = String::new();
        render_peer_gauges(&mut o, &peers);
        assert!(o.contains("# TYPE pdgate_peer_up gauge\npdgate_peer_up{upstream=\"p\\\"x\",peer=\"10.0.0.1:8000\"} 1\npdgate_peer_up{upstream=\"d\",peer=\"b\"} 0\n"));
        assert!(o.contains("pdgate_kv_blocks{upstream=\"d\",peer=\"b\"} 42\n"), "{o}");
        assert!(
            o.contains("pdgate_kv_events_age_seconds{upstream=\"d\",peer=\"b\"} 0.250\n"),
            "{o}"
        );
        assert!(o.contains(
            "pdgate_engine_requests_waiting{upstream=\"p\\\"x\",peer=\"10.0.0.1:8000\"} 2\n"
        ));
        assert!(o.contains("pdgate_engine_kv_cache_usage_ratio{upstream=\"p\\\"x\",peer=\"10.0.0.1:8000\"} 0.250\n"));
        assert!(o.contains(
            "pdgate_engine_metrics_age_seconds{upstream=\"p\\\"x\",peer=\"10.0.0.1:8000\"} 0.500\n"
        ));
        assert!(!o.contains("peer=\"b\"} 0\npdgate_engine"), "no engine gauges without a scrape");
        let mut none = String::new();
        render_peer_gauges(&mut none, &[]);
        assert!(none.is_empty());
    }

    #[test]
    fn scrapes_are_paced() {
        let row = EngineRow::default();
        assert!(row.due(1_000, 1_000, 50));
        assert!(!row.due(1_900, 1_000, 50));
        assert!(row.due(1_950, 1_000, 50), "within the slack");
        assert!(!row.due(1_960, 1_000, 50), "started again at 1950");
    }

    #[test]
    fn torn_reads_give_nothing() {
        let row = EngineRow::default();
        row.store(&load(1.0, 1.0, 0.1), (0, 0), 1_000, 1, &MetricsConf::default());
        row.seq.fetch_add(1, Ordering::AcqRel); // a writer died mid-write
        assert_eq!(row.view(1_000), EngineView::default());
        assert_eq!(row.snapshot(1_000).running, 0);
        row.store(&load(5.0, 0.0, 0.1), (0, 0), 2_000, 1, &MetricsConf::default());
        assert_eq!(row.view(2_000).requests, 5, "the next writer recovers");
    }
}
