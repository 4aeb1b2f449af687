//! What a P/D pair of simulators reports in `usage`, driven directly (no
//! proxy): the decode counts the prompt tokens whose KV it got from the
//! prefill as cached (vLLM with NIXL: all but the last; none when it had to
//! recompute, beyond its own prefix-cache hits), in JSON answers and in the
//! final SSE usage chunk; the prefill counts its own prefix-cache hits.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use pdgate_sim::profile::Profile;
use pdgate_sim::server::{self, Config, Role, Sim};
use serde_json::{json, Value};

fn sim(role: Role) -> Arc<Sim> {
    server::start(Config {
        port: 0,
        engine_id: format!("{role:?}"),
        profile: Profile::instant(),
        quiet: true,
        ..Config::new(role)
    })
    .expect("simulator listens")
}

/// Posts `body` with request id `rid`; returns the status and the body.
fn post(port: u16, rid: &str, body: &Value) -> (u16, String) {
    let body = body.to_string();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: t\r\nX-Request-Id: {rid}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split(' ').nth(1).unwrap().parse().unwrap();
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// The `usage` of a JSON answer, or of the last SSE chunk that has one.
fn usage(body: &str) -> Value {
    if let Ok(v) = serde_json::from_str::<Value>(body) {
        return v["usage"].clone();
    }
    // SSE events, one `data:` line each, inside the chunked encoding.
    body.lines()
        .filter_map(|l| l.trim_end().strip_prefix("data: "))
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .rfind(|v| v["usage"].is_object())
        .map(|v| v["usage"].clone())
        .unwrap_or(Value::Null)
}

/// A 50-token prompt (200 bytes), the same for every request.
fn request(extra: Value) -> Value {
    let mut v = json!({"prompt": "y".repeat(200), "max_tokens": 3, "ignore_eos": true});
    if let (Value::Object(o), Value::Object(e)) = (&mut v, extra) {
        o.extend(e);
    }
    v
}

/// Runs the prefill leg; returns its usage and the kv_transfer_params.
fn prefill(p: &Sim, rid: &str) -> (Value, Value) {
    let (st, body) = post(
        p.cfg.port,
        rid,
        &request(json!({"max_tokens": 1, "kv_transfer_params": {"do_remote_decode": true}})),
    );
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    (v["usage"].clone(), v["kv_transfer_params"].clone())
}

#[test]
fn the_decode_counts_the_prompt_it_got_from_the_prefill_as_cached() {
    let p = sim(Role::Prefill);
    let d = sim(Role::Decode);
    for (i, stream) in [(0, false), (1, true)] {
        let rid = format!("usage-{i}");
        let (_, kv) = prefill(&p, &rid);
        let mut req = request(json!({"kv_transfer_params": kv}));
        if stream {
            req["stream"] = json!(true);
            req["stream_options"] = json!({"include_usage": true});
        }
        let (st, body) = post(d.cfg.port, &rid, &req);
        assert_eq!(st, 200, "{body}");
        let u = usage(&body);
        assert_eq!(u["prompt_tokens"], 50, "stream {stream}: {body}");
        assert_eq!(u["prompt_tokens_details"]["cached_tokens"], 49, "stream {stream}: {body}");
        assert_eq!(u["completion_tokens"], 3, "stream {stream}: {body}");
    }
}

#[test]
fn a_decode_that_recomputes_reports_nothing_cached() {
    // Prompts it has never seen (its own prefix cache would count, as
    // vLLM's does, for a prompt it computed before).
    let d = sim(Role::Decode);
    for (stream, text) in [(false, "a"), (true, "b")] {
        let mut req = request(json!({"prompt": text.repeat(200)}));
        if stream {
            req["stream"] = json!(true);
            req["stream_options"] = json!({"include_usage": true});
        }
        let (st, body) = post(d.cfg.port, "no-handoff", &req);
        assert_eq!(st, 200, "{body}");
        assert_eq!(usage(&body)["prompt_tokens_details"]["cached_tokens"], 0, "{body}");
    }
}

#[test]
fn the_prefill_reports_its_own_prefix_cache_hits() {
    let p = sim(Role::Prefill);
    // First time: nothing cached. Second time (the KV of the first was
    // fetched by nobody, but its blocks are in the prefix cache): the three
    // full 16-token blocks of the 50-token prompt.
    let (u1, _) = prefill(&p, "p-1");
    assert_eq!(u1["prompt_tokens_details"]["cached_tokens"], 0);
    let (u2, _) = prefill(&p, "p-2");
    assert_eq!(u2["prompt_tokens_details"]["cached_tokens"], 48);
}
