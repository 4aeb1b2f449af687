//! The prefill and decode request bodies of the sequential (vLLM NIXL) P/D
//! protocol, built as splice plans over the client's body.
//!
//! A plan is a list of [`Piece`]s: byte ranges of the client body, literal
//! text, or borrowed bytes from elsewhere (the prefill answer). The nginx glue
//! turns source ranges into buffers that point at the body it already holds
//! (no copy) and gathers the small rest into one pool buffer, so the prompt is
//! never copied and the JSON work is proportional to the keys that change.
//!
//! Only top-level keys are read or replaced: a `"stream"` inside a message is
//! text, not a parameter.

use std::fmt;
use std::ops::Range;

use crate::json::{JsonError, Object};

/// Which OpenAI endpoint a request targets; it decides which max-tokens key
/// to add when the client sent none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/chat/completions`: `max_completion_tokens` (current OpenAI name).
    Chat,
    /// `/v1/completions` and anything else: `max_tokens`.
    Completions,
}

impl Endpoint {
    /// Classifies a request URI (path only, without the query string).
    pub fn from_uri(uri: &[u8]) -> Endpoint {
        if uri.ends_with(b"/chat/completions") {
            Endpoint::Chat
        } else {
            Endpoint::Completions
        }
    }
}

/// One part of a rewritten body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece<'a> {
    /// A byte range of the client body.
    Src(Range<usize>),
    /// Fixed text.
    Lit(&'static str),
    /// Bytes borrowed from elsewhere (e.g. the prefill answer).
    Ext(&'a [u8]),
}

/// A body as a sequence of pieces, with adjacent source ranges merged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan<'a> {
    pub pieces: Vec<Piece<'a>>,
}

impl<'a> Plan<'a> {
    fn push(&mut self, p: Piece<'a>) {
        if let (Some(Piece::Src(last)), Piece::Src(r)) = (self.pieces.last_mut(), &p) {
            if last.end == r.start {
                last.end = r.end;
                return;
            }
        }
        self.pieces.push(p);
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.pieces
            .iter()
            .map(|p| match p {
                Piece::Src(r) => r.len(),
                Piece::Lit(s) => s.len(),
                Piece::Ext(b) => b.len(),
            })
            .sum()
    }

    /// True when the plan produces no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The body as one contiguous vector (tests, and callers that need it).
    pub fn to_vec(&self, src: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        for p in &self.pieces {
            match p {
                Piece::Src(r) => out.extend_from_slice(&src[r.clone()]),
                Piece::Lit(s) => out.extend_from_slice(s.as_bytes()),
                Piece::Ext(b) => out.extend_from_slice(b),
            }
        }
        out
    }
}

/// The `kv_transfer_params` a vLLM prefill request carries so that the
/// engine keeps the KV blocks for a remote decode (vLLM's NixlConnector).
pub const PREFILL_KV_TRANSFER_PARAMS: &str = r#"{"do_remote_decode":true,"do_remote_prefill":false,"remote_engine_id":null,"remote_block_ids":null,"remote_host":null,"remote_port":null}"#;

/// Options of the prefill rewrite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefillOptions {
    pub endpoint: Endpoint,
    /// Add [`PREFILL_KV_TRANSFER_PARAMS`] (off for engines configured as
    /// prefill-only, which need no flag).
    pub kv_transfer_params: bool,
}

/// Keys that only the proxy or the prefill answer may set: whatever a
/// client sends under these names reaches no leg (a client could otherwise
/// point a decode engine at any KV source, or pick SGLang rooms).
pub const PD_RESERVED: &[&str] = &[
    "kv_transfer_params",
    "bootstrap_host",
    "bootstrap_port",
    "bootstrap_room",
    "disaggregated_params",
    "migration_request",
];

/// True when the request carries a key only the proxy may set.
pub fn has_reserved(obj: &Object<'_>) -> bool {
    obj.members.iter().any(|m| is_one_of(obj, m, PD_RESERVED))
}

/// The client's body without the keys of [`PD_RESERVED`] (every other byte
/// as sent): what a location that forwards a body to an engine without a
/// P/D flow sends (`pd_strip_reserved`).
pub fn stripped_plan<'a>(obj: &Object<'a>) -> Plan<'a> {
    decode_plan(obj, None, StreamOps::Off)
}

/// Keys the prefill leg replaces or must not see (besides [`PD_RESERVED`]).
const PREFILL_DROPPED: &[&str] = &[
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "min_tokens",
    "min_completion_tokens",
];

/// Whether member `m` of `obj` is one of `keys`.
fn is_one_of(obj: &Object<'_>, m: &crate::json::Member, keys: &[&str]) -> bool {
    keys.iter().any(|k| obj.key_is(m, k))
}

/// Why a request cannot go through P/D as one request (answered 400, with
/// the same words in every mode: vLLM's sequential protocol and SGLang's
/// bootstrap protocol share this check through [`pd_refusal`] and
/// `bootstrap::check_request`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `n` (or `best_of`) is not a positive integer: not a number, nor a
    /// string holding one (`"abc"`, `true`, `[2]`), or a number below 1 or
    /// with a fraction (`0`, `-1`, `1.5`).
    InvalidSamples { key: &'static str, value: String },
    /// `n` (or `best_of`) above 1: one KV handoff serves one sequence (vLLM
    /// would recompute or fail, SGLang needs one room per sample).
    ManySamples { key: &'static str, n: String },
    /// A batch `prompt` (a list of prompts): one handoff per prompt.
    BatchPrompt,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::InvalidSamples { key, value } => {
                write!(f, "invalid \"{key}\": {value}, expected a positive integer")
            }
            Refusal::ManySamples { key, n } => write!(
                f,
                "\"{key}\": {n} is not supported through prefill/decode disaggregation, \
                 send one request per sample"
            ),
            Refusal::BatchPrompt => f.write_str(
                "a batch \"prompt\" (a list of prompts) is not supported through \
                 prefill/decode disaggregation, send one request per prompt",
            ),
        }
    }
}

/// What a sample count (`n`, `best_of`) asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Samples {
    /// Absent or `null` (the engine's default, 1), or a value equal to 1.
    One,
    /// An integer value above 1 (`2`, `2.0`, `"2"`, `1e3`, or too large for
    /// any integer type).
    Many,
    /// Anything else.
    Invalid,
}

/// Reads the raw JSON value of a sample count. A JSON number or a string
/// holding exactly one (as vLLM's and SGLang's validators coerce it) counts
/// by its value; `1.0` is 1. `"inf"`, `"NaN"`, `"0x2"` and escaped strings are
/// not JSON numbers and so are invalid.
fn samples(v: &[u8]) -> Samples {
    if v == b"null" {
        return Samples::One;
    }
    let text = match v {
        [b'"', inner @ .., b'"'] => inner,
        _ => v,
    };
    match json_number(text) {
        Some(1.0) => Samples::One,
        // 1e400 reads as infinity, more samples than anyone can serve.
        Some(x) if x > 1.0 && (x.fract() == 0.0 || x.is_infinite()) => Samples::Many,
        _ => Samples::Invalid,
    }
}

/// `text` as a number if it is exactly one JSON number (RFC 8259 grammar:
/// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`).
fn json_number(text: &[u8]) -> Option<f64> {
    let digits = |i: usize| text[i..].iter().take_while(|b| b.is_ascii_digit()).count();
    let mut i = usize::from(text.first() == Some(&b'-'));
    match digits(i) {
        0 => return None,
        n if n > 1 && text[i] == b'0' => return None,
        n => i += n,
    }
    if text.get(i) == Some(&b'.') {
        match digits(i + 1) {
            0 => return None,
            n => i += 1 + n,
        }
    }
    if matches!(text.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(text.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        match digits(i) {
            0 => return None,
            n => i += n,
        }
    }
    if i != text.len() {
        return None;
    }
    std::str::from_utf8(text).ok()?.parse().ok()
}

/// The one check of what a P/D request may carry: `n` and `best_of` must be
/// 1 (or absent), and `prompt` must not be a batch.
pub fn refusal(obj: &Object<'_>) -> Option<Refusal> {
    for key in ["n", "best_of"] {
        let Some(v) = obj.get(key) else { continue };
        let value = String::from_utf8_lossy(v).into_owned();
        match samples(v) {
            Samples::One => {}
            Samples::Many => return Some(Refusal::ManySamples { key, n: value }),
            Samples::Invalid => return Some(Refusal::InvalidSamples { key, value }),
        }
    }
    if let Some(p) = obj.get("prompt") {
        // A list of strings or of token lists is a batch; a flat list of
        // token ids is one prompt.
        let inner = p.strip_prefix(b"[").map(|r| r.trim_ascii_start());
        if matches!(inner.and_then(|r| r.first()), Some(b'"') | Some(b'[')) {
            return Some(Refusal::BatchPrompt);
        }
    }
    None
}

/// [`refusal`] as the error message of the vLLM-mode module's 400.
pub fn pd_refusal(obj: &Object<'_>) -> Option<String> {
    refusal(obj).map(|r| r.to_string())
}

/// `stream_ops`: what the decode leg is told about usage reporting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StreamOps {
    /// The client's request as it is.
    #[default]
    Off,
    /// A streaming request gets `stream_options` with `include_usage` and
    /// `continuous_usage_stats` on (merged into the client's own, other
    /// options kept), so every chunk carries `usage` for the balancers.
    SetOpt,
    /// As `SetOpt`, and a non-streaming request is made streaming (the
    /// client then receives server-sent events).
    Add,
}

impl StreamOps {
    /// Parses the directive's value.
    pub fn parse(v: &[u8]) -> Option<StreamOps> {
        match v {
            b"off" => Some(StreamOps::Off),
            b"set_opt" => Some(StreamOps::SetOpt),
            b"add" => Some(StreamOps::Add),
            _ => None,
        }
    }
}

/// Copies `obj` into `plan` without the members for which `drop` holds,
/// keeping runs of untouched members (and their separators) as single ranges.
/// Returns whether any member was kept.
fn kept_members<'a>(obj: &Object<'_>, plan: &mut Plan<'a>, drop: impl Fn(usize) -> bool) -> bool {
    plan.push(Piece::Src(obj.open..obj.open + 1));
    let mut any = false;
    let mut prev_kept_end: Option<usize> = None;
    for (i, m) in obj.members.iter().enumerate() {
        if drop(i) {
            prev_kept_end = None;
            continue;
        }
        match prev_kept_end {
            // The previous member was kept too: extend over the separator.
            Some(end) => plan.push(Piece::Src(end..m.value.end)),
            // The first member keeps the whitespace after `{`, so that an
            // untouched prefix stays one range with the brace.
            None if !any && i == 0 => plan.push(Piece::Src(obj.open + 1..m.value.end)),
            None if !any => plan.push(Piece::Src(m.key.start..m.value.end)),
            None => {
                plan.push(Piece::Lit(","));
                plan.push(Piece::Src(m.key.start..m.value.end));
            }
        }
        any = true;
        prev_kept_end = Some(m.value.end);
    }
    any
}

/// The prefill body: the client's request with one output token, no
/// streaming, no minimum-token options, and (optionally) the KV-transfer flag.
pub fn prefill_plan<'a>(obj: &Object<'_>, opts: PrefillOptions) -> Plan<'a> {
    let mut plan = Plan::default();
    let mut has_max = false;
    let mut has_max_completion = false;
    let drop: Vec<bool> = obj
        .members
        .iter()
        .map(|m| {
            if obj.key_is(m, "max_tokens") {
                has_max = true;
                return true;
            }
            if obj.key_is(m, "max_completion_tokens") {
                has_max_completion = true;
                return true;
            }
            is_one_of(obj, m, PREFILL_DROPPED) || is_one_of(obj, m, PD_RESERVED)
        })
        .collect();
    let any = kept_members(obj, &mut plan, |i| drop[i]);
    plan.push(Piece::Lit(if any { ",\"stream\":false" } else { "\"stream\":false" }));
    let (add_max, add_completion) = match (has_max, has_max_completion, opts.endpoint) {
        (false, false, Endpoint::Chat) => (false, true),
        (false, false, Endpoint::Completions) => (true, false),
        (m, c, _) => (m, c),
    };
    if add_max {
        plan.push(Piece::Lit(",\"max_tokens\":1"));
    }
    if add_completion {
        plan.push(Piece::Lit(",\"max_completion_tokens\":1"));
    }
    if opts.kv_transfer_params {
        plan.push(Piece::Lit(",\"kv_transfer_params\":"));
        plan.push(Piece::Lit(PREFILL_KV_TRANSFER_PARAMS));
    }
    plan.push(Piece::Lit("}"));
    plan
}

/// What the prefill answer gave the decode leg.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvParams<'a> {
    /// The raw JSON text of a top-level `kv_transfer_params` object.
    Found(&'a [u8]),
    /// The answer is JSON but has no usable top-level `kv_transfer_params`
    /// (absent, or `null`); the decode engine will recompute the prompt.
    Missing,
    /// `kv_transfer_params` is there but not a JSON object (a string, a
    /// number, an array…): it is not forwarded, the decode recomputes.
    NotObject(&'a [u8]),
    /// The answer is not a JSON object.
    Invalid(JsonError),
}

/// Takes the top-level `kv_transfer_params` out of a prefill answer.
pub fn kv_params_of(answer: &[u8]) -> KvParams<'_> {
    match Object::parse(answer) {
        Ok(obj) => match obj.get("kv_transfer_params") {
            Some(v) if v.first() == Some(&b'{') => KvParams::Found(v),
            Some(v) if v != b"null" => KvParams::NotObject(v),
            _ => KvParams::Missing,
        },
        Err(e) => KvParams::Invalid(e),
    }
}

/// The decode body: the client's request without the keys of
/// [`PD_RESERVED`], with usage reporting per `ops`, plus the prefill's
/// `kv_transfer_params` when there is one. In the common case (nothing to
/// drop, `ops` off) this is one source range up to the closing brace and a
/// short tail; the prompt is never copied.
pub fn decode_plan<'a>(obj: &Object<'a>, kv: Option<&'a [u8]>, ops: StreamOps) -> Plan<'a> {
    let mut plan = Plan::default();
    let streaming = obj.get("stream").is_some_and(|v| v == b"true");
    let force_stream = ops == StreamOps::Add && !streaming;
    let set_options = match ops {
        StreamOps::Off => false,
        StreamOps::SetOpt => streaming,
        StreamOps::Add => true,
    };
    let drop = |m: &crate::json::Member| {
        is_one_of(obj, m, PD_RESERVED)
            || (set_options && obj.key_is(m, "stream_options"))
            || (force_stream && obj.key_is(m, "stream"))
    };
    let any = if obj.members.iter().any(drop) {
        kept_members(obj, &mut plan, |i| drop(&obj.members[i]))
    } else {
        // Keep everything, including whitespace, up to the closing brace.
        plan.push(Piece::Src(obj.open..obj.close));
        !obj.members.is_empty()
    };
    let mut sep = if any { "," } else { "" };
    if force_stream {
        plan.push(Piece::Lit(if any { ",\"stream\":true" } else { "\"stream\":true" }));
        sep = ",";
    }
    if set_options {
        plan.push(Piece::Lit(if sep.is_empty() {
            "\"stream_options\":{"
        } else {
            ",\"stream_options\":{"
        }));
        // The client's other stream options, kept as they are.
        if let Some(Ok(opts)) = obj.get("stream_options").map(Object::parse) {
            for m in &opts.members {
                if opts.key_is(m, "include_usage") || opts.key_is(m, "continuous_usage_stats") {
                    continue;
                }
                plan.push(Piece::Ext(&opts.src()[m.key.start..m.value.end]));
                plan.push(Piece::Lit(","));
            }
        }
        plan.push(Piece::Lit("\"include_usage\":true,\"continuous_usage_stats\":true}"));
        sep = ",";
    }
    if let Some(kv) = kv {
        plan.push(Piece::Lit(if sep.is_empty() {
            "\"kv_transfer_params\":"
        } else {
            ",\"kv_transfer_params\":"
        }));
        plan.push(Piece::Ext(kv));
    }
    plan.push(Piece::Lit("}"));
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn prefill(src: &str, endpoint: Endpoint, kv: bool) -> Value {
        let obj = Object::parse(src.as_bytes()).unwrap();
        let plan = prefill_plan(&obj, PrefillOptions { endpoint, kv_transfer_params: kv });
        let out = plan.to_vec(src.as_bytes());
        assert_eq!(out.len(), plan.len());
        serde_json::from_slice(&out)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out)))
    }

    fn decode(src: &str, kv: Option<&str>) -> (Vec<u8>, Plan<'static>) {
        decode_ops(src, kv, StreamOps::Off)
    }

    fn decode_ops(src: &str, kv: Option<&str>, ops: StreamOps) -> (Vec<u8>, Plan<'static>) {
        let src: &'static [u8] = Box::leak(src.as_bytes().to_vec().into_boxed_slice());
        let obj = Object::parse(src).unwrap();
        let kv: Option<&'static [u8]> =
            kv.map(|s| &*Box::leak(s.as_bytes().to_vec().into_boxed_slice()));
        let plan = decode_plan(&obj, kv, ops);
        (plan.to_vec(src), plan)
    }

    /// Parses `out` and checks it has no duplicate top-level keys.
    fn parsed(out: &[u8]) -> Value {
        let obj = Object::parse(out)
            .unwrap_or_else(|e| panic!("{e:?}: {}", String::from_utf8_lossy(out)));
        let mut keys: Vec<&[u8]> = obj.members.iter().map(|m| &out[m.key.clone()]).collect();
        let n = keys.len();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), n, "duplicate keys in {}", String::from_utf8_lossy(out));
        serde_json::from_slice(out).unwrap()
    }

    #[test]
    fn stream_ops_set_opt_merges_into_the_clients_options() {
        let src = r#"{"prompt":"p","stream":true,"stream_options":{"include_usage":false,"x":1}}"#;
        let (out, _) = decode_ops(src, Some("{}"), StreamOps::SetOpt);
        let v = parsed(&out);
        assert_eq!(
            v["stream_options"],
            json!({"x":1,"include_usage":true,"continuous_usage_stats":true})
        );
        assert_eq!(v["stream"], json!(true));
        assert_eq!(v["kv_transfer_params"], json!({}));
        // Not streaming: set_opt leaves the request alone (one source range).
        let src = r#"{"prompt":"p","stream":false}"#;
        let (out, plan) = decode_ops(src, None, StreamOps::SetOpt);
        assert_eq!(out, src.as_bytes());
        assert_eq!(plan.pieces.len(), 2);
        // Streaming without options: added.
        let (out, _) = decode_ops(r#"{"stream":true}"#, None, StreamOps::SetOpt);
        assert_eq!(
            parsed(&out),
            json!({"stream":true,"stream_options":{"include_usage":true,"continuous_usage_stats":true}})
        );
    }

    #[test]
    fn stream_ops_add_makes_the_request_stream() {
        for src in [
            r#"{"prompt":"p"}"#,
            r#"{"prompt":"p","stream":false}"#,
            r#"{"stream":null,"prompt":"p"}"#,
        ] {
            let (out, _) = decode_ops(src, Some(r#"{"a":1}"#), StreamOps::Add);
            let v = parsed(&out);
            assert_eq!(v["stream"], json!(true), "{src}");
            assert_eq!(v["stream_options"]["continuous_usage_stats"], json!(true));
            assert_eq!(v["prompt"], json!("p"));
            assert_eq!(v["kv_transfer_params"], json!({"a":1}));
        }
        let (out, _) = decode_ops("{}", None, StreamOps::Add);
        assert_eq!(
            parsed(&out),
            json!({"stream":true,"stream_options":{"include_usage":true,"continuous_usage_stats":true}})
        );
        // A stream_options that is not an object is replaced.
        let (out, _) = decode_ops(r#"{"stream":true,"stream_options":null}"#, None, StreamOps::Add);
        assert_eq!(parsed(&out)["stream_options"]["include_usage"], json!(true));
        // Off: untouched.
        let (out, _) = decode_ops(r#"{"prompt":"p"}"#, None, StreamOps::Off);
        assert_eq!(out, br#"{"prompt":"p"}"#);
        assert_eq!(StreamOps::parse(b"set_opt"), Some(StreamOps::SetOpt));
        assert_eq!(StreamOps::parse(b"stream_option"), None);
    }

    #[test]
    fn reserved_keys_reach_no_leg() {
        let src = r#"{"prompt":"p","bootstrap_host":"evil","bootstrap_port":1,"bootstrap_room":2,"disaggregated_params":{},"migration_request":true,"kv_transfer_params":{"remote_host":"evil"},"max_tokens":9}"#;
        let (out, _) = decode(src, Some(r#"{"remote_host":"good"}"#));
        let v = parsed(&out);
        assert_eq!(
            v,
            json!({"prompt":"p","max_tokens":9,"kv_transfer_params":{"remote_host":"good"}})
        );
        let p = prefill(src, Endpoint::Completions, false);
        for k in PD_RESERVED {
            assert!(p.get(k).is_none(), "{k} reached the prefill");
        }
    }

    #[test]
    fn sample_counts() {
        use Samples::*;
        let table: &[(&str, Samples)] = &[
            ("1", One),
            ("\"1\"", One),
            ("1.0", One),
            ("1e0", One),
            ("\"1.0\"", One),
            ("null", One),
            ("2", Many),
            ("\"2\"", Many),
            ("2.0", Many),
            ("\"2.0\"", Many),
            ("1e3", Many),
            ("18446744073709551616", Many),
            ("99999999999999999999999999999999", Many),
            ("1e400", Many),
            ("1.5", Invalid),
            ("\"1.5\"", Invalid),
            ("0", Invalid),
            ("0.0", Invalid),
            ("-1", Invalid),
            ("\"-2\"", Invalid),
            ("-1e400", Invalid),
            ("\"abc\"", Invalid),
            ("\"\"", Invalid),
            ("\" 2\"", Invalid),
            ("\"inf\"", Invalid),
            ("\"NaN\"", Invalid),
            ("\"0x2\"", Invalid),
            ("\"02\"", Invalid),
            ("\"2.\"", Invalid),
            ("\"\\u0032\"", Invalid),
            ("true", Invalid),
            ("false", Invalid),
            ("[2]", Invalid),
            ("{\"n\":2}", Invalid),
        ];
        for (v, want) in table {
            assert_eq!(samples(v.as_bytes()), *want, "n = {v}");
            // The same value under either key, through the whole check.
            for key in ["n", "best_of"] {
                let src = format!(r#"{{"prompt":"p","{key}":{v}}}"#);
                let got = refusal(&Object::parse(src.as_bytes()).unwrap());
                let value = v.to_string();
                let expected = match want {
                    One => None,
                    Many => Some(Refusal::ManySamples { key, n: value }),
                    Invalid => Some(Refusal::InvalidSamples { key, value }),
                };
                assert_eq!(got, expected, "{src}");
            }
        }
    }

    #[test]
    fn refusals() {
        let r = |s: &str| refusal(&Object::parse(s.as_bytes()).unwrap());
        let m = |s: &str| pd_refusal(&Object::parse(s.as_bytes()).unwrap());
        assert_eq!(
            m(r#"{"n":2}"#).unwrap(),
            "\"n\": 2 is not supported through prefill/decode disaggregation, send one request per sample"
        );
        assert_eq!(r(r#"{"n":"2"}"#), Some(Refusal::ManySamples { key: "n", n: "\"2\"".into() }));
        assert_eq!(
            r(r#"{"best_of":3.0}"#),
            Some(Refusal::ManySamples { key: "best_of", n: "3.0".into() })
        );
        assert_eq!(
            m(r#"{"n":"abc"}"#).unwrap(),
            "invalid \"n\": \"abc\", expected a positive integer"
        );
        assert_eq!(
            r(r#"{"n":1,"best_of":1.5}"#),
            Some(Refusal::InvalidSamples { key: "best_of", value: "1.5".into() })
        );
        assert_eq!(m(r#"{"prompt":["a","b"]}"#).unwrap(), "a batch \"prompt\" (a list of prompts) is not supported through prefill/decode disaggregation, send one request per prompt");
        assert_eq!(r(r#"{"prompt":[[1,2],[3]]}"#), Some(Refusal::BatchPrompt));
        assert_eq!(r(r#"{"prompt":[ [1],[2]]}"#), Some(Refusal::BatchPrompt));
        assert_eq!(r(r#"{"n":1,"best_of":"1","prompt":"a"}"#), None);
        assert_eq!(r(r#"{"prompt":[1,2,3]}"#), None);
        assert_eq!(r(r#"{"n":null}"#), None);
        // A key inside a message is text, not a parameter.
        assert_eq!(r(r#"{"messages":[{"n":2,"content":"n"}]}"#), None);
    }

    fn kv_prefill() -> Value {
        serde_json::from_str(PREFILL_KV_TRANSFER_PARAMS).unwrap()
    }

    #[test]
    fn endpoint_from_uri() {
        assert_eq!(Endpoint::from_uri(b"/v1/chat/completions"), Endpoint::Chat);
        assert_eq!(Endpoint::from_uri(b"/v1/completions"), Endpoint::Completions);
        assert_eq!(Endpoint::from_uri(b"/generate"), Endpoint::Completions);
    }

    /// Table of (client body, endpoint, expected prefill body).
    #[test]
    fn prefill_table() {
        let kv = kv_prefill();
        let cases: Vec<(&str, Endpoint, Value)> = vec![
            (
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":100,"stream":true,"stream_options":{"include_usage":true}}"#,
                Endpoint::Chat,
                json!({"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":1,"stream":false,"kv_transfer_params":kv}),
            ),
            (
                r#"{"model":"m","messages":[]}"#,
                Endpoint::Chat,
                json!({"model":"m","messages":[],"max_completion_tokens":1,"stream":false,"kv_transfer_params":kv}),
            ),
            (
                r#"{"model":"m","prompt":"p"}"#,
                Endpoint::Completions,
                json!({"model":"m","prompt":"p","max_tokens":1,"stream":false,"kv_transfer_params":kv}),
            ),
            (
                r#"{"max_completion_tokens":7,"max_tokens":9,"messages":[]}"#,
                Endpoint::Chat,
                json!({"messages":[],"max_tokens":1,"max_completion_tokens":1,"stream":false,"kv_transfer_params":kv}),
            ),
            (
                r#"{"prompt":"p","min_tokens":5,"min_completion_tokens":3,"max_tokens":50}"#,
                Endpoint::Completions,
                json!({"prompt":"p","max_tokens":1,"stream":false,"kv_transfer_params":kv}),
            ),
            // A client's own kv_transfer_params never reaches the prefill.
            (
                r#"{"prompt":"p","kv_transfer_params":{"do_remote_prefill":true}}"#,
                Endpoint::Completions,
                json!({"prompt":"p","max_tokens":1,"stream":false,"kv_transfer_params":kv}),
            ),
            (
                r#"{}"#,
                Endpoint::Chat,
                json!({"max_completion_tokens":1,"stream":false,"kv_transfer_params":kv}),
            ),
        ];
        for (src, ep, want) in cases {
            assert_eq!(prefill(src, ep, true), want, "{src}");
        }
    }

    #[test]
    fn prefill_without_kv_flag() {
        let v = prefill(r#"{"prompt":"p","stream":true}"#, Endpoint::Completions, false);
        assert_eq!(v, json!({"prompt":"p","stream":false,"max_tokens":1}));
    }

    /// Keys inside messages are text: the original rewrote the first match
    /// at any depth.
    #[test]
    fn nested_keys_untouched() {
        let src = r#"{"messages":[{"role":"user","content":"stream"},{"role":"user","content":"x","max_tokens":5,"stream":true}],"tools":[{"function":{"parameters":{"stream_options":{"type":"object"},"kv_transfer_params":1}}}],"stream":true}"#;
        let v = prefill(src, Endpoint::Chat, true);
        let orig: Value = serde_json::from_str(src).unwrap();
        assert_eq!(v["messages"], orig["messages"]);
        assert_eq!(v["tools"], orig["tools"]);
        assert_eq!(v["stream"], json!(false));
        assert_eq!(v["max_completion_tokens"], json!(1));
    }

    #[test]
    fn escapes_unicode_and_whitespace() {
        // A byte-order mark is not JSON whitespace: rejected, as serde_json does.
        assert!(Object::parse("\u{feff}{}".as_bytes()).is_err());
        let src = "\n {\n  \"prompt\" : \"caf\u{e9} \\\"q\\\" \\u00e9 \u{1F600}\\n\",\n  \"str\\u0065am\": true ,\n  \"max_tokens\":3\n}\n\n";
        let v = prefill(src, Endpoint::Completions, true);
        assert_eq!(v["prompt"], json!("caf\u{e9} \"q\" \u{e9} \u{1F600}\n"));
        assert_eq!(v["stream"], json!(false));
        // "str\u0065am" is the key "stream": replaced, not duplicated.
        let obj = Object::parse(src.as_bytes()).unwrap();
        let opts = PrefillOptions { endpoint: Endpoint::Completions, kv_transfer_params: true };
        let out = prefill_plan(&obj, opts).to_vec(src.as_bytes());
        let out_obj = Object::parse(&out).unwrap();
        assert_eq!(out_obj.members.len(), 4, "{}", String::from_utf8_lossy(&out));
    }

    #[test]
    fn duplicate_keys_are_all_replaced() {
        let src = r#"{"stream":true,"prompt":"p","stream":true,"max_tokens":5,"max_tokens":6}"#;
        let obj = Object::parse(src.as_bytes()).unwrap();
        let plan = prefill_plan(
            &obj,
            PrefillOptions { endpoint: Endpoint::Completions, kv_transfer_params: false },
        );
        let out = String::from_utf8(plan.to_vec(src.as_bytes())).unwrap();
        assert_eq!(out, r#"{"prompt":"p","stream":false,"max_tokens":1}"#);
    }

    #[test]
    fn huge_prompt_is_one_source_range() {
        let prompt = "x".repeat(4 << 20);
        let src = format!(r#"{{"model":"m","prompt":"{prompt}","stream":true,"max_tokens":10}}"#);
        let obj = Object::parse(src.as_bytes()).unwrap();
        let plan = prefill_plan(
            &obj,
            PrefillOptions { endpoint: Endpoint::Completions, kv_transfer_params: true },
        );
        let srcs: Vec<_> = plan.pieces.iter().filter(|p| matches!(p, Piece::Src(_))).collect();
        assert_eq!(srcs.len(), 1, "{:?}", plan.pieces);
        assert!(plan.len() > prompt.len());
        let (out, dplan) = decode(&src, Some(r#"{"remote_host":"h"}"#));
        assert_eq!(dplan.pieces[0], Piece::Src(0..src.len() - 1));
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["prompt"].as_str().map(str::len), Some(prompt.len()));
    }

    #[test]
    fn decode_table() {
        let kv = r#"{"remote_engine_id":"e1","remote_block_ids":[1,2],"remote_host":"10.0.0.1","remote_port":5600}"#;
        let kvv: Value = serde_json::from_str(kv).unwrap();
        let cases: Vec<(&str, Option<&str>, Value)> = vec![
            (
                r#"{"model":"m","stream":true,"max_tokens":100}"#,
                Some(kv),
                json!({"model":"m","stream":true,"max_tokens":100,"kv_transfer_params":kvv}),
            ),
            (r#"{}"#, Some(kv), json!({"kv_transfer_params":kvv})),
            (" {  } \n", Some(kv), json!({"kv_transfer_params":kvv})),
            (r#"{"a":1}"#, None, json!({"a":1})),
            (
                r#"{"kv_transfer_params":{"evil":1},"a":1,"kv_transfer_params":2}"#,
                Some(kv),
                json!({"a":1,"kv_transfer_params":kvv}),
            ),
            (r#"{"a":1,"kv_transfer_params":{"evil":1}}"#, None, json!({"a":1})),
            (r#"{"kv_transfer_params":{"evil":1}}"#, None, json!({})),
            (r#"{"a":1,"kv_transfer_params":0,"b":2,"c":3}"#, None, json!({"a":1,"b":2,"c":3})),
        ];
        for (src, kv, want) in cases {
            let (out, _) = decode(src, kv);
            let got: Value = serde_json::from_slice(&out)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out)));
            assert_eq!(got, want, "{src}");
            let obj = Object::parse(&out).unwrap();
            assert!(
                obj.members.iter().filter(|m| obj.key_is(m, "kv_transfer_params")).count() <= 1
            );
        }
    }

    #[test]
    fn decode_keeps_client_bytes_verbatim() {
        let src = "{\"model\" : \"m\",\n \"prompt\":\"a\\u0000b\"  }";
        let (out, plan) = decode(src, Some("{}"));
        assert_eq!(plan.pieces.len(), 4);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"model\" : \"m\",\n \"prompt\":\"a\\u0000b\"  ,\"kv_transfer_params\":{}}"
        );
    }

    #[test]
    fn kv_params_of_answers() {
        assert_eq!(
            kv_params_of(br#"{"id":"c","kv_transfer_params":{"a":[1]},"choices":[]}"#),
            KvParams::Found(br#"{"a":[1]}"#)
        );
        assert_eq!(
            kv_params_of(br#"{"choices":[{"kv_transfer_params":{"a":1}}]}"#),
            KvParams::Missing
        );
        assert_eq!(kv_params_of(br#"{"kv_transfer_params":null}"#), KvParams::Missing);
        assert!(matches!(kv_params_of(b"<html>"), KvParams::Invalid(_)));
        for v in [&br#""abc""#[..], b"1", b"[1,2]", b"true"] {
            let mut a = br#"{"kv_transfer_params":"#.to_vec();
            a.extend_from_slice(v);
            a.push(b'}');
            assert_eq!(kv_params_of(&a), KvParams::NotObject(v), "{}", String::from_utf8_lossy(v));
        }
    }

    #[test]
    fn stripping_drops_only_the_reserved_keys() {
        let src = br#"{"model":"m","kv_transfer_params":{"do_remote_decode":true},"prompt":"p","bootstrap_room":7,"n":2}"#;
        let obj = Object::parse(src).unwrap();
        assert!(has_reserved(&obj));
        let out = stripped_plan(&obj).to_vec(src);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v, serde_json::json!({"model":"m","prompt":"p","n":2}));
        let clean = br#"{"model":"m","prompt":"kv_transfer_params"}"#;
        assert!(!has_reserved(&Object::parse(clean).unwrap()));
    }
}
