//! The per-request record and the statistics pd-bench reports over them:
//! percentiles, distributions, throughput and goodput.

use std::collections::BTreeMap;

use serde_json::{json, Value};

/// What happened to one request. Times are milliseconds; `scheduled_ms` and
/// `start_ms` count from the start of the run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Record {
    /// Position in the request sequence.
    pub n: u64,
    /// The `X-Request-Id` sent.
    pub id: String,
    /// Conversation and turn (shared-prefix workloads).
    pub conv: Option<(u64, u32)>,
    /// Prompt tokens sent, by the shared rule.
    pub input_tokens: u64,
    /// `max_tokens` asked for.
    pub max_tokens: u64,
    /// The server's `usage.prompt_tokens`, when it sent one.
    pub prompt_tokens: Option<u64>,
    /// Output tokens: the server's `usage.completion_tokens`, else the
    /// content events counted.
    pub output_tokens: u64,
    /// HTTP status; 0 when no response arrived.
    pub status: u16,
    /// The error class (`http 503`, `connect refused`, `timeout`, ...);
    /// `None` for a success.
    pub error: Option<String>,
    /// When the arrival process scheduled it.
    pub scheduled_ms: f64,
    /// When its first byte was written (after any wait for a connection or
    /// for the previous turn of its conversation).
    pub start_ms: f64,
    /// Time to the first content event (stream) or to the whole answer.
    pub ttft_ms: Option<f64>,
    /// Time to the end of the answer.
    pub e2e_ms: Option<f64>,
    /// Gaps between consecutive content events after the first.
    pub itl_ms: Vec<f64>,
    /// The answer was an event stream.
    pub stream: bool,
    /// Content events received (stream).
    pub events: u64,
    /// Prefill of the prompt alone on an idle engine (the profile), ms; of
    /// the server's `prompt_tokens` when it sent them, else of ours.
    pub ideal_ttft_ms: f64,
}

impl Record {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }

    /// Time per output token after the first: (E2E − TTFT) / (tokens − 1);
    /// undefined below two tokens and for answers that were not streamed.
    pub fn tpot_ms(&self) -> Option<f64> {
        match (self.ttft_ms, self.e2e_ms) {
            (Some(t), Some(e)) if self.stream && self.output_tokens > 1 => {
                Some((e - t) / (self.output_tokens - 1) as f64)
            }
            _ => None,
        }
    }

    /// TTFT / ideal TTFT; undefined when the ideal is zero.
    pub fn slowdown(&self) -> Option<f64> {
        match self.ttft_ms {
            Some(t) if self.ideal_ttft_ms > 0.0 => Some(t / self.ideal_ttft_ms),
            _ => None,
        }
    }

    pub fn to_json(&self) -> Value {
        let conv = self.conv.map(|(c, t)| json!({"conversation": c, "turn": t}));
        json!({
            "n": self.n,
            "id": self.id,
            "conversation": conv,
            "input_tokens": self.input_tokens,
            "max_tokens": self.max_tokens,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "status": self.status,
            "error": self.error,
            "scheduled_ms": round3(self.scheduled_ms),
            "start_ms": round3(self.start_ms),
            "ttft_ms": self.ttft_ms.map(round3),
            "tpot_ms": self.tpot_ms().map(round3),
            "e2e_ms": self.e2e_ms.map(round3),
            "itl_max_ms": self.itl_ms.iter().copied().reduce(f64::max).map(round3),
            "stream": self.stream,
            "events": self.events,
            "ideal_ttft_ms": round3(self.ideal_ttft_ms),
            "slowdown": self.slowdown().map(round3),
        })
    }
}

/// Rounds to three decimals (µs for milliseconds) so the JSON stays short.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The `p`-th percentile (0–100) of ascending `sorted`, interpolating
/// linearly between the two closest ranks: numpy's default, which vLLM's
/// benchmark reports too. `None` for no values.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    let rank = p.clamp(0.0, 100.0) / 100.0 * last as f64;
    let lo = rank.floor() as usize;
    let hi = (rank.ceil() as usize).min(last);
    let (a, b) = (*sorted.get(lo)?, *sorted.get(hi)?);
    Some(a + (b - a) * (rank - lo as f64))
}

/// A distribution's summary.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Dist {
    pub count: usize,
    pub mean: f64,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Dist {
    /// Summarises `values` (sorting them); `None` when empty.
    pub fn of(values: &mut [f64]) -> Option<Dist> {
        values.sort_by(f64::total_cmp);
        let first = *values.first()?;
        let last = *values.last()?;
        let p = |q| percentile(values, q).unwrap_or(f64::NAN);
        Some(Dist {
            count: values.len(),
            mean: values.iter().sum::<f64>() / values.len() as f64,
            min: first,
            p50: p(50.0),
            p90: p(90.0),
            p99: p(99.0),
            max: last,
        })
    }

    pub fn to_json(&self) -> Value {
        json!({
            "count": self.count,
            "mean": round3(self.mean),
            "min": round3(self.min),
            "p50": round3(self.p50),
            "p90": round3(self.p90),
            "p99": round3(self.p99),
            "max": round3(self.max),
        })
    }
}

/// Service-level objectives for goodput; either may be absent.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Slo {
    pub ttft_ms: Option<f64>,
    pub tpot_ms: Option<f64>,
}

impl Slo {
    pub fn is_set(&self) -> bool {
        self.ttft_ms.is_some() || self.tpot_ms.is_some()
    }

    /// A successful request meets the SLO when its TTFT and its TPOT are
    /// within the limits; a request with no TPOT (one output token, or not
    /// streamed) passes the TPOT limit.
    pub fn met(&self, r: &Record) -> bool {
        let ttft_ok = match (self.ttft_ms, r.ttft_ms) {
            (Some(limit), Some(t)) => t <= limit,
            (Some(_), None) => false,
            (None, _) => true,
        };
        let tpot_ok = match (self.tpot_ms, r.tpot_ms()) {
            (Some(limit), Some(t)) => t <= limit,
            _ => true,
        };
        r.ok() && ttft_ok && tpot_ok
    }
}

/// Everything the table and the JSON summary show.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Summary {
    /// From the start of the run to the end of its last request, s.
    pub duration_s: f64,
    pub requests: usize,
    pub ok: usize,
    /// Failed requests by error class.
    pub errors: BTreeMap<String, usize>,
    /// Tokens of the successful requests (prompt: the server's count when
    /// it gave one, else ours).
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub request_throughput: f64,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    pub ttft: Option<Dist>,
    pub tpot: Option<Dist>,
    pub itl: Option<Dist>,
    pub e2e: Option<Dist>,
    pub slowdown: Option<Dist>,
    /// Successful requests that waited more than 1 ms past their scheduled
    /// time for a free connection or their conversation's previous turn.
    pub late: usize,
    pub slo: Slo,
    /// Requests meeting the SLO, when one is set.
    pub slo_met: Option<usize>,
    pub goodput: Option<f64>,
}

impl Summary {
    pub fn of(records: &[Record], duration_s: f64, slo: Slo) -> Summary {
        let mut s = Summary { duration_s, requests: records.len(), slo, ..Summary::default() };
        let (mut ttft, mut tpot, mut itl, mut e2e, mut slow) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut met = 0;
        for r in records {
            if let Some(e) = &r.error {
                *s.errors.entry(e.clone()).or_default() += 1;
                continue;
            }
            s.ok += 1;
            s.input_tokens += r.prompt_tokens.unwrap_or(r.input_tokens);
            s.output_tokens += r.output_tokens;
            ttft.extend(r.ttft_ms);
            tpot.extend(r.tpot_ms());
            e2e.extend(r.e2e_ms);
            itl.extend_from_slice(&r.itl_ms);
            slow.extend(r.slowdown());
            if r.start_ms - r.scheduled_ms > 1.0 {
                s.late += 1;
            }
            if slo.met(r) {
                met += 1;
            }
        }
        let per_s = |x: f64| if duration_s > 0.0 { x / duration_s } else { 0.0 };
        s.request_throughput = per_s(s.ok as f64);
        s.output_throughput = per_s(s.output_tokens as f64);
        s.total_token_throughput = per_s((s.input_tokens + s.output_tokens) as f64);
        s.ttft = Dist::of(&mut ttft);
        s.tpot = Dist::of(&mut tpot);
        s.itl = Dist::of(&mut itl);
        s.e2e = Dist::of(&mut e2e);
        s.slowdown = Dist::of(&mut slow);
        if slo.is_set() {
            s.slo_met = Some(met);
            s.goodput = Some(per_s(met as f64));
        }
        s
    }

    pub fn failed(&self) -> usize {
        self.requests - self.ok
    }

    pub fn to_json(&self) -> Value {
        let d = |x: &Option<Dist>| x.as_ref().map_or(Value::Null, Dist::to_json);
        json!({
            "duration_s": round3(self.duration_s),
            "requests": self.requests,
            "ok": self.ok,
            "failed": self.failed(),
            "errors": self.errors,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "request_throughput": round3(self.request_throughput),
            "output_throughput": round3(self.output_throughput),
            "total_token_throughput": round3(self.total_token_throughput),
            "ttft_ms": d(&self.ttft),
            "tpot_ms": d(&self.tpot),
            "itl_ms": d(&self.itl),
            "e2e_ms": d(&self.e2e),
            "slowdown": d(&self.slowdown),
            "late": self.late,
            "slo": {"ttft_ms": self.slo.ttft_ms, "tpot_ms": self.slo.tpot_ms},
            "slo_met": self.slo_met,
            "goodput": self.goodput.map(round3),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&v, 50.0), Some(2.5));
        assert_eq!(percentile(&v, 100.0), Some(4.0));
        // rank 0.9 × 3 = 2.7 → 3 + 0.7 × (4 − 3); np.percentile gives 3.7.
        assert!((percentile(&v, 90.0).unwrap() - 3.7).abs() < 1e-12);
        assert!((percentile(&v, 99.0).unwrap() - 3.97).abs() < 1e-12);
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
        // 1..=100: p50 = 50.5, p90 = 90.1, p99 = 99.01 (numpy).
        let h: Vec<f64> = (1..=100).map(f64::from).collect();
        assert!((percentile(&h, 50.0).unwrap() - 50.5).abs() < 1e-9);
        assert!((percentile(&h, 90.0).unwrap() - 90.1).abs() < 1e-9);
        assert!((percentile(&h, 99.0).unwrap() - 99.01).abs() < 1e-9);
    }

    #[test]
    fn dist_sorts_and_summarises() {
        let mut v = vec![5.0, 1.0, 3.0, 2.0, 4.0];
        let d = Dist::of(&mut v).unwrap();
        assert_eq!(v, [1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!((d.count, d.mean, d.min, d.p50, d.max), (5, 3.0, 1.0, 3.0, 5.0));
        assert!((d.p90 - 4.6).abs() < 1e-12);
        assert!((d.p99 - 4.96).abs() < 1e-12);
        assert_eq!(Dist::of(&mut []), None);
    }

    fn rec(ttft: f64, e2e: f64, out: u64) -> Record {
        Record {
            ttft_ms: Some(ttft),
            e2e_ms: Some(e2e),
            output_tokens: out,
            input_tokens: 100,
            ideal_ttft_ms: 10.0,
            status: 200,
            stream: true,
            ..Record::default()
        }
    }

    #[test]
    fn tpot_and_slowdown() {
        let r = rec(20.0, 110.0, 10);
        assert_eq!(r.tpot_ms(), Some(10.0));
        assert_eq!(r.slowdown(), Some(2.0));
        assert_eq!(rec(20.0, 20.0, 1).tpot_ms(), None);
        assert_eq!(Record { stream: false, ..rec(20.0, 110.0, 10) }.tpot_ms(), None);
        assert_eq!(Record { ideal_ttft_ms: 0.0, ..r }.slowdown(), None);
    }

    #[test]
    fn summary_counts_throughput_goodput_and_errors() {
        let mut records = vec![
            rec(10.0, 100.0, 10), // tpot 10
            rec(30.0, 120.0, 10), // tpot 10, ttft too slow
            rec(10.0, 200.0, 11), // tpot 19, too slow
            Record {
                itl_ms: vec![1.0, 3.0],
                prompt_tokens: Some(150),
                ..rec(20.0, 40.0, 3) // tpot 10
            },
        ];
        for e in ["http 503", "http 503", "connect refused"] {
            records.push(Record { error: Some(e.into()), ..Record::default() });
        }
        let slo = Slo { ttft_ms: Some(25.0), tpot_ms: Some(15.0) };
        let s = Summary::of(&records, 2.0, slo);
        assert_eq!((s.requests, s.ok, s.failed()), (7, 4, 3));
        assert_eq!(s.errors["http 503"], 2);
        assert_eq!(s.errors["connect refused"], 1);
        assert_eq!((s.input_tokens, s.output_tokens), (450, 34));
        assert_eq!(s.request_throughput, 2.0);
        assert_eq!(s.output_throughput, 17.0);
        assert_eq!(s.total_token_throughput, 242.0);
        assert_eq!(s.slo_met, Some(2));
        assert_eq!(s.goodput, Some(1.0));
        let ttft = s.ttft.unwrap();
        assert_eq!((ttft.mean, ttft.p50, ttft.max), (17.5, 15.0, 30.0));
        assert_eq!(s.tpot.unwrap().p50, 10.0);
        assert_eq!(s.itl.unwrap().count, 2);
        assert_eq!(s.slowdown.unwrap().p50, 1.5);
        let j = s.to_json();
        assert_eq!(j["errors"]["http 503"], 2);
        assert_eq!(j["goodput"], 1.0);
        // Without an SLO there is no goodput.
        assert_eq!(Summary::of(&records, 2.0, Slo::default()).goodput, None);
    }

    #[test]
    fn slo_on_ttft_only_ignores_tpot() {
        let slo = Slo { ttft_ms: Some(15.0), tpot_ms: None };
        assert!(slo.met(&rec(10.0, 1000.0, 2)));
        assert!(!slo.met(&rec(20.0, 21.0, 2)));
        let failed = Record { error: Some("timeout".into()), ..rec(1.0, 2.0, 2) };
        assert!(!slo.met(&failed));
    }
}
