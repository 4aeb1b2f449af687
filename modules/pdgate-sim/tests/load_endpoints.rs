//! The load and health endpoints peer routers poll (issue 16 item 2):
//! vllm-router's power_of_two monitor reads `load` from the object
//! `GET /get_load` answers in vLLM mode; SGLang's router sums `num_tokens`
//! over the per-DP-rank array SGLang mode answers; vLLM's own `/load` answers
//! `server_load`; SGLang mode answers the startup probes
//! (`/health_generate`, `/get_model_info`, `/get_server_info`). The counts
//! are the scheduler's.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pdgate_sim::profile::Profile;
use pdgate_sim::server::{self, Config, Flavor, Role, Sim};
use serde_json::Value;

/// A simulator whose steps take 20 ms and that runs at most two sequences,
/// so requests stay in flight long enough to be counted.
fn sim(flavor: Flavor, role: Role) -> Arc<Sim> {
    server::start(Config {
        flavor,
        port: 0,
        engine_id: format!("{role:?}"),
        profile: Profile { step_base_us: 20_000.0, max_num_seqs: 2, ..Profile::instant() },
        quiet: true,
        ..Config::new(role)
    })
    .expect("simulator listens")
}

fn get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split(' ').nth(1).unwrap().parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

fn get_json(port: u16, path: &str) -> Value {
    let (status, body) = get(port, path);
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

/// Sends a long completion and keeps the connection open (the answer is not
/// read): the request stays in the engine.
fn start_request(port: u16, i: usize) -> TcpStream {
    let body = format!(r#"{{"prompt":"{}","max_tokens":500}}"#, "load test ".repeat(10 + i));
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: t\r\nX-Request-Id: load-{i}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s
}

/// What vllm-router does with the answer: `data.get("load")` as an integer.
fn vllm_router_load(v: &Value) -> Option<i64> {
    v.get("load").and_then(Value::as_i64)
}

/// What SGLang's router does with it: an array, `num_tokens` summed.
fn sglang_router_load(v: &Value) -> Option<i64> {
    let ranks = v.as_array()?;
    Some(ranks.iter().filter_map(|r| r.get("num_tokens").and_then(Value::as_i64)).sum())
}

/// The one DP rank's entry, whatever the mode's shape.
fn rank0(v: &Value) -> &Value {
    match v.as_array() {
        Some(a) => {
            assert_eq!(a.len(), 1, "{v}");
            &a[0]
        }
        None => v,
    }
}

fn requests(v: &Value) -> Option<i64> {
    rank0(v).get("num_reqs").and_then(Value::as_i64)
}

/// Polls until `n` requests are in and the scheduler has admitted what it
/// can (`running` of them).
fn wait_for_load(port: u16, n: i64, running: i64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = get_json(port, "/get_load");
        let r = rank0(&v);
        let settled = requests(&v) == Some(n) && r["num_running_reqs"] == running;
        if settled || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn in_flight_requests_are_reported(flavor: Flavor) {
    let s = sim(flavor, Role::Both);
    let idle = get_json(s.cfg.port, "/get_load");
    assert_eq!(requests(&idle), Some(0), "{idle}");
    assert_eq!(rank0(&idle)["num_tokens"], 0, "{idle}");

    let n = 5;
    let _conns: Vec<TcpStream> = (0..n).map(|i| start_request(s.cfg.port, i)).collect();
    let v = wait_for_load(s.cfg.port, n as i64, 2);
    let r = rank0(&v);
    // Two run (max_num_seqs), the rest wait: the scheduler's own counts.
    assert_eq!(r["num_reqs"], 5, "{v}");
    assert_eq!(r["num_running_reqs"], 2, "{v}");
    assert_eq!(r["num_waiting_reqs"], 3, "{v}");
    assert_eq!(r["load"], 5, "{v}");
    let tokens = r["num_tokens"].as_i64().unwrap();
    assert!(tokens >= 5 * 10, "{v}");
    match flavor {
        Flavor::Vllm => {
            assert!(v.is_object(), "{v}");
            assert_eq!(vllm_router_load(&v), Some(5), "{v}");
            let l = get_json(s.cfg.port, "/load");
            assert_eq!(l["server_load"], 5, "{l}");
        }
        Flavor::Sglang => {
            assert!(v.is_array(), "{v}");
            assert_eq!(r["dp_rank"], 0, "{v}");
            assert_eq!(sglang_router_load(&v), Some(tokens), "{v}");
        }
    }
}

#[test]
fn get_load_reports_running_plus_waiting_in_vllm_mode() {
    in_flight_requests_are_reported(Flavor::Vllm);
}

#[test]
fn get_load_reports_running_plus_waiting_in_sglang_mode() {
    in_flight_requests_are_reported(Flavor::Sglang);
}

#[test]
fn sglang_mode_answers_the_startup_probes() {
    for (role, mode) in [(Role::Prefill, "prefill"), (Role::Decode, "decode"), (Role::Both, "null")]
    {
        let s = sim(Flavor::Sglang, role);
        let port = s.cfg.port;
        assert_eq!(get(port, "/health").0, 200);
        assert_eq!(get(port, "/health_generate").0, 200);
        let info = get_json(port, "/get_model_info");
        assert_eq!(info["model_path"], s.cfg.model.as_str(), "{info}");
        assert_eq!(info["is_generation"], true, "{info}");
        let server = get_json(port, "/get_server_info");
        assert_eq!(server["disaggregation_mode"], mode, "{server}");
        assert_eq!(server["served_model_name"], s.cfg.model.as_str(), "{server}");
        // SGLang's router reads model_path, and dp_size for DP-aware workers.
        assert_eq!(server["model_path"], s.cfg.model.as_str(), "{server}");
        assert_eq!(server["dp_size"], 1, "{server}");
        assert_eq!(server["disaggregation_bootstrap_port"], s.cfg.kv_port, "{server}");
        let models = get_json(port, "/v1/models");
        assert_eq!(models["data"][0]["id"], s.cfg.model.as_str(), "{models}");
        // vLLM's own load endpoint is not SGLang's.
        assert_eq!(get(port, "/load").0, 404);
    }
}

#[test]
fn vllm_mode_answers_health_and_models_but_not_sglang_probes() {
    let s = sim(Flavor::Vllm, Role::Both);
    let port = s.cfg.port;
    assert_eq!(get(port, "/health").0, 200);
    let models = get_json(port, "/v1/models");
    assert_eq!(models["data"][0]["id"], s.cfg.model.as_str(), "{models}");
    assert_eq!(get_json(port, "/load")["server_load"], 0);
    for path in ["/health_generate", "/get_model_info", "/get_server_info"] {
        assert_eq!(get(port, path).0, 404, "{path}");
    }
}

/// `--loading-ms`: a loading vLLM engine has no HTTP server yet (every
/// connection is reset before a byte is read); a loading SGLang engine
/// answers its health probes and completions 503, its other pages 200;
/// both serve normally once loaded.
#[test]
fn loading_at_start() {
    let start = |flavor| {
        server::start(Config {
            flavor,
            port: 0,
            loading_ms: 1500,
            profile: Profile::instant(),
            quiet: true,
            ..Config::new(Role::Both)
        })
        .expect("simulator listens")
    };
    let t0 = Instant::now();
    let vllm = start(Flavor::Vllm);
    let sglang = start(Flavor::Sglang);
    // A reset while loading: no status line comes back.
    let refused = |port: u16| {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return true };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = write!(s, "GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out.is_empty()
    };
    assert!(refused(vllm.cfg.port), "vLLM while loading");
    assert_eq!(get(sglang.cfg.port, "/health").0, 503);
    assert_eq!(get(sglang.cfg.port, "/health_generate").0, 503);
    assert_eq!(get(sglang.cfg.port, "/get_model_info").0, 200, "not a probe: served");
    assert!(t0.elapsed() < Duration::from_millis(1500), "the checks ran within the loading time");
    std::thread::sleep(
        Duration::from_millis(1500).saturating_sub(t0.elapsed()) + Duration::from_millis(50),
    );
    assert_eq!(get(vllm.cfg.port, "/health").0, 200, "vLLM once loaded");
    assert_eq!(get(sglang.cfg.port, "/health").0, 200, "SGLang once loaded");
    assert_eq!(get(sglang.cfg.port, "/health_generate").0, 200);
}
