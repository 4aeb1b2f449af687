//! The OpenAI-compatible API surface of the simulator: what a request asks
//! for, and the JSON / SSE it gets back, shaped like vLLM's.

use pdgate_core::tokens::tokens_for_bytes;
use serde_json::{json, Value};

/// Which completion API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Chat,
    Completions,
}

/// SGLang's bootstrap triple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bootstrap {
    pub host: String,
    pub port: u16,
    pub room: u64,
}

/// A parsed completion request.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiRequest {
    pub api: Api,
    pub model: String,
    /// The prompt as text (chat: `role: content` lines); its length gives
    /// the prompt tokens by the shared rule.
    pub prompt_text: Vec<u8>,
    pub prompt_tokens: u64,
    pub max_tokens: Option<u64>,
    pub stream: bool,
    pub include_usage: bool,
    pub continuous_usage: bool,
    pub ignore_eos: bool,
    pub kv_transfer_params: Option<Value>,
    pub bootstrap: Option<Bootstrap>,
    /// Image/audio/video parts in chat content (the encoder's work).
    pub media_items: usize,
}

fn err(msg: impl Into<String>) -> String {
    msg.into()
}

/// Parses a completion request body; `Err` is the message of a 400.
pub fn parse_request(api: Api, body: &[u8]) -> Result<ApiRequest, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| err(format!("Invalid JSON body: {e}")))?;
    let Value::Object(o) = &v else { return Err(err("The request body must be a JSON object")) };
    let mut prompt = Vec::new();
    let mut media = 0usize;
    match api {
        Api::Completions => match o.get("prompt") {
            Some(Value::String(s)) => prompt.extend_from_slice(s.as_bytes()),
            Some(Value::Array(items)) if !items.is_empty() => {
                for it in items {
                    match it {
                        Value::String(s) => prompt.extend_from_slice(s.as_bytes()),
                        // Token ids: four bytes each by the shared rule.
                        Value::Number(n) => prompt
                            .extend_from_slice(&(n.as_u64().unwrap_or(0) as u32).to_le_bytes()),
                        _ => {
                            return Err(err(
                                "\"prompt\" must be a string, a list of strings or token ids",
                            ))
                        }
                    }
                }
            }
            _ => return Err(err("\"prompt\" is required")),
        },
        Api::Chat => {
            let Some(Value::Array(msgs)) = o.get("messages") else {
                return Err(err("\"messages\" is required and must be a list"));
            };
            for m in msgs {
                let role = m
                    .get("role")
                    .and_then(Value::as_str)
                    .ok_or_else(|| err("each message needs a \"role\""))?;
                prompt.extend_from_slice(role.as_bytes());
                prompt.extend_from_slice(b": ");
                match m.get("content") {
                    Some(Value::String(s)) => prompt.extend_from_slice(s.as_bytes()),
                    Some(Value::Array(parts)) => {
                        for p in parts {
                            match p.get("type").and_then(Value::as_str) {
                                Some("text") => prompt.extend_from_slice(
                                    p.get("text").and_then(Value::as_str).unwrap_or("").as_bytes(),
                                ),
                                Some(_) => {
                                    media += 1;
                                    // An image is a fixed 576 tokens (LLaVA-style), as text.
                                    prompt.extend(std::iter::repeat_n(b'#', 576 * 4));
                                }
                                None => return Err(err("each content part needs a \"type\"")),
                            }
                        }
                    }
                    Some(Value::Null) | None => {}
                    _ => return Err(err("\"content\" must be a string or a list of parts")),
                }
                prompt.push(b'\n');
            }
        }
    }
    let max_tokens = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|k| o.get(*k).filter(|v| !v.is_null()))
        .map(|v| v.as_u64().ok_or_else(|| err("\"max_tokens\" must be a non-negative integer")))
        .transpose()?;
    let stream = o.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let so = o.get("stream_options");
    let flag = |k: &str| so.and_then(|s| s.get(k)).and_then(Value::as_bool).unwrap_or(false);
    let bootstrap =
        match (o.get("bootstrap_host"), o.get("bootstrap_port"), o.get("bootstrap_room")) {
            (Some(Value::String(h)), Some(p), Some(r)) => Some(Bootstrap {
                host: h.clone(),
                port: p
                    .as_u64()
                    .and_then(|p| u16::try_from(p).ok())
                    .ok_or_else(|| err("bad \"bootstrap_port\""))?,
                room: r.as_u64().ok_or_else(|| err("\"bootstrap_room\" must be an integer"))?,
            }),
            (None, None, None) => None,
            _ => {
                return Err(err(
                    "\"bootstrap_host\", \"bootstrap_port\" and \"bootstrap_room\" go together",
                ))
            }
        };
    Ok(ApiRequest {
        api,
        model: o.get("model").and_then(Value::as_str).unwrap_or("").to_owned(),
        prompt_tokens: tokens_for_bytes(prompt.len()).max(1),
        prompt_text: prompt,
        max_tokens,
        stream,
        include_usage: flag("include_usage"),
        continuous_usage: flag("continuous_usage_stats"),
        ignore_eos: o.get("ignore_eos").and_then(Value::as_bool).unwrap_or(false),
        kv_transfer_params: o.get("kv_transfer_params").filter(|v| !v.is_null()).cloned(),
        bootstrap,
        media_items: media,
    })
}

/// FNV-1a of the prompt: the seed of the deterministic answer.
pub fn prompt_seed(text: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in text {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// How many tokens the answer has: `max_tokens` (default 16 for
/// completions, as vLLM), cut at a deterministic "end of sequence" between
/// 16 and 271 tokens unless `ignore_eos`, and by the context window.
pub fn output_tokens(req: &ApiRequest, max_model_len: u64) -> (u64, &'static str) {
    let room = max_model_len.saturating_sub(req.prompt_tokens).max(1);
    let cap = match (req.max_tokens, req.api) {
        (Some(n), _) => n,
        (None, Api::Completions) => 16,
        (None, Api::Chat) => room,
    }
    .min(room)
    .max(1);
    if req.ignore_eos {
        return (cap, "length");
    }
    let eos = 16 + prompt_seed(&req.prompt_text) % 256;
    if eos < cap {
        (eos, "stop")
    } else {
        (cap, "length")
    }
}

/// Three-letter words: with their leading space each is exactly one token
/// (four bytes) by the shared rule.
const WORDS: [&str; 16] = [
    " the", " and", " for", " you", " are", " not", " but", " all", " can", " her", " was", " one",
    " our", " out", " day", " get",
];

/// Output token `i` of an answer seeded by `seed`.
pub fn token_text(seed: u64, i: u64) -> &'static str {
    WORDS[((seed >> 7).wrapping_add(i.wrapping_mul(7)) % WORDS.len() as u64) as usize]
}

/// Counts for `usage`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
    pub cached: u64,
}

fn usage_json(u: Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt,
        "total_tokens": u.prompt + u.completion,
        "completion_tokens": u.completion,
        "prompt_tokens_details": {"cached_tokens": u.cached},
    })
}

/// A non-streaming answer.
pub fn completion_json(
    req: &ApiRequest,
    id: &str,
    created: u64,
    text: &str,
    finish: &str,
    usage: Usage,
    kv_transfer_params: Option<Value>,
) -> Vec<u8> {
    let mut v = match req.api {
        Api::Chat => json!({
            "id": format!("chatcmpl-{id}"),
            "object": "chat.completion",
            "created": created,
            "model": req.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text, "tool_calls": []},
                "logprobs": null,
                "finish_reason": finish,
                "stop_reason": null,
            }],
            "usage": usage_json(usage),
        }),
        Api::Completions => json!({
            "id": format!("cmpl-{id}"),
            "object": "text_completion",
            "created": created,
            "model": req.model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish, "stop_reason": null}],
            "usage": usage_json(usage),
        }),
    };
    if let (Some(kv), Value::Object(o)) = (kv_transfer_params, &mut v) {
        o.insert("kv_transfer_params".into(), kv);
    }
    serde_json::to_vec(&v).unwrap_or_default()
}

/// One SSE event of a streamed answer: `text` (None: the opening role
/// chunk), an optional finish reason, optional usage.
pub fn stream_chunk(
    req: &ApiRequest,
    id: &str,
    created: u64,
    text: Option<&str>,
    finish: Option<&str>,
    usage: Option<Usage>,
) -> Vec<u8> {
    let mut v = match req.api {
        Api::Chat => {
            let delta = match text {
                None => json!({"role": "assistant", "content": ""}),
                Some(t) => json!({"content": t}),
            };
            json!({
                "id": format!("chatcmpl-{id}"),
                "object": "chat.completion.chunk",
                "created": created,
                "model": req.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
            })
        }
        Api::Completions => json!({
            "id": format!("cmpl-{id}"),
            "object": "text_completion",
            "created": created,
            "model": req.model,
            "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish}],
        }),
    };
    if let (Some(u), Value::Object(o)) = (usage, &mut v) {
        o.insert("usage".into(), usage_json(u));
    }
    sse(&v)
}

/// The usage-only final chunk (`stream_options.include_usage`).
pub fn usage_chunk(req: &ApiRequest, id: &str, created: u64, usage: Usage) -> Vec<u8> {
    let object = if req.api == Api::Chat { "chat.completion.chunk" } else { "text_completion" };
    let prefix = if req.api == Api::Chat { "chatcmpl" } else { "cmpl" };
    sse(&json!({
        "id": format!("{prefix}-{id}"),
        "object": object,
        "created": created,
        "model": req.model,
        "choices": [],
        "usage": usage_json(usage),
    }))
}

fn sse(v: &Value) -> Vec<u8> {
    let mut out = b"data: ".to_vec();
    out.extend_from_slice(&serde_json::to_vec(v).unwrap_or_default());
    out.extend_from_slice(b"\n\n");
    out
}

/// vLLM's error body.
pub fn error_json(status: u16, message: &str) -> Vec<u8> {
    pdgate_core::error::error_body(status, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_request() {
        let r = parse_request(
            Api::Chat,
            br#"{"model":"m","messages":[{"role":"user","content":"hello there"}],"max_completion_tokens":5,"stream":true,"stream_options":{"include_usage":true},"kv_transfer_params":{"do_remote_decode":true}}"#,
        )
        .unwrap();
        assert_eq!(r.prompt_text, b"user: hello there\n");
        assert_eq!(r.prompt_tokens, 5); // 18 bytes
        assert_eq!(r.max_tokens, Some(5));
        assert!(r.stream && r.include_usage && !r.continuous_usage);
        assert_eq!(r.kv_transfer_params.unwrap()["do_remote_decode"], true);
    }

    #[test]
    fn completions_and_media() {
        let r = parse_request(Api::Completions, br#"{"prompt":["ab","cd"],"ignore_eos":true}"#)
            .unwrap();
        assert_eq!(r.prompt_text, b"abcd");
        assert!(r.ignore_eos);
        let r = parse_request(
            Api::Chat,
            br#"{"messages":[{"role":"user","content":[{"type":"text","text":"x"},{"type":"image_url","image_url":{"url":"data:"}}]}]}"#,
        )
        .unwrap();
        assert_eq!(r.media_items, 1);
        assert!(r.prompt_tokens > 576);
        let r = parse_request(
            Api::Completions,
            br#"{"prompt":"p","bootstrap_host":"h","bootstrap_port":8998,"bootstrap_room":42}"#,
        )
        .unwrap();
        assert_eq!(r.bootstrap, Some(Bootstrap { host: "h".into(), port: 8998, room: 42 }));
    }

    #[test]
    fn bad_requests() {
        assert!(parse_request(Api::Chat, b"{").unwrap_err().starts_with("Invalid JSON"));
        assert!(parse_request(Api::Chat, b"[]").is_err());
        assert!(parse_request(Api::Chat, br#"{"messages":"x"}"#).is_err());
        assert!(parse_request(Api::Completions, br#"{"model":"m"}"#).is_err());
        assert!(parse_request(Api::Completions, br#"{"prompt":"p","max_tokens":-1}"#).is_err());
        assert!(parse_request(Api::Completions, br#"{"prompt":"p","bootstrap_room":1}"#).is_err());
    }

    #[test]
    fn output_length_rules() {
        let mut r = parse_request(Api::Completions, br#"{"prompt":"p"}"#).unwrap();
        assert_eq!(output_tokens(&r, 4096).0, 16);
        r.max_tokens = Some(1000);
        let (n, why) = output_tokens(&r, 4096);
        assert!((16..272).contains(&n) && why == "stop");
        r.ignore_eos = true;
        assert_eq!(output_tokens(&r, 4096), (1000, "length"));
        assert_eq!(output_tokens(&r, 100), (99, "length"));
    }

    #[test]
    fn answers_are_deterministic_one_token_words() {
        for i in 0..50 {
            assert_eq!(token_text(9, i).len(), pdgate_core::tokens::BYTES_PER_TOKEN);
            assert_eq!(token_text(9, i), token_text(9, i));
        }
        let r = parse_request(Api::Chat, br#"{"model":"m","messages":[]}"#).unwrap();
        let u = Usage { prompt: 3, completion: 2, cached: 0 };
        let body: Value = serde_json::from_slice(&completion_json(
            &r,
            "x",
            1,
            " a b",
            "stop",
            u,
            Some(json!({"k":1})),
        ))
        .unwrap();
        assert_eq!(body["usage"]["total_tokens"], 5);
        assert_eq!(body["kv_transfer_params"]["k"], 1);
        assert_eq!(body["choices"][0]["message"]["content"], " a b");
        let c = String::from_utf8(stream_chunk(&r, "x", 1, None, None, None)).unwrap();
        assert!(
            c.starts_with("data: {") && c.contains("\"role\":\"assistant\"") && c.ends_with("\n\n")
        );
    }
}
