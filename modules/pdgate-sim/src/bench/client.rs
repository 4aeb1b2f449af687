//! One request from the sequence to its record: render the body, send it,
//! time the answer as it streams in.
//!
//! TTFT is the time from writing the request to the read that brought the
//! first content event (or, for a JSON answer, the whole answer); ITL the
//! gaps between the reads that brought later content events; E2E the time
//! to the end of the answer. Output tokens are the final `usage`'s when the
//! server sends one, else the content events counted.

use std::time::{Duration, Instant};

use super::http::{self, Conn, Head, Sink, Target};
use super::sse::{self, SseParser};
use super::stats::Record;
use super::workload::{self, BodyOptions, RequestSpec};
use crate::profile::Profile;

/// Largest part of an error answer kept (nothing reads it; it only must not
/// grow without bound).
const MAX_ERROR_BODY: usize = 4096;

/// Everything requests of a run share.
#[derive(Debug, Clone)]
pub struct Client {
    pub target: Target,
    pub body: BodyOptions,
    /// Extra header lines, each ending in CRLF.
    pub headers: String,
    pub timeout: Duration,
    /// `X-Request-Id` = this + the request's position.
    pub id_prefix: String,
    pub profile: Profile,
}

impl Client {
    pub fn request_id(&self, n: u64) -> String {
        format!("{}{n}", self.id_prefix)
    }

    /// The request, head and body.
    pub fn request_bytes(&self, spec: &RequestSpec, id: &str) -> Vec<u8> {
        let body = workload::body(spec, &self.body);
        let accept = if self.body.stream { "text/event-stream" } else { "application/json" };
        let mut out = format!(
            "POST {}{} HTTP/1.1\r\nHost: {}\r\nUser-Agent: pd-bench\r\n\
             Content-Type: application/json\r\nAccept: {accept}\r\nX-Request-Id: {id}\r\n\
             {}Content-Length: {}\r\n\r\n",
            self.target.prefix,
            self.body.endpoint.path(),
            self.target.authority,
            self.headers,
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(&body);
        out
    }

    /// Sends request `spec` on `slot`'s connection (opening one when
    /// empty). `t0` is the start of the run, `scheduled` its arrival time
    /// (`None`: now).
    pub fn run(
        &self,
        slot: &mut Option<Conn>,
        buf: &mut [u8],
        spec: &RequestSpec,
        t0: Instant,
        scheduled: Option<Instant>,
    ) -> Record {
        let id = self.request_id(spec.n);
        let input_tokens = spec.input_tokens();
        let request = self.request_bytes(spec, &id);
        let mut rec = Record {
            n: spec.n,
            id,
            conv: spec.conv,
            input_tokens,
            max_tokens: spec.max_tokens,
            ideal_ttft_ms: self.profile.ideal_prefill_us(input_tokens) / 1000.0,
            ..Record::default()
        };
        let start = Instant::now();
        rec.start_ms = ms(start.saturating_duration_since(t0));
        rec.scheduled_ms = scheduled.map_or(rec.start_ms, |s| ms(s.saturating_duration_since(t0)));
        let mut acct = Accounting::new(start);
        let result =
            http::exchange(slot, &self.target.addr, self.timeout, &request, buf, &mut acct);
        let end = Instant::now();
        rec.status = acct.status;
        if let Err(f) = result {
            rec.error = Some(f.class());
            return rec;
        }
        acct.finish(&mut rec, end);
        // The prompt as the server counted it (chat templates, a real
        // tokenizer) is what it prefilled.
        if let Some(p) = rec.prompt_tokens {
            rec.ideal_ttft_ms = self.profile.ideal_prefill_us(p) / 1000.0;
        }
        rec
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The sink that times an answer.
struct Accounting {
    start: Instant,
    status: u16,
    /// Some for a successful event-stream answer.
    sse: Option<SseParser>,
    /// A JSON answer, or the start of an error answer.
    body: Vec<u8>,
    first: Option<Instant>,
    last: Option<Instant>,
    itl: Vec<f64>,
    events: u64,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    stream_error: bool,
    /// `data: [DONE]` arrived.
    done: bool,
}

impl Accounting {
    fn new(start: Instant) -> Accounting {
        Accounting {
            start,
            status: 0,
            sse: None,
            body: Vec::new(),
            first: None,
            last: None,
            itl: Vec::new(),
            events: 0,
            prompt_tokens: None,
            completion_tokens: None,
            stream_error: false,
            done: false,
        }
    }

    fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    fn event(&mut self, data: &[u8], now: Instant) {
        let info = sse::classify(data);
        self.stream_error |= info.error;
        self.done |= info.done;
        if let Some((p, c)) = info.usage {
            self.prompt_tokens = p.or(self.prompt_tokens);
            self.completion_tokens = c.or(self.completion_tokens);
        }
        if info.content {
            self.events += 1;
            match self.last {
                None => self.first = Some(now),
                Some(last) => self.itl.push(ms(now - last)),
            }
            self.last = Some(now);
        }
    }

    /// Fills in the record of a complete answer.
    fn finish(mut self, rec: &mut Record, end: Instant) {
        if !self.ok() {
            rec.error = Some(format!("http {}", self.status));
            return;
        }
        rec.e2e_ms = Some(ms(end - self.start));
        if let Some(mut p) = self.sse.take() {
            p.finish(&mut |d| self.event(d, end));
            rec.ttft_ms = self.first.map(|t| ms(t - self.start));
            rec.stream = true;
            rec.events = self.events;
            rec.itl_ms = self.itl;
            rec.prompt_tokens = self.prompt_tokens;
            rec.output_tokens = self.completion_tokens.unwrap_or(self.events);
            if self.stream_error {
                rec.error = Some("stream error".into());
            } else if self.first.is_none() {
                rec.error = Some("empty stream".into());
            } else if !self.done {
                rec.error = Some("stream without [DONE]".into());
            }
        } else {
            let (prompt, completion) = sse::classify_json(&self.body);
            rec.ttft_ms = rec.e2e_ms;
            rec.prompt_tokens = prompt;
            rec.output_tokens = completion.unwrap_or(0);
        }
    }
}

impl Sink for Accounting {
    fn head(&mut self, head: &Head) {
        self.status = head.status;
        if self.ok() && head.is_sse() {
            self.sse = Some(SseParser::new());
        }
    }

    fn body(&mut self, data: &[u8]) {
        if let Some(mut p) = self.sse.take() {
            let now = Instant::now();
            p.feed(data, &mut |d| self.event(d, now));
            self.sse = Some(p);
        } else if self.ok() {
            self.body.extend_from_slice(data);
        } else {
            let room = MAX_ERROR_BODY.saturating_sub(self.body.len());
            self.body.extend_from_slice(&data[..data.len().min(room)]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(head: &[u8], body_pieces: &[&[u8]]) -> Record {
        let start = Instant::now();
        let mut a = Accounting::new(start);
        let mut p = http::ResponseParser::new();
        p.feed(head, &mut a).unwrap();
        for piece in body_pieces {
            std::thread::sleep(Duration::from_millis(2));
            p.feed(piece, &mut a).unwrap();
        }
        let mut rec = Record::default();
        a.finish(&mut rec, Instant::now());
        rec
    }

    const SSE_HEAD: &[u8] =
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";

    #[test]
    fn stream_timing_and_usage() {
        let ev = |s: &str| format!("{:x}\r\n{s}\r\n", s.len()).into_bytes();
        let role =
            ev("data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n");
        let tok = ev("data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n");
        // An event split across two reads.
        let (t1, t2) = tok.split_at(20);
        let usage = ev("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":3}}\n\ndata: [DONE]\n\n");
        let r = account(SSE_HEAD, &[&role, &tok, t1, t2, &tok, &usage, b"0\r\n\r\n"]);
        assert_eq!(r.error, None);
        assert_eq!((r.events, r.output_tokens, r.prompt_tokens), (3, 3, Some(4)));
        assert_eq!(r.itl_ms.len(), 2);
        let (ttft, e2e) = (r.ttft_ms.unwrap(), r.e2e_ms.unwrap());
        assert!(ttft >= 4.0 && e2e >= ttft + 6.0, "{ttft} {e2e}");
        assert!(r.itl_ms.iter().all(|&g| g >= 1.5));
    }

    #[test]
    fn stream_without_usage_counts_events() {
        let body = b"data: {\"index\":0}\n\ndata: {\"index\":1}\n\ndata: [DONE]\n\n";
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let r = account(head.as_bytes(), &[body]);
        assert_eq!((r.error, r.events, r.output_tokens), (None, 2, 2));
    }

    #[test]
    fn stream_errors() {
        let r = account(SSE_HEAD, &[b"0\r\n\r\n"]);
        assert_eq!(r.error.as_deref(), Some("empty stream"));
        let e = b"data: {\"error\":{\"message\":\"x\"}}\n\n";
        let chunk = [format!("{:x}\r\n", e.len()).as_bytes(), e, b"\r\n0\r\n\r\n"].concat();
        let r = account(SSE_HEAD, &[&chunk]);
        assert_eq!(r.error.as_deref(), Some("stream error"));
        let cut = b"data: {\"choices\":[{\"text\":\"a\"}]}\n\n";
        let chunk = [format!("{:x}\r\n", cut.len()).as_bytes(), cut, b"\r\n0\r\n\r\n"].concat();
        let r = account(SSE_HEAD, &[&chunk]);
        assert_eq!(r.error.as_deref(), Some("stream without [DONE]"));
        let r = account(b"HTTP/1.1 503 Busy\r\nContent-Length: 2\r\n\r\n", &[b"no"]);
        assert_eq!((r.error.as_deref(), r.ttft_ms), (Some("http 503"), None));
    }

    #[test]
    fn json_answer() {
        let body = br#"{"choices":[{"message":{"content":"hello"}}],"usage":{"prompt_tokens":3,"completion_tokens":2}}"#;
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
        let r = account(head.as_bytes(), &[body]);
        assert_eq!((r.error.as_deref(), r.output_tokens, r.prompt_tokens), (None, 2, Some(3)));
        assert_eq!(r.ttft_ms, r.e2e_ms);
        assert_eq!(r.tpot_ms(), None);
    }
}
