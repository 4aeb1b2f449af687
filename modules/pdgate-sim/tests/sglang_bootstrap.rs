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
