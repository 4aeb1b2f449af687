//! The encoder stage of E/P/D (encode → prefill → decode) disaggregation,
//! free of nginx types.
//!
//! A chat request whose `messages` carry media parts (`image_url`,
//! `audio_url`, `input_audio`, `video_url`) is first sent to an encoder
//! engine once per media item, all items at once; the prefill (or the
//! combined P/D engine) starts when every encoder answered 2xx. As in vLLM's
//! `disagg_epd_proxy`, nothing of an encoder's answer is passed on: the
//! encoder stores the item's embedding in the shared encoder cache under a
//! hash of the item's content, and the prefill engine finds it there by
//! hashing the same item in the unchanged request.
//!
//! [`media_items`] finds the items, [`encode_plan`] builds the body of one
//! item's encoder request as a splice plan over the client body (the item's
//! bytes are referenced, not copied), and [`FanOut`] counts the answers and
//! decides when the main request goes on.

use std::fmt;
use std::ops::Range;

use crate::json::Object;
use crate::rewrite::{Piece, Plan};

/// Content-part types that go to the encoder. The first three are vLLM's
/// `MM_TYPES`; `video_url` is vLLM's video part, encoded the same way.
pub const MEDIA_TYPES: &[&str] = &["image_url", "audio_url", "input_audio", "video_url"];

/// Top-level members of the client request an encoder request keeps: the
/// model, and the two parameters that change what the encoder computes for
/// an item (and so the key of its cache entry). Everything about the answer
/// (sampling, tools, streaming, limits) is the prefill's and decode's.
pub const KEPT_MEMBERS: &[&str] = &["model", "mm_processor_kwargs", "media_io_kwargs"];

/// Default of `prefill_encode_max_items`.
pub const DEFAULT_MAX_ITEMS: usize = 32;
/// Largest accepted `prefill_encode_max_items`.
pub const MAX_MAX_ITEMS: usize = 1024;

/// One media part of the request's messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaItem {
    /// Its `type`, one of [`MEDIA_TYPES`].
    pub kind: &'static str,
    /// The part object's bytes in the client body.
    pub part: Range<usize>,
    /// Index of the message it is in.
    pub message: usize,
}

/// Every media part in `messages`, in order (message by message, part by
/// part). Text parts, string contents and anything malformed are skipped:
/// validating the chat schema is the engine's job.
pub fn media_items(obj: &Object<'_>) -> Vec<MediaItem> {
    let src = obj.src();
    let Some(m) = obj.members.iter().rev().find(|m| obj.key_is(m, "messages")) else {
        return Vec::new();
    };
    let mut items = Vec::new();
    for (mi, msg) in array_elements(src, m.value.clone()).into_iter().enumerate() {
        let Some(content) = member(src, msg, "content") else { continue };
        for part in array_elements(src, content) {
            let Some(ty) = member(src, part.clone(), "type") else { continue };
            if let Some(kind) = MEDIA_TYPES.iter().find(|t| string_is(&src[ty.clone()], t)) {
                items.push(MediaItem { kind, part, message: mi });
            }
        }
    }
    items
}

/// The body of the encoder request for `item`:
/// `{<kept members>,"messages":[{"role":"user","content":[<item>]}],`
/// `"stream":false,"max_tokens":1,"max_completion_tokens":1}`.
///
/// One user message holding only the item (no text, so the encoder runs
/// only its media path), one output token, no stream.
pub fn encode_plan<'a>(obj: &Object<'_>, item: &MediaItem) -> Plan<'a> {
    let mut pieces = vec![Piece::Lit("{")];
    for m in &obj.members {
        if KEPT_MEMBERS.iter().any(|k| obj.key_is(m, k)) {
            pieces.push(Piece::Src(m.key.start..m.value.end));
            pieces.push(Piece::Lit(","));
        }
    }
    pieces.push(Piece::Lit("\"messages\":[{\"role\":\"user\",\"content\":["));
    pieces.push(Piece::Src(item.part.clone()));
    pieces.push(Piece::Lit("]}],\"stream\":false,\"max_tokens\":1,\"max_completion_tokens\":1}"));
    Plan { pieces }
}

/// The `X-Request-Id` of item `k`'s encoder request: the request's id with
/// an item suffix, `<id>-enc<k>`.
pub fn item_request_id(id: &[u8], k: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(id.len() + 8);
    v.extend_from_slice(id);
    v.extend_from_slice(format!("-enc{k}").as_bytes());
    v
}

/// Why an encoder request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncodeFailure {
    /// The encoder answered with a non-2xx status (and maybe an error message).
    Status { status: u16, detail: Option<String> },
    /// Connect, send or read timed out (`proxy_*_timeout`).
    Timeout,
    /// No encoder server could be reached.
    Unreachable,
    /// The subrequest ended with another nginx status (e.g. 404: no such
    /// internal location), or an internal nginx error (`None`).
    Internal(Option<i64>),
}

impl fmt::Display for EncodeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeFailure::Status { status, detail: Some(d) } => {
                write!(f, "the encoder answered {status}: {d}")
            }
            EncodeFailure::Status { status, detail: None } => {
                write!(f, "the encoder answered {status}")
            }
            EncodeFailure::Timeout => f.write_str("the encoder timed out"),
            EncodeFailure::Unreachable => f.write_str("the encoder is unreachable"),
            EncodeFailure::Internal(Some(s)) => {
                write!(f, "the encode subrequest failed with status {s}")
            }
            EncodeFailure::Internal(None) => f.write_str("the encode subrequest failed"),
        }
    }
}

/// How one encoder request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncodeOutcome {
    /// 2xx: the item is in the encoder cache.
    Ok,
    Failed(EncodeFailure),
    /// The client went away; nginx terminates the request.
    ClientGone,
}

/// Classifies a finished encoder subrequest from the `rc` its post handler
/// got, its response status, whether its answer overflowed the in-memory
/// buffer, and the answer (for an error message).
///
/// An overflow does not matter on a 2xx: the answer itself is not used.
pub fn classify(rc: i64, status: u64, buffer_full: bool, answer: &[u8]) -> EncodeOutcome {
    match rc {
        408 | 499 => EncodeOutcome::ClientGone,
        _ if (200..300).contains(&status) && (rc == 0 || buffer_full) => EncodeOutcome::Ok,
        0 | -1 if (100..200).contains(&status) || (300..600).contains(&status) => {
            EncodeOutcome::Failed(EncodeFailure::Status {
                status: status as u16,
                detail: if buffer_full { None } else { error_detail(answer) },
            })
        }
        502 => EncodeOutcome::Failed(EncodeFailure::Unreachable),
        504 => EncodeOutcome::Failed(EncodeFailure::Timeout),
        300..=599 => EncodeOutcome::Failed(EncodeFailure::Internal(Some(rc))),
        _ => EncodeOutcome::Failed(EncodeFailure::Internal(None)),
    }
}

/// Longest engine error message quoted in ours.
const DETAIL_MAX: usize = 200;

/// The message of an OpenAI/vLLM-style error answer
/// (`{"error":{"message":…}}`, `{"message":…}` or `{"detail":…}`),
/// shortened to [`DETAIL_MAX`] bytes.
pub fn error_detail(answer: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(answer).ok()?;
    let msg = v
        .pointer("/error/message")
        .or_else(|| v.get("message"))
        .or_else(|| v.get("detail"))
        .and_then(serde_json::Value::as_str)?;
    let mut end = msg.len().min(DETAIL_MAX);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    let mut s = msg[..end].to_owned();
    if end < msg.len() {
        s.push('…');
    }
    Some(s)
}

/// The client's error when an encoder request failed.
pub fn failure_message(index: usize, kind: &str, f: &EncodeFailure) -> String {
    format!("encoding media item {index} ({kind}) failed: {f}")
}

/// The client's error when a request has more media items than allowed.
pub fn too_many_message(items: usize, max: usize) -> String {
    format!(
        "the request has {items} media items, more than the {max} allowed \
         (\"prefill_encode_max_items\")"
    )
}

/// What the main request does after one encoder answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Other items are still being encoded.
    Wait,
    /// Every item is encoded: wake the main request, go on to the prefill.
    Proceed,
    /// This item failed, the first to: wake the main request, answer 502.
    Fail { index: usize, failure: EncodeFailure },
    /// The stage was decided already (or this item was counted before):
    /// nothing to do.
    Ignore,
}

/// The answers of one fan-out: which items are done and whether the stage
/// is decided. nginx may call a subrequest's post handler more than once,
/// so each item counts once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FanOut {
    done: Vec<bool>,
    pending: usize,
    decided: bool,
}

impl FanOut {
    pub fn new(items: usize) -> FanOut {
        FanOut { done: vec![false; items], pending: items, decided: items == 0 }
    }

    /// Records how item `index` ended.
    pub fn record(&mut self, index: usize, outcome: &EncodeOutcome) -> Decision {
        match self.done.get_mut(index) {
            Some(d) if !*d => *d = true,
            _ => return Decision::Ignore,
        }
        self.pending -= 1;
        if self.decided {
            return Decision::Ignore;
        }
        match outcome {
            EncodeOutcome::Ok if self.pending == 0 => {
                self.decided = true;
                Decision::Proceed
            }
            EncodeOutcome::Ok => Decision::Wait,
            EncodeOutcome::Failed(f) => {
                self.decided = true;
                Decision::Fail { index, failure: f.clone() }
            }
            // nginx terminates the whole request; nothing may wake it.
            EncodeOutcome::ClientGone => {
                self.decided = true;
                Decision::Ignore
            }
        }
    }

    /// Decides the stage without waking anyone (starting it failed half
    /// way): the items already started are ignored when they end.
    pub fn cancel(&mut self) {
        self.decided = true;
    }

    /// The items not answered yet.
    pub fn unanswered(&self) -> impl Iterator<Item = usize> + '_ {
        self.done.iter().enumerate().filter(|(_, d)| !**d).map(|(k, _)| k)
    }

    /// Items not answered yet.
    pub fn pending(&self) -> usize {
        self.pending
    }
}

// --- walking already validated JSON ----------------------------------------
//
// The body passed `Object::parse`, so every range here holds valid JSON; the
// walkers only skip strings and brackets and never need to report errors.

fn skip_ws(s: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = s.get(i) {
        i += 1;
    }
    i
}

/// End of the string whose opening quote is at `i`.
fn string_end(s: &[u8], mut i: usize) -> usize {
    i += 1;
    while let Some(&b) = s.get(i) {
        match b {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    s.len()
}

/// End of the value starting at `i`.
fn value_end(s: &[u8], i: usize) -> usize {
    match s.get(i) {
        Some(b'"') => string_end(s, i),
        Some(b'{' | b'[') => {
            let mut depth = 0usize;
            let mut j = i;
            while let Some(&b) = s.get(j) {
                match b {
                    b'"' => {
                        j = string_end(s, j);
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return j + 1;
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            s.len()
        }
        _ => {
            let mut j = i;
            while let Some(&b) = s.get(j) {
                if matches!(b, b',' | b']' | b'}' | b' ' | b'\t' | b'\n' | b'\r') {
                    break;
                }
                j += 1;
            }
            j
        }
    }
}

/// The elements of the array at `r` (empty when it is not an array).
fn array_elements(s: &[u8], r: Range<usize>) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    if s.get(r.start) != Some(&b'[') {
        return out;
    }
    let mut i = skip_ws(s, r.start + 1);
    while i < r.end && s.get(i) != Some(&b']') {
        let end = value_end(s, i);
        out.push(i..end);
        i = skip_ws(s, end);
        if s.get(i) == Some(&b',') {
            i = skip_ws(s, i + 1);
        }
    }
    out
}

/// The value of the last member named `name` of the object at `r` (`None`
/// when absent or when `r` is not an object).
fn member(s: &[u8], r: Range<usize>, name: &str) -> Option<Range<usize>> {
    if s.get(r.start) != Some(&b'{') {
        return None;
    }
    let mut found = None;
    let mut i = skip_ws(s, r.start + 1);
    while i < r.end && s.get(i) == Some(&b'"') {
        let kend = string_end(s, i);
        let key = i..kend;
        i = skip_ws(s, kend);
        // The ':'.
        i = skip_ws(s, i + 1);
        let vend = value_end(s, i);
        if string_is(&s[key], name) {
            found = Some(i..vend);
        }
        i = skip_ws(s, vend);
        if s.get(i) == Some(&b',') {
            i = skip_ws(s, i + 1);
        }
    }
    found
}

/// True when `raw` is a JSON string (quotes included) whose text is `want`.
fn string_is(raw: &[u8], want: &str) -> bool {
    if raw.len() < 2 || raw[0] != b'"' {
        return false;
    }
    let inner = &raw[1..raw.len() - 1];
    if !inner.contains(&b'\\') {
        return inner == want.as_bytes();
    }
    serde_json::from_slice::<String>(raw).is_ok_and(|t| t == want)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn items_of(body: &str) -> Vec<(String, String, usize)> {
        let obj = Object::parse(body.as_bytes()).unwrap();
        media_items(&obj)
            .into_iter()
            .map(|it| (it.kind.to_owned(), body[it.part].to_owned(), it.message))
            .collect()
    }

    fn bodies(body: &str) -> Vec<Value> {
        let obj = Object::parse(body.as_bytes()).unwrap();
        media_items(&obj)
            .iter()
            .map(|it| {
                let out = encode_plan(&obj, it).to_vec(body.as_bytes());
                serde_json::from_slice(&out)
                    .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out)))
            })
            .collect()
    }

    const IMG: &str = r#"{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}"#;

    #[test]
    fn finds_every_media_part_in_order() {
        let body = format!(
            r#"{{"model":"m","messages":[
                {{"role":"system","content":"be brief"}},
                {{"role":"user","content":[{{"type":"text","text":"look"}},{IMG},
                  {{"type":"audio_url","audio_url":{{"url":"http://a/x.wav"}}}}]}},
                {{"role":"assistant","content":null}},
                {{"role":"user","content":[{{"type":"input_audio","input_audio":{{"data":"UklG","format":"wav"}}}},
                  {{"type":"video_url","video_url":{{"url":"http://v/1.mp4"}}}}]}}
            ]}}"#
        );
        let got = items_of(&body);
        let kinds: Vec<_> = got.iter().map(|(k, _, m)| (k.as_str(), *m)).collect();
        assert_eq!(
            kinds,
            [("image_url", 1), ("audio_url", 1), ("input_audio", 3), ("video_url", 3)]
        );
        assert_eq!(got[0].1, IMG);
    }

    #[test]
    fn text_only_and_odd_shapes_have_no_items() {
        for body in [
            r#"{"prompt":"p"}"#,
            r#"{"messages":"x"}"#,
            r#"{"messages":[]}"#,
            r#"{"messages":[1,"a",null,{"content":"text"},{"content":[{"type":"text","text":"image_url"}]}]}"#,
            r#"{"messages":[{"content":[{"text":"no type"},{"type":7},{"type":"image"},["image_url"]]}]}"#,
            // A "type" inside the part's value does not count.
            r#"{"messages":[{"content":[{"type":"text","image_url":{"type":"image_url"}}]}]}"#,
        ] {
            assert!(items_of(body).is_empty(), "{body}");
        }
    }

    #[test]
    fn keys_and_types_may_be_escaped_and_spaced() {
        let body = "{ \"messages\" : [ { \"content\" : [ { \"t\\u0079pe\" : \"image\\u005furl\" , \"image_url\" : { \"url\" : \"u\\\"]}\" } } ] } ] }";
        let got = items_of(body);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, "image_url");
        assert!(got[0].1.starts_with('{') && got[0].1.ends_with('}'));
        assert_eq!(bodies(body)[0]["messages"][0]["content"][0]["image_url"]["url"], "u\"]}");
    }

    #[test]
    fn the_last_duplicate_member_wins() {
        let body =
            format!(r#"{{"messages":[{{"content":[{IMG}]}}],"messages":[{{"content":"text"}}]}}"#);
        assert!(items_of(&body).is_empty());
        let body = format!(r#"{{"messages":[{{"content":"t","content":[{IMG},{IMG}]}}]}}"#);
        assert_eq!(items_of(&body).len(), 2);
    }

    #[test]
    fn one_encoder_body_per_item_without_text() {
        let body = format!(
            r#"{{"model":"llava","temperature":0.5,"stream":true,"stream_options":{{"include_usage":true}},
               "max_tokens":300,"mm_processor_kwargs":{{"num_crops":4}},"tools":[],
               "messages":[{{"role":"system","content":"sys"}},
                           {{"role":"user","content":[{{"type":"text","text":"what"}},{IMG},
                             {{"type":"input_audio","input_audio":{{"data":"UklG","format":"wav"}}}}]}}]}}"#
        );
        let b = bodies(&body);
        assert_eq!(b.len(), 2);
        assert_eq!(
            b[0],
            json!({
                "model": "llava",
                "mm_processor_kwargs": {"num_crops": 4},
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
                ]}],
                "stream": false,
                "max_tokens": 1,
                "max_completion_tokens": 1,
            })
        );
        assert_eq!(
            b[1]["messages"],
            json!([{"role": "user", "content": [
                {"type": "input_audio", "input_audio": {"data": "UklG", "format": "wav"}}
            ]}])
        );
        // The item is referenced in the client body, not copied.
        let obj = Object::parse(body.as_bytes()).unwrap();
        let items = media_items(&obj);
        let plan = encode_plan(&obj, &items[0]);
        assert!(plan.pieces.contains(&Piece::Src(items[0].part.clone())));
    }

    #[test]
    fn a_body_without_kept_members_is_still_valid() {
        let body = format!(r#"{{"messages":[{{"role":"user","content":[{IMG}]}}]}}"#);
        let b = bodies(&body);
        assert_eq!(b[0]["max_tokens"], 1);
        assert!(b[0].get("model").is_none());
    }

    #[test]
    fn item_ids() {
        assert_eq!(item_request_id(b"abc-123", 0), b"abc-123-enc0");
        assert_eq!(item_request_id(b"x", 31), b"x-enc31");
    }

    #[test]
    fn classification() {
        use EncodeFailure::*;
        let err = br#"{"error":{"message":"bad image","type":"BadRequestError","code":400}}"#;
        type Case<'a> = ((i64, u64, bool, &'a [u8]), EncodeOutcome);
        let cases: Vec<Case> = vec![
            ((0, 200, false, b"{}"), EncodeOutcome::Ok),
            ((-1, 200, true, b""), EncodeOutcome::Ok),
            ((0, 200, true, b""), EncodeOutcome::Ok),
            (
                (0, 400, false, err),
                EncodeOutcome::Failed(Status { status: 400, detail: Some("bad image".into()) }),
            ),
            (
                (0, 503, false, b"<html>"),
                EncodeOutcome::Failed(Status { status: 503, detail: None }),
            ),
            ((-1, 500, true, err), EncodeOutcome::Failed(Status { status: 500, detail: None })),
            ((502, 0, false, b""), EncodeOutcome::Failed(Unreachable)),
            ((504, 0, false, b""), EncodeOutcome::Failed(Timeout)),
            ((404, 404, false, b""), EncodeOutcome::Failed(Internal(Some(404)))),
            ((-1, 0, false, b""), EncodeOutcome::Failed(Internal(None))),
            ((0, 0, false, b""), EncodeOutcome::Failed(Internal(None))),
            // A 2xx answer cut short.
            ((-1, 200, false, b"{"), EncodeOutcome::Failed(Internal(None))),
            ((499, 200, false, b""), EncodeOutcome::ClientGone),
            ((408, 0, false, b""), EncodeOutcome::ClientGone),
        ];
        for ((rc, st, full, ans), want) in cases {
            assert_eq!(classify(rc, st, full, ans), want, "rc={rc} status={st} full={full}");
        }
    }

    #[test]
    fn error_details() {
        assert_eq!(error_detail(br#"{"message":"m"}"#).as_deref(), Some("m"));
        assert_eq!(error_detail(br#"{"detail":"d"}"#).as_deref(), Some("d"));
        assert_eq!(error_detail(br#"{"error":"flat"}"#), None);
        assert_eq!(error_detail(b"not json"), None);
        let long = format!(r#"{{"message":"{}"}}"#, "é".repeat(300));
        let d = error_detail(long.as_bytes()).unwrap();
        assert!(d.len() <= DETAIL_MAX + '…'.len_utf8() && d.ends_with('…'), "{d}");
        let f = EncodeFailure::Status { status: 500, detail: Some("boom".into()) };
        assert_eq!(
            failure_message(2, "audio_url", &f),
            "encoding media item 2 (audio_url) failed: the encoder answered 500: boom"
        );
        assert_eq!(
            failure_message(0, "image_url", &EncodeFailure::Unreachable),
            "encoding media item 0 (image_url) failed: the encoder is unreachable"
        );
        assert!(too_many_message(40, 32).contains("40 media items, more than the 32"));
    }

    #[test]
    fn fan_out_decides_once() {
        let ok = EncodeOutcome::Ok;
        let bad = EncodeOutcome::Failed(EncodeFailure::Timeout);

        let mut f = FanOut::new(3);
        assert_eq!(f.record(1, &ok), Decision::Wait);
        assert_eq!(f.record(1, &ok), Decision::Ignore, "a second post-handler call");
        assert_eq!(f.record(0, &ok), Decision::Wait);
        assert_eq!(f.pending(), 1);
        assert_eq!(f.record(2, &ok), Decision::Proceed);
        assert_eq!(f.record(2, &bad), Decision::Ignore);
        assert_eq!(f.record(7, &ok), Decision::Ignore);

        // The first failure decides; later answers, good or bad, are ignored.
        let mut f = FanOut::new(3);
        assert_eq!(f.record(2, &bad), Decision::Fail { index: 2, failure: EncodeFailure::Timeout });
        assert_eq!(f.unanswered().collect::<Vec<_>>(), [0, 1]);
        assert_eq!(f.record(0, &ok), Decision::Ignore);
        assert_eq!(f.record(1, &bad), Decision::Ignore);
        assert_eq!(f.pending(), 0);

        // A client gone ends the stage without waking anyone.
        let mut f = FanOut::new(2);
        assert_eq!(f.record(0, &EncodeOutcome::ClientGone), Decision::Ignore);
        assert_eq!(f.record(1, &ok), Decision::Ignore);

        assert_eq!(FanOut::new(1).record(0, &ok), Decision::Proceed);

        // A stage cancelled while starting never wakes the request.
        let mut f = FanOut::new(2);
        f.cancel();
        assert_eq!(f.record(0, &ok), Decision::Ignore);
        assert_eq!(f.record(1, &ok), Decision::Ignore);
    }
}
