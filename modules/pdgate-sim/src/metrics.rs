//! The simulator's Prometheus metrics, under vLLM's names where vLLM has
//! one (`vllm:*`, labels `engine` and `model_name`) and `engine_sim:*` for
//! what only a simulator knows (KV handoffs and recomputes, the KV cache
//! events it published).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use parking_lot::Mutex;

use crate::kvevents::Counts;

/// vLLM's TTFT histogram buckets, seconds.
pub const TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

/// A cumulative histogram.
#[derive(Debug, Default)]
pub struct Histogram {
    inner: Mutex<(Vec<u64>, f64, u64)>,
}

impl Histogram {
    pub fn observe(&self, v: f64) {
        let mut g = self.inner.lock();
        if g.0.is_empty() {
            g.0 = vec![0; TTFT_BUCKETS.len()];
        }
        for (i, b) in TTFT_BUCKETS.iter().enumerate() {
            if v <= *b {
                g.0[i] += 1;
            }
        }
        g.1 += v;
        g.2 += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let g = self.inner.lock();
        for (i, b) in TTFT_BUCKETS.iter().enumerate() {
            let n = g.0.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {n}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", g.2);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", g.1);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", g.2);
    }
}

/// Counters kept outside the engine.
#[derive(Debug, Default)]
pub struct Metrics {
    pub requests_ok: AtomicU64,
    pub requests_error: AtomicU64,
    pub kv_transfers: AtomicU64,
    pub kv_recomputes: AtomicU64,
    pub ttft: Histogram,
}

/// Gauges and counters read from the engine at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct EngineSnapshot {
    pub running: usize,
    pub waiting: usize,
    pub kv_usage: f64,
    pub prefix_queries: u64,
    pub prefix_hits: u64,
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    pub preemptions: u64,
    /// The KV event publisher's counters, when it runs.
    pub kv_events: Option<Counts>,
}

impl Metrics {
    /// The `/metrics` page.
    pub fn render(&self, model: &str, e: EngineSnapshot) -> String {
        let l = format!("engine=\"0\",model_name=\"{}\"", model.replace(['"', '\\', '\n'], "_"));
        let mut s = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ =
                writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{l}}} {value}");
        };
        metric(
            "vllm:num_requests_running",
            "gauge",
            "Requests in the running batch.",
            e.running.to_string(),
        );
        metric(
            "vllm:num_requests_waiting",
            "gauge",
            "Requests waiting to be scheduled.",
            e.waiting.to_string(),
        );
        metric(
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV cache usage, 1 means 100 percent.",
            format!("{:.6}", e.kv_usage),
        );
        metric(
            "vllm:prefix_cache_queries_total",
            "counter",
            "Prompt tokens looked up in the prefix cache.",
            e.prefix_queries.to_string(),
        );
        metric(
            "vllm:prefix_cache_hits_total",
            "counter",
            "Prompt tokens found in the prefix cache.",
            e.prefix_hits.to_string(),
        );
        metric(
            "vllm:prompt_tokens_total",
            "counter",
            "Prefill tokens computed.",
            e.prompt_tokens.to_string(),
        );
        metric(
            "vllm:generation_tokens_total",
            "counter",
            "Tokens generated.",
            e.generation_tokens.to_string(),
        );
        metric("vllm:num_preemptions_total", "counter", "Preemptions.", e.preemptions.to_string());
        metric(
            "engine_sim:kv_transfers_total",
            "counter",
            "Decode requests whose prompt KV came from a prefill engine.",
            self.kv_transfers.load(Relaxed).to_string(),
        );
        metric(
            "engine_sim:kv_recompute_total",
            "counter",
            "Decode requests that recomputed their prompt (no usable KV handoff).",
            self.kv_recomputes.load(Relaxed).to_string(),
        );
        if let Some(k) = e.kv_events {
            metric(
                "engine_sim:kv_events_batches_total",
                "counter",
                "KV cache event batches published.",
                k.batches.to_string(),
            );
            metric(
                "engine_sim:kv_events_total",
                "counter",
                "KV cache events published (BlockStored, BlockRemoved, AllBlocksCleared).",
                k.events.to_string(),
            );
            metric(
                "engine_sim:kv_events_dropped_total",
                "counter",
                "KV cache event batches dropped for a full publisher queue.",
                k.dropped.to_string(),
            );
            metric(
                "engine_sim:kv_events_replays_total",
                "counter",
                "KV cache event replay requests answered.",
                k.replays.to_string(),
            );
        }
        let _ = writeln!(s, "# HELP vllm:request_success_total Finished requests.\n# TYPE vllm:request_success_total counter");
        let _ = writeln!(s, "vllm:request_success_total{{{l}}} {}", self.requests_ok.load(Relaxed));
        let _ = writeln!(s, "# HELP engine_sim:request_errors_total Requests answered with an error.\n# TYPE engine_sim:request_errors_total counter");
        let _ = writeln!(
            s,
            "engine_sim:request_errors_total{{{l}}} {}",
            self.requests_error.load(Relaxed)
        );
        let _ = writeln!(s, "# HELP vllm:time_to_first_token_seconds Time to first token.\n# TYPE vllm:time_to_first_token_seconds histogram");
        self.ttft.render(&mut s, "vllm:time_to_first_token_seconds", &l);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let m = Metrics::default();
        m.ttft.observe(0.003);
        m.ttft.observe(0.3);
        let page = m.render("m\"x", EngineSnapshot { running: 2, ..Default::default() });
        assert!(page.contains("vllm:num_requests_running{engine=\"0\",model_name=\"m_x\"} 2"));
        assert!(page.contains("vllm:time_to_first_token_seconds_bucket{engine=\"0\",model_name=\"m_x\",le=\"0.001\"} 0"));
        assert!(page.contains("le=\"0.005\"} 1"));
        assert!(page.contains("le=\"0.5\"} 2"));
        assert!(page.contains("le=\"+Inf\"} 2"));
        assert!(page
            .contains("vllm:time_to_first_token_seconds_count{engine=\"0\",model_name=\"m_x\"} 2"));
        assert!(!page.contains("kv_events"));
    }

    #[test]
    fn kv_event_counters_only_with_a_publisher() {
        let kv = Counts { batches: 3, events: 7, dropped: 0, replays: 1 };
        let page = Metrics::default()
            .render("m", EngineSnapshot { kv_events: Some(kv), ..Default::default() });
        let l = "{engine=\"0\",model_name=\"m\"}";
        assert!(page.contains(&format!("engine_sim:kv_events_batches_total{l} 3")), "{page}");
        assert!(page.contains(&format!("engine_sim:kv_events_total{l} 7")));
        assert!(page.contains(&format!("engine_sim:kv_events_dropped_total{l} 0")));
        assert!(page.contains(&format!("engine_sim:kv_events_replays_total{l} 1")));
    }
}
