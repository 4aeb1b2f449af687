//! engine-sim: a vLLM/SGLang-like prefill, decode, combined or encoder
//! server with a continuous-batching timing model. See `--help`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use pdgate_core::kv::events::Shape;
use pdgate_core::kv::hash::HashAlgo;
use pdgate_sim::kvevents;
use pdgate_sim::profile::Profile;
use pdgate_sim::prompt::{self, Tokenizer};
use pdgate_sim::server::{self, Config, Flavor, Role};

const HELP: &str = "\
engine-sim: an LLM engine simulator speaking vLLM's OpenAI HTTP API

USAGE: engine-sim [--role prefill|decode|both|encode] [--port N] [options]

Serving
  --role R                  prefill, decode, both (a normal engine) or encode [both]
  --engine vllm|sglang      P/D protocol: vLLM kv_transfer_params (NIXL-style side
                            channel) or SGLang bootstrap rooms [vllm]
  --host ADDR               listen address [127.0.0.1]
  --port N                  HTTP port (0: any free port, printed) [8000]
  --kv-port N               side channel port: KV fetches (vLLM) or bootstrap (SGLang)
                            [HTTP port + 1000; 0: any]
  --bootstrap-port N        same as --kv-port
  --advertise-host H        host put in kv_transfer_params.remote_host [the listen
                            address, 127.0.0.1 when it is 0.0.0.0]
  --model NAME              served model name [sim-llama-3-8b]
  --engine-id ID            remote_engine_id it reports [<role>-<port>]
  --quiet                   no per-request log lines (errors and recomputes still logged)

Timing model
  --profile FILE            key = value profile (see docs/engine-sim.md) [built-in
                            h100-llama3-8b]
  --instant                 every engine step takes no time (functional tests, overhead)
  --time-scale X            run the model X times faster than real time [1]
  --max-num-seqs N, --max-num-batched-tokens N, --num-gpu-blocks N,
  --no-prefix-caching       override the profile
  --seed N                  seed of the fault injection [1]
  --kv-hold-ms N            a prefill's KV waits this long to be fetched [30000]
  --loading-ms N            the model loads this long after start: vLLM refuses
                            connections, SGLang answers /health and completions 503 [0]
  --bootstrap-timeout-ms N  a decode waits this long for its bootstrap room [30000]

Tokens and prefix caching (as vLLM)
  --tokenizer DIR           the model directory (tokenizer.json, tokenizer_config.json,
                            chat template): prompts become its token ids, chat requests
                            rendered with its template [none: 4 bytes of prompt text
                            make one token]
  --prefix-caching-hash-algo A
                            sha256_cbor or xxhash_cbor: vLLM's hash of each full block
                            of prompt token ids, chained [sha256_cbor]
  --hash-seed S             vLLM's PYTHONHASHSEED, the root of every chain [the
                            PYTHONHASHSEED variable; unset: random per process, so
                            nobody else can compute the block hashes, as vLLM]
  --write-test-tokenizer DIR
                            write a small test model (a BPE tokenizer and a ChatML
                            template) into DIR and exit

KV cache events (vLLM's --kv-events-config, ZMQ)
  --kv-events-port N        publish BlockStored / BlockRemoved / AllBlocksCleared, one
                            batch per engine step, on a PUB socket on --host:N (0: any
                            free port, printed) [off]
  --kv-replay-port N        serve replays of the last 10000 batches on a ROUTER socket
                            on --host:N (0: any) [off]
  --kv-events-topic T       first frame of every message [\"\"]
  --kv-events-shape S       array (array_like events, older vLLM) or map (events tagged
                            under \"type\", vLLM PR #42892) [array]
  --kv-events-int-hashes    block hashes as ints (their low 64 bits), as with
                            VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES [digest bytes]

Faults (for reliability tests)
  --fault-error-rate P      answer this fraction of completions with an error
  --fault-error-status S    ... with this status [500]
  --fault-latency-ms N      add N ms before every completion
  --fault-hang-rate P       never answer this fraction of completions
  --fault-close-after N     close streamed answers after N events, without [DONE]
  --fault-refuse            reset every connection at once
  --fault-slow-kv-ms N      delay every side-channel answer by N ms

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models,
GET /health, GET /metrics (Prometheus, vLLM metric names), POST /reset_prefix_cache.
";

/// What the command line asks for.
enum Action {
    Help,
    WriteTokenizer(PathBuf),
    Run(Box<Config>),
}

/// Parses the arguments; `env_seed` is `PYTHONHASHSEED`.
fn parse(args: &[String], env_seed: Option<String>) -> Result<Action, String> {
    let mut cfg = Config { advertise_host: String::new(), ..Config::new(Role::Both) };
    cfg.hash_seed = env_seed;
    let mut kv_port: Option<u16> = None;
    let mut events: Option<kvevents::Options> = None;
    let mut replay_port: Option<u16> = None;
    let mut topic: Option<String> = None;
    let mut shape: Option<Shape> = None;
    let mut int_hashes = false;
    let mut instant = false;
    let mut overrides: Vec<(String, String)> = Vec::new();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut val = || it.next().cloned().ok_or_else(|| format!("{flag} needs a value"));
        let num = |v: String| {
            v.parse::<u64>().map_err(|_| format!("{flag}: \"{v}\" is not a whole number"))
        };
        let frac = |v: String| match v.parse::<f64>() {
            Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
            _ => Err(format!("{flag}: \"{v}\" is not a probability between 0 and 1")),
        };
        let port =
            |v: String| v.parse::<u16>().map_err(|_| format!("{flag}: \"{v}\" is not a port"));
        match flag.as_str() {
            "-h" | "--help" => return Ok(Action::Help),
            "--write-test-tokenizer" => return Ok(Action::WriteTokenizer(val()?.into())),
            "--tokenizer" => {
                let dir = PathBuf::from(val()?);
                let tok = Tokenizer::load(&dir).map_err(|e| format!("--tokenizer: {e}"))?;
                cfg.tokenizer = Some(Arc::new(tok));
            }
            "--prefix-caching-hash-algo" => {
                let v = val()?;
                cfg.hash_algo = HashAlgo::parse(v.as_bytes()).ok_or_else(|| {
                    format!(
                        "--prefix-caching-hash-algo: \"{v}\" is not sha256_cbor or xxhash_cbor \
                         (the pickle-based sha256 and xxhash cannot be reproduced)"
                    )
                })?;
            }
            "--hash-seed" => cfg.hash_seed = Some(val()?),
            "--kv-events-port" => events = Some(kvevents::Options::new(port(val()?)?)),
            "--kv-replay-port" => replay_port = Some(port(val()?)?),
            "--kv-events-topic" => topic = Some(val()?),
            "--kv-events-shape" => {
                shape = Some(match val()?.as_str() {
                    "array" => Shape::Array,
                    "map" => Shape::Map,
                    v => return Err(format!("--kv-events-shape: \"{v}\" is not array or map")),
                })
            }
            "--kv-events-int-hashes" => int_hashes = true,
            "--role" => {
                cfg.role = match val()?.as_str() {
                    "prefill" => Role::Prefill,
                    "decode" => Role::Decode,
                    "both" => Role::Both,
                    "encode" => Role::Encode,
                    v => {
                        return Err(format!(
                            "--role: \"{v}\" is not prefill, decode, both or encode"
                        ))
                    }
                }
            }
            "--engine" => {
                cfg.flavor = match val()?.as_str() {
                    "vllm" => Flavor::Vllm,
                    "sglang" => Flavor::Sglang,
                    v => return Err(format!("--engine: \"{v}\" is not vllm or sglang")),
                }
            }
            "--host" => cfg.host = val()?,
            "--port" => cfg.port = port(val()?)?,
            "--kv-port" | "--bootstrap-port" => kv_port = Some(port(val()?)?),
            "--advertise-host" => cfg.advertise_host = val()?,
            "--model" => cfg.model = val()?,
            "--engine-id" => cfg.engine_id = val()?,
            "--quiet" => cfg.quiet = true,
            "--profile" => {
                let path = val()?;
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("--profile: {path}: {e}"))?;
                cfg.profile =
                    Profile::parse(&text).map_err(|e| format!("--profile: {path}: {e}"))?;
            }
            "--instant" => instant = true,
            "--time-scale" => {
                let v = val()?;
                cfg.time_scale = match v.parse::<f64>() {
                    Ok(x) if x > 0.0 => x,
                    _ => return Err(format!("--time-scale: \"{v}\" is not a positive number")),
                }
            }
            "--max-num-seqs" | "--max-num-batched-tokens" | "--num-gpu-blocks" => {
                let v = val()?;
                num(v.clone())?;
                overrides.push((flag.trim_start_matches("--").replace('-', "_"), v));
            }
            "--no-prefix-caching" => {
                overrides.push(("enable_prefix_caching".into(), "false".into()))
            }
            "--seed" => cfg.seed = num(val()?)?,
            "--kv-hold-ms" => cfg.kv_hold_ms = num(val()?)?,
            "--loading-ms" => cfg.loading_ms = num(val()?)?,
            "--bootstrap-timeout-ms" => cfg.bootstrap_timeout_ms = num(val()?)?,
            "--fault-error-rate" => cfg.faults.error_rate = frac(val()?)?,
            "--fault-error-status" => {
                let v = val()?;
                cfg.faults.error_status = match v.parse::<u16>() {
                    Ok(s) if (400..600).contains(&s) => s,
                    _ => {
                        return Err(format!(
                            "--fault-error-status: \"{v}\" is not a 4xx or 5xx status"
                        ))
                    }
                }
            }
            "--fault-latency-ms" => cfg.faults.latency_ms = num(val()?)?,
            "--fault-hang-rate" => cfg.faults.hang_rate = frac(val()?)?,
            "--fault-close-after" => cfg.faults.close_after = Some(num(val()?)?),
            "--fault-refuse" => cfg.faults.refuse = true,
            "--fault-slow-kv-ms" => cfg.faults.slow_kv_ms = num(val()?)?,
            other => return Err(format!("unknown option \"{other}\" (see --help)")),
        }
    }
    match events.as_mut() {
        Some(o) => {
            o.replay_port = replay_port;
            o.topic = topic.unwrap_or_default();
            o.shape = shape.unwrap_or(Shape::Array);
            o.int_hashes = int_hashes;
            cfg.kv_events = events;
        }
        None if replay_port.is_some() || topic.is_some() || shape.is_some() || int_hashes => {
            return Err("the --kv-* event options need --kv-events-port".into())
        }
        None => {}
    }
    if instant {
        let keep = cfg.profile.clone();
        cfg.profile = Profile { name: format!("{} (instant)", keep.name), ..Profile::instant() };
        cfg.profile.max_num_seqs = keep.max_num_seqs;
        cfg.profile.max_num_batched_tokens = keep.max_num_batched_tokens;
        cfg.profile.num_gpu_blocks = keep.num_gpu_blocks;
    }
    if !overrides.is_empty() {
        let text: String = overrides.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
        let base = cfg.profile.clone();
        let over = Profile::parse(&text).map_err(|e| e.msg)?;
        cfg.profile = Profile {
            max_num_seqs: if text.contains("max_num_seqs") {
                over.max_num_seqs
            } else {
                base.max_num_seqs
            },
            max_num_batched_tokens: if text.contains("max_num_batched_tokens") {
                over.max_num_batched_tokens
            } else {
                base.max_num_batched_tokens
            },
            num_gpu_blocks: if text.contains("num_gpu_blocks") {
                over.num_gpu_blocks
            } else {
                base.num_gpu_blocks
            },
            enable_prefix_caching: if text.contains("enable_prefix_caching") {
                over.enable_prefix_caching
            } else {
                base.enable_prefix_caching
            },
            ..base
        };
    }
    cfg.kv_port = match kv_port {
        Some(p) => p,
        None if cfg.port == 0 => 0,
        None => cfg.port.checked_add(1000).ok_or("--port too high for the default --kv-port")?,
    };
    if cfg.advertise_host.is_empty() {
        cfg.advertise_host = if cfg.host == "0.0.0.0" || cfg.host == "::" {
            "127.0.0.1".into()
        } else {
            cfg.host.clone()
        };
    }
    Ok(Action::Run(Box::new(cfg)))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut cfg = match parse(&args, prompt::env_hash_seed()) {
        Ok(Action::Run(c)) => *c,
        Ok(Action::Help) => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Ok(Action::WriteTokenizer(dir)) => {
            return match pdgate_core::tokenize::testing::write_test_model(&dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("engine-sim: --write-test-tokenizer: {}: {e}", dir.display());
                    ExitCode::from(1)
                }
            };
        }
        Err(e) => {
            eprintln!("engine-sim: {e}");
            return ExitCode::from(2);
        }
    };
    let role = format!("{:?}", cfg.role).to_lowercase();
    if cfg.engine_id.is_empty() {
        cfg.engine_id = format!("{role}-{}", cfg.port);
    }
    match server::start(cfg) {
        Ok(sim) => {
            let c = &sim.cfg;
            eprintln!(
                "engine-sim {role}:{} ready: http {}:{}, side channel {}:{}, engine {:?}, profile {}, time scale {}",
                c.port, c.host, c.port, c.host, c.kv_port, c.flavor, c.profile.name, c.time_scale
            );
            let tok = c
                .tokenizer
                .as_ref()
                .map_or("4 bytes per token".into(), |t| format!("tokenizer {}", t.dir.display()));
            let seed = if sim.hashing().seeded { "seed given" } else { "random seed" };
            eprintln!(
                "engine-sim {role}:{} prompts: {tok}, block hashes {} ({seed}), block size {}",
                c.port,
                c.hash_algo.name(),
                c.profile.block_size
            );
            if let Some(k) = &c.kv_events {
                let replay = k.replay_port.map_or("off".into(), |p| format!("{}:{p}", c.host));
                eprintln!(
                    "engine-sim {role}:{} kv events: pub {}:{}, replay {replay}, topic \"{}\", shape {}, {} hashes",
                    c.port,
                    c.host,
                    k.port,
                    k.topic,
                    if k.shape == Shape::Map { "map" } else { "array" },
                    if k.int_hashes { "int" } else { "bytes" }
                );
            }
            loop {
                std::thread::park();
            }
        }
        Err(e) => {
            eprintln!("engine-sim: cannot listen: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str], env_seed: Option<&str>) -> Result<Config, String> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        match parse(&args, env_seed.map(str::to_owned))? {
            Action::Run(c) => Ok(*c),
            _ => Err("not a run".into()),
        }
    }

    #[test]
    fn hashing_flags_and_the_seed() {
        let c = run(&[], None).unwrap();
        assert_eq!((c.hash_algo, c.hash_seed, c.kv_events), (HashAlgo::Sha256Cbor, None, None));
        let c = run(&["--prefix-caching-hash-algo", "xxhash_cbor"], Some("7")).unwrap();
        assert_eq!((c.hash_algo, c.hash_seed.as_deref()), (HashAlgo::XxhashCbor, Some("7")));
        // The flag wins over PYTHONHASHSEED.
        let c = run(&["--hash-seed", "abc"], Some("7")).unwrap();
        assert_eq!(c.hash_seed.as_deref(), Some("abc"));
        for bad in ["sha256", "builtin", "xxhash"] {
            let e = run(&["--prefix-caching-hash-algo", bad], None).unwrap_err();
            assert!(e.contains("is not sha256_cbor or xxhash_cbor"), "{e}");
        }
    }

    #[test]
    fn kv_event_flags() {
        let c = run(&["--kv-events-port", "5557"], None).unwrap();
        assert_eq!(c.kv_events, Some(kvevents::Options::new(5557)));
        let c = run(
            &[
                "--kv-events-port",
                "0",
                "--kv-replay-port",
                "5558",
                "--kv-events-topic",
                "kv",
                "--kv-events-shape",
                "map",
                "--kv-events-int-hashes",
            ],
            None,
        )
        .unwrap();
        let o = c.kv_events.unwrap();
        assert_eq!((o.port, o.replay_port, o.topic.as_str()), (0, Some(5558), "kv"));
        assert_eq!((o.shape, o.int_hashes), (Shape::Map, true));
        for bad in [
            &["--kv-replay-port", "5558"][..],
            &["--kv-events-int-hashes"],
            &["--kv-events-port", "1", "--kv-events-shape", "tuple"],
            &["--kv-events-port", "x"],
        ] {
            assert!(run(bad, None).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tokenizer_flags() {
        let dir = std::env::temp_dir().join(format!("engine-sim-flags-{}", std::process::id()));
        let args = ["--write-test-tokenizer".to_owned(), dir.display().to_string()];
        assert!(matches!(parse(&args, None), Ok(Action::WriteTokenizer(d)) if d == dir));
        pdgate_core::tokenize::testing::write_test_model(&dir).unwrap();
        let c = run(&["--tokenizer", dir.to_str().unwrap()], None).unwrap();
        assert_eq!(c.tokenizer.unwrap().dir, dir);
        let e = run(&["--tokenizer", "/nonexistent/model"], None).unwrap_err();
        assert!(e.starts_with("--tokenizer: "), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
