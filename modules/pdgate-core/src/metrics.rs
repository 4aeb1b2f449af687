//! Metrics of P/D requests: what one request measured ([`Sample`]), the
//! shared counters every worker adds it to ([`MetricsZone`], `#[repr(C)]`
//! atomics only, so it can live in an nginx shared zone), the Prometheus
//! text of those counters ([`render`]). The token counts of an answer's
//! `usage` are found by [`UsageScanner`] (in `usage.rs`).
//!
//! Times are taken in milliseconds (nginx's cached clock) and accumulated
//! in microseconds; histograms are exported cumulatively in seconds, as
//! Prometheus expects (the original exported per-bucket counts).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

pub use crate::usage::UsageScanner;

/// Upper bounds (ms) of the time-to-first-token buckets (vLLM's).
pub const TTFT_BOUNDS_MS: &[u64] = &[
    1, 5, 10, 20, 40, 60, 80, 100, 250, 500, 750, 1000, 2500, 5000, 7500, 10000, 20000, 40000,
    80000, 160000, 640000, 2560000,
];
/// Upper bounds (ms) of the time-per-output-token buckets (vLLM's).
pub const TPOT_BOUNDS_MS: &[u64] = &[
    10, 25, 50, 75, 100, 150, 200, 300, 400, 500, 750, 1000, 2500, 5000, 7500, 10000, 20000, 40000,
    80000,
];
/// Upper bounds (ms) of the end-to-end latency buckets (vLLM's).
pub const E2E_BOUNDS_MS: &[u64] = &[
    300, 500, 800, 1000, 1500, 2000, 2500, 5000, 10000, 15000, 20000, 30000, 40000, 50000, 60000,
    120000, 240000, 480000, 960000, 1920000, 7680000,
];
/// Upper bounds (ms) of the prefill-leg time buckets (those of TTFT).
pub const PREFILL_BOUNDS_MS: &[u64] = TTFT_BOUNDS_MS;
/// Upper bounds (ms) of the prefill-done → decode-sent gap buckets.
pub const GAP_BOUNDS_MS: &[u64] = &[1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000];

/// Buckets a histogram has room for (finite bounds + `+Inf`).
pub const MAX_BUCKETS: usize = 24;

/// The histograms, in [`MetricsZone::hist`] order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hist {
    Ttft = 0,
    Tpot = 1,
    E2e = 2,
    Prefill = 3,
    Gap = 4,
}

impl Hist {
    pub const ALL: [Hist; 5] = [Hist::Ttft, Hist::Tpot, Hist::E2e, Hist::Prefill, Hist::Gap];

    pub fn bounds(self) -> &'static [u64] {
        match self {
            Hist::Ttft => TTFT_BOUNDS_MS,
            Hist::Tpot => TPOT_BOUNDS_MS,
            Hist::E2e => E2E_BOUNDS_MS,
            Hist::Prefill => PREFILL_BOUNDS_MS,
            Hist::Gap => GAP_BOUNDS_MS,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Hist::Ttft => "pdgate_time_to_first_token_seconds",
            Hist::Tpot => "pdgate_time_per_output_token_seconds",
            Hist::E2e => "pdgate_e2e_request_latency_seconds",
            Hist::Prefill => "pdgate_prefill_time_seconds",
            Hist::Gap => "pdgate_prefill_decode_gap_seconds",
        }
    }

    fn help(self) -> &'static str {
        match self {
            Hist::Ttft => "Time from the client request to the first byte of the decode answer.",
            Hist::Tpot => "Time per output token after the first (decode answers of 2+ tokens).",
            Hist::E2e => "Time from the client request to the last byte of the decode answer.",
            Hist::Prefill => "Time of the prefill leg (subrequest sent to its answer).",
            Hist::Gap => "Time from the prefill answer to the decode request being sent.",
        }
    }
}

/// How a P/D request ended, in [`MetricsZone::outcomes`] order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered below 400 (normally the decode's 2xx).
    Ok = 0,
    /// Answered 4xx: a bad request (ours or an engine's verdict).
    ClientError = 1,
    /// 5xx after an encoder request failed.
    EncodeError = 2,
    /// 5xx after the prefill failed (its error status, or no answer).
    PrefillError = 3,
    /// 5xx after the decode failed (its error status, or no answer).
    DecodeError = 4,
    /// 5xx before any leg failed (pdgate's own failure).
    InternalError = 5,
    /// The client closed the connection before the answer was complete.
    ClientClosed = 6,
}

impl Outcome {
    pub const ALL: [Outcome; 7] = [
        Outcome::Ok,
        Outcome::ClientError,
        Outcome::EncodeError,
        Outcome::PrefillError,
        Outcome::DecodeError,
        Outcome::InternalError,
        Outcome::ClientClosed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ClientError => "client_error",
            Outcome::EncodeError => "encode_error",
            Outcome::PrefillError => "prefill_error",
            Outcome::DecodeError => "decode_error",
            Outcome::InternalError => "internal_error",
            Outcome::ClientClosed => "client_closed",
        }
    }
}

/// A P/D stage, in [`MetricsZone::stages`] order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Encode = 0,
    Prefill = 1,
    Decode = 2,
}

impl Stage {
    pub const ALL: [Stage; 3] = [Stage::Encode, Stage::Prefill, Stage::Decode];

    pub fn label(self) -> &'static str {
        match self {
            Stage::Encode => "encode",
            Stage::Prefill => "prefill",
            Stage::Decode => "decode",
        }
    }
}

/// What one P/D request measured (times in ms of one monotonic clock;
/// `None`: did not happen).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    pub start: u64,
    /// The encoder stage started.
    pub encode_sent: Option<u64>,
    pub prefill_sent: Option<u64>,
    pub prefill_done: Option<u64>,
    /// The prefill's HTTP status (0: none).
    pub prefill_status: u16,
    /// The prefill succeeded (the request went on to the decode).
    pub prefill_ok: bool,
    pub decode_sent: Option<u64>,
    /// First and last byte of the decode's answer passed to the client.
    pub first_byte: Option<u64>,
    pub last_byte: Option<u64>,
    /// The decode's answer reached its end (its last buffer passed).
    pub complete: bool,
    /// The prefill answer had no usable `kv_transfer_params`.
    pub kv_missing: bool,
    /// The prefill failed and the decode ran alone (`prefill_fallback`).
    pub fallback: bool,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    /// How long `pd_hold` held the request (ms; 0: admitted at once).
    pub held_ms: Option<u64>,
}

fn since(from: Option<u64>, to: Option<u64>) -> Option<u64> {
    Some(to?.saturating_sub(from?))
}

impl Sample {
    /// Prefill leg: sent → answered (ms).
    pub fn prefill_ms(&self) -> Option<u64> {
        since(self.prefill_sent, self.prefill_done)
    }

    /// Prefill answered → decode sent (ms).
    pub fn gap_ms(&self) -> Option<u64> {
        since(self.prefill_done, self.decode_sent)
    }

    /// Start → first byte of the decode answer (ms).
    pub fn ttft_ms(&self) -> Option<u64> {
        self.decode_sent?;
        since(Some(self.start), self.first_byte)
    }

    /// Start → last byte of the decode answer (ms).
    pub fn e2e_ms(&self) -> Option<u64> {
        self.decode_sent?;
        since(Some(self.start), self.last_byte)
    }

    /// (E2E − TTFT) / (completion tokens − 1), in µs, for 2+ tokens.
    pub fn tpot_us(&self) -> Option<u64> {
        let n = self.completion_tokens.filter(|&n| n >= 2)?;
        let decode_ms = self.e2e_ms()?.saturating_sub(self.ttft_ms()?);
        Some(decode_ms.saturating_mul(1000) / (n - 1))
    }

    /// The stage that failed, given the request's final status.
    pub fn failed_stage(&self, status: u16, client_closed: bool) -> Option<Stage> {
        if client_closed || status == 499 {
            return None;
        }
        if self.prefill_done.is_some() && !self.prefill_ok && !self.fallback {
            return Some(Stage::Prefill);
        }
        let failed = status >= 400 || status == 0;
        if self.decode_sent.is_some() {
            // A decode that broke off after its header keeps a 2xx status.
            return (failed || !self.complete).then_some(Stage::Decode);
        }
        if self.encode_sent.is_some() && self.prefill_sent.is_none() && failed {
            return Some(Stage::Encode);
        }
        None
    }

    /// How the request ended, given its final status (`$status`) and
    /// whether the client connection broke.
    pub fn outcome(&self, status: u16, client_closed: bool) -> Outcome {
        if client_closed || status == 499 {
            return Outcome::ClientClosed;
        }
        match status {
            1..=399 if self.decode_sent.is_none() || self.complete => Outcome::Ok,
            400..=499 => Outcome::ClientError,
            _ => match self.failed_stage(status, client_closed) {
                Some(Stage::Encode) => Outcome::EncodeError,
                Some(Stage::Prefill) => Outcome::PrefillError,
                Some(Stage::Decode) => Outcome::DecodeError,
                None => Outcome::InternalError,
            },
        }
    }
}

/// A histogram in shared memory: per-bucket counts (one atomic add per
/// observation; [`render`] accumulates them) and the sum in µs.
#[repr(C)]
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; MAX_BUCKETS],
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { buckets: [const { AtomicU64::new(0) }; MAX_BUCKETS], sum_us: AtomicU64::new(0) }
    }
}

impl Histogram {
    /// Counts one value of `us` microseconds against `bounds` (ms).
    pub fn observe(&self, bounds: &[u64], us: u64) {
        let i = bounds.iter().position(|&b| us <= b.saturating_mul(1000)).unwrap_or(bounds.len());
        if let Some(b) = self.buckets.get(i.min(MAX_BUCKETS - 1)) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Cumulative counts (the last one is `+Inf`, the total) and the sum.
    pub fn cumulative(&self, bounds: &[u64]) -> ([u64; MAX_BUCKETS], u64) {
        let mut out = [0u64; MAX_BUCKETS];
        let mut acc = 0u64;
        for (i, o) in out.iter_mut().enumerate().take(bounds.len().min(MAX_BUCKETS - 1) + 1) {
            acc += self.buckets[i].load(Ordering::Relaxed);
            *o = acc;
        }
        (out, self.sum_us.load(Ordering::Relaxed))
    }
}

/// Marks a zone holding a [`MetricsZone`] of this layout.
pub const MAGIC: u64 = 0x7064_6d65_7472_0002;

/// The counters every worker shares.
#[repr(C)]
#[derive(Debug)]
pub struct MetricsZone {
    magic: AtomicU64,
    hist: [Histogram; 5],
    outcomes: [AtomicU64; 7],
    stages: [AtomicU64; 3],
    kv_missing: AtomicU64,
    fallback: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
}

impl Default for MetricsZone {
    fn default() -> Self {
        MetricsZone {
            magic: AtomicU64::new(0),
            hist: Default::default(),
            outcomes: [const { AtomicU64::new(0) }; 7],
            stages: [const { AtomicU64::new(0) }; 3],
            kv_missing: AtomicU64::new(0),
            fallback: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
        }
    }
}

impl MetricsZone {
    /// Claims all-zero memory or recognises a zone of this layout.
    pub fn attach(&self) -> bool {
        crate::shm::attach(&self.magic, MAGIC)
    }

    /// Adds one finished request: its outcome, failing stage, and (when it
    /// succeeded) its latencies.
    pub fn record(&self, s: &Sample, status: u16, client_closed: bool) {
        let outcome = s.outcome(status, client_closed);
        self.outcomes[outcome as usize].fetch_add(1, Ordering::Relaxed);
        if let Some(stage) = s.failed_stage(status, client_closed) {
            self.stages[stage as usize].fetch_add(1, Ordering::Relaxed);
        }
        if s.kv_missing {
            self.kv_missing.fetch_add(1, Ordering::Relaxed);
        }
        if s.fallback {
            self.fallback.fetch_add(1, Ordering::Relaxed);
        }
        let ms = |h: Hist, v: Option<u64>| {
            if let Some(v) = v {
                self.hist[h as usize].observe(h.bounds(), v.saturating_mul(1000));
            }
        };
        ms(Hist::Prefill, s.prefill_ms());
        ms(Hist::Gap, s.gap_ms());
        if outcome != Outcome::Ok {
            return;
        }
        ms(Hist::Ttft, s.ttft_ms());
        ms(Hist::E2e, s.e2e_ms());
        if let Some(us) = s.tpot_us() {
            self.hist[Hist::Tpot as usize].observe(TPOT_BOUNDS_MS, us);
        }
        if let Some(n) = s.prompt_tokens {
            self.prompt_tokens.fetch_add(n, Ordering::Relaxed);
        }
        if let Some(n) = s.completion_tokens {
            self.completion_tokens.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// One peer's in-flight counters as a balancer's zone holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerGauge<'a> {
    /// The balancer (its zone name without `pdgate_`).
    pub balancer: &'a str,
    pub upstream: &'a [u8],
    pub peer: &'a [u8],
    pub requests: u64,
    pub tokens: u64,
}

/// `us` microseconds as seconds, without trailing zeros (`1500` → `0.0015`).
fn seconds(out: &mut String, us: u64) {
    let (s, frac) = (us / 1_000_000, us % 1_000_000);
    let _ = write!(out, "{s}");
    if frac != 0 {
        let f = format!("{frac:06}");
        out.push('.');
        out.push_str(f.trim_end_matches('0'));
    }
}

/// Escapes a Prometheus label value.
pub(crate) fn label(out: &mut String, v: &[u8]) {
    for c in String::from_utf8_lossy(v).chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// The Prometheus text (format 0.0.4) of `z` and the balancers' gauges.
pub fn render(z: &MetricsZone, gauges: &[PeerGauge<'_>]) -> String {
    let mut o = String::with_capacity(8192);
    o.push_str("# HELP pdgate_requests_total P/D requests by outcome.\n");
    o.push_str("# TYPE pdgate_requests_total counter\n");
    for oc in Outcome::ALL {
        let n = z.outcomes[oc as usize].load(Ordering::Relaxed);
        let _ = writeln!(o, "pdgate_requests_total{{outcome=\"{}\"}} {n}", oc.label());
    }
    o.push_str("# HELP pdgate_stage_failures_total P/D requests by the stage that failed.\n");
    o.push_str("# TYPE pdgate_stage_failures_total counter\n");
    for st in Stage::ALL {
        let n = z.stages[st as usize].load(Ordering::Relaxed);
        let _ = writeln!(o, "pdgate_stage_failures_total{{stage=\"{}\"}} {n}", st.label());
    }
    let counters: [(&str, &str, &AtomicU64); 4] = [
        (
            "pdgate_kv_transfer_params_missing_total",
            "Prefill answers without usable kv_transfer_params.",
            &z.kv_missing,
        ),
        (
            "pdgate_prefill_fallback_total",
            "Requests sent to the decode alone after their prefill failed (prefill_fallback decode).",
            &z.fallback,
        ),
        ("pdgate_prompt_tokens_total", "Prompt tokens of successful requests.", &z.prompt_tokens),
        (
            "pdgate_generation_tokens_total",
            "Completion tokens of successful requests.",
            &z.completion_tokens,
        ),
    ];
    for (name, help, v) in counters {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
        let _ = writeln!(o, "{name} {}", v.load(Ordering::Relaxed));
    }
    for h in Hist::ALL {
        let (name, bounds) = (h.name(), h.bounds());
        let _ = writeln!(o, "# HELP {name} {}\n# TYPE {name} histogram", h.help());
        let (cum, sum) = z.hist[h as usize].cumulative(bounds);
        for (i, b) in bounds.iter().enumerate() {
            let _ = write!(o, "{name}_bucket{{le=\"");
            seconds(&mut o, b * 1000);
            let _ = writeln!(o, "\"}} {}", cum[i]);
        }
        let total = cum[bounds.len()];
        let _ = writeln!(o, "{name}_bucket{{le=\"+Inf\"}} {total}");
        let _ = write!(o, "{name}_sum ");
        seconds(&mut o, sum);
        let _ = writeln!(o, "\n{name}_count {total}");
    }
    for (metric, help, field) in [
        ("pdgate_upstream_requests_in_flight", "Requests in flight per balanced peer.", 0),
        ("pdgate_upstream_tokens_in_flight", "Estimated tokens in flight per balanced peer.", 1),
    ] {
        let _ = writeln!(o, "# HELP {metric} {help}\n# TYPE {metric} gauge");
        for g in gauges {
            let _ = write!(o, "{metric}{{balancer=\"{}\",upstream=\"", g.balancer);
            label(&mut o, g.upstream);
            o.push_str("\",peer=\"");
            label(&mut o, g.peer);
            let _ = writeln!(o, "\"}} {}", if field == 0 { g.requests } else { g.tokens });
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_sample() -> Sample {
        Sample {
            start: 1000,
            prefill_sent: Some(1002),
            prefill_done: Some(1052),
            prefill_status: 200,
            prefill_ok: true,
            decode_sent: Some(1053),
            first_byte: Some(1100),
            last_byte: Some(1400),
            complete: true,
            prompt_tokens: Some(7),
            completion_tokens: Some(4),
            ..Sample::default()
        }
    }

    #[test]
    fn durations() {
        let s = ok_sample();
        assert_eq!(s.prefill_ms(), Some(50));
        assert_eq!(s.gap_ms(), Some(1));
        assert_eq!(s.ttft_ms(), Some(100));
        assert_eq!(s.e2e_ms(), Some(400));
        // (400 - 100) ms over 3 tokens after the first.
        assert_eq!(s.tpot_us(), Some(100_000));
        let one = Sample { completion_tokens: Some(1), ..s };
        assert_eq!(one.tpot_us(), None);
        let no_decode = Sample { decode_sent: None, ..s };
        assert_eq!((no_decode.ttft_ms(), no_decode.e2e_ms()), (None, None));
    }

    #[test]
    fn outcomes_and_stages() {
        let s = ok_sample();
        assert_eq!(s.outcome(200, false), Outcome::Ok);
        assert_eq!(s.failed_stage(200, false), None);
        assert_eq!(s.outcome(200, true), Outcome::ClientClosed);
        assert_eq!(s.outcome(499, false), Outcome::ClientClosed);
        assert_eq!(s.outcome(502, false), Outcome::DecodeError);
        assert_eq!(s.failed_stage(502, false), Some(Stage::Decode));
        assert_eq!(s.outcome(400, false), Outcome::ClientError);
        assert_eq!(s.failed_stage(400, false), Some(Stage::Decode));
        let cut = Sample { complete: false, ..s };
        assert_eq!(cut.outcome(200, false), Outcome::DecodeError);
        assert_eq!(cut.failed_stage(200, false), Some(Stage::Decode));
        assert_eq!(cut.outcome(200, true), Outcome::ClientClosed);
        let p503 = Sample {
            prefill_ok: false,
            prefill_status: 503,
            decode_sent: None,
            first_byte: None,
            last_byte: None,
            ..s
        };
        assert_eq!(p503.outcome(503, false), Outcome::PrefillError);
        assert_eq!(p503.failed_stage(503, false), Some(Stage::Prefill));
        assert_eq!(p503.outcome(400, false), Outcome::ClientError);
        let enc = Sample { start: 1, encode_sent: Some(1), ..Sample::default() };
        assert_eq!(enc.outcome(502, false), Outcome::EncodeError);
        let bad_body = Sample { start: 1, ..Sample::default() };
        assert_eq!(bad_body.outcome(400, false), Outcome::ClientError);
        assert_eq!(bad_body.failed_stage(400, false), None);
        assert_eq!(bad_body.outcome(500, false), Outcome::InternalError);
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        for us in [0, 1000, 1001, 4_000, 3_000_000_000] {
            h.observe(TTFT_BOUNDS_MS, us);
        }
        let (cum, sum) = h.cumulative(TTFT_BOUNDS_MS);
        assert_eq!(&cum[..3], &[2, 4, 4]);
        assert_eq!(cum[TTFT_BOUNDS_MS.len() - 1], 4);
        assert_eq!(cum[TTFT_BOUNDS_MS.len()], 5);
        assert_eq!(sum, 3_000_006_001);
        assert!(cum.windows(2).take(TTFT_BOUNDS_MS.len()).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn bounds_fit() {
        for h in Hist::ALL {
            assert!(h.bounds().len() < MAX_BUCKETS, "{h:?}");
            assert!(h.bounds().windows(2).all(|w| w[0] < w[1]), "{h:?}");
        }
    }

    #[test]
    fn seconds_text() {
        let f = |us| {
            let mut s = String::new();
            seconds(&mut s, us);
            s
        };
        assert_eq!(f(0), "0");
        assert_eq!(f(1000), "0.001");
        assert_eq!(f(1500), "0.0015");
        assert_eq!(f(2_500_000), "2.5");
        assert_eq!(f(2_560_000_000), "2560");
    }

    #[test]
    fn a_fallback_is_counted_and_judged_by_its_decode() {
        let fell_back =
            Sample { prefill_ok: false, prefill_status: 502, fallback: true, ..ok_sample() };
        assert_eq!(fell_back.outcome(200, false), Outcome::Ok);
        assert_eq!(fell_back.failed_stage(200, false), None);
        let broke = Sample { complete: false, ..fell_back };
        assert_eq!(broke.failed_stage(200, false), Some(Stage::Decode));
        let z = MetricsZone::default();
        assert!(z.attach());
        z.record(&fell_back, 200, false);
        z.record(&ok_sample(), 200, false);
        let text = render(&z, &[]);
        assert!(text.contains("\npdgate_prefill_fallback_total 1\n"), "{text}");
        assert!(text.contains("pdgate_requests_total{outcome=\"ok\"} 2\n"), "{text}");
    }

    #[test]
    fn render_exact() {
        let z = MetricsZone::default();
        assert!(z.attach());
        z.record(&ok_sample(), 200, false);
        let p503 = Sample {
            prefill_ok: false,
            prefill_status: 503,
            decode_sent: None,
            kv_missing: false,
            ..ok_sample()
        };
        z.record(&p503, 503, false);
        let missing = Sample { kv_missing: true, ..ok_sample() };
        z.record(&missing, 502, false);
        let gauges = [PeerGauge {
            balancer: "least_total_load",
            upstream: b"decode_pool",
            peer: b"127.0.0.1:8001",
            requests: 3,
            tokens: 120,
        }];
        let text = render(&z, &gauges);
        let head = "\
# HELP pdgate_requests_total P/D requests by outcome.
# TYPE pdgate_requests_total counter
pdgate_requests_total{outcome=\"ok\"} 1
pdgate_requests_total{outcome=\"client_error\"} 0
pdgate_requests_total{outcome=\"encode_error\"} 0
pdgate_requests_total{outcome=\"prefill_error\"} 1
pdgate_requests_total{outcome=\"decode_error\"} 1
pdgate_requests_total{outcome=\"internal_error\"} 0
pdgate_requests_total{outcome=\"client_closed\"} 0
# HELP pdgate_stage_failures_total P/D requests by the stage that failed.
# TYPE pdgate_stage_failures_total counter
pdgate_stage_failures_total{stage=\"encode\"} 0
pdgate_stage_failures_total{stage=\"prefill\"} 1
pdgate_stage_failures_total{stage=\"decode\"} 1
# HELP pdgate_kv_transfer_params_missing_total Prefill answers without usable kv_transfer_params.
# TYPE pdgate_kv_transfer_params_missing_total counter
pdgate_kv_transfer_params_missing_total 1
# HELP pdgate_prefill_fallback_total Requests sent to the decode alone after their prefill failed (prefill_fallback decode).
# TYPE pdgate_prefill_fallback_total counter
pdgate_prefill_fallback_total 0
# HELP pdgate_prompt_tokens_total Prompt tokens of successful requests.
# TYPE pdgate_prompt_tokens_total counter
pdgate_prompt_tokens_total 7
# HELP pdgate_generation_tokens_total Completion tokens of successful requests.
# TYPE pdgate_generation_tokens_total counter
pdgate_generation_tokens_total 4
";
        assert!(text.starts_with(head), "{text}");
        // Prefill times of all three (50 ms each), gaps of the two decodes.
        let gap = "\
# HELP pdgate_prefill_decode_gap_seconds Time from the prefill answer to the decode request being sent.
# TYPE pdgate_prefill_decode_gap_seconds histogram
pdgate_prefill_decode_gap_seconds_bucket{le=\"0.001\"} 2
pdgate_prefill_decode_gap_seconds_bucket{le=\"0.002\"} 2
pdgate_prefill_decode_gap_seconds_bucket{le=\"0.005\"} 2
pdgate_prefill_decode_gap_seconds_bucket{le=\"0.01\"} 2
pdgate_prefill_decode_gap_seconds_bucket{le=\"0.025\"} 2
pdgate_prefill_decode_gap_seconds_bucket{le=\"0.05\"} 2
pdgate_prefill_decode_gap_seconds_bucket{le=\"0.1\"} 2
pdgate_prefill_decode_gap_seconds_bucket{le=\"0.25\"} 2
pdgate_prefill_decode_gap_seconds_bucket{le=\"0.5\"} 2
pdgate_prefill_decode_gap_seconds_bucket{le=\"1\"} 2
pdgate_prefill_decode_gap_seconds_bucket{le=\"2.5\"} 2
pdgate_prefill_decode_gap_seconds_bucket{le=\"5\"} 2
pdgate_prefill_decode_gap_seconds_bucket{le=\"10\"} 2
pdgate_prefill_decode_gap_seconds_bucket{le=\"+Inf\"} 2
pdgate_prefill_decode_gap_seconds_sum 0.002
pdgate_prefill_decode_gap_seconds_count 2
";
        assert!(text.contains(gap), "{text}");
        assert!(text.contains("pdgate_prefill_time_seconds_sum 0.15\n"), "{text}");
        assert!(text.contains("pdgate_prefill_time_seconds_bucket{le=\"0.04\"} 0\n"));
        assert!(text.contains("pdgate_prefill_time_seconds_bucket{le=\"0.06\"} 3\n"));
        // Only the successful request's latencies.
        assert!(text.contains("pdgate_time_to_first_token_seconds_count 1\n"));
        assert!(text.contains("pdgate_time_to_first_token_seconds_bucket{le=\"0.1\"} 1\n"));
        assert!(text.contains("pdgate_time_to_first_token_seconds_bucket{le=\"0.08\"} 0\n"));
        assert!(text.contains("pdgate_e2e_request_latency_seconds_sum 0.4\n"));
        assert!(text.contains("pdgate_time_per_output_token_seconds_bucket{le=\"0.1\"} 1\n"));
        assert!(text.contains("pdgate_time_per_output_token_seconds_bucket{le=\"0.075\"} 0\n"));
        let tail = "\
# HELP pdgate_upstream_requests_in_flight Requests in flight per balanced peer.
# TYPE pdgate_upstream_requests_in_flight gauge
pdgate_upstream_requests_in_flight{balancer=\"least_total_load\",upstream=\"decode_pool\",peer=\"127.0.0.1:8001\"} 3
# HELP pdgate_upstream_tokens_in_flight Estimated tokens in flight per balanced peer.
# TYPE pdgate_upstream_tokens_in_flight gauge
pdgate_upstream_tokens_in_flight{balancer=\"least_total_load\",upstream=\"decode_pool\",peer=\"127.0.0.1:8001\"} 120
";
        assert!(text.ends_with(tail), "{text}");
    }

    #[test]
    fn label_escaping() {
        let mut s = String::new();
        label(&mut s, b"a\"b\\c\nd");
        assert_eq!(s, "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn attach_accepts_zeroes_and_itself_only() {
        let z = MetricsZone::default();
        assert!(z.attach());
        assert!(z.attach());
        z.magic.store(1, Ordering::Relaxed);
        assert!(!z.attach());
    }

    #[test]
    fn workers_sharing_a_zone_agree() {
        let z = std::sync::Arc::new(MetricsZone::default());
        let s = ok_sample();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let z = z.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        z.record(&s, 200, false);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(z.outcomes[0].load(Ordering::Relaxed), 4000);
        assert_eq!(
            z.hist[Hist::E2e as usize].cumulative(E2E_BOUNDS_MS).0[E2E_BOUNDS_MS.len()],
            4000
        );
    }
}

/// A variable's text formatted on the stack: what the `$pd_*` getters
/// write before copying it into the request pool (no allocation on the log
/// path, where nginx calls a no-cacheable getter twice per `escape=json`
/// field). Holds any u64 and any millisecond count as seconds.
#[derive(Debug, Clone, Copy)]
pub struct VarText {
    buf: [u8; 32],
    len: usize,
}

impl Default for VarText {
    fn default() -> VarText {
        VarText::new()
    }
}

impl VarText {
    pub fn new() -> VarText {
        VarText { buf: [0; 32], len: 0 }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Appends `n` in decimal; false when it does not fit (never for one
    /// number in an empty text).
    pub fn num(&mut self, n: u64) -> bool {
        std::fmt::Write::write_fmt(self, format_args!("{n}")).is_ok()
    }

    /// Appends `ms` milliseconds as seconds with three decimals, the shape
    /// of nginx's `$request_time`.
    pub fn secs(&mut self, ms: u64) -> bool {
        std::fmt::Write::write_fmt(self, format_args!("{}.{:03}", ms / 1000, ms % 1000)).is_ok()
    }
}

impl std::fmt::Write for VarText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        let dst = self.buf.get_mut(self.len..end).ok_or(std::fmt::Error)?;
        dst.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

#[cfg(test)]
mod var_text_tests {
    use super::VarText;

    #[test]
    fn formats_numbers_and_seconds() {
        let text = |f: &dyn Fn(&mut VarText) -> bool| {
            let mut t = VarText::new();
            assert!(f(&mut t));
            String::from_utf8(t.bytes().to_vec()).unwrap()
        };
        assert_eq!(text(&|t| t.num(0)), "0");
        assert_eq!(text(&|t| t.num(u64::MAX)), u64::MAX.to_string());
        assert_eq!(text(&|t| t.secs(0)), "0.000");
        assert_eq!(text(&|t| t.secs(1234)), "1.234");
        assert_eq!(text(&|t| t.secs(7)), "0.007");
        assert_eq!(text(&|t| t.secs(u64::MAX)), "18446744073709551.615");
    }

    #[test]
    fn refuses_what_does_not_fit() {
        let mut t = VarText::new();
        assert!(t.num(u64::MAX)); // 20 bytes
        assert!(!t.num(u64::MAX)); // 40 > 32
        assert_eq!(
            t.bytes(),
            u64::MAX.to_string().as_bytes(),
            "a failed write leaves the text as it was"
        );
    }
}
