//! End to end: precise prefix-cache routing (issue 15). Three prefill
//! engines tokenize with the test model, hash their blocks as vLLM does
//! (each with its own random seed, as vLLM without PYTHONHASHSEED) and
//! publish vLLM's KV events; nginx tokenizes the same requests
//! (`pd_tokenizer`), keeps the engines' blocks in its shared index
//! (`pd_kv_events`) and routes with `prefix_cache_affinity`.
//!
//! A conversation warmed on one engine *behind the proxy's back* (straight
//! to the engine) is sent there by the proxy, which only the engines' own
//! events can tell it; multi-turn traffic follows its cache; a cleared
//! cache empties the index.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pdgate_sim::kvevents::Options;
use pdgate_sim::profile::Profile;
use pdgate_sim::prompt::Tokenizer;
use pdgate_sim::server::{self, Config, Role, Sim};

mod common;
use common::{dist, exchange, get, request, whoami_location, Nginx};

/// A port `p` such that `p`, `p + 1` and `p + 2` are free (the engine, its
/// KV event PUB and its replay socket: `pd_kv_events port=+1 replay_port=+2`).
fn three_ports() -> u16 {
    for _ in 0..200 {
        let p = common::free_port();
        if p < 65000 && (1..=2).all(|i| std::net::TcpListener::bind(("127.0.0.1", p + i)).is_ok()) {
            return p;
        }
    }
    panic!("no three free ports in a row");
}

/// The test model in a directory of the test's own (`tag`): each test
/// removes its own once its nginx stopped.
fn model_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("pdgate-e2e-model-{tag}-{}", std::process::id()));
    pdgate_core::tokenize::testing::write_test_model(&d).expect("test model");
    d
}

fn engine(role: Role, model: &Arc<Tokenizer>, events: bool) -> Arc<Sim> {
    let port = three_ports();
    let mut kv = Options::new(port + 1);
    kv.replay_port = Some(port + 2);
    server::start(Config {
        port,
        quiet: true,
        profile: Profile::instant(),
        tokenizer: Some(model.clone()),
        kv_events: events.then_some(kv),
        ..Config::new(role)
    })
    .expect("simulator listens")
}

fn proxy(prefill: &[&Arc<Sim>], decode: &Arc<Sim>, model: &std::path::Path, kv: &str) -> Nginx {
    let m = dist().join("modules");
    let servers: String =
        prefill.iter().map(|s| format!("        server 127.0.0.1:{};\n", s.cfg.port)).collect();
    Nginx::start("prefix-kv", |port| {
        format!(
            r#"load_module {m}/ngx_http_prefill_module.so;
load_module {m}/ngx_http_upstream_prefix_cache_affinity_module.so;
load_module {m}/ngx_http_upstream_pd_health_module.so;
daemon off;
master_process on;
worker_processes 2;
error_log logs/error.log notice;
pid logs/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    upstream prefill_servers {{
        zone prefill_servers 64k;
{servers}        prefix_cache_affinity on;
        {kv}
    }}
    upstream decode_servers {{ server 127.0.0.1:{d}; }}
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    server {{
        listen 127.0.0.1:{port} reuseport;
        {whoami}
        location ~ ^/v1/(chat/)?completions$ {{
            prefill /prefill_internal;
            pd_tokenizer {model};
            add_header X-Prefill $pd_prefill_addr always;
            add_header X-Input-Tokens $pd_input_tokens always;
            proxy_pass http://decode_servers;
        }}
        location /prefill_internal/ {{
            internal;
            rewrite ^/prefill_internal(/.*)$ $1 break;
            proxy_pass http://prefill_servers;
            subrequest_output_buffer_size 64k;
        }}
        location = /status {{ pd_health_status; }}
        location = /metrics {{ pd_metrics; }}
    }}
}}
"#,
            m = m.display(),
            d = decode.cfg.port,
            model = model.display(),
            whoami = whoami_location(port),
        )
    })
}

/// A conversation: a long system prompt of its own, then `turns` user
/// turns (with the assistant's earlier answers).
fn conversation(id: usize, turns: usize, reorder: bool) -> String {
    let system = format!(
        "You are assistant number {id}. {} Answer briefly.",
        "Read the configuration of the proxy, the balancers and the health checks carefully, then explain each directive. "
            .repeat(4 + id % 3)
    );
    let mut msgs = vec![(String::from("system"), system)];
    for t in 0..turns {
        if t > 0 {
            msgs.push(("assistant".into(), format!("Answer {t} of conversation {id}.")));
        }
        msgs.push(("user".into(), format!("Question {t}: how does the prefill module work?")));
    }
    let list: Vec<String> = msgs
        .iter()
        .map(|(r, c)| {
            let c = serde_json::to_string(c).unwrap();
            if reorder {
                format!(r#"{{"content":{c},"role":"{r}"}}"#)
            } else {
                format!(r#"{{"role":"{r}","content":{c}}}"#)
            }
        })
        .collect();
    format!(r#"{{"model":"m","max_tokens":2,"messages":[{}]}}"#, list.join(","))
}

/// Status and the whole answer (head and body).
fn chat(port: u16, body: &str) -> (u16, String) {
    exchange(
        port,
        &format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
        20,
    )
}

/// A response header's value.
fn header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    answer.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The index's block count of `engine` on the status page.
fn blocks_of(status: &str, engine: u16) -> Option<u64> {
    let needle = format!("peer 127.0.0.1:{engine} kv_events ");
    let line = status.lines().find(|l| l.contains(&needle))?;
    line.split("blocks ").nth(1)?.split(' ').next()?.parse().ok()
}

fn wait_for(what: &str, nginx: &Nginx, mut ok: impl FnMut(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = get(nginx.port, "/status").1;
        if ok(&s) {
            return;
        }
        assert!(Instant::now() < deadline, "{what} never happened:\n{s}\nlog:\n{}", nginx.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Warms each conversation's first turn straight on engine `i % 3` (the
/// proxy never sees it), then sends it through the proxy: how many went to
/// the engine holding them.
fn followed(nginx: &Nginx, engines: &[&Arc<Sim>], n: usize, reorder: bool) -> usize {
    let mut hits = 0;
    for id in 0..n {
        let e = engines[id % engines.len()];
        let body = conversation(20 + 100 * usize::from(reorder) + id, 1, false);
        let before = blocks_of(&get(nginx.port, "/status").1, e.cfg.port).unwrap_or(0);
        assert_eq!(chat(e.cfg.port, &body).0, 200, "warmed on the engine directly");
        wait_for("the engine's blocks in the index", nginx, |s| {
            blocks_of(s, e.cfg.port).is_some_and(|b| b > before)
        });
        let (status, answer) =
            chat(nginx.port, &conversation(20 + 100 * usize::from(reorder) + id, 1, reorder));
        assert_eq!(status, 200, "{answer}");
        let went = header(&answer, "X-Prefill").unwrap_or_default();
        if went == format!("127.0.0.1:{}", e.cfg.port) {
            hits += 1;
        }
    }
    hits
}

#[test]
fn requests_follow_the_blocks_the_engines_report() {
    let dir = model_dir("follow");
    let model = Arc::new(Tokenizer::load(&dir).expect("model loads"));
    let prefills: Vec<Arc<Sim>> = (0..3).map(|_| engine(Role::Prefill, &model, true)).collect();
    let decode = engine(Role::Decode, &model, false);
    let refs: Vec<&Arc<Sim>> = prefills.iter().collect();
    let nginx = proxy(&refs, &decode, &dir, "pd_kv_events port=+1 replay_port=+2;");
    wait_for("three subscriptions", &nginx, |s| {
        prefills.iter().all(|p| blocks_of(s, p.cfg.port).is_some())
    });

    // The proxy counts the model's tokens.
    let (status, answer) = chat(nginx.port, &conversation(0, 1, false));
    assert_eq!(status, 200, "{answer}");
    let counted: u64 = header(&answer, "X-Input-Tokens").and_then(|v| v.parse().ok()).unwrap_or(0);
    let expected =
        model.model.prompt_tokens(conversation(0, 1, false).as_bytes()).unwrap().len() as u64;
    assert_eq!(counted, expected, "$pd_input_tokens is the model's count: {answer}");

    // Conversations warmed behind the proxy's back are sent to their engine,
    // whatever the order of their JSON keys.
    let n = 6;
    let plain = followed(&nginx, &refs, n, false);
    let reordered = followed(&nginx, &refs, n, true);
    eprintln!("warmed on an engine directly, then sent through pdgate: {plain}/{n} went to it, {reordered}/{n} with their JSON keys reordered");
    assert_eq!((plain, reordered), (n, n), "every conversation follows its engine's blocks");

    // Multi-turn: every later turn goes where its conversation is cached
    // and finds its prefix there.
    for id in 10..14 {
        let (_, first) = chat(nginx.port, &conversation(id, 1, false));
        let home = header(&first, "X-Prefill").unwrap_or_default().to_owned();
        for turns in 2..=4 {
            let (status, answer) = chat(nginx.port, &conversation(id, turns, false));
            assert_eq!(status, 200);
            assert_eq!(
                header(&answer, "X-Prefill").unwrap_or_default(),
                home,
                "turn {turns} of {id}"
            );
            assert!(answer.contains("\"cached_tokens\":"), "{answer}");
            assert!(
                !answer.contains("\"cached_tokens\":0"),
                "turn {turns} of {id} found its prefix: {answer}"
            );
        }
    }

    // The index's view on the metrics page.
    let metrics = get(nginx.port, "/metrics").1;
    for p in &prefills {
        let line = format!(
            "pdgate_kv_blocks{{upstream=\"prefill_servers\",peer=\"127.0.0.1:{}\"}} ",
            p.cfg.port
        );
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }

    // An engine that drops its cache drops out of the index.
    let e = &prefills[0];
    assert!(blocks_of(&get(nginx.port, "/status").1, e.cfg.port).unwrap_or(0) > 0);
    let (status, _) = request(
        e.cfg.port,
        "POST /reset_prefix_cache HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        5,
    );
    assert_eq!(status, 200);
    wait_for("the cleared engine's blocks gone", &nginx, |s| blocks_of(s, e.cfg.port) == Some(0));
    // `nginx -s stop` reads the configuration: the model must still be there.
    drop(nginx);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A proxy started after the engines warmed up learns what they cached
/// before from their replay sockets: its first live batch of each engine
/// comes with a sequence number past 0, and the batches before it are
/// asked for and applied first.
#[test]
fn a_late_proxy_replays_what_the_engines_cached_before() {
    let dir = model_dir("replay");
    let model = Arc::new(Tokenizer::load(&dir).expect("model loads"));
    let prefills: Vec<Arc<Sim>> = (0..2).map(|_| engine(Role::Prefill, &model, true)).collect();
    let decode = engine(Role::Decode, &model, false);
    // Three conversations on each engine before any proxy runs.
    for (k, e) in prefills.iter().enumerate() {
        for id in 0..3 {
            assert_eq!(chat(e.cfg.port, &conversation(300 + 10 * k + id, 1, false)).0, 200);
        }
    }
    let refs: Vec<&Arc<Sim>> = prefills.iter().collect();
    let nginx = proxy(&refs, &decode, &dir, "pd_kv_events port=+1 replay_port=+2;");
    wait_for("two subscriptions", &nginx, |s| {
        prefills.iter().all(|p| blocks_of(s, p.cfg.port).is_some())
    });
    // One more batch from each engine: the subscriber sees sequence 3 first.
    for (k, e) in prefills.iter().enumerate() {
        assert_eq!(chat(e.cfg.port, &conversation(390 + k, 1, false)).0, 200);
    }
    wait_for("the replays", &nginx, |s| {
        s.lines().filter(|l| l.contains("kv_events") && l.contains("(replayed 3, lost 0)")).count()
            == 2
    });
    // A conversation cached before the proxy started goes to its engine.
    for (k, e) in prefills.iter().enumerate() {
        for id in 0..3 {
            let (status, answer) = chat(nginx.port, &conversation(300 + 10 * k + id, 1, false));
            assert_eq!(status, 200, "{answer}");
            assert_eq!(
                header(&answer, "X-Prefill").unwrap_or_default(),
                format!("127.0.0.1:{}", e.cfg.port),
                "conversation {id} of engine {k}"
            );
        }
    }
    drop(nginx);
    let _ = std::fs::remove_dir_all(&dir);
}
