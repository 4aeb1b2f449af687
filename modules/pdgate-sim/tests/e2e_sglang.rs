//! End to end, SGLang bootstrap mode: nginx (dist/, built by ./build.sh)
//! with ngx_http_prefill_refactor_module in front of engine simulators in
//! SGLang mode. The simulated decode waits for the room its prefill
//! publishes, so a 200 with `kv: loaded` proves both legs carried the same
//! bootstrap host, port and room; a failing prefill must surface at once.

use std::io::{Read, Write};
use std::net::TcpStream;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pdgate_sim::profile::Profile;
use pdgate_sim::server::{self, Config, Flavor, Role, Sim};

mod common;
use common::{dist, free_port, whoami_location, Nginx};

fn sim(role: Role) -> Arc<Sim> {
    server::start(Config {
        flavor: Flavor::Sglang,
        port: 0,
        engine_id: format!("{role:?}"),
        profile: Profile { step_base_us: 2_000.0, ..Profile::instant() },
        bootstrap_timeout_ms: 3_000,
        seed: 7,
        quiet: true,
        ..Config::new(role)
    })
    .expect("simulator listens")
}

/// nginx with /together/ (pd_together) and /before/ (p_before_d) in front
/// of these prefill servers (with their bootstrap ports) and decodes.
fn nginx(prefills: &[(u16, u16)], decodes: &[u16]) -> Nginx {
    let m = dist().join("modules");
    let plist: Vec<String> = prefills.iter().map(|(p, _)| format!("127.0.0.1:{p}")).collect();
    let ports: Vec<String> = prefills.iter().map(|(_, b)| b.to_string()).collect();
    let dservers: String = decodes.iter().map(|d| format!("server 127.0.0.1:{d}; ")).collect();
    let conf = |port: u16| {
        format!(
            r#"load_module {m}/ngx_http_set_request_id_module.so;
load_module {m}/ngx_http_prefill_refactor_module.so;
daemon off;
master_process off;
worker_processes 1;
error_log logs/error.log info;
pid logs/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    upstream decode_servers {{ {dservers} keepalive 8; }}
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    server {{
        listen 127.0.0.1:{port};
        {whoami}
        set_request_id on;
        prefill_servers_list {plist};
        bootstrap_ports_list {ports};
        pd_backend sglang;
        location /together/ {{
            prefill_refactor /prefill_internal;
            pd_distribution pd_together;
            proxy_buffering off;
            proxy_pass http://decode_servers/;
        }}
        location /before/ {{
            prefill_refactor /prefill_internal;
            pd_distribution p_before_d;
            proxy_buffering off;
            proxy_pass http://decode_servers/;
        }}
        location /prefill_internal/ {{
            internal;
            rewrite ^/prefill_internal/[a-z]+(/.*)$ $1 break;
            proxy_pass http://$prefill_server;
            subrequest_output_buffer_size 64k;
        }}
    }}
}}
"#,
            m = m.display(),
            whoami = whoami_location(port),
            plist = plist.join(","),
            ports = ports.join(","),
        )
    };
    Nginx::start("sglang", conf)
}

fn post(port: u16, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split(' ').nth(1).unwrap().parse().unwrap();
    let body = out.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("").to_owned();
    (status, body)
}

fn journal(sim: &Sim, n: usize) -> Vec<server::Record> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let j = sim.journal();
        if j.len() >= n || Instant::now() > deadline {
            return j;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The journals of `sims` together, once they hold `n` records (or after
/// 5 s).
fn journals(sims: &[&Sim], n: usize) -> Vec<server::Record> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let all: Vec<_> = sims.iter().flat_map(|s| s.journal()).collect();
        if all.len() >= n || Instant::now() > deadline {
            return all;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn chat(i: usize, stream: bool) -> String {
    format!(
        r#"{{"model":"sim","messages":[{{"role":"user","content":"question {i}: {}"}}],"max_tokens":8,"stream":{stream},"bootstrap_room":1}}"#,
        "y".repeat(300)
    )
}

#[test]
fn both_distributions_hand_the_kv_over_through_matching_rooms() {
    let (p1, p2, d1, d2) =
        (sim(Role::Prefill), sim(Role::Prefill), sim(Role::Decode), sim(Role::Decode));
    let ngx = nginx(
        &[(p1.cfg.port, p1.cfg.kv_port), (p2.cfg.port, p2.cfg.kv_port)],
        &[d1.cfg.port, d2.cfg.port],
    );
    let mut n = 0;
    for mode in ["together", "before"] {
        for i in 0..6 {
            let stream = i % 2 == 1;
            let (status, answer) =
                post(ngx.port, &format!("/{mode}/v1/chat/completions"), &chat(i, stream));
            assert_eq!(status, 200, "{mode} {i}: {answer}");
            if stream {
                assert!(answer.contains("data: [DONE]"), "{answer}");
            } else {
                let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
                assert_eq!(v["usage"]["completion_tokens"], 8, "{answer}");
            }
            n += 1;
        }
    }
    // A request is recorded just after its answer is written: wait for
    // all of them across both engines of a role (the last one may still be
    // on its way when the client has its answer).
    let dj = journals(&[&d1, &d2], n);
    let pj = journals(&[&p1, &p2], n);
    assert_eq!(dj.len(), n, "{dj:?}");
    assert_eq!(pj.len(), n, "{pj:?}");
    assert!(dj.iter().all(|r| r.kv == "loaded"), "{dj:?}");
    let transfers = d1.metrics.kv_transfers.load(Relaxed) + d2.metrics.kv_transfers.load(Relaxed);
    let recomputes =
        d1.metrics.kv_recomputes.load(Relaxed) + d2.metrics.kv_recomputes.load(Relaxed);
    assert_eq!((transfers, recomputes), (n as u64, 0));
    // Least-active ties are broken at random (a pd_together prefill may
    // still be finishing when the next request comes): both prefills get
    // some of the 12 (all on one would be a 1 in 2048 accident).
    assert!(!journal(&p1, 1).is_empty() && !journal(&p2, 1).is_empty(), "{pj:?}");
}

#[test]
fn a_prefill_that_is_down_fails_the_request_at_once_in_both_modes() {
    let d = sim(Role::Decode);
    let dead = free_port();
    let ngx = nginx(&[(dead, dead)], &[d.cfg.port]);
    for mode in ["together", "before"] {
        let t0 = Instant::now();
        let (status, answer) =
            post(ngx.port, &format!("/{mode}/v1/completions"), r#"{"prompt":"p"}"#);
        assert_eq!(status, 502, "{mode}: {answer}");
        assert!(answer.contains("prefill upstream is unreachable"), "{answer}");
        // The decode waits up to 3 s for its room: it was cancelled.
        assert!(t0.elapsed() < Duration::from_secs(2), "{mode}: {:?}", t0.elapsed());
    }
}
