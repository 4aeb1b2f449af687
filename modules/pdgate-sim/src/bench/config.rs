//! pd-bench's command line: every flag, its default and its checks. A bad
//! flag is a one-line error naming it.

use serde_json::{json, Map, Value};

use super::http::{self, Target};
use super::stats::Slo;
use super::workload::{
    Arrivals, Endpoint, Lengths, LongPrompts, Prefix, LONG_RANGE, LONG_SHARE,
    SHAREGPT_INPUT_MEDIAN, SHAREGPT_INPUT_RANGE, SHAREGPT_OUTPUT_MEDIAN, SHAREGPT_OUTPUT_RANGE,
};
use crate::profile::Profile;

pub const HELP: &str = "\
pd-bench: replays a workload against an OpenAI-compatible endpoint and reports
TTFT, TPOT, ITL, E2E (mean, p50, p90, p99), request and token throughput,
goodput at an SLO, errors by HTTP status, and the slowdown TTFT / ideal TTFT.

usage: pd-bench [flags]        (--flag VALUE or --flag=VALUE)

Target
  --url URL              http://host[:port][/prefix] (a trailing /v1 is fine)
                         [http://127.0.0.1:8000]
  --endpoint E           chat (/v1/chat/completions) or completions
                         (/v1/completions) [chat]
  --model NAME           the \"model\" field [the first id of GET /v1/models,
                         else \"default\"]
  --api-key KEY          sends Authorization: Bearer KEY
  --header 'N: V'        an extra request header (repeatable)
  --extra-body JSON      a JSON object merged into every body (e.g.
                         '{\"temperature\":0}')
  --no-stream            ask for JSON answers (TTFT = the whole answer, no
                         TPOT/ITL) instead of SSE streams
  --timeout S            give up on a request after S seconds [600]

Arrivals (default: closed loop with --concurrency 1)
  --rate R               Poisson arrivals, R requests/s
  --burst N              N requests at once every --burst-interval
  --burst-interval S     seconds between bursts [1]
  --on-off ON,OFF        with --rate: bursty arrivals, Poisson during ON
                         seconds and none for OFF seconds, repeated, R
                         requests/s on average (R x (ON+OFF)/ON while on)
  --concurrency C        without --rate/--burst: a closed loop of C
                         connections, each sending its next request when the
                         last is answered; with them: at most C in flight
  --max-conns N          open loop without --concurrency: most connections
                         (and threads) [1024]

Length and count
  --num-requests N       requests to send [1000; a round of every
                         conversation with --prefix-groups; unlimited when
                         only --duration is given]
  --duration S           stop sending after S seconds (in-flight requests
                         finish); with --num-requests, whichever comes first
  --warmup N             first send N requests (their own seeded stream,
                         same arrivals) and leave them out of every figure
  --seed S               seeds the requests and the arrivals [0]; the same
                         seed gives the same request sequence

Workload (tokens; a prompt of N tokens is 4N bytes of words, the shared rule)
  --lengths L            fixed, uniform, sharegpt or longtail [fixed]
  --input-len N          fixed: prompt tokens [512]; sharegpt: their median
                         [200]
  --output-len N         fixed: max_tokens [128]; sharegpt: its median [150]
  --input-min N, --input-max N, --output-min N, --output-max N
                         uniform: inclusive ranges [±50 % around --input-len
                         and --output-len]
                         sharegpt: lognormal input (sigma 1.0, 4..4096) and
                         output (sigma 0.8, 4..2048), independent;
                         --input-max/--output-max lower those upper clamps
                         longtail: sharegpt, with a share of the prompts
                         replaced by long ones:
  --long-share F         ... F of them [0.1] ...
  --long-min N, --long-max N
                         ... uniform in N..N tokens [8192..16384]
  --prefix-groups N      shared-prefix conversations: N system prompts ...
  --users-per-group M    ... M users on each [4] ...
  --turns T              ... T turns per conversation [1], each sending the
                         whole history again (earlier answers as synthetic
                         text of their max_tokens); each new user message
                         and answer takes its length from --lengths
  --prefix-tokens P      system prompt tokens [1024]
  --prefix-tokens-max P  each system prompt uniform in --prefix-tokens..P
                         tokens (drawn per group) [--prefix-tokens]

Report
  --profile FILE         engine profile for the ideal TTFT (key = value lines;
                         see docs/engine-sim.md) [built-in h100-llama3-8b]
  --tokenizer DIR        the engines' model directory (tokenizer.json, chat
                         template; engine-sim --tokenizer): --predict-capacity
                         counts each prompt in its tokens as the engines will,
                         not by the shared 4-bytes rule
  --predict-capacity     print what one prefill and one decode engine of the
                         profile sustain for this workload (JSON) and exit
  --slo-ttft-ms X        goodput: TTFT at most X ms
  --slo-tpot-ms X        goodput: TPOT at most X ms
  --json FILE            write config, summary and per-request records
  --label TEXT           the run's name in --json (scripts/pd-plot.py)
  --fail-on-error        exit 1 when any request failed
  --quiet                no progress lines on stderr
  --help                 this text

Exit status: 0 when the run completes (failed requests are counted and
reported), 1 with --fail-on-error and failures or when --json cannot be
written, 2 on a bad flag.
";

/// A run's settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub url: String,
    pub target: Target,
    pub endpoint: Endpoint,
    pub model: Option<String>,
    pub api_key: Option<String>,
    /// `Name: value` lines.
    pub headers: Vec<String>,
    pub extra_body: Map<String, Value>,
    pub stream: bool,
    pub timeout_s: f64,
    pub arrivals: Arrivals,
    /// Closed loop: connections; open loop: most in flight.
    pub concurrency: Option<usize>,
    pub max_conns: usize,
    pub num_requests: Option<u64>,
    pub duration_s: Option<f64>,
    pub warmup: u64,
    pub seed: u64,
    pub lengths: Lengths,
    pub prefix: Option<Prefix>,
    pub profile_path: Option<String>,
    pub profile: Profile,
    /// `--tokenizer`: the model directory prompts are counted with.
    pub tokenizer: Option<String>,
    pub slo: Slo,
    pub json: Option<String>,
    pub label: Option<String>,
    pub fail_on_error: bool,
    pub quiet: bool,
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    Run(Box<Config>),
    Predict(Box<Config>),
    Help,
}

fn number<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String> {
    v.parse::<T>().map_err(|_| format!("{flag}: \"{v}\" is not a valid number"))
}

fn positive(flag: &str, v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(format!("{flag}: \"{v}\" is not a positive number")),
    }
}

fn count(flag: &str, v: &str) -> Result<u64, String> {
    match v.parse::<u64>() {
        Ok(x) if x > 0 => Ok(x),
        _ => Err(format!("{flag}: \"{v}\" is not a positive whole number")),
    }
}

/// Parses the arguments (without the program name).
pub fn parse(args: &[String]) -> Result<Command, String> {
    let mut raw: Vec<(String, String)> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--help" || a == "-h" {
            return Ok(Command::Help);
        }
        let Some(name) = a.strip_prefix("--") else {
            return Err(format!("unexpected argument \"{a}\" (flags start with --)"));
        };
        let (name, inline) = match name.split_once('=') {
            Some((n, v)) => (n, Some(v.to_owned())),
            None => (name, None),
        };
        let flag = format!("--{name}");
        let switch = matches!(name, "no-stream" | "fail-on-error" | "quiet" | "predict-capacity");
        let known = switch
            || matches!(
                name,
                "url"
                    | "endpoint"
                    | "model"
                    | "api-key"
                    | "header"
                    | "extra-body"
                    | "timeout"
                    | "rate"
                    | "burst"
                    | "burst-interval"
                    | "on-off"
                    | "concurrency"
                    | "max-conns"
                    | "num-requests"
                    | "duration"
                    | "warmup"
                    | "seed"
                    | "lengths"
                    | "input-len"
                    | "output-len"
                    | "input-min"
                    | "input-max"
                    | "output-min"
                    | "output-max"
                    | "prefix-groups"
                    | "users-per-group"
                    | "turns"
                    | "prefix-tokens"
                    | "prefix-tokens-max"
                    | "long-share"
                    | "long-min"
                    | "long-max"
                    | "profile"
                    | "tokenizer"
                    | "slo-ttft-ms"
                    | "slo-tpot-ms"
                    | "json"
                    | "label"
            );
        if !known {
            return Err(format!("unknown flag {flag} (see --help)"));
        }
        let value = match (switch, inline) {
            (true, Some(_)) => return Err(format!("{flag} takes no value")),
            (true, None) => String::new(),
            (false, Some(v)) => v,
            (false, None) => it.next().cloned().ok_or_else(|| format!("{flag} needs a value"))?,
        };
        if name != "header" && raw.iter().any(|(n, _)| *n == flag) {
            return Err(format!("{flag} is given twice"));
        }
        raw.push((flag, value));
    }
    let predict = raw.iter().any(|(n, _)| n == "--predict-capacity");
    build(&raw)
        .map(|c| if predict { Command::Predict(Box::new(c)) } else { Command::Run(Box::new(c)) })
}

fn build(raw: &[(String, String)]) -> Result<Config, String> {
    let get = |f: &str| raw.iter().find(|(n, _)| n == f).map(|(_, v)| v.as_str());
    let has = |f: &str| get(f).is_some();
    let url = get("--url").unwrap_or("http://127.0.0.1:8000").to_owned();
    let target = http::parse_url(&url).map_err(|e| format!("--url: {e}"))?;
    let endpoint = match get("--endpoint").unwrap_or("chat") {
        "chat" => Endpoint::Chat,
        "completions" => Endpoint::Completions,
        v => return Err(format!("--endpoint: \"{v}\" is not chat or completions")),
    };
    let mut headers = Vec::new();
    for (_, h) in raw.iter().filter(|(n, _)| n == "--header") {
        let ok = h.split_once(':').is_some_and(|(n, _)| {
            !n.is_empty() && n.bytes().all(|b| b.is_ascii_graphic() && b != b':')
        });
        if !ok || h.contains(['\r', '\n']) {
            return Err(format!("--header: \"{h}\" is not \"Name: value\""));
        }
        headers.push(h.clone());
    }
    let extra_body = match get("--extra-body") {
        None => Map::new(),
        Some(v) => match serde_json::from_str::<Value>(v) {
            Ok(Value::Object(m)) => m,
            _ => return Err(format!("--extra-body: \"{v}\" is not a JSON object")),
        },
    };
    if get("--api-key").is_some_and(|k| k.contains(['\r', '\n'])) {
        return Err("--api-key: contains a line break".into());
    }

    let opt_pos = |f: &str| get(f).map(|v| positive(f, v)).transpose();
    let opt_count = |f: &str| get(f).map(|v| count(f, v)).transpose();
    let rate = opt_pos("--rate")?;
    let burst = opt_count("--burst")?;
    let burst_interval = opt_pos("--burst-interval")?;
    let on_off = match get("--on-off") {
        None => None,
        Some(v) => {
            let bad = || format!("--on-off: \"{v}\" is not ON,OFF (seconds, both positive)");
            let (on, off) = v.split_once(',').ok_or_else(bad)?;
            let (on, off) = (
                positive("--on-off", on).map_err(|_| bad())?,
                positive("--on-off", off).map_err(|_| bad())?,
            );
            Some((on, off))
        }
    };
    let arrivals = match (rate, burst) {
        (Some(_), Some(_)) => return Err("--burst: cannot be combined with --rate".into()),
        (Some(rate), None) => match on_off {
            Some((on_s, off_s)) => Arrivals::OnOff { rate, on_s, off_s },
            None => Arrivals::Poisson { rate },
        },
        (None, Some(size)) => Arrivals::Burst { size, interval_s: burst_interval.unwrap_or(1.0) },
        (None, None) => Arrivals::Closed,
    };
    if on_off.is_some() && rate.is_none() {
        return Err("--on-off: only with --rate".into());
    }
    if burst.is_none() && burst_interval.is_some() {
        return Err("--burst-interval: only with --burst".into());
    }
    let concurrency = opt_count("--concurrency")?.map(|c| c as usize);
    let max_conns = opt_count("--max-conns")?.unwrap_or(1024) as usize;

    let input_len = opt_count("--input-len")?;
    let output_len = opt_count("--output-len")?;
    let range_flags = ["--input-min", "--input-max", "--output-min", "--output-max"];
    let lengths = match get("--lengths").unwrap_or("fixed") {
        "fixed" => {
            Lengths::Fixed { input: input_len.unwrap_or(512), output: output_len.unwrap_or(128) }
        }
        "uniform" => {
            let (i, o) = (input_len.unwrap_or(512), output_len.unwrap_or(128));
            let around = |len: u64| ((len / 2).max(1), len + len / 2);
            let range = |min_f: &str, max_f: &str, def: (u64, u64)| -> Result<(u64, u64), String> {
                let lo = opt_count(min_f)?.unwrap_or(def.0);
                let hi = opt_count(max_f)?.unwrap_or(def.1.max(lo));
                if lo > hi {
                    return Err(format!("{min_f}: {lo} is above {max_f} {hi}"));
                }
                Ok((lo, hi))
            };
            Lengths::Uniform {
                input: range("--input-min", "--input-max", around(i))?,
                output: range("--output-min", "--output-max", around(o))?,
            }
        }
        kind @ ("sharegpt" | "longtail") => {
            let input_median = input_len.unwrap_or(SHAREGPT_INPUT_MEDIAN);
            let output_median = output_len.unwrap_or(SHAREGPT_OUTPUT_MEDIAN);
            let clamp = |f: &str, median: u64, lo: u64, def: u64| -> Result<u64, String> {
                match opt_count(f)? {
                    Some(m) if m < median.max(lo) => {
                        Err(format!("{f}: {m} is below the median {} (or {lo})", median))
                    }
                    m => Ok(m.unwrap_or(def)),
                }
            };
            let long = if kind == "longtail" {
                let share = match get("--long-share") {
                    None => LONG_SHARE,
                    Some(v) => match v.parse::<f64>() {
                        Ok(x) if (0.0..=1.0).contains(&x) => x,
                        _ => return Err(format!("--long-share: \"{v}\" is not between 0 and 1")),
                    },
                };
                let lo = opt_count("--long-min")?.unwrap_or(LONG_RANGE.0);
                let hi = opt_count("--long-max")?.unwrap_or(LONG_RANGE.1.max(lo));
                if lo > hi {
                    return Err(format!("--long-min: {lo} is above --long-max {hi}"));
                }
                Some(LongPrompts { share, range: (lo, hi) })
            } else {
                None
            };
            Lengths::ShareGpt {
                input_median,
                output_median,
                input_max: clamp(
                    "--input-max",
                    input_median,
                    SHAREGPT_INPUT_RANGE.0,
                    SHAREGPT_INPUT_RANGE.1,
                )?,
                output_max: clamp(
                    "--output-max",
                    output_median,
                    SHAREGPT_OUTPUT_RANGE.0,
                    SHAREGPT_OUTPUT_RANGE.1,
                )?,
                long,
            }
        }
        v => return Err(format!("--lengths: \"{v}\" is not fixed, uniform, sharegpt or longtail")),
    };
    match lengths {
        Lengths::Uniform { .. } => {}
        Lengths::ShareGpt { .. } => {
            if let Some(f) = ["--input-min", "--output-min"].iter().find(|f| has(f)) {
                return Err(format!("{f}: only with --lengths uniform"));
            }
        }
        Lengths::Fixed { .. } => {
            if let Some(f) = range_flags.iter().find(|f| has(f)) {
                return Err(format!("{f}: only with --lengths uniform"));
            }
        }
    }
    if !matches!(lengths, Lengths::ShareGpt { long: Some(_), .. }) {
        if let Some(f) = ["--long-share", "--long-min", "--long-max"].iter().find(|f| has(f)) {
            return Err(format!("{f}: only with --lengths longtail"));
        }
    }

    let prefix = match opt_count("--prefix-groups")? {
        Some(groups) => Some(Prefix {
            groups,
            users: opt_count("--users-per-group")?.unwrap_or(4),
            turns: match opt_count("--turns")?.unwrap_or(1) {
                t if t > 1000 => return Err(format!("--turns: {t} is more than 1000")),
                t => t as u32,
            },
            tokens: match get("--prefix-tokens") {
                Some(v) => number::<u64>("--prefix-tokens", v)?,
                None => 1024,
            },
            tokens_max: 0,
        }),
        None => {
            if let Some(f) =
                ["--users-per-group", "--turns", "--prefix-tokens", "--prefix-tokens-max"]
                    .iter()
                    .find(|f| has(f))
            {
                return Err(format!("{f}: only with --prefix-groups"));
            }
            None
        }
    };

    let prefix = match prefix {
        Some(mut p) => {
            p.tokens_max = match get("--prefix-tokens-max") {
                None => p.tokens,
                Some(v) => match number::<u64>("--prefix-tokens-max", v)? {
                    m if m < p.tokens => {
                        return Err(format!(
                            "--prefix-tokens-max: {m} is below --prefix-tokens {}",
                            p.tokens
                        ))
                    }
                    m => m,
                },
            };
            Some(p)
        }
        None => None,
    };
    let num_requests = match (opt_count("--num-requests")?, has("--duration"), prefix) {
        (Some(n), _, _) => Some(n),
        (None, true, _) => None,
        (None, false, Some(p)) => Some(p.epoch()),
        (None, false, None) => Some(1000),
    };
    let duration_s = opt_pos("--duration")?;
    let warmup = match get("--warmup") {
        Some(v) => number::<u64>("--warmup", v)?,
        None => 0,
    };
    let seed = match get("--seed") {
        Some(v) => number::<u64>("--seed", v)?,
        None => 0,
    };
    let profile_path = get("--profile").map(str::to_owned);
    let profile = match &profile_path {
        None => Profile::h100_llama3_8b(),
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| format!("--profile: cannot read \"{p}\": {e}"))?;
            Profile::parse(&text).map_err(|e| format!("--profile: \"{p}\": {e}"))?
        }
    };
    Ok(Config {
        url,
        target,
        endpoint,
        model: get("--model").map(str::to_owned),
        api_key: get("--api-key").map(str::to_owned),
        headers,
        extra_body,
        stream: !has("--no-stream"),
        timeout_s: opt_pos("--timeout")?.unwrap_or(600.0),
        arrivals,
        concurrency,
        max_conns,
        num_requests,
        duration_s,
        warmup,
        seed,
        lengths,
        prefix,
        profile_path,
        profile,
        tokenizer: get("--tokenizer").map(str::to_owned),
        slo: Slo { ttft_ms: opt_pos("--slo-ttft-ms")?, tpot_ms: opt_pos("--slo-tpot-ms")? },
        json: get("--json").map(str::to_owned),
        label: get("--label").map(str::to_owned),
        fail_on_error: has("--fail-on-error"),
        quiet: has("--quiet"),
    })
}

impl Config {
    /// Threads (and connections) at most: the closed loop's concurrency,
    /// or the open loop's cap.
    pub fn workers(&self) -> usize {
        match (self.arrivals, self.concurrency) {
            (Arrivals::Closed, c) => c.unwrap_or(1),
            (_, Some(c)) => c.min(self.max_conns),
            (_, None) => self.max_conns,
        }
    }

    /// The settings as recorded in `--json` (the API key left out).
    pub fn to_json(&self, model: &str) -> Value {
        let arrivals = match self.arrivals {
            Arrivals::Poisson { rate } => json!({"kind": "poisson", "rate": rate}),
            Arrivals::Burst { size, interval_s } => {
                json!({"kind": "burst", "size": size, "interval_s": interval_s})
            }
            Arrivals::OnOff { rate, on_s, off_s } => {
                json!({"kind": "on_off", "rate": rate, "on_s": on_s, "off_s": off_s})
            }
            Arrivals::Closed => json!({"kind": "closed"}),
        };
        let prefix = self.prefix.map(|p| {
            json!({"groups": p.groups, "users_per_group": p.users, "turns": p.turns,
                   "prefix_tokens": p.tokens, "prefix_tokens_max": p.tokens_max})
        });
        let header_names: Vec<&str> =
            self.headers.iter().filter_map(|h| h.split_once(':')).map(|(n, _)| n).collect();
        json!({
            "url": self.url,
            "endpoint": self.endpoint.name(),
            "model": model,
            "stream": self.stream,
            "timeout_s": self.timeout_s,
            "arrivals": arrivals,
            "concurrency": self.concurrency,
            "max_conns": self.max_conns,
            "num_requests": self.num_requests,
            "duration_s": self.duration_s,
            "warmup": self.warmup,
            "seed": self.seed,
            "lengths": self.lengths.to_json(),
            "prefix_groups": prefix,
            "profile": {"name": self.profile.name, "file": self.profile_path},
            "tokenizer": self.tokenizer,
            "slo": {"ttft_ms": self.slo.ttft_ms, "tpot_ms": self.slo.tpot_ms},
            "headers": header_names,
            "extra_body": self.extra_body,
            "label": self.label,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Config, String> {
        let v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        match parse(&v)? {
            Command::Run(c) => Ok(*c),
            Command::Predict(_) => Err("predict".into()),
            Command::Help => Err("help".into()),
        }
    }

    #[test]
    fn defaults() {
        let c = run(&[]).unwrap();
        assert_eq!(c.target.addr, "127.0.0.1:8000".parse().unwrap());
        assert_eq!((c.endpoint, c.stream, c.arrivals), (Endpoint::Chat, true, Arrivals::Closed));
        assert_eq!((c.num_requests, c.workers(), c.seed), (Some(1000), 1, 0));
        assert_eq!(c.lengths, Lengths::Fixed { input: 512, output: 128 });
        assert!(!c.slo.is_set());
        assert_eq!(c.profile.name, "h100-llama3-8b");
    }

    #[test]
    fn flags() {
        let c = run(&[
            "--url=http://127.0.0.1:9/v1",
            "--rate",
            "50",
            "--concurrency",
            "8",
            "--no-stream",
            "--lengths",
            "uniform",
            "--input-min",
            "10",
            "--input-max",
            "20",
            "--duration",
            "5",
            "--header",
            "X-A: 1",
            "--header",
            "X-B: 2",
            "--slo-ttft-ms",
            "200",
        ])
        .unwrap();
        assert_eq!(c.arrivals, Arrivals::Poisson { rate: 50.0 });
        assert_eq!(
            (c.workers(), c.stream, c.num_requests, c.duration_s),
            (8, false, None, Some(5.0))
        );
        assert_eq!(c.lengths, Lengths::Uniform { input: (10, 20), output: (64, 192) });
        assert_eq!(c.headers, ["X-A: 1", "X-B: 2"]);
        let c = run(&["--prefix-groups", "2", "--users-per-group", "3", "--turns", "4"]).unwrap();
        assert_eq!(c.num_requests, Some(24));
        let c = run(&["--lengths", "sharegpt", "--burst", "10"]).unwrap();
        assert_eq!(
            c.lengths,
            Lengths::ShareGpt {
                input_median: 200,
                output_median: 150,
                input_max: 4096,
                output_max: 2048,
                long: None
            }
        );
        assert_eq!(c.arrivals, Arrivals::Burst { size: 10, interval_s: 1.0 });
        assert!(matches!(parse(&["--help".into()]), Ok(Command::Help)));
    }

    #[test]
    fn bad_flags_name_themselves() {
        let cases: &[(&[&str], &str)] = &[
            (&["--rate", "x"], "--rate: \"x\" is not a positive number"),
            (&["--rate", "0"], "--rate: \"0\" is not a positive number"),
            (&["--rate"], "--rate needs a value"),
            (&["--bogus"], "unknown flag --bogus (see --help)"),
            (&["stray"], "unexpected argument \"stray\" (flags start with --)"),
            (&["--rate", "1", "--burst", "2"], "--burst: cannot be combined with --rate"),
            (&["--burst-interval", "2"], "--burst-interval: only with --burst"),
            (
                &["--endpoint", "embeddings"],
                "--endpoint: \"embeddings\" is not chat or completions",
            ),
            (&["--url", "https://x"], "--url: only http:// URLs are supported"),
            (&["--input-min", "3"], "--input-min: only with --lengths uniform"),
            (&["--turns", "3"], "--turns: only with --prefix-groups"),
            (&["--no-stream=1"], "--no-stream takes no value"),
            (&["--seed", "1", "--seed", "2"], "--seed is given twice"),
            (&["--extra-body", "[1]"], "--extra-body: \"[1]\" is not a JSON object"),
            (&["--header", "nocolon"], "--header: \"nocolon\" is not \"Name: value\""),
            (&["--num-requests", "0"], "--num-requests: \"0\" is not a positive whole number"),
            (
                &["--lengths", "uniform", "--input-min", "9", "--input-max", "3"],
                "--input-min: 9 is above --input-max 3",
            ),
        ];
        for (args, want) in cases {
            assert_eq!(run(args).unwrap_err(), *want, "{args:?}");
        }
        assert!(run(&["--profile", "/nonexistent/p"]).unwrap_err().starts_with("--profile: "));
    }

    #[test]
    fn help_names_every_flag() {
        for f in [
            "--url",
            "--endpoint",
            "--model",
            "--api-key",
            "--header",
            "--extra-body",
            "--no-stream",
            "--timeout",
            "--rate",
            "--burst",
            "--burst-interval",
            "--concurrency",
            "--max-conns",
            "--num-requests",
            "--duration",
            "--warmup",
            "--seed",
            "--lengths",
            "--input-len",
            "--output-len",
            "--input-min",
            "--input-max",
            "--output-min",
            "--output-max",
            "--prefix-groups",
            "--users-per-group",
            "--turns",
            "--prefix-tokens",
            "--profile",
            "--slo-ttft-ms",
            "--slo-tpot-ms",
            "--json",
            "--label",
            "--fail-on-error",
            "--quiet",
            "--help",
        ] {
            assert!(HELP.contains(f), "{f}");
            let v = vec![f.to_string(), "1".to_string()];
            if let Err(e) = parse(&v) {
                assert!(!e.starts_with("unknown flag"), "{f}: {e}");
            }
        }
    }

    #[test]
    fn bursty_longtail_and_ranged_prefixes() {
        let c = run(&[
            "--rate",
            "10",
            "--on-off",
            "2,3",
            "--lengths",
            "longtail",
            "--long-share",
            "0.2",
        ])
        .unwrap();
        assert_eq!(c.arrivals, Arrivals::OnOff { rate: 10.0, on_s: 2.0, off_s: 3.0 });
        let long = Some(LongPrompts { share: 0.2, range: LONG_RANGE });
        assert!(
            matches!(c.lengths, Lengths::ShareGpt { long: l, input_max: 4096, .. } if l == long)
        );
        let c =
            run(&["--lengths", "sharegpt", "--output-len", "100", "--output-max", "512"]).unwrap();
        assert!(matches!(c.lengths, Lengths::ShareGpt { output_max: 512, long: None, .. }));
        let c =
            run(&["--prefix-groups", "2", "--prefix-tokens", "10", "--prefix-tokens-max", "40"])
                .unwrap();
        assert_eq!(c.prefix.map(|p| (p.tokens, p.tokens_max)), Some((10, 40)));
        let c = run(&["--prefix-groups", "2", "--prefix-tokens", "10"]).unwrap();
        assert_eq!(c.prefix.map(|p| p.tokens_max), Some(10));
        assert!(matches!(parse(&["--predict-capacity".into()]), Ok(Command::Predict(_))));
        for (args, msg) in [
            (&["--on-off", "2,3"][..], "--on-off: only with --rate"),
            (
                &["--rate", "1", "--on-off", "2"],
                "--on-off: \"2\" is not ON,OFF (seconds, both positive)",
            ),
            (&["--long-share", "0.2"], "--long-share: only with --lengths longtail"),
            (
                &["--lengths", "longtail", "--long-share", "2"],
                "--long-share: \"2\" is not between 0 and 1",
            ),
            (
                &["--lengths", "sharegpt", "--output-max", "50"],
                "--output-max: 50 is below the median 150 (or 4)",
            ),
            (
                &["--lengths", "sharegpt", "--input-min", "5"],
                "--input-min: only with --lengths uniform",
            ),
            (
                &["--prefix-groups", "1", "--prefix-tokens", "9", "--prefix-tokens-max", "8"],
                "--prefix-tokens-max: 8 is below --prefix-tokens 9",
            ),
            (&["--prefix-tokens-max", "8"], "--prefix-tokens-max: only with --prefix-groups"),
        ] {
            let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            assert_eq!(parse(&args).unwrap_err(), msg, "{args:?}");
        }
    }
}
