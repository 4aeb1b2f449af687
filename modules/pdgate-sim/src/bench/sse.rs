//! Server-sent events: an incremental parser (events may be split across
//! reads anywhere, lines end in LF, CRLF or CR) and what pd-bench reads
//! from each OpenAI streaming event.

use serde_json::Value;

/// Collects `data:` lines into events (the WHATWG event-stream rules:
/// `data` lines of one event are joined with LF, a blank line dispatches,
/// `:` starts a comment, other fields are ignored).
#[derive(Debug, Clone, Default)]
pub struct SseParser {
    line: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
    /// The last byte seen was CR: an LF right after it ends nothing.
    after_cr: bool,
}

impl SseParser {
    pub fn new() -> SseParser {
        SseParser::default()
    }

    /// Parses the next bytes, calling `on_event` with each complete event's
    /// data.
    pub fn feed(&mut self, mut bytes: &[u8], on_event: &mut impl FnMut(&[u8])) {
        while !bytes.is_empty() {
            if self.after_cr && bytes[0] == b'\n' {
                bytes = &bytes[1..];
                self.after_cr = false;
                continue;
            }
            self.after_cr = false;
            match bytes.iter().position(|&b| b == b'\n' || b == b'\r') {
                Some(p) => {
                    self.after_cr = bytes[p] == b'\r';
                    if self.line.is_empty() {
                        self.line_done(&bytes[..p], on_event);
                    } else {
                        self.line.extend_from_slice(&bytes[..p]);
                        let line = std::mem::take(&mut self.line);
                        self.line_done(&line, on_event);
                        self.line = line;
                        self.line.clear();
                    }
                    bytes = &bytes[p + 1..];
                }
                None => {
                    self.line.extend_from_slice(bytes);
                    bytes = &[];
                }
            }
        }
    }

    /// The stream ended: an event missing its final blank line still
    /// counts (lenient; the standard would drop it).
    pub fn finish(&mut self, on_event: &mut impl FnMut(&[u8])) {
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.line_done(&line, on_event);
        }
        self.line_done(b"", on_event);
    }

    fn line_done(&mut self, line: &[u8], on_event: &mut impl FnMut(&[u8])) {
        if line.is_empty() {
            if self.has_data {
                on_event(&self.data);
                self.data.clear();
                self.has_data = false;
            }
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(0) => return, // comment
            Some(p) => {
                let v = &line[p + 1..];
                (&line[..p], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        if field == b"data" {
            if self.has_data {
                self.data.push(b'\n');
            }
            self.data.extend_from_slice(value);
            self.has_data = true;
        }
    }
}

/// What one event's data says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EventInfo {
    /// `[DONE]`.
    pub done: bool,
    /// Carries output: a choice with text, content, reasoning or tool
    /// calls; or any event of a non-OpenAI stream (no `choices` field).
    pub content: bool,
    /// `usage.prompt_tokens`, `usage.completion_tokens`.
    pub usage: Option<(Option<u64>, Option<u64>)>,
    /// An `{"error": ...}` event (vLLM reports mid-stream failures so).
    pub error: bool,
}

fn usage_of(v: &Value) -> Option<(Option<u64>, Option<u64>)> {
    let u = v.get("usage").filter(|u| u.is_object())?;
    Some((u["prompt_tokens"].as_u64(), u["completion_tokens"].as_u64()))
}

fn non_empty(v: &Value) -> bool {
    match v {
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Null => false,
        _ => true,
    }
}

fn choice_has_output(c: &Value) -> bool {
    if c.get("text").is_some_and(non_empty) {
        return true;
    }
    let Some(delta) = c.get("delta").or_else(|| c.get("message")) else {
        return false;
    };
    ["content", "reasoning_content", "reasoning", "tool_calls"]
        .iter()
        .any(|k| delta.get(k).is_some_and(non_empty))
}

/// Reads one event's data.
pub fn classify(data: &[u8]) -> EventInfo {
    let trimmed = data.trim_ascii();
    if trimmed == b"[DONE]" {
        return EventInfo { done: true, ..EventInfo::default() };
    }
    let Ok(v) = serde_json::from_slice::<Value>(trimmed) else {
        return EventInfo { content: !trimmed.is_empty(), ..EventInfo::default() };
    };
    let usage = usage_of(&v);
    match v.get("choices") {
        Some(Value::Array(choices)) => EventInfo {
            content: choices.iter().any(choice_has_output),
            usage,
            ..EventInfo::default()
        },
        Some(_) => EventInfo { usage, ..EventInfo::default() },
        None if v.get("error").is_some_and(|e| !e.is_null()) => {
            EventInfo { error: true, usage, ..EventInfo::default() }
        }
        None => EventInfo { content: usage.is_none(), usage, ..EventInfo::default() },
    }
}

/// A whole (non-stream) answer: (prompt tokens, output tokens), the latter
/// from `usage` or else by the shared rule over the answer's text.
pub fn classify_json(body: &[u8]) -> (Option<u64>, Option<u64>) {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return (None, None);
    };
    let (prompt, completion) = usage_of(&v).unwrap_or((None, None));
    let completion = completion.or_else(|| {
        let c = v.get("choices")?.get(0)?;
        let text = c.get("text").or_else(|| c.get("message")?.get("content"))?.as_str()?;
        Some(super::workload::text_tokens(text))
    });
    (prompt, completion)
}

/// Whether a JSON answer is an error object.
pub fn is_error_json(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body)
        .is_ok_and(|v| v.get("error").is_some_and(|e| !e.is_null()) && v.get("choices").is_none())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(input: &[u8], step: usize) -> Vec<String> {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        let mut on = |d: &[u8]| out.push(String::from_utf8_lossy(d).into_owned());
        for piece in input.chunks(step) {
            p.feed(piece, &mut on);
        }
        p.finish(&mut on);
        out
    }

    #[test]
    fn split_anywhere() {
        let s = b": keep-alive\r\n\r\ndata: {\"a\":1}\r\n\r\nevent: x\ndata: two\ndata:lines\n\nid: 3\r\rdata: [DONE]\n\n";
        for step in 1..=s.len() {
            assert_eq!(events(s, step), ["{\"a\":1}", "two\nlines", "[DONE]"], "step {step}");
        }
    }

    #[test]
    fn cr_only_and_unterminated() {
        assert_eq!(events(b"data: a\r\rdata: b\r\r", 1), ["a", "b"]);
        assert_eq!(events(b"data: last", 3), ["last"]);
        assert_eq!(events(b"data\n\n", 3), [""]);
        assert!(events(b"\n\n: only a comment\n\n", 2).is_empty());
    }

    #[test]
    fn openai_chunks() {
        let role = br#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#;
        assert_eq!(classify(role), EventInfo::default());
        let tok = br#"{"choices":[{"index":0,"delta":{"content":"Hi"}}],"usage":null}"#;
        assert_eq!(classify(tok), EventInfo { content: true, ..EventInfo::default() });
        let text = br#"{"choices":[{"index":0,"text":" a","logprobs":null}]}"#;
        assert!(classify(text).content);
        let reasoning = br#"{"choices":[{"delta":{"reasoning_content":"hm"}}]}"#;
        assert!(classify(reasoning).content);
        let usage = br#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}"#;
        assert_eq!(
            classify(usage),
            EventInfo { usage: Some((Some(12), Some(7))), ..EventInfo::default() }
        );
        // continuous_usage_stats: content and usage in one event.
        let both = br#"{"choices":[{"delta":{"content":"x"}}],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#;
        assert_eq!(classify(both).usage, Some((Some(1), Some(2))));
        assert!(classify(both).content);
        assert!(classify(b" [DONE] ").done);
        assert!(classify(br#"{"error":{"message":"boom","code":500}}"#).error);
    }

    #[test]
    fn non_openai_events_count_as_content() {
        assert!(classify(br#"{"index":0,"echo":{"method":"POST"}}"#).content);
        assert!(classify(b"plain text").content);
        assert!(!classify(br#"{"usage":{"completion_tokens":3}}"#).content);
    }

    #[test]
    fn whole_answers() {
        let chat = br#"{"choices":[{"message":{"role":"assistant","content":"abcdefgh"}}],"usage":{"prompt_tokens":5,"completion_tokens":9}}"#;
        assert_eq!(classify_json(chat), (Some(5), Some(9)));
        let no_usage = br#"{"choices":[{"message":{"content":"abcdefghi"}}]}"#;
        assert_eq!(classify_json(no_usage), (None, Some(3)));
        assert_eq!(classify_json(br#"{"choices":[{"text":"abcd"}]}"#), (None, Some(1)));
        assert_eq!(classify_json(br#"{"method":"POST"}"#), (None, None));
        assert!(is_error_json(br#"{"error":{"message":"x"}}"#));
        assert!(!is_error_json(chat));
    }
}
