//! End to end: nginx (dist/, built by ./build.sh) with the prefill and
//! set_request_id modules in front of in-process engine simulators.
//! Asserts that the KV really moves from prefill to decode, that both legs
//! see one request id, that streams arrive over time, and that a failing
//! prefill surfaces to the client.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pdgate_sim::profile::Profile;
use pdgate_sim::server::{self, Config, Faults, Role, Sim};

mod common;
use common::{dist, whoami_location, Nginx};

fn sim(role: Role, profile: Profile, faults: Faults) -> Arc<Sim> {
    server::start(Config {
        port: 0,
        engine_id: format!("{role:?}"),
        profile,
        seed: 7,
        faults,
        bootstrap_timeout_ms: 2_000,
        quiet: true,
        ..Config::new(role)
    })
    .expect("simulator listens")
}

/// The load-aware balancers under test.
const BALANCERS: [&str; 6] = [
    "least_total_load",
    "weighted_least_active",
    "auto_balance_controller",
    "prefill_score_balance",
    "prefix_cache_affinity",
    "pd_score_balance",
];

/// A balancer's "on" directive.
fn on(b: &str) -> String {
    if b == "pd_score_balance" {
        "pd_score_balance decode;".into()
    } else {
        format!("{b} on;")
    }
}

/// A running nginx that is stopped on drop.
/// Rewrites the configuration with these upstreams and reloads.
fn reload(n: &Nginx, upstreams: &str) {
    std::fs::write(n.dir.join("nginx.conf"), conf_text(upstreams, n.port, true)).unwrap();
    assert!(n.signal("reload").success(), "reload failed");
}

/// The simulator's journal once it has `n` records (a request is recorded
/// just after its answer is written, so the client can be faster).
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

fn nginx(prefill: &Sim, decode: &Sim) -> Nginx {
    let upstreams = format!(
        "    upstream prefill_servers {{ server 127.0.0.1:{p}; keepalive 8; }}\n    upstream decode_servers {{ server 127.0.0.1:{d}; keepalive 8; }}\n{balanced}",
        p = prefill.cfg.port,
        d = decode.cfg.port,
        balanced = BALANCERS
            .iter()
            .map(|b| format!(
                "    upstream lb_{b} {{ server 127.0.0.1:{}; server 127.0.0.1:{}; {} keepalive 8; }}\n",
                prefill.cfg.port,
                decode.cfg.port,
                on(b)
            ))
            .collect::<String>(),
    );
    start_nginx(&upstreams)
}

/// nginx with the P/D server block and these upstreams (which must define
/// prefill_servers and decode_servers).
fn start_nginx(upstreams: &str) -> Nginx {
    start_nginx_opts(upstreams, false)
}

/// The test configuration: the P/D server block over `upstreams`, on
/// `port`, with or without a master process (reload tests need one).
fn conf_text(upstreams: &str, port: u16, master: bool) -> String {
    let m = dist().join("modules");
    let master = if master { "on" } else { "off" };
    format!(
        r#"load_module {m}/ngx_http_set_request_id_module.so;
load_module {m}/ngx_http_prefill_module.so;
load_module {m}/ngx_http_upstream_least_total_load_module.so;
load_module {m}/ngx_http_upstream_weighted_least_active_module.so;
load_module {m}/ngx_http_upstream_auto_balance_controller_module.so;
load_module {m}/ngx_http_upstream_prefill_score_balance_module.so;
load_module {m}/ngx_http_upstream_greedy_timeout_module.so;
load_module {m}/ngx_http_upstream_prefix_cache_affinity_module.so;
load_module {m}/ngx_http_upstream_pd_score_balance_module.so;
daemon off;
master_process {master};
worker_processes 1;
error_log logs/error.log info;
pid logs/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
{upstreams}
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    server {{
        listen 127.0.0.1:{port};
        set_request_id on;
        location ~ ^/v1/(chat/)?completions$ {{
            prefill /prefill_internal;
            proxy_buffering off;
            proxy_pass http://decode_servers;
        }}
        location /prefill_internal/ {{
            internal;
            rewrite ^/prefill_internal(/.*)$ $1 break;
            proxy_pass http://prefill_servers;
            subrequest_output_buffer_size 64k;
        }}
        location /direct/ {{ proxy_pass http://decode_servers/; }}
        location ~ ^/lb/(?<lb>[a-z_]+)(?<rest>/.*)$ {{ proxy_buffering off; proxy_pass http://lb_$lb$rest; }}
        location = /status/weighted_least_active {{ weighted_least_active_status; }}
        location = /status/pd_score_balance {{ pd_score_balance_status; }}
        location = /status/least_total_load {{ least_total_load_status; }}
        {whoami}
    }}
}}
"#,
        m = m.display(),
        whoami = whoami_location(port),
    )
}

fn start_nginx_opts(upstreams: &str, master: bool) -> Nginx {
    Nginx::start("e2e", |port| conf_text(upstreams, port, master))
}

/// Status, body, and the arrival time of each body read (after the head).
fn post(port: u16, path: &str, body: &str) -> (u16, String, Vec<Duration>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let t0 = Instant::now();
    let mut r = BufReader::new(s);
    let mut status_line = String::new();
    r.read_line(&mut status_line).unwrap();
    let status: u16 = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut chunked = false;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        if h.trim().is_empty() {
            break;
        }
        if h.to_ascii_lowercase().starts_with("transfer-encoding: chunked") {
            chunked = true;
        }
    }
    let mut body = Vec::new();
    let mut arrivals = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).unwrap();
            let n = usize::from_str_radix(size.trim(), 16).unwrap();
            if n == 0 {
                break;
            }
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).unwrap();
            arrivals.push(t0.elapsed());
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        r.read_to_end(&mut body).unwrap();
    }
    (status, String::from_utf8(body).unwrap(), arrivals)
}

#[test]
fn kv_moves_from_prefill_to_decode_with_one_request_id() {
    let p = sim(Role::Prefill, Profile::instant(), Faults::default());
    let d = sim(Role::Decode, Profile::instant(), Faults::default());
    let ngx = nginx(&p, &d);
    for i in 0..5 {
        let body = format!(
            r#"{{"model":"sim","messages":[{{"role":"user","content":"question {i}: {}"}}],"max_tokens":8}}"#,
            "x".repeat(400)
        );
        let (status, answer, _) = post(ngx.port, "/v1/chat/completions", &body);
        assert_eq!(status, 200, "{answer}");
        let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(v["usage"]["completion_tokens"], 8);
    }
    let (pj, dj) = (journal(&p, 5), journal(&d, 5));
    assert_eq!(pj.len(), 5);
    assert_eq!(dj.len(), 5);
    assert!(pj.iter().all(|r| r.kv == "held" && r.output_tokens == 1), "{pj:?}");
    assert!(dj.iter().all(|r| r.kv == "loaded"), "{dj:?}");
    let mut pids: Vec<_> = pj.iter().map(|r| r.request_id.clone()).collect();
    let mut dids: Vec<_> = dj.iter().map(|r| r.request_id.clone()).collect();
    pids.sort();
    dids.sort();
    assert_eq!(pids, dids);
    assert!(pids.iter().all(|id| id.len() == 36), "{pids:?}");
    assert_eq!(d.metrics.kv_recomputes.load(Relaxed), 0);
    assert_eq!(d.metrics.kv_transfers.load(Relaxed), 5);
}

#[test]
fn the_client_sees_the_prefill_cached_tokens_not_the_decode_handoff() {
    let p = sim(Role::Prefill, Profile::instant(), Faults::default());
    let d = sim(Role::Decode, Profile::instant(), Faults::default());
    let ngx = nginx(&p, &d);
    let body = format!(
        r#"{{"model":"sim","messages":[{{"role":"user","content":"{}"}}],"max_tokens":4}}"#,
        "cache me ".repeat(200)
    );
    let cached = |stream: bool| {
        let b = if stream {
            body.replacen(
                r#""max_tokens":4"#,
                r#""max_tokens":4,"stream":true,"stream_options":{"include_usage":true}"#,
                1,
            )
        } else {
            body.clone()
        };
        let (status, answer, _) = post(ngx.port, "/v1/chat/completions", &b);
        assert_eq!(status, 200, "{answer}");
        let usage = if stream {
            let last = answer
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .rfind(|l| l.contains("\"usage\""))
                .expect("a usage chunk")
                .to_owned();
            serde_json::from_str::<serde_json::Value>(&last).unwrap()["usage"].clone()
        } else {
            serde_json::from_str::<serde_json::Value>(&answer).unwrap()["usage"].clone()
        };
        let prompt = usage["prompt_tokens"].as_u64().unwrap();
        (usage["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap(), prompt)
    };
    // A new prompt: the decode got prompt - 1 tokens through the KV
    // handoff, but nothing was in the prefill's cache: the client sees 0.
    let (first, prompt) = cached(false);
    assert!(prompt > 100, "{prompt}");
    assert_eq!(first, 0);
    // The same prompt again: the prefill's prefix cache hit, in whole blocks.
    let (again, _) = cached(false);
    assert!(again > 0 && again < prompt - 1 && again % 16 == 0, "{again} of {prompt}");
    // Streamed: the final usage chunk says the same.
    let (streamed, _) = cached(true);
    assert_eq!(streamed, again);
    assert_eq!(d.metrics.kv_recomputes.load(Relaxed), 0);
}

#[test]
fn a_decode_without_the_handoff_recomputes_and_counts_it() {
    let p = sim(Role::Prefill, Profile::instant(), Faults::default());
    let d = sim(Role::Decode, Profile::instant(), Faults::default());
    let ngx = nginx(&p, &d);
    let (status, _, _) =
        post(ngx.port, "/direct/v1/completions", r#"{"prompt":"hi","max_tokens":2}"#);
    assert_eq!(status, 200);
    assert_eq!(d.metrics.kv_recomputes.load(Relaxed), 1);
    assert_eq!(journal(&d, 1)[0].kv, "recomputed");
    assert!(p.journal().is_empty());
}

#[test]
fn streams_arrive_as_several_chunks_over_time() {
    // 10 ms per engine step: 12 tokens take >= 110 ms of decode.
    let slow = Profile { step_base_us: 10_000.0, ..Profile::instant() };
    let p = sim(Role::Prefill, Profile::instant(), Faults::default());
    let d = sim(Role::Decode, slow, Faults::default());
    let ngx = nginx(&p, &d);
    let (status, body, arrivals) = post(
        ngx.port,
        "/v1/chat/completions",
        r#"{"model":"sim","messages":[{"role":"user","content":"count"}],"max_tokens":12,"ignore_eos":true,"stream":true,"stream_options":{"include_usage":true}}"#,
    );
    assert_eq!(status, 200);
    let events = body.matches("data: ").count();
    assert_eq!(events, 1 + 12 + 1 + 1, "{body}"); // role, tokens, usage, [DONE]
    assert!(body.ends_with("data: [DONE]\n\n"));
    assert!(arrivals.len() >= 10, "{} reads", arrivals.len());
    let spread = *arrivals.last().unwrap() - arrivals[0];
    assert!(spread >= Duration::from_millis(80), "all chunks within {spread:?}");
}

#[test]
fn a_failing_prefill_surfaces_to_the_client_and_decode_is_not_called() {
    let faults = Faults { error_rate: 1.0, error_status: 503, ..Faults::default() };
    let p = sim(Role::Prefill, Profile::instant(), faults);
    let d = sim(Role::Decode, Profile::instant(), Faults::default());
    let ngx = nginx(&p, &d);
    let (status, body, _) = post(ngx.port, "/v1/completions", r#"{"prompt":"hi"}"#);
    assert_eq!(status, 503);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["message"], "injected fault");
    std::thread::sleep(Duration::from_millis(100));
    assert!(d.journal().is_empty());
    assert_eq!(p.metrics.requests_error.load(Relaxed), 1);
}

#[test]
fn load_aware_balancers_steer_around_a_busy_engine() {
    for lb in BALANCERS {
        // 5 ms per step: a 100-token answer keeps its engine busy ~0.5 s.
        let prof = Profile { step_base_us: 5_000.0, ..Profile::instant() };
        let a = sim(Role::Both, prof.clone(), Faults::default());
        let b = sim(Role::Both, prof, Faults::default());
        let ngx = nginx(&a, &b);
        let port = ngx.port;
        let path = format!("/lb/{lb}/v1/completions");
        let p2 = path.clone();
        let long = std::thread::spawn(move || {
            post(port, &p2, r#"{"prompt":"long","max_tokens":100,"ignore_eos":true}"#)
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        let busy = loop {
            let running_a = metric(a.cfg.port, "vllm:num_requests_running");
            let running_b = metric(b.cfg.port, "vllm:num_requests_running");
            if running_a + running_b >= 1.0 {
                break if running_a >= 1.0 { 'a' } else { 'b' };
            }
            assert!(Instant::now() < deadline, "{lb}: the long request never started");
            std::thread::sleep(Duration::from_millis(5));
        };
        for _ in 0..4 {
            let (status, body, _) = post(port, &path, r#"{"prompt":"short","max_tokens":1}"#);
            assert_eq!(status, 200, "{lb}: {body}");
        }
        let (status, _, _) = long.join().unwrap();
        assert_eq!(status, 200);
        let (busy_sim, idle_sim) = if busy == 'a' { (&a, &b) } else { (&b, &a) };
        let on_idle = journal(idle_sim, 4).iter().filter(|r| r.output_tokens == 1).count();
        let on_busy = journal(busy_sim, 1).iter().filter(|r| r.output_tokens == 1).count();
        assert_eq!((on_idle, on_busy), (4, 0), "{lb}: round robin would split them 2/2");
    }
}

/// A metric's value from a simulator's /metrics page.
fn metric(port: u16, name: &str) -> f64 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").unwrap();
    let mut page = String::new();
    s.read_to_string(&mut page).unwrap();
    page.lines()
        .find(|l| l.starts_with(name) && l.as_bytes().get(name.len()) == Some(&b'{'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn weighted_least_active_learns_resident_tokens_from_streamed_usage() {
    let prof = Profile { step_base_us: 5_000.0, ..Profile::instant() };
    let a = sim(Role::Both, prof.clone(), Faults::default());
    let b = sim(Role::Both, prof, Faults::default());
    let ngx = nginx(&a, &b);
    let port = ngx.port;
    let body = format!(
        r#"{{"prompt":"{}","max_tokens":200,"ignore_eos":true,"stream":true,"stream_options":{{"include_usage":true,"continuous_usage_stats":true}}}}"#,
        "x".repeat(400)
    );
    let estimate = pdgate_core::tokens::tokens_for_bytes(body.len());
    let long =
        std::thread::spawn(move || post(port, "/lb/weighted_least_active/v1/completions", &body));
    std::thread::sleep(Duration::from_millis(600));
    let (_, mid, _) = post(port, "/status/weighted_least_active", "");
    let (status, _, _) = long.join().unwrap();
    assert_eq!(status, 200);
    let (_, after, _) = post(port, "/status/weighted_least_active", "");
    // `upstream peer requests tokens cost total` per line.
    let held: Vec<u64> = mid
        .lines()
        .filter(|l| l.starts_with("lb_weighted_least_active "))
        .map(|l| l.split(' ').nth(3).unwrap().parse().unwrap())
        .collect();
    assert!(held.iter().any(|&t| t > estimate + 20), "estimate {estimate}, status:\n{mid}");
    for l in after.lines().filter(|l| l.starts_with("lb_weighted_least_active ")) {
        let f: Vec<&str> = l.split(' ').collect();
        assert_eq!((f[2], f[3]), ("0", "0"), "{after}");
    }
}

/// pd_score_balance places a decode looking ahead over the requests still
/// in prefill: a long prompt in prefill will want the idle decode engine,
/// so a short request that overtakes it goes to the busier one (a plain
/// least-loaded choice would take the idle one).
#[test]
fn pd_score_balance_decode_looks_ahead_over_prefills() {
    // Prefill 200 µs per token: a 2000-token prompt takes ~0.4 s.
    let pprof = Profile { prefill_token_us: 200.0, ..Profile::instant() };
    let dprof = Profile { step_base_us: 5_000.0, ..Profile::instant() };
    let p1 = sim(Role::Prefill, pprof.clone(), Faults::default());
    let p2 = sim(Role::Prefill, pprof, Faults::default());
    let da = sim(Role::Decode, dprof.clone(), Faults::default());
    let db = sim(Role::Decode, dprof, Faults::default());
    let ngx = start_nginx(&format!(
        "    upstream prefill_servers {{ server 127.0.0.1:{}; server 127.0.0.1:{}; pd_score_balance prefill; keepalive 8; }}\n    upstream decode_servers {{ server 127.0.0.1:{}; server 127.0.0.1:{}; pd_score_balance decode; keepalive 8; }}\n",
        p1.cfg.port, p2.cfg.port, da.cfg.port, db.cfg.port
    ));
    let port = ngx.port;
    // A decode that keeps one engine busy for ~1 s.
    let busy = std::thread::spawn(move || {
        post(port, "/v1/completions", r#"{"prompt":"busy","max_tokens":200,"ignore_eos":true}"#)
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    let busy_is_a = loop {
        let (ra, rb) = (
            metric(da.cfg.port, "vllm:num_requests_running"),
            metric(db.cfg.port, "vllm:num_requests_running"),
        );
        if ra + rb >= 1.0 {
            break ra >= 1.0;
        }
        assert!(Instant::now() < deadline, "the busy request never started");
        std::thread::sleep(Duration::from_millis(5));
    };
    // A long prompt enters prefill...
    let long_prompt = "x".repeat(8000);
    let long = std::thread::spawn(move || {
        let body = format!(r#"{{"prompt":"{long_prompt}","max_tokens":1}}"#);
        post(port, "/v1/completions", &body)
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, status, _) = post(port, "/status/pd_score_balance", "");
        if status.contains("# in prefill 1") {
            break;
        }
        assert!(Instant::now() < deadline, "the long prefill never showed:\n{status}");
        std::thread::sleep(Duration::from_millis(5));
    }
    // ...and a short one overtakes it on the other prefill engine.
    let (status, body, _) = post(port, "/v1/completions", r#"{"prompt":"short","max_tokens":1}"#);
    assert_eq!(status, 200, "{body}");
    let (status, body, _) = long.join().unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(busy.join().unwrap().0, 200);
    let (busy_sim, idle_sim) = if busy_is_a { (&da, &db) } else { (&db, &da) };
    let short_on = |s: &Sim| {
        journal(s, 1).iter().filter(|r| r.prompt_tokens < 100 && r.output_tokens == 1).count()
    };
    let long_on = |s: &Sim| journal(s, 1).iter().filter(|r| r.prompt_tokens >= 1000).count();
    assert_eq!(
        (short_on(busy_sim), short_on(idle_sim)),
        (1, 0),
        "the short request went to the idle engine"
    );
    assert_eq!(
        (long_on(idle_sim), long_on(busy_sim)),
        (1, 0),
        "the long request did not get the idle engine"
    );
    // Both prefill engines were used (the short prefill avoided the busy one).
    assert_eq!(journal(&p1, 1).len() + journal(&p2, 1).len(), 3);
    assert!(!journal(&p1, 1).is_empty() && !journal(&p2, 1).is_empty());
    let (_, after, _) = post(port, "/status/pd_score_balance", "");
    assert!(after.contains("# in prefill 0"), "{after}");
    for l in after.lines().filter(|l| !l.starts_with('#')) {
        let f: Vec<&str> = l.split(' ').collect();
        assert_eq!((f[2], f[3]), ("0", "0"), "{after}");
    }
}

/// A reload keeps the balancer's shared counters: the new workers see the
/// request an old worker still serves (and avoid its peer), a peer added
/// by the reload gets a fresh slot, and when the old worker finishes the
/// request its count goes back to zero.
#[test]
fn balancer_state_survives_reload() {
    let prof = Profile { step_base_us: 5_000.0, ..Profile::instant() };
    let a = sim(Role::Both, prof.clone(), Faults::default());
    let b = sim(Role::Both, prof, Faults::default());
    let pd = |extra: &str| {
        format!(
            "    upstream prefill_servers {{ server 127.0.0.1:{a}; }}\n    upstream decode_servers {{ server 127.0.0.1:{a}; }}\n    upstream lb_least_total_load {{ server 127.0.0.1:{a}; {extra} least_total_load on; keepalive 8; }}\n",
            a = a.cfg.port
        )
    };
    let ngx = start_nginx_opts(&pd(""), true);
    let port = ngx.port;
    let long = std::thread::spawn(move || {
        post(
            port,
            "/lb/least_total_load/v1/completions",
            r#"{"prompt":"long","max_tokens":200,"ignore_eos":true}"#,
        )
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(a.cfg.port, "vllm:num_requests_running") < 1.0 {
        assert!(Instant::now() < deadline, "the long request never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    let line_of = |status: &str, peer: u16| -> Vec<String> {
        status
            .lines()
            .find(|l| l.starts_with("lb_least_total_load ") && l.contains(&format!(":{peer} ")))
            .map(|l| l.split(' ').map(str::to_owned).collect())
            .unwrap_or_default()
    };
    let (_, before, _) = post(port, "/status/least_total_load", "");
    assert_eq!(line_of(&before, a.cfg.port)[2], "1", "{before}");
    // Reload with a second peer.
    reload(&ngx, &pd(&format!("server 127.0.0.1:{};", b.cfg.port)));
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let (_, st, _) = post(port, "/status/least_total_load", "");
        if !line_of(&st, b.cfg.port).is_empty() {
            break st;
        }
        assert!(Instant::now() < deadline, "the reload never took effect:\n{st}");
        std::thread::sleep(Duration::from_millis(20));
    };
    // nginx starts the new workers 100 ms before it tells the old one to
    // stop accepting: wait for that.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(ngx.dir.join("logs/error.log"))
        .unwrap_or_default()
        .contains("gracefully shutting down")
    {
        assert!(Instant::now() < deadline, "the old worker was never told to stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The old worker's request is still counted; the new peer starts empty.
    assert_eq!(line_of(&after, a.cfg.port)[2], "1", "{after}");
    assert_eq!(line_of(&after, b.cfg.port)[2..6], ["0", "0", "0", "0"], "{after}");
    // So new requests avoid the busy peer.
    for _ in 0..3 {
        let (status, body, _) =
            post(port, "/lb/least_total_load/v1/completions", r#"{"prompt":"s","max_tokens":1}"#);
        assert_eq!(status, 200, "{body}");
    }
    let (_, st, _) = post(port, "/status/least_total_load", "");
    assert_eq!(
        journal(&b, 3).iter().filter(|r| r.output_tokens == 1).count(),
        3,
        "status:\n{st}\nA: {:?}\nB: {:?}",
        journal(&a, 1),
        journal(&b, 1)
    );
    assert_eq!(long.join().unwrap().0, 200);
    // The old worker released its request in the same slot.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, st, _) = post(port, "/status/least_total_load", "");
        if line_of(&st, a.cfg.port)[2] == "0" {
            assert_eq!(line_of(&st, a.cfg.port)[3], "0", "{st}");
            break;
        }
        assert!(Instant::now() < deadline, "the in-flight count never returned to zero:\n{st}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
