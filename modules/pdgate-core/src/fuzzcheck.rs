//! Property checks shared by the cargo-fuzz targets under `fuzz/` and the
//! stable unit test that replays `fuzz/corpus/` (so a machine without nightly
//! still runs every committed input through the same assertions).
//!
//! Each function takes arbitrary bytes and panics when a property fails.

use crate::bootstrap::{bootstrap_members, leg_plan, Leg, PROXY_OWNED};
use crate::encode::{encode_plan, error_detail, media_items, MEDIA_TYPES};
use crate::json::{JsonError, Object};
use crate::metrics::UsageScanner;
use crate::prom::{samples, EngineLoad};
use crate::rewrite::{decode_plan, prefill_plan, Endpoint, PrefillOptions, StreamOps, PD_RESERVED};
use crate::usage::CachedTokens;
use serde_json::value::RawValue;
use std::collections::HashMap;

/// The scanner accepts exactly the objects serde_json accepts (within our
/// bounds), and every member's key and value agree with serde_json's.
pub fn json(data: &[u8]) {
    let ours = Object::parse(data);
    // `Value`, not `RawValue`: only decoding strings checks surrogate pairs
    // (serde_json's skipping path lets `\ude00` alone through).
    let theirs = serde_json::from_slice::<serde_json::Value>(data);
    if let Err(JsonError::TooDeep { .. } | JsonError::TooManyMembers { .. }) = ours {
        return;
    }
    if let Err(e) = &theirs {
        // Valid JSON that serde_json cannot hold (a number beyond f64).
        let msg = e.to_string();
        if msg.contains("recursion limit") || msg.contains("number out of range") {
            return;
        }
    }
    let theirs_obj = matches!(&theirs, Ok(serde_json::Value::Object(_)));
    assert_eq!(ours.is_ok(), theirs_obj, "accept/reject differs: {ours:?} vs {theirs:?}");
    let Ok(o) = ours else { return };
    let map: HashMap<String, &RawValue> = match serde_json::from_slice(data) {
        Ok(m) => m,
        // serde_json's own map needs more stack than its validator; skip.
        Err(e) if e.to_string().contains("recursion limit") => return,
        Err(e) => panic!("serde_json rejects as a map what it accepts as a value: {e}"),
    };
    let mut distinct = std::collections::HashSet::new();
    for m in &o.members {
        let key: String = serde_json::from_slice(&data[m.key.clone()]).expect("key range");
        assert!(o.key_is(m, &key), "key_is fails on its own key {key:?}");
        assert_eq!(m.key_escaped, data[m.key.clone()].contains(&b'\\'));
        let _: &RawValue = serde_json::from_slice(&data[m.value.clone()]).expect("value range");
        distinct.insert(key);
    }
    assert_eq!(distinct.len(), map.len(), "distinct keys");
    for (k, v) in &map {
        assert_eq!(o.get(k), Some(v.get().as_bytes()), "value of {k:?}");
    }
}

/// Decoded top-level keys of a rewritten body, which must be an object.
fn out_keys(out: &[u8]) -> Vec<(String, String)> {
    // `RawValue`: a client's number beyond f64 is valid JSON all the same.
    let _: &RawValue = serde_json::from_slice(out).expect("plan output is JSON");
    let o = Object::parse(out).expect("plan output is an object");
    o.members
        .iter()
        .map(|m| {
            let k = serde_json::from_slice(&out[m.key.clone()]).expect("key");
            (k, String::from_utf8_lossy(&out[m.value.clone()]).into_owned())
        })
        .collect()
}

/// The vLLM prefill and decode bodies of any object: valid JSON objects with
/// one output token and no streaming on the prefill leg, and no reserved key
/// from the client on either. The first byte picks the options.
pub fn rewrite(data: &[u8]) {
    let Some((&opt, body)) = data.split_first() else { return };
    let Ok(obj) = Object::parse(body) else { return };
    let kv = opt & 1 != 0;
    let endpoint = if opt & 2 != 0 { Endpoint::Chat } else { Endpoint::Completions };
    let out = prefill_plan(&obj, PrefillOptions { endpoint, kv_transfer_params: kv }).to_vec(body);
    let keys = out_keys(&out);
    let count = |name: &str| keys.iter().filter(|(k, _)| k == name).count();
    let value = |name: &str| keys.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    assert_eq!(count("stream"), 1);
    assert_eq!(value("stream").as_deref(), Some("false"));
    assert_eq!(count("stream_options") + count("min_tokens") + count("min_completion_tokens"), 0);
    let maxes = count("max_tokens") + count("max_completion_tokens");
    assert!((1..=2).contains(&maxes), "{maxes} max-token keys");
    for k in ["max_tokens", "max_completion_tokens"] {
        assert!(count(k) <= 1);
        if let Some(v) = value(k) {
            assert_eq!(v, "1", "{k}");
        }
    }
    for k in PD_RESERVED {
        let want = usize::from(kv && *k == "kv_transfer_params");
        assert_eq!(count(k), want, "prefill {k}");
    }
    let ops = [StreamOps::Off, StreamOps::SetOpt, StreamOps::Add][usize::from(opt >> 2) % 3];
    let params: &[u8] = br#"{"remote_engine_id":"e","remote_block_ids":[1]}"#;
    let kv_in = if opt & 32 != 0 { Some(params) } else { None };
    let out = decode_plan(&obj, kv_in, ops).to_vec(body);
    let keys = out_keys(&out);
    let count = |name: &str| keys.iter().filter(|(k, _)| k == name).count();
    for k in PD_RESERVED {
        let want = usize::from(kv_in.is_some() && *k == "kv_transfer_params");
        assert_eq!(count(k), want, "decode {k}");
    }
}

/// The SGLang bootstrap leg bodies of any object: valid JSON objects that
/// keep every client member but the proxy-owned ones (and, on the prefill,
/// `stream`/`stream_options`) in order with their bytes unchanged, then the
/// proxy's own `bootstrap_*` members exactly once. The first byte picks the
/// host (one that needs escaping, or not), port and room.
pub fn bootstrap(data: &[u8]) {
    let Some((&opt, body)) = data.split_first() else { return };
    let Ok(obj) = Object::parse(body) else { return };
    let host = if opt & 1 != 0 { "10.0.0.1" } else { "h\"\\\u{1}\u{e9}" };
    let port = u16::from(opt) * 257;
    let room = u64::from(opt).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let members = bootstrap_members(host, port, room);
    let input: Vec<(String, String)> = obj
        .members
        .iter()
        .map(|m| {
            let k = serde_json::from_slice(&body[m.key.clone()]).expect("key");
            (k, String::from_utf8_lossy(&body[m.value.clone()]).into_owned())
        })
        .collect();
    for leg in [Leg::Prefill, Leg::Decode] {
        let plan = leg_plan(&obj, members.as_bytes(), leg);
        let out = plan.to_vec(body);
        assert_eq!(out.len(), plan.len(), "plan length");
        let keys = out_keys(&out);
        let dropped = |k: &str| {
            PROXY_OWNED.contains(&k)
                || (leg == Leg::Prefill && (k == "stream" || k == "stream_options"))
        };
        let kept: Vec<_> = input.iter().filter(|(k, _)| !dropped(k)).cloned().collect();
        let extra = if leg == Leg::Prefill { 4 } else { 3 };
        assert_eq!(keys.len(), kept.len() + extra, "{leg:?} member count");
        assert_eq!(keys[..kept.len()], kept[..], "{leg:?} client members");
        let tail: Vec<&str> = keys[kept.len()..].iter().map(|(k, _)| k.as_str()).collect();
        let mut want = vec!["bootstrap_host", "bootstrap_port", "bootstrap_room"];
        if leg == Leg::Prefill {
            want.insert(0, "stream");
            assert_eq!(keys[kept.len()].1, "false");
        }
        assert_eq!(tail, want, "{leg:?} proxy members");
        // Raw values: a client's number beyond f64 is valid JSON all the same.
        let v: HashMap<String, &RawValue> = serde_json::from_slice(&out).expect("leg JSON");
        let host_out: String = serde_json::from_str(v["bootstrap_host"].get()).expect("host");
        assert_eq!(host_out, host, "host round-trips");
        assert_eq!(v["bootstrap_port"].get(), port.to_string());
        assert_eq!(v["bootstrap_room"].get(), room.to_string());
    }
}

/// The media items `media_items` finds are those serde_json sees in the
/// request (each `messages[i].content[j]` object whose `type` is a media
/// type, the last of duplicate keys winning as in serde_json), and each
/// item's encoder body is valid JSON carrying exactly that part, one output
/// token and no stream. Also: `error_detail` never panics on any answer.
pub fn encode(data: &[u8]) {
    let _ = error_detail(data);
    let Ok(obj) = Object::parse(data) else { return };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let mut want = Vec::new();
    if let Some(msgs) = v.get("messages").and_then(serde_json::Value::as_array) {
        for (mi, msg) in msgs.iter().enumerate() {
            let Some(parts) = msg.get("content").and_then(serde_json::Value::as_array) else {
                continue;
            };
            for part in parts {
                let Some(ty) = part.get("type").and_then(serde_json::Value::as_str) else {
                    continue;
                };
                if MEDIA_TYPES.contains(&ty) {
                    want.push((ty.to_owned(), mi, part.clone()));
                }
            }
        }
    }
    let items = media_items(&obj);
    assert_eq!(items.len(), want.len(), "media item count");
    for (item, (ty, mi, part)) in items.iter().zip(&want) {
        assert_eq!((item.kind, item.message), (ty.as_str(), *mi), "item kind/message");
        let ours: serde_json::Value =
            serde_json::from_slice(&data[item.part.clone()]).expect("part");
        assert_eq!(&ours, part, "item bytes");
    }
    for item in items.iter().take(4) {
        let plan = encode_plan(&obj, item);
        let out = plan.to_vec(data);
        let e: serde_json::Value = serde_json::from_slice(&out).expect("encoder body is JSON");
        assert_eq!(e["messages"].as_array().map(Vec::len), Some(1));
        assert_eq!(e["messages"][0]["role"], "user");
        assert_eq!(e["messages"][0]["content"].as_array().map(Vec::len), Some(1));
        assert_eq!(e["messages"][0]["content"][0]["type"], item.kind);
        assert_eq!(e["stream"], false);
        assert_eq!(e["max_tokens"], 1);
        assert_eq!(e["max_completion_tokens"], 1);
        for k in ["model", "mm_processor_kwargs", "media_io_kwargs"] {
            assert_eq!(e.get(k), v.get(k), "kept member {k}");
        }
    }
}

/// A health probe's answer, read as it arrives: no panic; a status code only
/// from a whole `HTTP/1.x NNN` line (code 100-599, a line end present); a
/// verdict never changes once given (more bytes cannot turn an invalid or
/// complete line into something else).
pub fn health_status(data: &[u8]) {
    use crate::health::{status_line, StatusLine};
    let whole = status_line(data);
    if let StatusLine::Code(c) = whole {
        assert!((100..=599).contains(&c));
        assert!(data.starts_with(b"HTTP/1.0 ") || data.starts_with(b"HTTP/1.1 "));
        assert!(data.contains(&b'\n'));
        assert_eq!(data[9..12].iter().fold(0u16, |a, &d| a * 10 + u16::from(d - b'0')), c);
    }
    // (A verdict is reached within the first 1,025 bytes.)
    for cut in 0..data.len().min(1100) {
        match status_line(&data[..cut]) {
            StatusLine::Partial => {}
            decided => assert_eq!(decided, whole, "a verdict at {cut} bytes changed"),
        }
    }
}

/// An engine's `/metrics` text: read without a panic; every sample found
/// re-reads the same from its canonical rendering; every label value
/// unescapes and escapes back to its raw bytes.
pub fn prom(data: &[u8]) {
    let load = EngineLoad::read(data, None);
    let _ = EngineLoad::read(data, Some("m"));
    let mut canonical = Vec::new();
    let mut found = Vec::new();
    let mut bad = 0u32;
    for s in samples(data) {
        let Ok(s) = s else {
            bad += 1;
            continue;
        };
        assert!(!s.name.is_empty() && !s.name.as_bytes()[0].is_ascii_digit(), "name {:?}", s.name);
        let value = if s.value.is_nan() {
            "NaN".to_owned()
        } else if s.value.is_infinite() {
            if s.value > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
        } else {
            format!("{:?}", s.value)
        };
        canonical.extend_from_slice(s.name.as_bytes());
        canonical.push(b'{');
        canonical.extend_from_slice(s.labels);
        canonical.extend_from_slice(b"} ");
        canonical.extend_from_slice(value.as_bytes());
        canonical.push(b'\n');
        found.push(s);
        if let Ok(raw) = std::str::from_utf8(s.labels) {
            let mut rest = raw;
            let mut seen = Vec::new();
            while let Some(eq) = rest.find("=\"") {
                let key = rest[..eq].trim_start_matches([',', ' ', '\t']).trim();
                let after = &rest[eq + 2..];
                // The value's end: the first quote not escaped.
                let mut end = 0;
                let b = after.as_bytes();
                while b[end] != b'"' {
                    end += if b[end] == b'\\' { 2 } else { 1 };
                }
                // label() gives the first of duplicate names.
                if !seen.contains(&key) {
                    let v = s.label(key).expect("a label the parser accepted");
                    let escaped = v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
                    assert_eq!(escaped, &after[..end], "label {key}");
                    seen.push(key);
                }
                rest = &after[end + 1..];
            }
        }
    }
    assert_eq!(load.bad_lines, bad);
    // As a scrape's answer (the bytes themselves, and as a 200's body),
    // published in an engine row and read back as balancers read it.
    let _ = crate::engine::read_answer(data, Some("m"));
    let mut answer = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n".to_vec();
    answer.extend_from_slice(data);
    match crate::engine::read_answer(&answer, None) {
        Ok(l) => {
            assert_eq!(l, load, "the body of a scrape reads as the text alone");
            let row = crate::engine::EngineRow::default();
            let conf = crate::engine::MetricsConf::default();
            row.store(&l, (0, 0), 1_000, 1, &conf);
            let v = row.view(1_000);
            let n = |x: Option<f64>| x.map_or(0, |x| x.round().min(1e15) as u64);
            assert!(v.fresh);
            assert_eq!(v.requests, n(l.running).saturating_add(n(l.waiting)));
            let permille = l.kv_usage.map_or(0.0, |k| (k.clamp(0.0, 1.0) * 1000.0).round());
            assert_eq!(v.pressured, permille >= 950.0);
        }
        Err(e) => {
            let none = load.running.is_none() && load.waiting.is_none() && load.kv_usage.is_none();
            assert!(none, "a 200 with load metrics is refused: {e:?}");
        }
    }
    let again: Vec<_> = samples(&canonical).collect();
    assert_eq!(again.len(), found.len(), "canonical lines");
    for (a, b) in again.iter().zip(&found) {
        let a = a.as_ref().expect("a canonical line parses");
        assert_eq!((a.name, a.labels), (b.name, b.labels));
        assert!(a.value == b.value || (a.value.is_nan() && b.value.is_nan()), "value");
    }
}

/// `UsageScanner` finds the same counts whether the answer comes whole or in
/// pieces (the first byte seeds where the pieces end).
pub fn usage_scanner(data: &[u8]) {
    let Some((&seed, body)) = data.split_first() else { return };
    let mut whole = UsageScanner::default();
    whole.feed(body);
    let mut split = UsageScanner::default();
    let mut rest = body;
    let mut s = u32::from(seed) | 1;
    while !rest.is_empty() {
        s = s.wrapping_mul(1_103_515_245).wrapping_add(12345);
        let n = 1 + (s >> 16) as usize % 40;
        let (piece, tail) = rest.split_at(n.min(rest.len()));
        split.feed(piece);
        rest = tail;
    }
    let counts = |u: &UsageScanner| (u.prompt, u.completion, u.total);
    assert_eq!(counts(&whole), counts(&split), "whole vs pieces");
}

/// `CachedTokens` keeps the length, and valid JSON stays valid JSON.
pub fn cached_tokens(data: &[u8]) {
    let Some((&seed, body)) = data.split_first() else { return };
    let was_json = serde_json::from_slice::<&RawValue>(body).is_ok();
    let mut out = body.to_vec();
    let mut c = CachedTokens::new(u64::from(seed) * 37);
    let mut at = 0;
    let step = 1 + usize::from(seed % 17);
    while at < out.len() {
        let end = (at + step).min(out.len());
        c.feed(&mut out[at..end]);
        at = end;
    }
    assert_eq!(out.len(), body.len());
    if was_json {
        assert!(serde_json::from_slice::<&RawValue>(&out).is_ok(), "valid JSON became invalid");
    }
}

/// A vLLM KV event batch (msgpack): decoding never panics, and a batch that
/// decodes re-encodes, in either shape, to bytes that decode to the same
/// batch (less the events skipped for an unknown tag); with int hashes, to
/// the same keys.
pub fn kv_events(data: &[u8]) {
    use crate::kv::events::{decode, encode_batch, encode_batch_with, Event, HashForm, Shape};
    let Ok(b) = decode(data) else { return };
    // Our encoding adds at most a few values per event (map keys, fields
    // vLLM may leave out): far from MAX_VALUES for inputs below this.
    if data.len() > crate::kv::events::MAX_VALUES / 16 {
        return;
    }
    let keys = |b: &crate::kv::events::Batch| -> Vec<u64> {
        let mut k = Vec::new();
        for e in &b.events {
            match e {
                Event::Stored(s) => k.extend(s.hashes.iter().chain(&s.parent).map(|r| r.key)),
                Event::Removed { hashes, .. } => k.extend(hashes.iter().map(|r| r.key)),
                Event::Cleared => {}
            }
        }
        k
    };
    for shape in [Shape::Map, Shape::Array] {
        let again = decode(&encode_batch(&b, shape)).expect("our own encoding decodes");
        assert_eq!(again.ts.to_bits(), b.ts.to_bits(), "{shape:?} ts");
        assert_eq!(again.events, b.events, "{shape:?} events");
        assert_eq!((again.dp_rank, again.unknown), (b.dp_rank, 0), "{shape:?}");
        let ints = decode(&encode_batch_with(&b, shape, HashForm::Int)).expect("int hashes decode");
        assert_eq!(keys(&ints), keys(&b), "{shape:?} int keys");
    }
}

/// A request body through the test model's tokenizer and chat template
/// (`pd_tokenizer`'s per-request path): never a panic; a body it takes is
/// a JSON object, and the same body gives the same tokens again.
pub fn prompt(data: &[u8]) {
    use std::sync::OnceLock;
    static MODEL: OnceLock<crate::tokenize::Model> = OnceLock::new();
    let model = MODEL.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("pdgate-fuzz-model-{}", std::process::id()));
        crate::tokenize::testing::write_test_model(&dir).expect("test model written");
        let m = crate::tokenize::Model::load(&dir).expect("test model loads");
        let _ = std::fs::remove_dir_all(&dir);
        m
    });
    let Ok(ids) = model.prompt_tokens(data) else { return };
    assert!(Object::parse(data).is_ok(), "a body that is no JSON object was tokenized");
    assert_eq!(model.prompt_tokens(data).ok(), Some(ids), "the same body, other tokens");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replays the committed seed corpus (and any crash inputs saved next to
    /// it) through the same checks the fuzz targets run.
    #[test]
    fn corpus_replays() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
        type Check = fn(&[u8]);
        let targets: [(&str, Check); 10] = [
            ("health_status", health_status),
            ("prom", prom),
            ("json", json),
            ("rewrite", rewrite),
            ("bootstrap", bootstrap),
            ("encode", encode),
            ("usage_scanner", usage_scanner),
            ("cached_tokens", cached_tokens),
            ("kv_events", kv_events),
            ("prompt", prompt),
        ];
        for (name, check) in targets {
            let dir = root.join(name);
            let mut n = 0;
            for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir:?}: {e}")) {
                let path = entry.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                let r = std::panic::catch_unwind(|| check(&data));
                assert!(r.is_ok(), "{name}: {path:?} fails");
                n += 1;
            }
            assert!(n > 0, "{name}: empty corpus");
        }
    }
}
