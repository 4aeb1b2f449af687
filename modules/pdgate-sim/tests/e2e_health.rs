//! End to end: pd_health_check with nginx (dist/, built by ./build.sh;
//! master process, two workers) in front of in-process engine simulators.
//! An engine that is still loading (vLLM: no server yet) gets no request
//! until its probes pass, then takes its share; when the worker probing for
//! the whole nginx is killed, another one takes the lease over and the
//! probes go on.

use std::process::Command;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pdgate_sim::profile::Profile;
use pdgate_sim::server::{self, Config, Role, Sim};

mod common;
use common::{dist, get, request, whoami_location, Nginx};

fn sim(loading_ms: u64) -> Arc<Sim> {
    server::start(Config {
        port: 0,
        profile: Profile::instant(),
        loading_ms,
        quiet: true,
        ..Config::new(Role::Both)
    })
    .expect("simulator listens")
}

fn start(a: u16, b: u16) -> Nginx {
    let m = dist().join("modules");
    Nginx::start("health", |port| {
        format!(
            r#"load_module {m}/ngx_http_upstream_pd_health_module.so;
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
        server 127.0.0.1:{a};
        server 127.0.0.1:{b};
        pd_health_check interval=200ms timeout=200ms fails=1 passes=1;
        keepalive 8;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport;
        {whoami}
        location /v1/ {{
            proxy_pass http://engines;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
        location = /status {{ pd_health_status; }}
        location = /health {{ pd_health_ready engines; }}
    }}
}}
"#,
            m = m.display(),
            whoami = whoami_location(port),
        )
    })
}

fn complete(port: u16) -> u16 {
    let body = r#"{"model":"m","prompt":"hello there","max_tokens":2}"#;
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    request(port, &req, 5).0
}

/// Waits until the status page matches `pred`; returns it.
fn wait_status(n: &Nginx, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page = get(n.port, "/status").1;
        if pred(&page) {
            return page;
        }
        assert!(Instant::now() < deadline, "{what}: status page stayed\n{page}\nlog:\n{}", n.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn peer_line(page: &str, port: u16) -> &str {
    let needle = format!("peer 127.0.0.1:{port} ");
    page.lines().find(|l| l.contains(&needle)).unwrap_or("")
}

fn prober(page: &str) -> u32 {
    page.lines()
        .next()
        .and_then(|l| l.strip_prefix("prober pid "))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_loading_engine_takes_traffic_only_once_its_probes_pass() {
    let ready = sim(0);
    let loading = sim(2_000);
    let (a, b) = (ready.cfg.port, loading.cfg.port);
    let n = start(a, b);
    wait_status(&n, "the ready engine up", |p| peer_line(p, a).contains(" up "));
    let page = get(n.port, "/status").1;
    assert!(!peer_line(&page, b).contains(" up "), "a loading engine is not up:\n{page}");
    assert_eq!(get(n.port, "/health").0, 200, "ready with one engine up");
    for _ in 0..20 {
        assert_eq!(complete(n.port), 200);
    }
    assert_eq!(
        ready.metrics.requests_ok.load(Relaxed),
        20,
        "every request went to the ready engine"
    );
    assert_eq!(loading.metrics.requests_ok.load(Relaxed), 0);
    // No request tried it (nginx logs a failed upstream with its URL).
    let tried = format!("127.0.0.1:{b}/v1/");
    assert!(!n.log().contains(&tried), "a request tried the loading engine:\n{}", n.log());
    // Loaded: its next probe passes and it takes its share.
    wait_status(&n, "the loaded engine up", |p| peer_line(p, b).contains(" up "));
    for _ in 0..20 {
        assert_eq!(complete(n.port), 200);
    }
    assert!(loading.metrics.requests_ok.load(Relaxed) >= 5, "the loaded engine takes traffic");
    assert!(
        n.log().contains(&format!("peer 127.0.0.1:{b} is up")),
        "the change is logged:\n{}",
        n.log()
    );
}

#[test]
fn the_probing_worker_is_replaced_when_it_dies() {
    let up = sim(0);
    let late = sim(3_000);
    let (a, b) = (up.cfg.port, late.cfg.port);
    let n = start(a, b);
    let page = wait_status(&n, "a prober and the first engine up", |p| {
        prober(p) != 0 && peer_line(p, a).contains(" up ")
    });
    let first = prober(&page);
    let st = Command::new("kill").args(["-9", &first.to_string()]).status().unwrap();
    assert!(st.success());
    // Another worker holds the lease within its time to live (2 s) ...
    let page = wait_status(&n, "a new prober", |p| prober(p) != 0 && prober(p) != first);
    assert_ne!(prober(&page), first);
    // ... and probes: the late engine comes up without the dead prober.
    wait_status(&n, "the late engine up", |p| peer_line(p, b).contains(" up "));
    let log = n.log();
    assert!(log.contains("probes for every worker"), "the takeover is logged:\n{log}");
}
