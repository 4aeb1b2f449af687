//! End to end: two nginx instances in front of the same engines (issue 13
//! item 7). Proxy A sends long requests to engine 1 only; proxy B balances
//! over engines 1 and 2 with least_total_load. Without pd_engine_metrics B
//! knows nothing of A's requests and sends engine 1 about half of its own;
//! with it, B reads engine 1's queue from its /metrics and sends none there.
//! The counts of both are printed (`--nocapture`): the figure of
//! docs/benchmarks.md.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pdgate_sim::server::{self, Config, Role, Sim};

mod common;
use common::{dist, get, request, whoami_location, Nginx};

/// An engine 20 times slower than real time: a request of 300 tokens
/// decodes for about a minute, one of 2 tokens is done within a second.
fn sim() -> Arc<Sim> {
    server::start(Config { port: 0, time_scale: 0.05, quiet: true, ..Config::new(Role::Both) })
        .expect("simulator listens")
}

/// A proxy over `engines` (`balancer` and `extra` lines in its upstream).
fn proxy(tag: &str, engines: &[u16], balancer: &str, extra: &str) -> Nginx {
    let m = dist().join("modules");
    let servers: String =
        engines.iter().map(|p| format!("        server 127.0.0.1:{p};\n")).collect();
    Nginx::start(tag, |port| {
        format!(
            r#"load_module {m}/ngx_http_upstream_pd_health_module.so;
load_module {m}/ngx_http_upstream_least_total_load_module.so;
daemon off;
master_process on;
worker_processes 2;
error_log logs/error.log notice;
pid logs/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    upstream engines {{
        zone engines 64k;
{servers}        {balancer}
        {extra}
    }}
    server {{
        listen 127.0.0.1:{port} reuseport;
        {whoami}
        location /v1/ {{
            proxy_pass http://engines;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
        location = /status {{ pd_health_status; }}
    }}
}}
"#,
            m = m.display(),
            whoami = whoami_location(port),
        )
    })
}

fn completion(max_tokens: u32, stream: bool) -> String {
    let body = format!(
        r#"{{"model":"m","prompt":"tell me a long story about the sea","max_tokens":{max_tokens},"stream":{stream}}}"#
    );
    format!(
        "POST /v1/completions HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Sends a long streaming request and returns its connection once the
/// answer started (the request runs on the engine until it is dropped).
fn long_request(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(completion(300, true).as_bytes()).unwrap();
    let mut first = [0u8; 12];
    s.read_exact(&mut first).unwrap();
    assert_eq!(&first[9..12], b"200", "the long request started");
    s
}

fn short_request(port: u16) -> u16 {
    request(port, &completion(2, false), 20).0
}

/// Of `n` short requests through `b`, how many went to `busy` while `a`
/// holds long requests there.
fn sent_to_busy(b: &Nginx, busy: &Sim, idle: &Sim, n: u64) -> u64 {
    let (b0, i0) = (busy.metrics.requests_ok.load(Relaxed), idle.metrics.requests_ok.load(Relaxed));
    for _ in 0..n {
        assert_eq!(short_request(b.port), 200);
    }
    let (b1, i1) = (busy.metrics.requests_ok.load(Relaxed), idle.metrics.requests_ok.load(Relaxed));
    assert_eq!((b1 - b0) + (i1 - i0), n, "every short request finished on one of the engines");
    b1 - b0
}

#[test]
fn a_second_proxy_sees_the_queue_the_first_put_on_an_engine() {
    let (busy, idle) = (sim(), sim());
    let (e1, e2) = (busy.cfg.port, idle.cfg.port);
    let a = proxy("proxy-a", &[e1], "", "");
    let held: Vec<TcpStream> = (0..16).map(|_| long_request(a.port)).collect();
    // Proxy B without the engines' metrics: both engines look idle to it.
    let blind = proxy("proxy-b-blind", &[e1, e2], "least_total_load on;", "");
    let blind_busy = sent_to_busy(&blind, &busy, &idle, 10);
    drop(blind);
    // Proxy B reading them: engine 1 runs A's 16 requests.
    let seeing = proxy(
        "proxy-b-metrics",
        &[e1, e2],
        "least_total_load on;",
        "pd_engine_metrics interval=200ms timeout=200ms;",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let needle = format!("peer 127.0.0.1:{e1} engine running=16 ");
    while !get(seeing.port, "/status").1.contains(&needle) {
        assert!(
            Instant::now() < deadline,
            "engine 1's 16 requests never showed:\n{}\nlog:\n{}",
            get(seeing.port, "/status").1,
            seeing.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let seeing_busy = sent_to_busy(&seeing, &busy, &idle, 10);
    eprintln!(
        "two proxies, one engine loaded by the other proxy (16 long requests): of 10 requests, \
         {blind_busy} went to it without pd_engine_metrics, {seeing_busy} with it"
    );
    assert_eq!(seeing_busy, 0, "with the engine's metrics, none goes to the loaded engine");
    drop(held);
}
