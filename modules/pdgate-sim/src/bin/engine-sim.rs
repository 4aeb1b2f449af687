//! engine-sim: a vLLM/SGLang-like prefill, decode, combined or encoder
//! server with a continuous-batching timing model. See `--help`.

use std::process::ExitCode;

use pdgate_sim::profile::Profile;
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

Faults (for reliability tests)
  --fault-error-rate P      answer this fraction of completions with an error
  --fault-error-status S    ... with this status [500]
  --fault-latency-ms N      add N ms before every completion
  --fault-hang-rate P       never answer this fraction of completions
  --fault-close-after N     close streamed answers after N events, without [DONE]
  --fault-refuse            reset every connection at once
  --fault-slow-kv-ms N      delay every side-channel answer by N ms

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models,
GET /health, GET /metrics (Prometheus, vLLM metric names).
";

fn parse(args: &[String]) -> Result<Option<Config>, String> {
    let mut cfg = Config { advertise_host: String::new(), ..Config::new(Role::Both) };
    let mut kv_port: Option<u16> = None;
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
            "-h" | "--help" => return Ok(None),
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
    Ok(Some(cfg))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut cfg = match parse(&args) {
        Ok(Some(c)) => c,
        Ok(None) => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
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
