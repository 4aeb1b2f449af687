//! pd-bench's output: the plain table on stdout and the `--json` document.

use std::fmt::Write as _;

use serde_json::{json, Value};

use super::config::Config;
use super::stats::{Dist, Record, Summary};
use super::workload::Arrivals;

/// Format version of the `--json` document.
pub const JSON_VERSION: u64 = 1;

fn arrivals(cfg: &Config) -> String {
    match (cfg.arrivals, cfg.concurrency) {
        (Arrivals::Closed, c) => format!("closed loop, concurrency {}", c.unwrap_or(1)),
        (a, Some(c)) => format!("{}, at most {c} in flight", a.describe()),
        (a, None) => a.describe(),
    }
}

fn workload(cfg: &Config) -> String {
    let mut w = cfg.lengths.describe();
    if let Some(p) = cfg.prefix {
        let tokens = if p.tokens_max > p.tokens {
            format!("{}..{}", p.tokens, p.tokens_max)
        } else {
            p.tokens.to_string()
        };
        let _ = write!(
            w,
            "; {} system prompts of {tokens} tokens x {} users x {} turns",
            p.groups, p.users, p.turns
        );
    }
    w
}

fn slo_text(s: &Summary) -> String {
    let mut parts = Vec::new();
    if let Some(t) = s.slo.ttft_ms {
        parts.push(format!("TTFT <= {t} ms"));
    }
    if let Some(t) = s.slo.tpot_ms {
        parts.push(format!("TPOT <= {t} ms"));
    }
    parts.join(", ")
}

/// The table printed at the end of a run.
pub fn table(cfg: &Config, model: &str, s: &Summary) -> String {
    let mut o = String::new();
    let t = &cfg.target;
    let url = format!("http://{}{}{}", t.authority, t.prefix, cfg.endpoint.path());
    let mode = if cfg.stream { "stream" } else { "no stream" };
    let _ = writeln!(o, "target      {url}, model \"{model}\", {mode}");
    let _ = writeln!(o, "workload    {}; seed {}", workload(cfg), cfg.seed);
    let _ = writeln!(o, "arrivals    {}", arrivals(cfg));
    let _ =
        writeln!(o, "profile     {} (ideal TTFT: the prompt's prefill alone)", cfg.profile.name);
    o.push('\n');
    let _ = writeln!(o, "{:<25}{:.3} s", "duration", s.duration_s);
    let _ =
        writeln!(o, "{:<25}{} sent, {} ok, {} failed", "requests", s.requests, s.ok, s.failed());
    let _ = writeln!(o, "{:<25}{:.2} req/s", "request throughput", s.request_throughput);
    let _ = writeln!(o, "{:<25}{:.1} tok/s", "output token throughput", s.output_throughput);
    let _ = writeln!(o, "{:<25}{:.1} tok/s", "total token throughput", s.total_token_throughput);
    let _ = writeln!(o, "{:<25}{} in, {} out", "tokens", s.input_tokens, s.output_tokens);
    if let (Some(g), Some(met)) = (s.goodput, s.slo_met) {
        let _ = writeln!(
            o,
            "{:<25}{g:.2} req/s ({met} of {} met {})",
            "goodput",
            s.requests,
            slo_text(s)
        );
    }
    if s.late > 0 {
        let _ = writeln!(o, "{:<25}{} sent > 1 ms after their arrival time", "late starts", s.late);
    }
    o.push('\n');
    let _ = writeln!(
        o,
        "{:<14}{:>11}{:>11}{:>11}{:>11}{:>11}{:>9}",
        "", "mean", "p50", "p90", "p99", "max", "n"
    );
    let rows: [(&str, &Option<Dist>, usize); 5] = [
        ("TTFT (ms)", &s.ttft, 3),
        ("TPOT (ms)", &s.tpot, 3),
        ("ITL (ms)", &s.itl, 3),
        ("E2E (ms)", &s.e2e, 3),
        ("slowdown (x)", &s.slowdown, 2),
    ];
    for (name, d, prec) in rows {
        match d {
            Some(d) => {
                let _ = writeln!(
                    o,
                    "{name:<14}{:>11.prec$}{:>11.prec$}{:>11.prec$}{:>11.prec$}{:>11.prec$}{:>9}",
                    d.mean, d.p50, d.p90, d.p99, d.max, d.count
                );
            }
            None => {
                let _ = writeln!(o, "{name:<14}{:>11}", "-");
            }
        }
    }
    if !s.errors.is_empty() {
        o.push_str("\nerrors\n");
        for (class, n) in &s.errors {
            let _ = writeln!(o, "  {class:<35}{n:>8}");
        }
    }
    o
}

/// The `--json` document.
pub fn json(
    cfg: &Config,
    model: &str,
    started_unix_s: f64,
    summary: &Summary,
    warmup: Option<&Summary>,
    records: &[Record],
) -> Value {
    json!({
        "pd_bench": JSON_VERSION,
        "label": cfg.label,
        "started_unix_s": (started_unix_s * 1000.0).round() / 1000.0,
        "config": cfg.to_json(model),
        "summary": summary.to_json(),
        "warmup": warmup.map(|w| json!({"requests": w.requests, "failed": w.failed(),
                                         "errors": w.errors})),
        "requests": records.iter().map(Record::to_json).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::config::{parse, Command};
    use crate::bench::stats::Slo;

    #[test]
    fn table_shows_every_figure() {
        let args: Vec<String> =
            ["--rate", "5", "--slo-ttft-ms", "50"].iter().map(|s| s.to_string()).collect();
        let Ok(Command::Run(cfg)) = parse(&args) else { panic!() };
        let r = Record {
            ttft_ms: Some(10.0),
            e2e_ms: Some(30.0),
            output_tokens: 3,
            stream: true,
            itl_ms: vec![10.0, 10.0],
            ideal_ttft_ms: 5.0,
            status: 200,
            ..Record::default()
        };
        let bad = Record { error: Some("http 503".into()), ..Record::default() };
        let s = Summary::of(&[r.clone(), bad], 1.0, Slo { ttft_ms: Some(50.0), tpot_ms: None });
        let t = table(&cfg, "m", &s);
        for want in [
            "http://127.0.0.1:8000/v1/chat/completions, model \"m\", stream",
            "poisson 5 req/s",
            "2 sent, 1 ok, 1 failed",
            "goodput                  1.00 req/s (1 of 2 met TTFT <= 50 ms)",
            "TTFT (ms)",
            "slowdown (x)",
            "http 503",
        ] {
            assert!(t.contains(want), "{want}\n{t}");
        }
        let j = json(&cfg, "m", 0.0, &s, None, &[r]);
        assert_eq!(j["config"]["arrivals"]["rate"], 5.0);
        assert_eq!(j["summary"]["ttft_ms"]["p50"], 10.0);
        assert_eq!(j["requests"][0]["slowdown"], 2.0);
    }
}
