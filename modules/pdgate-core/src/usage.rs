//! An answer's `usage`, read and rewritten as it passes: [`UsageScanner`]
//! finds its token counts (metrics, balancers); [`CachedTokens`] makes the
//! client's `usage.prompt_tokens_details.cached_tokens` the prefill's
//! prefix-cache hits, not the decode's.
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

/// Finds the last `usage.prompt_tokens`, `usage.completion_tokens` and
/// `usage.total_tokens` of an answer that arrives in pieces (the metrics
/// read the first two; a balancer learning what a request holds on its
/// engine reads the third), without copying it: each piece is searched
/// where it lies for the keys' common end (`_tokens"`). A key split between
/// two pieces is found in a small join of the previous piece's last bytes
/// and the new piece's head; what follows a key (whitespace, `:`, the
/// digits) is read by a small state machine that carries over any number
/// of pieces, so the counts never depend on where the pieces end.
#[derive(Debug, Clone, Copy, Default)]
pub struct UsageScanner {
    pub prompt: Option<u64>,
    pub completion: Option<u64>,
    pub total: Option<u64>,
    /// The read of a key's value that reached the end of the last piece.
    pending: Option<Value>,
    tail: [u8; TAIL],
    tail_len: u8,
}

/// Bytes kept from a piece's end: the longest key, `"completion_tokens"`,
/// less its last byte (a key that ended in the last piece was found there).
const TAIL: usize = 18;

const NEEDLE: &[u8] = b"_tokens\"";

/// Which count a key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Prompt,
    Completion,
    Total,
}

impl Field {
    /// The length of its key, quotes included.
    fn key_len(self) -> usize {
        NEEDLE.len()
            + match self {
                Field::Prompt => "\"prompt".len(),
                Field::Completion => "\"completion".len(),
                Field::Total => "\"total".len(),
            }
    }
}

/// Where the read of a key's value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Whitespace, then `:`.
    Colon,
    /// Whitespace, then the first digit.
    First,
    /// Digits so far (`None` once beyond `u64`).
    Digits(Option<u64>),
}

/// The read of one key's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Value {
    field: Field,
    phase: Phase,
}

/// What reading a value from a piece came to.
enum Read {
    /// The value ended at this index: a count (or nothing: not a number).
    Done(usize, Option<u64>),
    /// The piece ended first.
    More(Value),
}

impl Value {
    fn read(mut self, s: &[u8], mut i: usize) -> Read {
        while let Some(&b) = s.get(i) {
            match self.phase {
                Phase::Colon if b == b':' => self.phase = Phase::First,
                Phase::Colon | Phase::First if b.is_ascii_whitespace() => {}
                Phase::First | Phase::Digits(_) if b.is_ascii_digit() => {
                    let v = match self.phase {
                        Phase::Digits(v) => v,
                        _ => Some(0),
                    };
                    let d = u64::from(b - b'0');
                    self.phase = Phase::Digits(v.and_then(|v| v.checked_mul(10)?.checked_add(d)));
                }
                Phase::Digits(v) => return Read::Done(i, v),
                _ => return Read::Done(i, None),
            }
            i += 1;
        }
        Read::More(self)
    }
}

impl UsageScanner {
    /// Scans the next piece of the answer.
    pub fn feed(&mut self, piece: &[u8]) {
        if piece.is_empty() {
            return;
        }
        let mut from = 0;
        if let Some(v) = self.pending.take() {
            from = match self.finish(v, piece, 0) {
                Some(end) => end,
                None => piece.len(),
            };
        }
        let t = usize::from(self.tail_len);
        if t > 0 && from == 0 {
            // A key begun in the last piece and ended in this one: it ends
            // within this piece's first TAIL bytes.
            let mut join = [0u8; 2 * TAIL];
            let h = piece.len().min(TAIL);
            join[..t].copy_from_slice(&self.tail[..t]);
            join[t..t + h].copy_from_slice(&piece[..h]);
            let j = &join[..t + h];
            let mut at = 0;
            while let Some(p) = find(&j[at..], NEEDLE) {
                let key_end = at + p + NEEDLE.len();
                let field = field_before(&j[..at + p]);
                at += p + 1;
                let Some(field) = field else { continue };
                if key_end > t && key_end - field.key_len() < t {
                    let v = Value { field, phase: Phase::Colon };
                    from = self.finish(v, piece, key_end - t).unwrap_or(piece.len());
                    break;
                }
            }
        }
        self.scan(piece, from);
        // Keep the last TAIL bytes of everything seen.
        let keep = piece.len().min(TAIL);
        let old = (t + keep).saturating_sub(TAIL).min(t);
        let kept_old = t - old;
        self.tail.copy_within(old..t, 0);
        self.tail[kept_old..kept_old + keep].copy_from_slice(&piece[piece.len() - keep..]);
        self.tail_len = (kept_old + keep) as u8;
    }

    /// Reads a value from `s[i..]`: records it and gives where it ended, or
    /// keeps the read pending when `s` ends first.
    fn finish(&mut self, v: Value, s: &[u8], i: usize) -> Option<usize> {
        match v.read(s, i) {
            Read::Done(end, n) => {
                if let Some(n) = n {
                    *match v.field {
                        Field::Prompt => &mut self.prompt,
                        Field::Completion => &mut self.completion,
                        Field::Total => &mut self.total,
                    } = Some(n);
                }
                Some(end)
            }
            Read::More(v) => {
                self.pending = Some(v);
                None
            }
        }
    }

    /// Records every `"prompt_tokens": N` / `"completion_tokens": N` /
    /// `"total_tokens": N` of `s` from `from`, in order.
    fn scan(&mut self, s: &[u8], mut at: usize) {
        while let Some(p) = find(&s[at..], NEEDLE) {
            let key_end = at + p + NEEDLE.len();
            let field = field_before(&s[..at + p]);
            at += p + 1;
            let Some(field) = field else { continue };
            match self.finish(Value { field, phase: Phase::Colon }, s, key_end) {
                Some(end) => at = end,
                None => return,
            }
        }
    }
}

/// The count named by the bytes before a `_tokens"`.
fn field_before(head: &[u8]) -> Option<Field> {
    if head.ends_with(b"\"prompt") {
        Some(Field::Prompt)
    } else if head.ends_with(b"\"completion") {
        Some(Field::Completion)
    } else if head.ends_with(b"\"total") {
        Some(Field::Total)
    } else {
        None
    }
}

/// The first position of `needle` in `hay`: a byte scan for its first
/// byte (which the compiler vectorises), then a compare of the rest only
/// there — the answer bytes are looked at about once, not once per byte
/// of the needle.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, rest) = needle.split_first()?;
    let last_start = hay.len().checked_sub(needle.len())?;
    let mut i = 0;
    while i <= last_start {
        i += hay[i..=last_start].iter().position(|&b| b == first)?;
        if &hay[i + 1..i + needle.len()] == rest {
            return Some(i);
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod scanner_tests {
    use super::*;

    fn scan_pieces(pieces: &[&[u8]]) -> (Option<u64>, Option<u64>) {
        let mut u = UsageScanner::default();
        for p in pieces {
            u.feed(p);
        }
        (u.prompt, u.completion)
    }

    #[test]
    fn usage_whole() {
        let body = br#"{"id":"x","choices":[],"usage":{"prompt_tokens":12,"total_tokens":17,"completion_tokens":5,"prompt_tokens_details":null}}"#;
        assert_eq!(scan_pieces(&[body]), (Some(12), Some(5)));
        let spaced = b"{\"usage\": {\"prompt_tokens\" :  3,\n \"completion_tokens\":\t40}}";
        assert_eq!(scan_pieces(&[spaced]), (Some(3), Some(40)));
        // Text inside a string is escaped, so never a key.
        let text = br#"{"content":"\"prompt_tokens\": 99","x_prompt_tokens":1}"#;
        assert_eq!(scan_pieces(&[text]), (None, None));
        assert_eq!(scan_pieces(&[b"data: [DONE]\n\n"]), (None, None));
    }

    #[test]
    fn usage_last_sse_event_wins() {
        let a: &[u8] = b"data: {\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1}}\n\n";
        let b: &[u8] = b"data: {\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}\n\n";
        let c: &[u8] = b"data: {\"choices\":[],\"usage\":null}\n\ndata: [DONE]\n\n";
        assert_eq!(scan_pieces(&[a, b, c]), (Some(5), Some(2)));
    }

    #[test]
    fn usage_split_anywhere() {
        let body: &[u8] = br#"{"choices":[{"text":"hello"}],"usage":{"prompt_tokens":123,"total_tokens":4690,"completion_tokens":4567}}"#;
        for i in 0..=body.len() {
            let (a, b) = body.split_at(i);
            assert_eq!(scan_pieces(&[a, b]), (Some(123), Some(4567)), "split at {i}");
        }
        // One byte at a time.
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(scan_pieces(&bytes), (Some(123), Some(4567)));
        for n in [2, 3, 7, 50] {
            let pieces: Vec<&[u8]> = body.chunks(n).collect();
            assert_eq!(scan_pieces(&pieces), (Some(123), Some(4567)), "chunks of {n}");
        }
    }

    #[test]
    fn usage_total_split_at_every_byte() {
        // What a balancer learns from: `total_tokens`, in SSE events
        // (vLLM's continuous usage stats); the last one counts.
        let body: &[u8] = b"data: {\"usage\":{\"prompt_tokens\":5,\"total_tokens\": 6}}\n\ndata: {\"usage\":{\"prompt_tokens\":5,\"total_tokens\":4077,\"completion_tokens\":4072}}\n\n";
        let total = |pieces: &[&[u8]]| {
            let mut u = UsageScanner::default();
            pieces.iter().for_each(|p| u.feed(p));
            u.total
        };
        assert_eq!(total(&[body]), Some(4077));
        for i in 0..=body.len() {
            let (a, b) = body.split_at(i);
            assert_eq!(total(&[a, b]), Some(4077), "split at {i}");
            for j in i..=body.len() {
                let (b, c) = b.split_at(j - i);
                assert_eq!(total(&[a, b, c]), Some(4077), "split at {i} and {j}");
            }
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(total(&bytes), Some(4077));
        assert_eq!(total(&[b"data: [DONE]"]), None);
        assert_eq!(total(&[b"{\"total_tokens\":x}"]), None);
        // A key of another name that ends the same way is not one.
        assert_eq!(total(&[b"{\"subtotal_tokens\":3}"]), None);
    }

    #[test]
    fn find_agrees_with_a_naive_search() {
        let naive = |h: &[u8], n: &[u8]| h.windows(n.len()).position(|w| w == n);
        let hay = br#"{"usage":{"prompt_tokens":7,"total_tokens":9,"completion_tokens":2}}_tok"#;
        for needle in [&b"_tokens\""[..], b"_tok", b"}", b"{", b"x", b"\"usage\"", b"2}}_tok"] {
            for start in 0..hay.len() {
                assert_eq!(find(&hay[start..], needle), naive(&hay[start..], needle), "{start}");
            }
        }
        assert_eq!(find(b"ab", b"abc"), None);
        assert_eq!(find(b"", b"a"), None);
        assert_eq!(find(b"abc", b""), None);
    }

    /// Whitespace and digits of any length, split anywhere: what follows a
    /// key is read across any number of pieces (the old 32-byte tail lost
    /// a count far from its key or longer than ten digits).
    #[test]
    fn long_runs_split_anywhere() {
        let pad = " \n\t ".repeat(20);
        let body = format!(
            "{{\"usage\":{{\"prompt_tokens\"{pad}:{pad}18446744073709551615,\
             \"completion_tokens\":{pad}00000000000000000000000007,\
             \"total_tokens\":{pad}184467440737095516160}}}}"
        );
        let body = body.as_bytes();
        let want = (Some(u64::MAX), Some(7), None);
        let scan = |pieces: &[&[u8]]| {
            let mut u = UsageScanner::default();
            pieces.iter().for_each(|p| u.feed(p));
            (u.prompt, u.completion, u.total)
        };
        assert_eq!(scan(&[body]), want);
        for i in 0..=body.len() {
            let (a, b) = body.split_at(i);
            assert_eq!(scan(&[a, b]), want, "split at {i}");
        }
        for n in [1, 2, 5, 17, 18, 19, 33] {
            let pieces: Vec<&[u8]> = body.chunks(n).collect();
            assert_eq!(scan(&pieces), want, "chunks of {n}");
        }
    }

    /// Found by the usage_scanner fuzz target: a number cut at the end of a
    /// boundary join (short piece) was taken whole, here 12345974 for 123459745.
    #[test]
    fn number_cut_at_a_join_end_is_not_taken() {
        let answer = br#"{"usage":{"total_tokens":123459745}}"#;
        let at = answer.len() - 4;
        let mut u = UsageScanner::default();
        for piece in [&answer[..at - 3], &answer[at - 3..at], &answer[at..]] {
            u.feed(piece);
        }
        assert_eq!(u.total, Some(123459745));
        let mut u = UsageScanner::default();
        u.feed(&answer[..answer.len() - 3]);
        u.feed(&answer[answer.len() - 3..answer.len() - 2]);
        assert_eq!(u.total, None);
    }
}
