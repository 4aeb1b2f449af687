//! engine-sim's vLLM KV cache events end to end (no nginx): a prompt
//! tokenized with the model's chat template is cached under the block
//! hashes the proxy computes for the same body, the engine publishes them
//! on its PUB socket, and `POST /reset_prefix_cache` publishes
//! `AllBlocksCleared`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pdgate_core::kv::events::{self, Event, Shape};
use pdgate_core::kv::hash::{key64, BlockHasher, HashAlgo};
use pdgate_core::tokenize::Model;
use pdgate_sim::kvevents::Options;
use pdgate_sim::profile::Profile;
use pdgate_sim::prompt::Tokenizer;
use pdgate_sim::server::{self, Config, Role, Sim};
use serde_json::Value;

const BS: usize = 4;

fn model_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pdgate-sim-kv-{tag}-{}", std::process::id()));
    pdgate_core::tokenize::testing::write_test_model(&dir).unwrap();
    dir
}

fn sim(tok: Option<&PathBuf>, algo: HashAlgo, seed: &str, shape: Shape) -> Arc<Sim> {
    server::start(Config {
        port: 0,
        quiet: true,
        profile: Profile { block_size: BS, ..Profile::instant() },
        tokenizer: tok.map(|d| Arc::new(Tokenizer::load(d).unwrap())),
        hash_algo: algo,
        hash_seed: Some(seed.into()),
        kv_events: Some(Options {
            replay_port: Some(0),
            topic: "t".into(),
            shape,
            ..Options::new(0)
        }),
        ..Config::new(Role::Both)
    })
    .expect("simulator listens")
}

fn http(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split(' ').nth(1).unwrap().parse().unwrap();
    (status, out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

/// A SUB on the sim's events, joined: resets the prefix cache until an
/// `AllBlocksCleared` arrives, then drains the rest.
fn subscribe(s: &Sim) -> (zmq::Context, zmq::Socket, u64) {
    let port = s.cfg.kv_events.as_ref().unwrap().port;
    let ctx = zmq::Context::new();
    let sub = ctx.socket(zmq::SUB).unwrap();
    sub.set_linger(0).unwrap();
    sub.set_rcvtimeo(10_000).unwrap();
    sub.set_subscribe(b"t").unwrap();
    sub.connect(&format!("tcp://127.0.0.1:{port}")).unwrap();
    let t0 = Instant::now();
    let mut last = None;
    while last.is_none() {
        assert!(t0.elapsed() < Duration::from_secs(10), "the SUB never joined");
        assert_eq!(http(s.cfg.port, "POST", "/reset_prefix_cache", "").0, 200);
        if sub.poll(zmq::POLLIN, 100).unwrap() > 0 {
            last = Some(sub.recv_multipart(0).unwrap());
        }
    }
    while sub.poll(zmq::POLLIN, 300).unwrap() > 0 {
        last = Some(sub.recv_multipart(0).unwrap());
    }
    let f = last.unwrap();
    assert_eq!(events::decode(&f[2]).unwrap().events, [Event::Cleared]);
    (ctx, sub, events::seq(&f[1]).unwrap())
}

fn next(sub: &zmq::Socket, seq: &mut u64) -> Vec<Event> {
    let f = sub.recv_multipart(0).expect("a batch");
    assert_eq!(f[0], b"t");
    *seq += 1;
    assert_eq!(events::seq(&f[1]), Some(*seq), "no gap");
    events::decode(&f[2]).unwrap().events
}

#[test]
fn tokenized_chat_prompt_events_match_the_proxys_keys() {
    let dir = model_dir("chat");
    for (algo, shape) in [(HashAlgo::Sha256Cbor, Shape::Array), (HashAlgo::XxhashCbor, Shape::Map)]
    {
        let s = sim(Some(&dir), algo, "1234", shape);
        let (_ctx, sub, mut seq) = subscribe(&s);
        let body = r#"{"model":"m","max_tokens":2,"messages":[{"role":"system","content":"You are a helpful assistant that answers briefly."},{"role":"user","content":"What is the capital of France, and why?"}]}"#;
        let (status, answer) = http(s.cfg.port, "POST", "/v1/chat/completions", body);
        assert_eq!(status, 200, "{answer}");
        // What the proxy computes for the same body.
        let model = Model::load(&dir).unwrap();
        let ids = model.prompt_tokens(body.as_bytes()).unwrap();
        let proxy = BlockHasher::new(algo, BS, "1234");
        let mut keys = Vec::new();
        proxy.keys(&ids, usize::MAX, &mut keys);
        assert!(keys.len() >= 3, "{} tokens", ids.len());
        let v: Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(v["usage"]["prompt_tokens"], ids.len());

        let ev = next(&sub, &mut seq);
        let [Event::Stored(st)] = ev.as_slice() else { panic!("{ev:?}") };
        assert_eq!(st.parent, None);
        assert_eq!(st.token_ids, ids[..keys.len() * BS]);
        assert_eq!(st.hashes.iter().map(|r| r.key).collect::<Vec<_>>(), keys);
        let mut derived = Vec::new();
        proxy.chain(None, &st.token_ids, &mut derived);
        assert_eq!(st.hashes.iter().map(|r| r.digest.unwrap()).collect::<Vec<_>>(), derived);
        assert_eq!(derived[0].len(), algo.digest_len());

        // The same prompt again is a hit: nothing new to store.
        let (status, answer) = http(s.cfg.port, "POST", "/v1/chat/completions", body);
        assert_eq!(status, 200);
        let v: Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], keys.len() * BS);

        assert_eq!(http(s.cfg.port, "POST", "/reset_prefix_cache", "").0, 200);
        assert_eq!(next(&sub, &mut seq), [Event::Cleared]);
        assert_eq!(http(s.cfg.port, "GET", "/reset_prefix_cache", "").0, 405);

        let (_, page) = http(s.cfg.port, "GET", "/metrics", "");
        let batches = page
            .lines()
            .find(|l| l.starts_with("engine_sim:kv_events_batches_total{"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse::<u64>().ok());
        assert_eq!(batches, Some(seq + 1), "{page}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn byte_tokens_without_a_tokenizer() {
    let s = sim(None, HashAlgo::Sha256Cbor, "0", Shape::Array);
    let (_ctx, sub, mut seq) = subscribe(&s);
    let prompt = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJ"; // 46 bytes: 12 tokens
    let body = format!(r#"{{"prompt":"{prompt}","max_tokens":1}}"#);
    assert_eq!(http(s.cfg.port, "POST", "/v1/completions", &body).0, 200);
    let ev = next(&sub, &mut seq);
    let [Event::Stored(st)] = ev.as_slice() else { panic!("{ev:?}") };
    let ids = pdgate_sim::prompt::byte_tokens(prompt.as_bytes());
    assert_eq!(ids.len(), 12);
    assert_eq!(st.token_ids, ids[..12]);
    let mut keys = Vec::new();
    BlockHasher::new(HashAlgo::Sha256Cbor, BS, "0").keys(&ids, usize::MAX, &mut keys);
    assert_eq!(st.hashes.iter().map(|r| key64(&r.digest.unwrap())).collect::<Vec<_>>(), keys);
}

#[test]
fn a_template_error_is_a_400() {
    let dir = model_dir("bad");
    let s = sim(Some(&dir), HashAlgo::Sha256Cbor, "0", Shape::Array);
    // A token id outside the model's vocabulary: refused, as vLLM does.
    let (status, body) =
        http(s.cfg.port, "POST", "/v1/completions", r#"{"prompt":[999999999],"max_tokens":1}"#);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("out of vocabulary"), "{body}");
    let _ = std::fs::remove_dir_all(&dir);
}
