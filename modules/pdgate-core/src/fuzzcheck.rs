//! Property checks shared by the cargo-fuzz targets under `fuzz/` and the
//! stable unit test that replays `fuzz/corpus/` (so a machine without nightly
//! still runs every committed input through the same assertions).
//!
//! Each function takes arbitrary bytes and panics when a property fails.

use crate::json::{JsonError, Object};
use crate::metrics::UsageScanner;
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

/// `UsageScanner` finds the same counts whether the answer comes whole or in
/// pieces (the first byte seeds where the pieces end), for counts of up to
/// ten digits.
pub fn usage_scanner(data: &[u8]) {
    let Some((&seed, body)) = data.split_first() else { return };
    // The scanner keeps enough bytes across a piece boundary for a key, a
    // colon, a little whitespace and a ten-digit count (`TAIL` in
    // metrics.rs); longer digit or whitespace runs are outside its contract.
    let runs = |f: fn(&u8) -> bool, max: usize| body.split(|b| !f(b)).any(|r| r.len() > max);
    if runs(u8::is_ascii_digit, 10) || runs(u8::is_ascii_whitespace, 4) {
        return;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Replays the committed seed corpus (and any crash inputs saved next to
    /// it) through the same checks the fuzz targets run.
    #[test]
    fn corpus_replays() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
        type Check = fn(&[u8]);
        let targets: [(&str, Check); 4] = [
            ("json", json),
            ("rewrite", rewrite),
            ("usage_scanner", usage_scanner),
            ("cached_tokens", cached_tokens),
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
