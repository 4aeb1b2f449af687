//! pd-bench: a load generator for OpenAI-compatible servers (vLLM, SGLang,
//! engine-sim, or pdgate in front of them). It replays a seeded workload
//! (`workload`) with Poisson, burst or closed-loop arrivals (`runner`) over
//! keep-alive HTTP/1.1 connections (`http`, `client`, `sse`) and reports
//! TTFT, TPOT, ITL, E2E, throughput, goodput, errors and the slowdown
//! against the profile's ideal TTFT (`stats`, `report`). docs/pd-bench.md
//! has the user's guide.

pub mod client;
pub mod config;
pub mod http;
pub mod report;
pub mod runner;
pub mod sse;
pub mod stats;
pub mod workload;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::capacity::Demand;
use client::Client;
use config::{Command, Config};
use pdgate_core::tokenize::Model;
use runner::{Plan, Pool};
use stats::Summary;
use workload::{BodyOptions, Generator, Workload};

/// Finds the model name when `--model` is not given: the first id of
/// `GET /v1/models`, else `default`.
fn discover_model(cfg: &Config) -> String {
    let timeout = Duration::from_secs_f64(cfg.timeout_s.min(10.0));
    let found = http::get(&cfg.target, "/v1/models", timeout).ok().and_then(|(status, body)| {
        let v: Value = serde_json::from_slice(&body).ok().filter(|_| status == 200)?;
        v["data"][0]["id"].as_str().map(str::to_owned)
    });
    found.unwrap_or_else(|| {
        if !cfg.quiet {
            eprintln!(
                "pd-bench: no --model and no model list at GET /v1/models; using \"default\""
            );
        }
        "default".into()
    })
}

fn client(cfg: &Config, model: &str, id_prefix: String) -> Client {
    let mut headers = String::new();
    if let Some(k) = &cfg.api_key {
        headers.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    for h in &cfg.headers {
        headers.push_str(h);
        headers.push_str("\r\n");
    }
    Client {
        target: cfg.target.clone(),
        body: BodyOptions {
            endpoint: cfg.endpoint,
            model: model.to_owned(),
            stream: cfg.stream,
            extra: cfg.extra_body.clone(),
        },
        headers,
        timeout: Duration::from_secs_f64(cfg.timeout_s),
        id_prefix,
        profile: cfg.profile.clone(),
    }
}

fn plan(cfg: &Config, seed: u64, limit: Option<u64>, duration: Option<f64>) -> Plan {
    Plan {
        generator: Generator::new(Workload {
            seed,
            lengths: cfg.lengths.clone(),
            prefix: cfg.prefix,
        }),
        arrivals: cfg.arrivals,
        workers: cfg.workers(),
        limit,
        duration: duration.map(Duration::from_secs_f64),
        progress: (!cfg.quiet).then_some(Duration::from_secs(10)),
        seed,
    }
}

/// Requests sampled for `--predict-capacity` (at least one round of every
/// conversation).
const PREDICT_SAMPLES: u64 = 20_000;
/// The same when each prompt is tokenized (`--tokenizer`): two renderings
/// and encodings per request, so fewer; their means are as steady.
const PREDICT_SAMPLES_TOKENIZED: u64 = 2_000;

/// How `--predict-capacity` counts a request's prompt: `(input, cacheable)`
/// tokens, where a perfect prefix cache holds the system prompt and the
/// history (everything but the new user message).
enum Counter {
    /// The shared rule: the spec's own token counts.
    Shared,
    /// The engines' model (`--tokenizer`): the rendered body's token ids;
    /// the cacheable part is what the prompt without its last message has
    /// in common with it, in whole blocks of `block` tokens (all an engine's
    /// prefix cache can hold).
    Model { model: Box<Model>, body: BodyOptions, block: u64 },
}

impl Counter {
    fn of(cfg: &Config) -> Result<Counter, String> {
        let Some(dir) = &cfg.tokenizer else { return Ok(Counter::Shared) };
        let model = Model::load(std::path::Path::new(dir))
            .map_err(|e| format!("--tokenizer: cannot load \"{dir}\": {e}"))?;
        let body = BodyOptions {
            endpoint: cfg.endpoint,
            model: cfg.model.clone().unwrap_or_else(|| "default".into()),
            stream: cfg.stream,
            extra: cfg.extra_body.clone(),
        };
        Ok(Counter::Model {
            model: Box::new(model),
            body,
            block: cfg.profile.block_size.max(1) as u64,
        })
    }

    fn count(&self, s: &workload::RequestSpec) -> Result<(u64, u64), String> {
        let Counter::Model { model, body, block } = self else {
            let last = s.messages.last().map_or(0, |t| t.tokens);
            return Ok((s.input_tokens(), s.input_tokens() - last));
        };
        let ids = |spec: &workload::RequestSpec| {
            model
                .prompt_tokens(&workload::body(spec, body))
                .map_err(|e| format!("--tokenizer: request {}: {e}", s.n))
        };
        let full = ids(s)?;
        let mut head = s.clone();
        head.messages.pop();
        let cached = if head.messages.is_empty() && head.system.is_none() {
            0
        } else {
            let h = ids(&head)?;
            let common = full.iter().zip(&h).take_while(|(a, b)| a == b).count() as u64;
            common / block * block
        };
        Ok((full.len() as u64, cached))
    }

    fn samples(&self) -> u64 {
        match self {
            Counter::Shared => PREDICT_SAMPLES,
            Counter::Model { .. } => PREDICT_SAMPLES_TOKENIZED,
        }
    }
}

/// What one prefill and one decode engine of the profile sustain for the
/// workload's first requests (`crate::capacity`), as a JSON line.
fn predict(cfg: &Config) -> Result<String, String> {
    let mut g = Generator::new(Workload {
        seed: cfg.seed,
        lengths: cfg.lengths.clone(),
        prefix: cfg.prefix,
    });
    let counter = Counter::of(cfg)?;
    let n = cfg.prefix.map_or(counter.samples(), |p| p.epoch().max(counter.samples()));
    let mut samples = Vec::with_capacity(n as usize);
    for i in 0..n {
        let s = g.spec(i);
        let (input, cacheable) = counter.count(&s)?;
        samples.push((input, cacheable, s.max_tokens));
    }
    let Some(d) = Demand::of(samples) else {
        return Ok(serde_json::json!({"error": "the workload has no output tokens"}).to_string());
    };
    let c = cfg.profile.capacity(&d);
    Ok(serde_json::json!({
        "profile": cfg.profile.name,
        "tokenizer": cfg.tokenizer,
        "samples": n,
        "demand": {"input": d.input, "input_uncached": d.input_uncached, "output": d.output,
                   "decode_context": d.decode_context},
        "prefill": {"tokens_per_s": c.prefill_tokens_per_s, "rps": c.prefill_rps,
                    "rps_cached": c.prefill_rps_cached},
        "decode": {"batch": c.decode_batch, "tpot_ms": c.decode_tpot_ms,
                   "tokens_per_s": c.decode_tokens_per_s, "rps": c.decode_rps},
    })
    .to_string())
}

/// Runs pd-bench with `args` (without the program name); returns the exit
/// status.
pub fn main(args: &[String]) -> i32 {
    let cfg = match config::parse(args) {
        Ok(Command::Run(cfg)) => cfg,
        Ok(Command::Predict(cfg)) => {
            return match predict(&cfg) {
                Ok(line) => {
                    println!("{line}");
                    0
                }
                Err(e) => {
                    eprintln!("pd-bench: {e}");
                    2
                }
            };
        }
        Ok(Command::Help) => {
            print!("{}", config::HELP);
            return 0;
        }
        Err(e) => {
            eprintln!("pd-bench: {e}");
            return 2;
        }
    };
    let model = cfg.model.clone().unwrap_or_else(|| discover_model(&cfg));
    let pool = Pool::new(Vec::new());
    let warm = (cfg.warmup > 0).then(|| {
        if !cfg.quiet {
            eprintln!("pd-bench: warmup, {} requests", cfg.warmup);
        }
        let c = client(&cfg, &model, format!("pdbench-{}-w", cfg.seed));
        let p = plan(&cfg, workload::warmup_seed(cfg.seed), Some(cfg.warmup), None);
        let out = runner::run(&c, &pool, p);
        Summary::of(&out.records, out.duration_s, cfg.slo)
    });
    if !cfg.quiet {
        eprintln!(
            "pd-bench: {} to http://{}{}",
            match (cfg.num_requests, cfg.duration_s) {
                (Some(n), Some(d)) => format!("{n} requests or {d} s"),
                (Some(n), None) => format!("{n} requests"),
                (None, Some(d)) => format!("{d} s"),
                (None, None) => "requests".into(),
            },
            cfg.target.authority,
            cfg.target.prefix.clone() + cfg.endpoint.path()
        );
    }
    let started = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let c = client(&cfg, &model, format!("pdbench-{}-", cfg.seed));
    let out = runner::run(&c, &pool, plan(&cfg, cfg.seed, cfg.num_requests, cfg.duration_s));
    let summary = Summary::of(&out.records, out.duration_s, cfg.slo);
    print!("{}", report::table(&cfg, &model, &summary));
    if let Some(w) = &warm {
        if w.failed() > 0 {
            println!("\nwarmup: {} of {} requests failed", w.failed(), w.requests);
        }
    }
    if let Some(path) = &cfg.json {
        let doc = report::json(&cfg, &model, started, &summary, warm.as_ref(), &out.records);
        let text = serde_json::to_string_pretty(&doc).unwrap_or_default();
        if let Err(e) = std::fs::write(path, text + "\n") {
            eprintln!("pd-bench: --json: cannot write \"{path}\": {e}");
            return 1;
        }
    }
    if cfg.fail_on_error && summary.failed() > 0 {
        return 1;
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn predicted(args: &[&str]) -> Value {
        let v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let Ok(Command::Predict(cfg)) = config::parse(&v) else { panic!("{args:?}") };
        serde_json::from_str(&predict(&cfg).unwrap()).unwrap()
    }

    #[test]
    fn predicted_capacity_counts_the_models_tokens() {
        let dir = std::env::temp_dir().join(format!("pd-bench-tok-{}", std::process::id()));
        pdgate_core::tokenize::testing::write_test_model(&dir).unwrap();
        let workload: Vec<&str> = "--predict-capacity --lengths fixed --input-len 40 \
            --output-len 10 --prefix-groups 2 --users-per-group 2 --turns 3 --prefix-tokens 200"
            .split_whitespace()
            .collect();
        let shared = predicted(&workload);
        let dir_s = dir.to_string_lossy().into_owned();
        let mut with = workload.clone();
        with.extend(["--tokenizer", &dir_s]);
        let tok = predicted(&with);
        assert_eq!(shared["samples"], 20_000);
        assert_eq!(tok["samples"], 2_000);
        assert_eq!(tok["tokenizer"], dir_s.as_str());
        // The shared rule: 200 + 40, 200 + 40 + 10 + 40, ... (turns 1-3,
        // about as many of each in 20,000).
        let mean = (240.0 + 290.0 + 340.0) / 3.0;
        assert!((shared["demand"]["input"].as_f64().unwrap() - mean).abs() < 0.1);
        // The model's count differs (its words and the template's tokens),
        // and the cached part is whole 16-token blocks of less than it.
        let (i, u) = (
            tok["demand"]["input"].as_f64().unwrap(),
            tok["demand"]["input_uncached"].as_f64().unwrap(),
        );
        assert_ne!(i, shared["demand"]["input"].as_f64().unwrap());
        assert!(u > 0.0 && u < i / 2.0, "{i} {u}");
        // A model directory that is not one: an error naming the flag.
        let v: Vec<String> = ["--predict-capacity", "--tokenizer", "/nonexistent"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let Ok(Command::Predict(cfg)) = config::parse(&v) else { panic!() };
        assert!(predict(&cfg)
            .unwrap_err()
            .starts_with("--tokenizer: cannot load \"/nonexistent\""));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
