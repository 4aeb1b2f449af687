//! End to end, E/P/D: nginx (dist/, built by ./build.sh) with the prefill
//! module's encoder stage (`prefill_encode`) in front of engine simulators
//! playing the encode, prefill and decode roles (or encode + a combined P/D
//! engine). Asserts one encoder request per media item, under the request's
//! id with an item suffix, all in flight together, before a prefill whose KV
//! the decode loads; and that an encoder failure reaches the client as a 502
//! naming the item while no prefill or decode runs.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pdgate_sim::profile::Profile;
use pdgate_sim::server::{self, Config, Faults, Record, Role, Sim};

mod common;
use common::{dist, whoami_location, Nginx};

fn sim(role: Role, faults: Faults) -> Arc<Sim> {
    server::start(Config {
        port: 0,
        engine_id: format!("{role:?}"),
        profile: Profile::instant(),
        seed: 7,
        faults,
        quiet: true,
        ..Config::new(role)
    })
    .expect("simulator listens")
}

/// nginx with `/v1/` running E → P → D and `/pd/v1/` running E → combined
/// P/D (`prefill off`). `prefill` may be `None` when only /pd/ is used.
fn start_nginx(encode: &Sim, prefill: Option<&Sim>, decode: &Sim) -> Nginx {
    let m = dist().join("modules");
    // An unused prefill points at a closed port: any prefill request fails.
    let p = prefill.map_or(1, |p| p.cfg.port);
    let conf = |port: u16| {
        format!(
            r#"load_module {m}/ngx_http_set_request_id_module.so;
load_module {m}/ngx_http_prefill_module.so;
daemon off;
master_process off;
worker_processes 1;
error_log logs/error.log info;
pid logs/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    upstream encode_servers {{ server 127.0.0.1:{e}; keepalive 16; }}
    upstream prefill_servers {{ server 127.0.0.1:{p}; keepalive 8; }}
    upstream decode_servers {{ server 127.0.0.1:{d}; keepalive 8; }}
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    server {{
        listen 127.0.0.1:{port};
        {whoami}
        set_request_id on;
        location ~ ^/v1/(chat/)?completions$ {{
            prefill_encode /encode_internal;
            prefill /prefill_internal;
            proxy_buffering off;
            proxy_pass http://decode_servers;
        }}
        location /pd/ {{
            prefill_encode /encode_internal;
            proxy_buffering off;
            proxy_pass http://decode_servers/;
        }}
        location /encode_internal/ {{
            internal;
            rewrite ^/encode_internal(?:/pd)?(/.*)$ $1 break;
            proxy_pass http://encode_servers;
        }}
        location /prefill_internal/ {{
            internal;
            rewrite ^/prefill_internal(/.*)$ $1 break;
            proxy_pass http://prefill_servers;
            subrequest_output_buffer_size 64k;
        }}
    }}
}}
"#,
            m = m.display(),
            whoami = whoami_location(port),
            e = encode.cfg.port,
            d = decode.cfg.port,
        )
    };
    Nginx::start("epd", conf)
}

/// Status and body of a POST (answers are not chunked: non-streaming).
fn post(port: u16, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut status_line = String::new();
    r.read_line(&mut status_line).unwrap();
    let status: u16 = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        if h.trim().is_empty() {
            break;
        }
    }
    let mut body = Vec::new();
    r.read_to_end(&mut body).unwrap();
    (status, String::from_utf8(body).unwrap())
}

/// A simulator's journal once it has `n` records.
fn journal(sim: &Sim, n: usize) -> Vec<Record> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let j = sim.journal();
        if j.len() >= n || Instant::now() > deadline {
            return j;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A chat request with `images` image parts and one audio part around text.
fn multimodal(images: usize) -> String {
    let mut parts = vec![r#"{"type":"text","text":"describe these"}"#.to_owned()];
    for i in 0..images {
        parts.push(format!(
            r#"{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{}"}}}}"#,
            format!("iVBOR{i}").repeat(20)
        ));
    }
    parts.push(r#"{"type":"input_audio","input_audio":{"data":"UklGRg==","format":"wav"}}"#.into());
    format!(
        r#"{{"model":"sim","messages":[{{"role":"system","content":"be brief"}},{{"role":"user","content":[{}]}}],"max_tokens":6,"ignore_eos":true}}"#,
        parts.join(",")
    )
}

#[test]
fn encoder_gets_one_request_per_item_then_prefill_and_decode_run() {
    let e = sim(Role::Encode, Faults::default());
    let p = sim(Role::Prefill, Faults::default());
    let d = sim(Role::Decode, Faults::default());
    let ngx = start_nginx(&e, Some(&p), &d);
    for round in 0..3 {
        let (status, answer) = post(ngx.port, "/v1/chat/completions", &multimodal(2));
        assert_eq!(status, 200, "{answer}");
        let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(v["usage"]["completion_tokens"], 6);
        let (ej, pj, dj) =
            (journal(&e, 3 * (round + 1)), journal(&p, round + 1), journal(&d, round + 1));
        assert_eq!((ej.len(), pj.len(), dj.len()), (3 * (round + 1), round + 1, round + 1));
        // This round's request id, as the prefill and the decode saw it.
        let id = &dj[round].request_id;
        assert_eq!(&pj[round].request_id, id);
        assert_eq!(id.len(), 36, "{id}");
        let mut enc_ids: Vec<&str> =
            ej[3 * round..].iter().map(|r| r.request_id.as_str()).collect();
        enc_ids.sort();
        assert_eq!(enc_ids, [format!("{id}-enc0"), format!("{id}-enc1"), format!("{id}-enc2")]);
        // Each encoder request holds one media item and no text: 576 tokens
        // for the item plus "user: \n" (the simulator's token rule).
        assert!(
            ej[3 * round..].iter().all(|r| r.output_tokens == 1 && r.prompt_tokens == 578),
            "{ej:?}"
        );
        // The prefill and decode saw the whole prompt: 3 items and the text.
        assert!(pj[round].prompt_tokens > 3 * 576, "{pj:?}");
        assert_eq!(pj[round].kv, "held");
        assert_eq!(dj[round].kv, "loaded");
    }
    assert_eq!(d.metrics.kv_recomputes.load(Relaxed), 0);
}

#[test]
fn a_text_only_request_skips_the_encoder() {
    let e = sim(Role::Encode, Faults::default());
    let p = sim(Role::Prefill, Faults::default());
    let d = sim(Role::Decode, Faults::default());
    let ngx = start_nginx(&e, Some(&p), &d);
    let (status, answer) = post(
        ngx.port,
        "/v1/chat/completions",
        r#"{"model":"sim","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],"max_tokens":3}"#,
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(journal(&d, 1).len(), 1);
    assert_eq!(journal(&p, 1).len(), 1);
    assert!(e.journal().is_empty());
}

#[test]
fn encoder_then_a_combined_pd_engine_when_prefill_is_off() {
    let e = sim(Role::Encode, Faults::default());
    let pd = sim(Role::Both, Faults::default());
    let ngx = start_nginx(&e, None, &pd);
    let (status, answer) = post(ngx.port, "/pd/v1/chat/completions", &multimodal(1));
    assert_eq!(status, 200, "{answer}");
    let (ej, dj) = (journal(&e, 2), journal(&pd, 1));
    assert_eq!((ej.len(), dj.len()), (2, 1));
    assert!(ej.iter().all(|r| r.request_id.starts_with(&dj[0].request_id)));
    assert_eq!(dj[0].kv, "local");
}

#[test]
fn encoder_requests_run_concurrently() {
    // Every encoder answer takes 300 ms; four items sequentially would
    // take 1.2 s.
    let e = sim(Role::Encode, Faults { latency_ms: 300, ..Faults::default() });
    let p = sim(Role::Prefill, Faults::default());
    let d = sim(Role::Decode, Faults::default());
    let ngx = start_nginx(&e, Some(&p), &d);
    let t0 = Instant::now();
    let (status, answer) = post(ngx.port, "/v1/chat/completions", &multimodal(3));
    let took = t0.elapsed();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(journal(&e, 4).len(), 4);
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(
        took < Duration::from_millis(600),
        "the encoder requests ran one after another: {took:?}"
    );
}

#[test]
fn an_encoder_failure_is_a_502_naming_the_item_and_nothing_else_runs() {
    let e = sim(Role::Encode, Faults { error_rate: 1.0, error_status: 500, ..Faults::default() });
    let p = sim(Role::Prefill, Faults::default());
    let d = sim(Role::Decode, Faults::default());
    let ngx = start_nginx(&e, Some(&p), &d);
    let (status, body) = post(ngx.port, "/v1/chat/completions", &multimodal(0));
    assert_eq!(status, 502, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["error"]["message"],
        "encoding media item 0 (input_audio) failed: the encoder answered 500: injected fault"
    );
    assert_eq!(v["error"]["type"], "BadGatewayError");
    std::thread::sleep(Duration::from_millis(100));
    assert!(p.journal().is_empty() && d.journal().is_empty());
    assert_eq!(e.metrics.requests_error.load(Relaxed), 1);
    let log = std::fs::read_to_string(ngx.dir.join("logs/error.log")).unwrap();
    assert!(
        log.contains("[error]") && log.contains("encoding media item 0 (input_audio) failed"),
        "{log}"
    );
}
