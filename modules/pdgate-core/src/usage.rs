//! The client's `usage.prompt_tokens_details.cached_tokens` after a P/D
//! request: the prefill's prefix-cache hits, not the decode's.
//!
//! A decode engine of a P/D pair reports the prompt it received through
//! the KV transfer as cached (vLLM NIXL: prompt − 1), which tells the client
//! nothing about its prefix cache; the prefill's own count does (vLLM's
//! router reports it the same way). [`prefill_cached_tokens`] reads it from
//! the prefill's answer; [`CachedTokens`] writes it over the decode's number
//! in the answer's bytes as they pass, in place, padding with spaces (JSON
//! whitespace) so the length never changes. The key cannot occur inside a
//! JSON string (its quotes would be escaped there), so a byte match is a
//! key. A number it cannot overwrite in place (the prefill's is longer, or
//! the decode's is split between two buffers) is left as the decode wrote it.

use crate::json::Object;

const KEY: &[u8] = b"\"cached_tokens\"";

/// `usage.prompt_tokens_details.cached_tokens` of a prefill answer.
pub fn prefill_cached_tokens(answer: &[u8]) -> Option<u64> {
    // Most answers have none: look before parsing.
    memchr::memmem::find(answer, KEY)?;
    let usage = Object::parse(answer).ok()?.get("usage")?;
    let details = Object::parse(usage).ok()?.get("prompt_tokens_details")?;
    let n = Object::parse(details).ok()?.get("cached_tokens")?;
    if n.is_empty() || !n.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(n).ok()?.parse().ok()
}

/// Where the scan is between two pieces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum At {
    /// Looking for the key; `n` bytes of it matched at the end of the last
    /// piece.
    #[default]
    Key,
    Matched(usize),
    /// After the key: whitespace, then `:`, then whitespace.
    Colon,
    Value,
}

/// Rewrites every `"cached_tokens": N` of an answer to the prefill's count.
#[derive(Debug, Clone, Default)]
pub struct CachedTokens {
    digits: Vec<u8>,
    at: At,
    /// Numbers rewritten, and numbers that could not be.
    pub rewritten: u32,
    pub skipped: u32,
}

impl CachedTokens {
    pub fn new(cached: u64) -> CachedTokens {
        CachedTokens { digits: cached.to_string().into_bytes(), ..CachedTokens::default() }
    }

    /// Scans the next piece of the answer, rewriting in place.
    pub fn feed(&mut self, piece: &mut [u8]) {
        let mut i = 0;
        while i < piece.len() {
            match self.at {
                At::Key | At::Matched(_) => {
                    let m = if let At::Matched(m) = self.at { m } else { 0 };
                    if m == 0 {
                        // Jump to the next quote.
                        match piece[i..].iter().position(|&b| b == b'"') {
                            Some(p) => i += p,
                            None => return,
                        }
                    }
                    let m = if let At::Matched(m) = self.at { m } else { 0 };
                    let b = piece[i];
                    if b == KEY[m] {
                        self.at = if m + 1 == KEY.len() { At::Colon } else { At::Matched(m + 1) };
                        i += 1;
                    } else if m > 0 {
                        // Restart: this byte may begin the key.
                        self.at = At::Key;
                    } else {
                        i += 1;
                    }
                }
                At::Colon => {
                    let b = piece[i];
                    if b == b':' {
                        self.at = At::Value;
                    } else if !b.is_ascii_whitespace() {
                        self.at = At::Key;
                        continue;
                    }
                    i += 1;
                }
                At::Value => {
                    let b = piece[i];
                    if b.is_ascii_whitespace() {
                        i += 1;
                        continue;
                    }
                    self.at = At::Key;
                    if !b.is_ascii_digit() {
                        continue;
                    }
                    let end = piece[i..].iter().position(|b| !b.is_ascii_digit()).map(|p| i + p);
                    match end {
                        Some(end) if end - i >= self.digits.len() => {
                            let (num, pad) = piece[i..end].split_at_mut(self.digits.len());
                            num.copy_from_slice(&self.digits);
                            pad.fill(b' ');
                            self.rewritten += 1;
                            i = end;
                        }
                        // Longer than the room, or running into the next
                        // piece: left as it is.
                        Some(end) => {
                            self.skipped += 1;
                            i = end;
                        }
                        None => {
                            self.skipped += 1;
                            self.at = At::Key;
                            return;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(cached: u64, pieces: &[&str]) -> (String, u32, u32) {
        let mut r = CachedTokens::new(cached);
        let mut out = String::new();
        for p in pieces {
            let mut b = p.as_bytes().to_vec();
            r.feed(&mut b);
            out.push_str(std::str::from_utf8(&b).unwrap());
        }
        (out, r.rewritten, r.skipped)
    }

    #[test]
    fn reads_the_prefill_count() {
        let a = br#"{"id":"x","usage":{"prompt_tokens":100,"prompt_tokens_details":{"cached_tokens":64},"completion_tokens":1},"kv_transfer_params":{}}"#;
        assert_eq!(prefill_cached_tokens(a), Some(64));
        assert_eq!(prefill_cached_tokens(br#"{"usage":{"prompt_tokens":3}}"#), None);
        assert_eq!(prefill_cached_tokens(br#"{"usage":{"prompt_tokens_details":null}}"#), None);
        assert_eq!(
            prefill_cached_tokens(br#"{"usage":{"prompt_tokens_details":{"cached_tokens":-1}}}"#),
            None
        );
        assert_eq!(prefill_cached_tokens(b"not json"), None);
    }

    #[test]
    fn rewrites_in_place_keeping_the_length_and_valid_json() {
        let doc = r#"{"choices":[],"usage":{"prompt_tokens":100,"prompt_tokens_details":{"cached_tokens":99},"total_tokens":104}}"#;
        let (out, n, s) = rewrite(7, &[doc]);
        assert_eq!((n, s), (1, 0));
        assert_eq!(out.len(), doc.len());
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 7);
        assert_eq!(v["usage"]["total_tokens"], 104);
        // Equal length: no padding.
        let (out, _, _) = rewrite(42, &[doc]);
        assert!(out.contains(r#""cached_tokens":42}"#), "{out}");
    }

    #[test]
    fn the_key_split_at_every_byte_is_found() {
        let doc = r#"data: {"usage":{"prompt_tokens_details": {"cached_tokens" : 1234}}}"#;
        for cut in 0..doc.len() {
            let (out, n, s) = rewrite(55, &[&doc[..cut], &doc[cut..]]);
            let digits_at = doc.find("1234").unwrap();
            if cut > digits_at && cut <= digits_at + 4 {
                // The number itself is split (or ends the piece, so its
                // end is not known yet): left alone.
                assert_eq!((n, s, out.as_str()), (0, 1, doc), "cut {cut}");
            } else {
                assert_eq!((n, s), (1, 0), "cut {cut}");
                assert!(out.contains(r#""cached_tokens" : 55  }"#), "cut {cut}: {out}");
            }
        }
    }

    #[test]
    fn leaves_what_it_cannot_or_must_not_touch() {
        // A longer number than the room.
        assert_eq!(rewrite(12345, &[r#"{"cached_tokens":9}"#]).0, r#"{"cached_tokens":9}"#);
        // null, a string, a key inside a string, another key.
        for doc in [
            r#"{"cached_tokens":null}"#,
            r#"{"cached_tokens":"9"}"#,
            r#"{"content":"\"cached_tokens\":9"}"#,
            r#"{"xcached_tokens":9,"cached_tokensx":9}"#,
        ] {
            assert_eq!(rewrite(1, &[doc]).0, doc, "{doc}");
        }
        // Every occurrence (one per SSE usage chunk).
        let two = r#"{"cached_tokens":10} {"cached_tokens":20}"#;
        assert_eq!(rewrite(3, &[two]).0, r#"{"cached_tokens":3 } {"cached_tokens":3 }"#);
    }
}
