//! SGLang-style disaggregation between two simulators, driven directly:
//! both legs carry the same bootstrap triple; the decode waits for the
//! prefill of its room, or fails clearly when it never comes.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use pdgate_sim::profile::Profile;
use pdgate_sim::server::{self, Config, Flavor, Role, Sim};

fn sim(role: Role, bootstrap_timeout_ms: u64) -> Arc<Sim> {
    server::start(Config {
        flavor: Flavor::Sglang,
        port: 0,
        engine_id: format!("{role:?}"),
        profile: Profile { step_base_us: 20_000.0, ..Profile::instant() },
        bootstrap_timeout_ms,
        quiet: true,
        ..Config::new(role)
    })
    .expect("simulator listens")
}

fn post(port: u16, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: t\r\nX-Request-Id: room-test\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split(' ').nth(1).unwrap().parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

#[test]
fn decode_waits_for_the_prefill_of_its_room() {
    let p = sim(Role::Prefill, 5_000);
    let d = sim(Role::Decode, 5_000);
    let body = format!(
        r#"{{"prompt":"{}","max_tokens":4,"bootstrap_host":"127.0.0.1","bootstrap_port":{},"bootstrap_room":12345}}"#,
        "y".repeat(200),
        p.cfg.kv_port
    );
    // The decode leg first: it must wait for the prefill.
    let b2 = body.clone();
    let dport = d.cfg.port;
    let decode = std::thread::spawn(move || post(dport, &b2));
    std::thread::sleep(Duration::from_millis(50));
    let (ps, _) = post(p.cfg.port, &body);
    let (ds, dbody) = decode.join().unwrap();
    assert_eq!((ps, ds), (200, 200), "{dbody}");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while d.journal().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(d.journal()[0].kv, "loaded");
    assert_eq!(d.metrics.kv_transfers.load(Relaxed), 1);
    assert_eq!(d.metrics.kv_recomputes.load(Relaxed), 0);
}

#[test]
fn a_room_whose_prefill_never_runs_times_out_with_a_clear_error() {
    let p = sim(Role::Prefill, 300);
    let d = sim(Role::Decode, 300);
    let body = format!(
        r#"{{"prompt":"z","bootstrap_host":"127.0.0.1","bootstrap_port":{},"bootstrap_room":777}}"#,
        p.cfg.kv_port
    );
    let (status, answer) = post(d.cfg.port, &body);
    assert_eq!(status, 500);
    assert!(
        answer.contains("bootstrap room 777: the prefill did not finish within 300 ms"),
        "{answer}"
    );
}

#[test]
fn the_prefill_answers_one_token_after_the_prefill_whatever_max_tokens_asks() {
    // 20 ms per step: 1000 generated tokens would take 20 s, the prefill
    // and its one token a step or two.
    let p = sim(Role::Prefill, 5_000);
    let d = sim(Role::Decode, 5_000);
    let body = format!(
        r#"{{"prompt":"{}","max_tokens":1000,"ignore_eos":true,"bootstrap_host":"127.0.0.1","bootstrap_port":{},"bootstrap_room":4242}}"#,
        "w".repeat(200),
        p.cfg.kv_port
    );
    // The decode leg first, waiting on the room; it then generates for
    // 20 s, so the client gives up after 2 s.
    let dport = d.cfg.port;
    let b2 = body.clone();
    let decode = std::thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", dport)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        write!(
            s,
            "POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b2}",
            b2.len()
        )
        .unwrap();
        let _ = s.read_to_end(&mut Vec::new());
    });
    std::thread::sleep(Duration::from_millis(50));
    let t0 = std::time::Instant::now();
    let (status, answer) = post(p.cfg.port, &body);
    let took = t0.elapsed();
    assert_eq!(status, 200, "{answer}");
    assert!(took < Duration::from_millis(500), "the prefill took {took:?}");
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 1, "{answer}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{answer}");
    // The room was published with the prefill: the decode has its KV.
    while d.metrics.kv_transfers.load(Relaxed) == 0 && t0.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(d.metrics.kv_transfers.load(Relaxed), 1, "no KV after {:?}", t0.elapsed());
    decode.join().unwrap();
}

#[test]
fn the_decode_counts_the_prompt_it_got_through_the_room_as_cached() {
    let p = sim(Role::Prefill, 5_000);
    let d = sim(Role::Decode, 5_000);
    let body = format!(
        r#"{{"prompt":"{}","max_tokens":2,"ignore_eos":true,"bootstrap_host":"127.0.0.1","bootstrap_port":{},"bootstrap_room":99}}"#,
        "v".repeat(200),
        p.cfg.kv_port
    );
    let b2 = body.clone();
    let dport = d.cfg.port;
    let decode = std::thread::spawn(move || post(dport, &b2));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(post(p.cfg.port, &body).0, 200);
    let (ds, dbody) = decode.join().unwrap();
    assert_eq!(ds, 200, "{dbody}");
    let v: serde_json::Value = serde_json::from_str(&dbody).unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], 50, "{dbody}");
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 49, "{dbody}");
}
