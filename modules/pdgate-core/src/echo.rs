//! What the `pdgate_echo` test backend answers: a JSON description of the
//! request it got, so tests can assert exactly what each P/D leg received.
//! Acting as a prefill it also returns `kv_transfer_params` that embed the
//! prefill request, so the decode leg's echo shows both legs at once.

use serde_json::{json, Map, Value};

/// The parts of a request the echo reports.
#[derive(Debug, Clone, Default)]
pub struct EchoRequest<'a> {
    pub method: &'a [u8],
    pub uri: &'a [u8],
    pub args: &'a [u8],
    /// Header names and values in arrival order.
    pub headers: Vec<(&'a [u8], &'a [u8])>,
    pub body: &'a [u8],
    /// How many requests the connection carrying this one has served (1 on
    /// a new connection): shows whether the proxy reuses connections.
    pub connection_requests: u64,
}

/// How the echo answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EchoOptions {
    /// Answer like a vLLM prefill: add top-level `kv_transfer_params`.
    pub prefill: bool,
    /// When the request asks for `"stream": true`, answer as an SSE stream
    /// of this many `data:` events plus `[DONE]` (0 counts as 3).
    pub sse_events: usize,
    /// Add an OpenAI `usage` (to the document, or to the last SSE event):
    /// `prompt_tokens` = the request body's bytes, `completion_tokens` =
    /// the number of events (3 for a plain answer unless `sse=N`).
    pub usage: bool,
}

/// The arguments of the `pdgate_echo` directive.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EchoConf {
    pub opts: EchoOptions,
    /// Hold the answer back this long (exercise proxy timeouts).
    pub delay_ms: usize,
    /// With `sse=N`: time between events.
    pub interval_ms: usize,
    /// Response status (0: 200).
    pub status: u16,
}

fn parse_number(v: &[u8]) -> Option<usize> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

impl EchoConf {
    /// Parses `[prefill] [usage] [sse=N] [delay=MS] [interval=MS] [status=CODE]`.
    pub fn parse(args: &[&[u8]]) -> Result<EchoConf, String> {
        let mut c = EchoConf::default();
        for a in args {
            let bad = || format!("invalid parameter \"{}\"", String::from_utf8_lossy(a));
            if *a == b"prefill" {
                c.opts.prefill = true;
            } else if *a == b"usage" {
                c.opts.usage = true;
            } else if let Some(v) = a.strip_prefix(b"sse=") {
                c.opts.sse_events = parse_number(v).filter(|n| *n > 0).ok_or_else(bad)?;
            } else if let Some(v) = a.strip_prefix(b"delay=") {
                c.delay_ms = parse_number(v).ok_or_else(bad)?;
            } else if let Some(v) = a.strip_prefix(b"interval=") {
                c.interval_ms = parse_number(v).ok_or_else(bad)?;
            } else if let Some(v) = a.strip_prefix(b"status=") {
                c.status = parse_number(v)
                    .filter(|s| (200..600).contains(s))
                    .and_then(|s| u16::try_from(s).ok())
                    .ok_or_else(bad)?;
            } else {
                return Err(bad());
            }
        }
        Ok(c)
    }
}

fn text(b: &[u8]) -> Value {
    Value::String(String::from_utf8_lossy(b).into_owned())
}

/// The JSON description of a request: method, uri, args, headers (lowercase
/// names; repeated headers joined with ", "), body text and the body parsed
/// as JSON (null when it is not JSON).
pub fn describe(req: &EchoRequest<'_>) -> Value {
    let mut headers = Map::new();
    for (k, v) in &req.headers {
        let k = String::from_utf8_lossy(k).to_ascii_lowercase();
        let v = String::from_utf8_lossy(v).into_owned();
        match headers.get_mut(&k) {
            Some(Value::String(prev)) => {
                prev.push_str(", ");
                prev.push_str(&v);
            }
            _ => {
                headers.insert(k, Value::String(v));
            }
        }
    }
    json!({
        "method": text(req.method),
        "uri": text(req.uri),
        "args": text(req.args),
        "headers": headers,
        "body": text(req.body),
        "connection_requests": req.connection_requests,
        "json": serde_json::from_slice::<Value>(req.body).unwrap_or(Value::Null),
    })
}

/// An echo answer: its body in chunks, and whether it is an SSE stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EchoAnswer {
    pub chunks: Vec<Vec<u8>>,
    pub sse: bool,
}

/// The answer: one JSON document, or (for a request with top-level
/// `"stream": true`) SSE events, the first carrying the description.
pub fn answer(req: &EchoRequest<'_>, opts: EchoOptions) -> EchoAnswer {
    let mut doc = describe(req);
    if opts.prefill {
        let kv = json!({
            "do_remote_decode": false,
            "do_remote_prefill": true,
            "remote_engine_id": "pdgate-echo",
            "remote_host": "127.0.0.1",
            "remote_port": 5600,
            "remote_block_ids": [0, 1],
            "prefill_request": {
                "method": doc["method"].clone(),
                "uri": doc["uri"].clone(),
                "args": doc["args"].clone(),
                "connection_requests": doc["connection_requests"].clone(),
                "headers": doc["headers"].clone(),
                "json": doc["json"].clone(),
            },
        });
        if let Value::Object(m) = &mut doc {
            m.insert("kv_transfer_params".into(), kv);
        }
    }
    let events = if opts.sse_events == 0 { 3 } else { opts.sse_events };
    let usage = opts.usage.then(|| {
        let p = req.body.len();
        json!({"prompt_tokens": p, "completion_tokens": events, "total_tokens": p + events})
    });
    if doc["json"]["stream"] != Value::Bool(true) {
        if let (Some(u), Value::Object(m)) = (&usage, &mut doc) {
            m.insert("usage".into(), u.clone());
        }
        return EchoAnswer {
            chunks: vec![serde_json::to_vec(&doc).unwrap_or_default()],
            sse: false,
        };
    }
    let mut out = Vec::with_capacity(events + 1);
    for i in 0..events {
        let mut ev = json!({"index": i, "echo": if i == 0 { doc.clone() } else { Value::Null }});
        if let (Some(u), Value::Object(m)) = (&usage, &mut ev) {
            if i + 1 == events {
                m.insert("usage".into(), u.clone());
            }
        }
        let mut line = b"data: ".to_vec();
        line.extend_from_slice(&serde_json::to_vec(&ev).unwrap_or_default());
        line.extend_from_slice(b"\n\n");
        out.push(line);
    }
    out.push(b"data: [DONE]\n\n".to_vec());
    EchoAnswer { chunks: out, sse: true }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> EchoRequest<'static> {
        EchoRequest {
            method: b"POST",
            uri: b"/v1/completions",
            args: b"a=1",
            headers: vec![(b"X-Request-Id", b"abc"), (b"Accept", b"a"), (b"accept", b"b")],
            body: br#"{"prompt":"p"}"#,
            connection_requests: 3,
        }
    }

    #[test]
    fn plain() {
        let chunks = answer(&req(), EchoOptions::default()).chunks;
        assert_eq!(chunks.len(), 1);
        let v: Value = serde_json::from_slice(&chunks[0]).unwrap();
        assert_eq!(v["method"], "POST");
        assert_eq!(v["headers"]["x-request-id"], "abc");
        assert_eq!(v["headers"]["accept"], "a, b");
        assert_eq!(v["json"]["prompt"], "p");
        assert_eq!(v["connection_requests"], 3);
        assert!(v.get("kv_transfer_params").is_none());
    }

    #[test]
    fn prefill_embeds_request() {
        let v: Value = serde_json::from_slice(
            &answer(&req(), EchoOptions { prefill: true, ..EchoOptions::default() }).chunks[0],
        )
        .unwrap();
        assert_eq!(v["kv_transfer_params"]["prefill_request"]["json"]["prompt"], "p");
        assert_eq!(v["kv_transfer_params"]["prefill_request"]["headers"]["x-request-id"], "abc");
        assert_eq!(v["kv_transfer_params"]["remote_engine_id"], "pdgate-echo");
    }

    #[test]
    fn sse() {
        let mut r = req();
        r.body = br#"{"stream":true}"#;
        let a = answer(&r, EchoOptions { sse_events: 3, ..EchoOptions::default() });
        assert!(a.sse);
        let c = a.chunks;
        assert_eq!(c.len(), 4);
        assert!(c[0].starts_with(b"data: {"));
        assert!(c[0].ends_with(b"\n\n"));
        assert_eq!(c[3], b"data: [DONE]\n\n");
        let body = String::from_utf8(c.concat()).unwrap();
        assert_eq!(body.matches("data: ").count(), 4);
    }

    #[test]
    fn conf_args() {
        let c = EchoConf::parse(&[b"prefill", b"sse=3", b"delay=10", b"interval=5", b"status=503"])
            .unwrap();
        assert!(c.opts.prefill);
        assert_eq!((c.opts.sse_events, c.delay_ms, c.interval_ms, c.status), (3, 10, 5, 503));
        assert!(EchoConf::parse(&[b"sse=0"]).is_err());
        assert!(EchoConf::parse(&[b"status=99"]).is_err());
        assert_eq!(EchoConf::parse(&[b"bogus"]).unwrap_err(), "invalid parameter \"bogus\"");
    }

    #[test]
    fn stream_only_when_asked() {
        let opts = EchoOptions { sse_events: 2, ..EchoOptions::default() };
        assert!(!answer(&req(), opts).sse);
        let mut r = req();
        r.body = br#"{"stream":"true"}"#;
        assert!(!answer(&r, opts).sse);
        r.body = br#"{"stream":true}"#;
        assert_eq!(answer(&r, opts).chunks.len(), 3);
        assert_eq!(answer(&r, EchoOptions::default()).chunks.len(), 4);
    }

    #[test]
    fn usage_when_asked() {
        let opts = EchoOptions { usage: true, ..EchoOptions::default() };
        let v: Value = serde_json::from_slice(&answer(&req(), opts).chunks[0]).unwrap();
        assert_eq!(v["usage"]["prompt_tokens"], 14);
        assert_eq!(v["usage"]["completion_tokens"], 3);
        let mut r = req();
        r.body = br#"{"stream":true}"#;
        let c = answer(&r, EchoOptions { sse_events: 4, ..opts }).chunks;
        assert!(!String::from_utf8_lossy(&c[2]).contains("usage"));
        assert!(String::from_utf8_lossy(&c[3]).contains(r#""completion_tokens":4"#));
        assert!(answer(&req(), EchoOptions::default()).chunks[0].windows(5).all(|w| w != b"usage"));
    }

    #[test]
    fn non_json_body() {
        let mut r = req();
        r.body = b"not json";
        assert_eq!(describe(&r)["json"], Value::Null);
        assert_eq!(describe(&r)["body"], "not json");
    }
}
