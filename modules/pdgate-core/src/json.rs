//! A validating scanner for the top level of a JSON object.
//!
//! The P/D rewrites only ever touch top-level keys, so instead of building a
//! full DOM (and re-serialising every prompt byte) we validate the whole text
//! once, remember where each top-level member sits, and let the callers splice
//! byte ranges. Work is one pass over the input plus O(members) bookkeeping;
//! nested values are validated but never materialised.
//!
//! The grammar accepted is RFC 8259 exactly (the same inputs `serde_json`
//! accepts, which the tests cross-check), with a nesting limit.

use std::fmt;
use std::ops::Range;

/// Deepest nesting of arrays/objects accepted inside a body.
pub const MAX_DEPTH: usize = 128;

/// Most top-level members accepted in one object. A chat or completion
/// request has a few dozen; the bound keeps the member list (the only memory
/// the scanner allocates, 40 bytes a member) at a fixed size whatever the body,
/// where a 60 MB body of `"a":1,` would otherwise need ~400 MB of it.
pub const MAX_MEMBERS: usize = 1024;

/// Why a body is not a JSON object we can work with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonError {
    /// Zero bytes, or only whitespace.
    Empty,
    /// A syntax error at a byte offset, with what was expected there.
    Syntax { offset: usize, expected: &'static str },
    /// Valid JSON whose top-level value is not an object.
    NotObject,
    /// Nesting deeper than [`MAX_DEPTH`].
    TooDeep { offset: usize },
    /// More than [`MAX_MEMBERS`] top-level members.
    TooManyMembers { offset: usize },
}

impl JsonError {
    /// The HTTP status a request body with this error is refused with:
    /// 413 when it is too large to look at, 400 otherwise.
    pub fn status(&self) -> u16 {
        match self {
            JsonError::TooManyMembers { .. } => 413,
            _ => 400,
        }
    }

    /// Beyond pdgate's documented bounds (members, depth) although perhaps
    /// valid JSON an engine would take: such a body is never forwarded
    /// unchecked (its reserved keys could not be looked for).
    pub fn is_bound(&self) -> bool {
        matches!(self, JsonError::TooDeep { .. } | JsonError::TooManyMembers { .. })
    }
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JsonError::Empty => f.write_str("body is empty"),
            JsonError::Syntax { offset, expected } => {
                write!(f, "invalid JSON: expected {expected} at byte {offset}")
            }
            JsonError::NotObject => f.write_str("top-level JSON value is not an object"),
            JsonError::TooDeep { offset } => {
                write!(f, "JSON nested deeper than {MAX_DEPTH} levels at byte {offset}")
            }
            JsonError::TooManyMembers { offset } => {
                write!(f, "JSON object has more than {MAX_MEMBERS} members at byte {offset}")
            }
        }
    }
}

impl std::error::Error for JsonError {}

/// One top-level `"key": value` member, as byte ranges into the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// From the key's opening quote to its closing quote, inclusive.
    pub key: Range<usize>,
    /// True when the key text contains a backslash escape.
    pub key_escaped: bool,
    /// The value's text, without surrounding whitespace.
    pub value: Range<usize>,
}

/// A parsed top-level object: the source and where its members are.
#[derive(Debug, Clone)]
pub struct Object<'a> {
    src: &'a [u8],
    /// Index of the opening `{`.
    pub open: usize,
    /// Index of the closing `}`.
    pub close: usize,
    pub members: Vec<Member>,
}

impl<'a> Object<'a> {
    /// Validates `src` as a JSON document whose top-level value is an object.
    pub fn parse(src: &'a [u8]) -> Result<Self, JsonError> {
        let mut p = Parser { s: src, i: 0 };
        p.ws();
        if p.i == src.len() {
            return Err(JsonError::Empty);
        }
        if src[p.i] != b'{' {
            // Tell "valid but not an object" apart from garbage.
            p.value(0)?;
            p.ws();
            if p.i != src.len() {
                return Err(p.err("end of input"));
            }
            return Err(JsonError::NotObject);
        }
        let open = p.i;
        p.i += 1;
        let mut members = Vec::with_capacity(16);
        p.ws();
        if p.peek() == Some(b'}') {
            p.i += 1;
        } else {
            loop {
                p.ws();
                if p.peek() != Some(b'"') {
                    return Err(p.err("'\"' (an object key)"));
                }
                if members.len() == MAX_MEMBERS {
                    return Err(JsonError::TooManyMembers { offset: p.i });
                }
                let kstart = p.i;
                let key_escaped = p.string()?;
                let key = kstart..p.i;
                p.ws();
                if p.peek() != Some(b':') {
                    return Err(p.err("':'"));
                }
                p.i += 1;
                p.ws();
                let vstart = p.i;
                p.value(1)?;
                members.push(Member { key, key_escaped, value: vstart..p.i });
                p.ws();
                match p.peek() {
                    Some(b',') => p.i += 1,
                    Some(b'}') => {
                        p.i += 1;
                        break;
                    }
                    _ => return Err(p.err("',' or '}'")),
                }
            }
        }
        let close = p.i - 1;
        p.ws();
        if p.i != src.len() {
            return Err(p.err("end of input"));
        }
        Ok(Object { src, open, close, members })
    }

    /// The source text the ranges point into.
    pub fn src(&self) -> &'a [u8] {
        self.src
    }

    /// True when the member's key equals `name` (escapes decoded).
    pub fn key_is(&self, m: &Member, name: &str) -> bool {
        let raw = &self.src[m.key.start + 1..m.key.end - 1];
        if !m.key_escaped {
            return raw == name.as_bytes();
        }
        unescaped_eq(raw, name.as_bytes())
    }

    /// The raw text of the value of the last member named `name` (JSON
    /// decoders keep the last of duplicate keys, so this is what an engine sees).
    pub fn get(&self, name: &str) -> Option<&'a [u8]> {
        self.members.iter().rev().find(|m| self.key_is(m, name)).map(|m| &self.src[m.value.clone()])
    }

    /// True when some member is named `name`.
    pub fn has(&self, name: &str) -> bool {
        self.members.iter().any(|m| self.key_is(m, name))
    }
}

/// True when the raw text of a key (between its quotes, already validated by
/// [`Parser::string`]) decodes to `name`. Decodes escapes one at a time while
/// comparing, so an escaped key costs one pass and no allocation.
fn unescaped_eq(raw: &[u8], name: &[u8]) -> bool {
    let (mut i, mut j) = (0, 0);
    while i < raw.len() {
        if raw[i] != b'\\' {
            if name.get(j) != Some(&raw[i]) {
                return false;
            }
            i += 1;
            j += 1;
            continue;
        }
        let single = match raw.get(i + 1) {
            Some(b'"') => b'"',
            Some(b'\\') => b'\\',
            Some(b'/') => b'/',
            Some(b'b') => 0x08,
            Some(b'f') => 0x0c,
            Some(b'n') => b'\n',
            Some(b'r') => b'\r',
            Some(b't') => b'\t',
            Some(b'u') => {
                let Some(hi) = hex4(raw.get(i + 2..i + 6)) else { return false };
                i += 6;
                let code = if (0xd800..0xdc00).contains(&hi) {
                    // The scanner only lets a high surrogate through when a
                    // `\uDC00`..`\uDFFF` escape follows it.
                    let Some(lo) = hex4(raw.get(i + 2..i + 6)) else { return false };
                    i += 6;
                    0x10000 + ((hi - 0xd800) << 10) + (lo.wrapping_sub(0xdc00) & 0x3ff)
                } else {
                    hi
                };
                let Some(c) = char::from_u32(code) else { return false };
                let mut buf = [0u8; 4];
                let enc = c.encode_utf8(&mut buf).as_bytes();
                if name.get(j..j + enc.len()) != Some(enc) {
                    return false;
                }
                j += enc.len();
                continue;
            }
            _ => return false,
        };
        if name.get(j) != Some(&single) {
            return false;
        }
        i += 2;
        j += 1;
    }
    j == name.len()
}

/// The value of four hex digits.
fn hex4(d: Option<&[u8]>) -> Option<u32> {
    let d = d?;
    let s = std::str::from_utf8(d).ok()?;
    u32::from_str_radix(s, 16).ok()
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// True when some byte of `w` is `"`, `\\`, below 0x20 or 0x80 and above
/// (the classic "has a byte less than n / equal to c" bit tricks; exact as
/// an existence test).
fn needs_attention(w: u64) -> bool {
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS != 0;
    let control = w.wrapping_sub(ONES * 0x20) & !w & HIGHS != 0;
    w & HIGHS != 0
        || control
        || has_zero(w ^ (ONES * u64::from(b'"')))
        || has_zero(w ^ (ONES * u64::from(b'\\')))
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn err(&self, expected: &'static str) -> JsonError {
        JsonError::Syntax { offset: self.i, expected }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    fn value(&mut self, depth: usize) -> Result<(), JsonError> {
        match self.peek() {
            Some(b'"') => self.string().map(|_| ()),
            Some(b'{') => self.object(depth + 1),
            Some(b'[') => self.array(depth + 1),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => Err(self.err("a JSON value")),
        }
    }

    fn literal(&mut self, lit: &'static [u8]) -> Result<(), JsonError> {
        if self.s[self.i..].starts_with(lit) {
            self.i += lit.len();
            Ok(())
        } else {
            Err(self.err("a JSON value"))
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        self.i - start
    }

    fn number(&mut self) -> Result<(), JsonError> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(self.err("a digit")),
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return Err(self.err("a digit"));
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if self.digits() == 0 {
                return Err(self.err("a digit"));
            }
        }
        Ok(())
    }

    /// Scans a string starting at its opening quote; returns whether it
    /// contained an escape. Validates escapes, control characters and UTF-8
    /// (including surrogate pairing of `\u` escapes, as serde_json does).
    fn string(&mut self) -> Result<bool, JsonError> {
        self.i += 1;
        let mut escaped = false;
        loop {
            // Fast path over plain ASCII: eight bytes at a time while none of
            // them is a quote, a backslash, a control character or non-ASCII
            // (prompts are long runs of such text), then byte by byte.
            while let Some(chunk) = self.s.get(self.i..self.i + 8) {
                let Ok(bytes) = <[u8; 8]>::try_from(chunk) else { break };
                if needs_attention(u64::from_le_bytes(bytes)) {
                    break;
                }
                self.i += 8;
            }
            while let Some(&c) = self.s.get(self.i) {
                if c == b'"' || c == b'\\' || !(0x20..0x80).contains(&c) {
                    break;
                }
                self.i += 1;
            }
            match self.peek() {
                None => return Err(self.err("'\"' (end of string)")),
                Some(b'"') => {
                    self.i += 1;
                    return Ok(escaped);
                }
                Some(b'\\') => {
                    escaped = true;
                    self.i += 1;
                    match self.peek() {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.i += 1,
                        Some(b'u') => {
                            self.i += 1;
                            let cp = self.hex4()?;
                            if (0xD800..0xDC00).contains(&cp) {
                                if !self.s[self.i..].starts_with(b"\\u") {
                                    return Err(self.err("a low surrogate escape"));
                                }
                                self.i += 2;
                                let lo = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&lo) {
                                    return Err(self.err("a low surrogate escape"));
                                }
                            } else if (0xDC00..0xE000).contains(&cp) {
                                return Err(self.err("a high surrogate before a low one"));
                            }
                        }
                        _ => return Err(self.err("a valid escape")),
                    }
                }
                Some(c) if c < 0x20 => return Err(self.err("no control character in a string")),
                Some(_) => self.utf8()?,
            }
        }
    }

    fn hex4(&mut self) -> Result<u32, JsonError> {
        let mut v = 0u32;
        for _ in 0..4 {
            let d = match self.peek() {
                Some(c @ b'0'..=b'9') => c - b'0',
                Some(c @ b'a'..=b'f') => c - b'a' + 10,
                Some(c @ b'A'..=b'F') => c - b'A' + 10,
                _ => return Err(self.err("four hex digits")),
            };
            v = v * 16 + u32::from(d);
            self.i += 1;
        }
        Ok(v)
    }

    /// One multi-byte UTF-8 sequence at `self.i`.
    fn utf8(&mut self) -> Result<(), JsonError> {
        let rest = &self.s[self.i..];
        let n = match rest[0] {
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => return Err(self.err("valid UTF-8")),
        };
        match rest.get(..n).map(std::str::from_utf8) {
            Some(Ok(_)) => {
                self.i += n;
                Ok(())
            }
            _ => Err(self.err("valid UTF-8")),
        }
    }

    fn object(&mut self, depth: usize) -> Result<(), JsonError> {
        if depth > MAX_DEPTH {
            return Err(JsonError::TooDeep { offset: self.i });
        }
        self.i += 1;
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(());
        }
        loop {
            self.ws();
            if self.peek() != Some(b'"') {
                return Err(self.err("'\"' (an object key)"));
            }
            self.string()?;
            self.ws();
            if self.peek() != Some(b':') {
                return Err(self.err("':'"));
            }
            self.i += 1;
            self.ws();
            self.value(depth)?;
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return Err(self.err("',' or '}'")),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<(), JsonError> {
        if depth > MAX_DEPTH {
            return Err(JsonError::TooDeep { offset: self.i });
        }
        self.i += 1;
        self.ws();
        if self.peek() == Some(b']') {
            self.i += 1;
            return Ok(());
        }
        loop {
            self.ws();
            self.value(depth)?;
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b']') => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return Err(self.err("',' or ']'")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(o: &Object) -> Vec<String> {
        o.members
            .iter()
            .map(|m| serde_json::from_slice::<String>(&o.src()[m.key.clone()]).unwrap())
            .collect()
    }

    #[test]
    fn members_and_ranges() {
        let src = br#" { "a" : 1 , "b":[1,{"c":"}"}], "d\u0041":"x\"y" } "#;
        let o = Object::parse(src).unwrap();
        assert_eq!(keys(&o), ["a", "b", "dA"]);
        assert_eq!(&src[o.members[0].value.clone()], b"1");
        assert_eq!(&src[o.members[1].value.clone()], br#"[1,{"c":"}"}]"#);
        assert_eq!(&src[o.members[2].value.clone()], br#""x\"y""#);
        assert!(o.members[2].key_escaped && !o.members[0].key_escaped);
        assert_eq!(src[o.open], b'{');
        assert_eq!(src[o.close], b'}');
        assert_eq!(o.close, src.len() - 2);
        assert_eq!(o.get("dA"), Some(&br#""x\"y""#[..]));
        assert!(o.has("b") && !o.has("c"));
    }

    #[test]
    fn word_scan_finds_every_special_byte() {
        for pos in 0..8 {
            for b in [b'"', b'\\', 0x00, 0x1f, 0x80, 0xff, 0xc3] {
                let mut w = [b'a'; 8];
                w[pos] = b;
                assert!(needs_attention(u64::from_le_bytes(w)), "{b:#x} at {pos}");
            }
            for b in [b' ', b'!', b'#', b'[', b']', b'~', 0x7f] {
                let mut w = [b'a'; 8];
                w[pos] = b;
                assert!(!needs_attention(u64::from_le_bytes(w)), "{b:#x} at {pos}");
            }
        }
        // Every position of a special byte within long plain runs is found.
        for n in 0..40 {
            let s = format!("{{\"k\":\"{}\\n{}\"}}", "x".repeat(n), "y".repeat(n % 9));
            let o = Object::parse(s.as_bytes()).unwrap();
            assert!(o.members[0].value.end == s.len() - 1);
        }
    }

    #[test]
    fn duplicate_keys_last_wins() {
        let o = Object::parse(br#"{"k":1,"k":2}"#).unwrap();
        assert_eq!(o.members.len(), 2);
        assert_eq!(o.get("k"), Some(&b"2"[..]));
    }

    #[test]
    fn errors() {
        let cases: &[(&[u8], JsonError)] = &[
            (b"", JsonError::Empty),
            (b"  \n", JsonError::Empty),
            (b"[1,2]", JsonError::NotObject),
            (b"\"s\"", JsonError::NotObject),
            (b"{", JsonError::Syntax { offset: 1, expected: "'\"' (an object key)" }),
            (b"{\"a\":1,}", JsonError::Syntax { offset: 7, expected: "'\"' (an object key)" }),
            (b"{\"a\" 1}", JsonError::Syntax { offset: 5, expected: "':'" }),
            (b"{\"a\":1}x", JsonError::Syntax { offset: 7, expected: "end of input" }),
            (b"{\"a\":01}", JsonError::Syntax { offset: 6, expected: "',' or '}'" }),
            (b"{\"a\":tru}", JsonError::Syntax { offset: 5, expected: "a JSON value" }),
            (b"not json", JsonError::Syntax { offset: 0, expected: "a JSON value" }),
        ];
        for (src, want) in cases {
            assert_eq!(Object::parse(src).unwrap_err(), *want, "{}", String::from_utf8_lossy(src));
        }
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert!(matches!(Object::parse(deep.as_bytes()), Err(JsonError::TooDeep { .. })));
        let ok = format!("{{\"a\":{}{}}}", "[".repeat(MAX_DEPTH - 1), "]".repeat(MAX_DEPTH - 1));
        assert!(Object::parse(ok.as_bytes()).is_ok());
        assert!(JsonError::Syntax { offset: 3, expected: "':'" }.to_string().contains("byte 3"));
    }

    /// Accepts exactly what serde_json accepts (for object documents), over a
    /// table of tricky inputs and a seeded random mutation of valid ones.
    #[test]
    fn agrees_with_serde_json() {
        let mut inputs: Vec<Vec<u8>> = [
            &br#"{"s":"\ud83d\ude00"}"#[..],
            br#"{"s":"\ud83d"}"#,
            br#"{"s":"\ude00"}"#,
            br#"{"s":"\u00e9\n\t\/"}"#,
            br#"{"s":"\x"}"#,
            "{\"s\":\"caf\u{e9} \u{1F600}\"}".as_bytes(),
            b"{\"s\":\"\xff\"}",
            b"{\"s\":\"\xc3\"}",
            b"{\"s\":\"\xed\xa0\x80\"}",
            b"{\"s\":\"a\x01b\"}",
            br#"{"n":-0.5e+10,"m":1E3,"z":0}"#,
            br#"{"n":-}"#,
            br#"{"n":1.}"#,
            br#"{"n":.5}"#,
            br#"{"n":1e}"#,
            br#"{"a":[],"b":{},"c":[{}],"d":null,"e":true,"f":false}"#,
            br#"{"a":[1,]}"#,
            br#"{"a":{"b":1,}}"#,
        ]
        .iter()
        .map(|s| s.to_vec())
        .collect();
        let base = br#"{"model":"m","messages":[{"role":"user","content":"hi \"there\" \u00e9"}],"max_tokens":16,"stream":true,"x":[1.5,-2e3,null]}"#;
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..4000 {
            let mut v = base.to_vec();
            for _ in 0..1 + (seed % 3) {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let pos = (seed >> 33) as usize % v.len();
                let alphabet = b"{}[]\",:\\ 0e-.tnu\x01\xc3";
                let byte = alphabet[(seed >> 20) as usize % alphabet.len()];
                match seed % 3 {
                    0 => v[pos] = byte,
                    1 => v.insert(pos, byte),
                    _ => {
                        v.remove(pos);
                    }
                }
            }
            inputs.push(v);
        }
        let mut accepted = 0;
        for src in &inputs {
            let theirs = serde_json::from_slice::<serde_json::Value>(src);
            let ours = Object::parse(src);
            let theirs_obj = matches!(&theirs, Ok(serde_json::Value::Object(_)));
            assert_eq!(ours.is_ok(), theirs_obj, "{:?}: {:?}", String::from_utf8_lossy(src), ours);
            if let (Ok(o), Ok(serde_json::Value::Object(map))) = (&ours, &theirs) {
                accepted += 1;
                for (k, v) in map {
                    let raw = o.get(k).unwrap();
                    assert_eq!(&serde_json::from_slice::<serde_json::Value>(raw).unwrap(), v);
                }
            }
        }
        assert!(accepted > 100, "mutation test accepted only {accepted} inputs");
    }

    fn members_body(n: usize, member: &str) -> Vec<u8> {
        let mut b = b"{".to_vec();
        for i in 0..n {
            if i > 0 {
                b.push(b',');
            }
            b.extend_from_slice(member.as_bytes());
        }
        b.push(b'}');
        b
    }

    #[test]
    fn member_count_is_bounded_with_413() {
        let at = members_body(MAX_MEMBERS, r#""a":1"#);
        assert_eq!(Object::parse(&at).unwrap().members.len(), MAX_MEMBERS);
        let over = members_body(MAX_MEMBERS + 1, r#""a":1"#);
        let e = Object::parse(&over).unwrap_err();
        assert!(matches!(e, JsonError::TooManyMembers { .. }), "{e:?}");
        assert_eq!(e.status(), 413);
        assert!(e.to_string().contains("more than 1024 members"), "{e}");
        // Nested members are validated, not stored, so they do not count.
        let nested = format!(r#"{{"a":{}}}"#, String::from_utf8(over).unwrap());
        assert_eq!(Object::parse(nested.as_bytes()).unwrap().members.len(), 1);
    }

    #[test]
    fn depth_is_bounded_with_400() {
        let ok = format!(r#"{{"a":{}{}}}"#, "[".repeat(MAX_DEPTH - 1), "]".repeat(MAX_DEPTH - 1));
        assert!(Object::parse(ok.as_bytes()).is_ok());
        let deep = format!(r#"{{"a":{}{}}}"#, "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        let e = Object::parse(deep.as_bytes()).unwrap_err();
        assert!(matches!(e, JsonError::TooDeep { .. }), "{e:?}");
        assert_eq!(e.status(), 400);
    }

    #[test]
    fn escaped_keys_compare_like_serde_json() {
        let keys = [
            r#""\u0061""#,
            r#""\u0061b""#,
            r#""a\"b""#,
            r#""a\\b""#,
            r#""a\/b""#,
            r#""\b\f\n\r\t""#,
            r#""caf\u00e9""#,
            r#""caf\u00E9""#,
            r#""\ud83d\ude00x""#,
            r#""\u20ac""#,
            r#""max\u005ftokens""#,
            r#""\u0000""#,
        ];
        let names = ["a", "ab", "a\"b", "a\\b", "a/b", "\u{8}\u{c}\n\r\t", "café", "😀x", "€"];
        let names = names.iter().copied().chain(["max_tokens", "\0", "", "a\u{0}", "max_token"]);
        let names: Vec<&str> = names.collect();
        for k in keys {
            let src = format!("{{{k}:1}}");
            let o = Object::parse(src.as_bytes()).unwrap();
            let m = &o.members[0];
            assert!(m.key_escaped, "{k}");
            let want: String = serde_json::from_str(k).unwrap();
            for &n in &names {
                assert_eq!(o.key_is(m, n), want == n, "key {k} vs {n:?}");
            }
            assert!(o.key_is(m, &want), "{k}");
        }
    }

    #[test]
    fn escaped_keys_cost_about_what_plain_keys_cost() {
        // Within the member bound, lookups of absent keys walk every member.
        let plain = members_body(MAX_MEMBERS, r#""abcdef":1"#);
        let escaped = members_body(MAX_MEMBERS, r#""\u0061bcdef":1"#);
        let time = |b: &[u8]| {
            let start = std::time::Instant::now();
            for _ in 0..20 {
                let o = Object::parse(b).unwrap();
                assert!(!o.has("max_tokens") && !o.has("abcdeg"));
            }
            start.elapsed()
        };
        let (p, e) = (time(&plain), time(&escaped));
        assert!(e < p * 20 + std::time::Duration::from_millis(20), "plain {p:?}, escaped {e:?}");
    }
}
