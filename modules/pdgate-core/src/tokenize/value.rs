//! JSON request text to template values, keeping Python's dict order.
//!
//! vLLM hands the chat template Python dicts, which iterate in insertion
//! order: a tool's `parameters.properties` renders in the order the client
//! sent them, and `tojson` prints keys in that order. `serde_json::Value` and
//! minijinja's own maps (without their `preserve_order` features) sort keys
//! instead, so request data becomes [`JsonMap`]/[`JsonList`] objects built
//! straight from the request text.
//!
//! The input is text [`crate::json::Object::parse`] (or `serde_json`) has
//! already validated, nested at most [`crate::json::MAX_DEPTH`] deep, so this
//! is a plain recursive walk; a surprise still ends in an error, never a panic.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use minijinja::value::{Enumerator, Object, ObjectExt, ObjectRepr, Value};

use super::pyfmt;

/// A JSON object: entries in document order, duplicate keys collapsed the way
/// Python's `json.loads` does (first position, last value).
#[derive(Debug, Default, Clone)]
pub(crate) struct JsonMap {
    entries: Vec<(Value, Value)>,
}

impl JsonMap {
    pub(crate) fn with_capacity(n: usize) -> JsonMap {
        JsonMap { entries: Vec::with_capacity(n) }
    }

    /// Appends an entry; the caller guarantees `key` is new (or calls
    /// [`JsonMap::dedup`] afterwards).
    pub(crate) fn push(&mut self, key: &str, value: Value) {
        self.entries.push((Value::from(key), value));
    }

    /// Sets `key`, replacing the value in place when it is already present.
    pub(crate) fn set(&mut self, key: &str, value: Value) {
        match self.entries.iter_mut().find(|(k, _)| k.as_str() == Some(key)) {
            Some(slot) => slot.1 = value,
            None => self.push(key, value),
        }
    }

    pub(crate) fn get(&self, key: &str) -> Option<&Value> {
        self.entries.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v)
    }

    pub(crate) fn contains(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub(crate) fn entries(&self) -> &[(Value, Value)] {
        &self.entries
    }

    pub(crate) fn into_value(self) -> Value {
        Value::from_object(self)
    }

    /// Collapses duplicate keys: the first occurrence keeps its position and
    /// takes the last occurrence's value. Small maps are first checked
    /// pairwise without allocating (duplicates are rare); the collapse goes
    /// through a sorted index, so a hostile object with many keys costs
    /// O(n log n), not O(n²).
    fn dedup(&mut self) {
        let n = self.entries.len();
        if n < 2 {
            return;
        }
        if n <= 16 {
            let e = &self.entries;
            if !(1..n).any(|j| e[..j].iter().any(|(k, _)| *k == e[j].0)) {
                return;
            }
        }
        let mut drop = vec![false; n];
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| {
            self.entries[a].0.as_str().cmp(&self.entries[b].0.as_str()).then(a.cmp(&b))
        });
        let mut g = 0;
        while g < n {
            let mut e = g + 1;
            while e < n && self.entries[order[e]].0 == self.entries[order[g]].0 {
                drop[order[e]] = true;
                e += 1;
            }
            if e - g > 1 {
                self.entries[order[g]].1 = self.entries[order[e - 1]].1.clone();
            }
            g = e;
        }
        let mut i = 0;
        self.entries.retain(|_| {
            i += 1;
            !drop[i - 1]
        });
    }
}

impl Object for JsonMap {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.get(key.as_str()?).cloned()
    }

    fn get_value_by_str(self: &Arc<Self>, key: &str) -> Option<Value> {
        self.get(key).cloned()
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        self.mapped_rev_key_value_enumerator(|this| {
            Box::new(this.entries.iter().map(|(k, v)| (k.clone(), v.clone())))
        })
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        Some(self.entries.len())
    }

    fn render(self: &Arc<Self>, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        render_repr(&Value::from_dyn_object(self.clone()), f)
    }
}

/// A JSON array. minijinja's `Vec<Value>` would do, except that it prints
/// like Rust; this one prints like Python (`['a', 1]`).
#[derive(Debug, Default, Clone)]
pub(crate) struct JsonList(pub(crate) Vec<Value>);

impl JsonList {
    pub(crate) fn into_value(self) -> Value {
        Value::from_object(self)
    }
}

impl Object for JsonList {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Seq
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.0.get(key.as_usize()?).cloned()
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        self.mapped_rev_enumerator(|this| Box::new(this.0.iter().cloned()))
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        Some(self.0.len())
    }

    fn render(self: &Arc<Self>, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        render_repr(&Value::from_dyn_object(self.clone()), f)
    }
}

fn render_repr(v: &Value, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let mut s = String::new();
    pyfmt::repr(&mut s, v).map_err(|_| fmt::Error)?;
    f.write_str(&s)
}

/// Why text could not be turned into values (only for text that was not
/// validated first, or a bug): the offset of the problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BadJson(pub usize);

/// Builds the value of one complete, validated JSON text.
pub(crate) fn parse(src: &[u8]) -> Result<Value, BadJson> {
    let mut b = Builder { s: src, i: 0 };
    b.ws();
    let v = b.value(0)?;
    b.ws();
    if b.i != src.len() {
        return Err(BadJson(b.i));
    }
    Ok(v)
}

/// Decodes one validated JSON string literal (quotes included), borrowing
/// from `raw` when it has no escapes.
pub(crate) fn string(raw: &[u8]) -> Result<Cow<'_, str>, BadJson> {
    let mut b = Builder { s: raw, i: 0 };
    if b.peek() != Some(b'"') {
        return b.bad();
    }
    let s = b.string()?;
    if b.i != raw.len() {
        return Err(BadJson(b.i));
    }
    Ok(s)
}

/// Parses any JSON text the way Python's `json.loads` would, or `None` when it
/// is not JSON (used for tool-call `arguments` strings).
pub(crate) fn loads(text: &str) -> Option<Value> {
    // serde_json validates (RFC 8259, nesting limit 128); the builder only
    // ever sees well-formed text.
    serde_json::from_str::<&serde_json::value::RawValue>(text).ok()?;
    parse(text.as_bytes()).ok()
}

struct Builder<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Builder<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    fn bad<T>(&self) -> Result<T, BadJson> {
        Err(BadJson(self.i))
    }

    fn value(&mut self, depth: usize) -> Result<Value, BadJson> {
        if depth > crate::json::MAX_DEPTH {
            return self.bad();
        }
        match self.peek() {
            Some(b'"') => Ok(Value::from(self.string()?.as_ref())),
            Some(b'{') => self.object(depth + 1),
            Some(b'[') => self.array(depth + 1),
            Some(b't') => self.literal(b"true", Value::from(true)),
            Some(b'f') => self.literal(b"false", Value::from(false)),
            Some(b'n') => self.literal(b"null", Value::from(())),
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => self.bad(),
        }
    }

    fn literal(&mut self, lit: &[u8], v: Value) -> Result<Value, BadJson> {
        if self.s.get(self.i..self.i + lit.len()) == Some(lit) {
            self.i += lit.len();
            Ok(v)
        } else {
            self.bad()
        }
    }

    /// Python keeps `1` an int and `1.0`/`1e3` floats; so do we. Integers
    /// beyond i128 become floats (Python would keep them exact).
    fn number(&mut self) -> Result<Value, BadJson> {
        let start = self.i;
        let mut float = false;
        while let Some(c) = self.peek() {
            match c {
                b'0'..=b'9' | b'-' | b'+' => {}
                b'.' | b'e' | b'E' => float = true,
                _ => break,
            }
            self.i += 1;
        }
        let text = std::str::from_utf8(&self.s[start..self.i]).map_err(|_| BadJson(start))?;
        if !float {
            if let Ok(n) = text.parse::<i64>() {
                return Ok(Value::from(n));
            }
            if let Ok(n) = text.parse::<i128>() {
                return Ok(Value::from(n));
            }
        }
        text.parse::<f64>().map(Value::from).map_err(|_| BadJson(start))
    }

    fn string(&mut self) -> Result<Cow<'a, str>, BadJson> {
        let start = self.i + 1;
        let s: &'a [u8] = self.s;
        let rest = s.get(start..).unwrap_or_default();
        let Some(end) = memchr::memchr2(b'"', b'\\', rest) else { return self.bad() };
        if rest[end] == b'"' {
            self.i = start + end + 1;
            return std::str::from_utf8(&rest[..end])
                .map(Cow::Borrowed)
                .map_err(|_| BadJson(start));
        }
        let mut out = Vec::with_capacity(end + 16);
        let mut j = start;
        loop {
            let Some(&c) = self.s.get(j) else { return Err(BadJson(j)) };
            match c {
                b'"' => break,
                b'\\' => {
                    let esc = self.s.get(j + 1).copied().ok_or(BadJson(j))?;
                    j += 2;
                    let single = match esc {
                        b'"' => b'"',
                        b'\\' => b'\\',
                        b'/' => b'/',
                        b'b' => 0x08,
                        b'f' => 0x0c,
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'u' => {
                            let (c, used) = unicode_escape(self.s, j).ok_or(BadJson(j))?;
                            j += used;
                            let mut buf = [0u8; 4];
                            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                            continue;
                        }
                        _ => return Err(BadJson(j)),
                    };
                    out.push(single);
                }
                _ => {
                    // Copy the run up to the next quote or backslash at once.
                    let run = self.s.get(j..).unwrap_or_default();
                    let n = memchr::memchr2(b'"', b'\\', run).unwrap_or(run.len());
                    out.extend_from_slice(&run[..n]);
                    j += n;
                }
            }
        }
        self.i = j + 1;
        String::from_utf8(out).map(Cow::Owned).map_err(|_| BadJson(start))
    }

    fn object(&mut self, depth: usize) -> Result<Value, BadJson> {
        self.i += 1;
        let mut map = JsonMap::with_capacity(4);
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(map.into_value());
        }
        loop {
            self.ws();
            if self.peek() != Some(b'"') {
                return self.bad();
            }
            let key = Value::from(self.string()?.as_ref());
            self.ws();
            if self.peek() != Some(b':') {
                return self.bad();
            }
            self.i += 1;
            self.ws();
            let v = self.value(depth)?;
            map.entries.push((key, v));
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    break;
                }
                _ => return self.bad(),
            }
        }
        map.dedup();
        Ok(map.into_value())
    }

    fn array(&mut self, depth: usize) -> Result<Value, BadJson> {
        self.i += 1;
        let mut items = Vec::new();
        self.ws();
        if self.peek() == Some(b']') {
            self.i += 1;
            return Ok(JsonList(items).into_value());
        }
        loop {
            self.ws();
            items.push(self.value(depth)?);
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b']') => {
                    self.i += 1;
                    break;
                }
                _ => return self.bad(),
            }
        }
        Ok(JsonList(items).into_value())
    }
}

/// Decodes the four hex digits at `s[at..]` (after `\u`), joining a surrogate
/// pair; returns the char and the bytes consumed. A lone surrogate (valid JSON,
/// not a valid Rust char) becomes U+FFFD.
fn unicode_escape(s: &[u8], at: usize) -> Option<(char, usize)> {
    let hex = |i: usize| -> Option<u32> {
        let d = std::str::from_utf8(s.get(i..i + 4)?).ok()?;
        u32::from_str_radix(d, 16).ok()
    };
    let hi = hex(at)?;
    if (0xd800..0xdc00).contains(&hi) && s.get(at + 4..at + 6) == Some(b"\\u") {
        if let Some(lo) = hex(at + 6).filter(|lo| (0xdc00..0xe000).contains(lo)) {
            let code = 0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00);
            return Some((char::from_u32(code)?, 10));
        }
    }
    Some((char::from_u32(hi).unwrap_or('\u{fffd}'), 4))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenize::pyfmt::{dumps, JsonStyle};

    fn keys(v: &Value) -> Vec<String> {
        let map = v.downcast_object_ref::<JsonMap>().unwrap();
        map.entries().iter().map(|(k, v)| format!("{}={v}", k.as_str().unwrap())).collect()
    }

    #[test]
    fn objects_keep_order_and_collapse_duplicates_like_python() {
        let v = parse(br#"{"b":1,"a":2,"b":3}"#).unwrap();
        assert_eq!(keys(&v), ["b=3", "a=2"]);
        let mut big = String::from("{");
        for i in 0..40 {
            big.push_str(&format!("\"k{}\":{i},", i % 25));
        }
        big.push_str("\"z\":0}");
        let v = parse(big.as_bytes()).unwrap();
        let k = keys(&v);
        assert_eq!(k.len(), 26);
        assert_eq!(k[0], "k0=25");
        assert_eq!(k[14], "k14=39");
        assert_eq!(k[15], "k15=15");
        assert_eq!(k[25], "z=0");
    }

    #[test]
    fn strings_and_numbers() {
        let v = parse(br#"["a\u00e9\ud83d\ude00\n\"x\/", "\udc00", 1, -2, 1.0, 1E2, 170141183460469231731687303715884105727, 1e400]"#).unwrap();
        let items: Vec<Value> = v.try_iter().unwrap().collect();
        assert_eq!(items[0].as_str(), Some("aé😀\n\"x/"));
        assert_eq!(items[1].as_str(), Some("\u{fffd}"));
        assert!(items[2].is_integer() && items[3].is_integer());
        assert_eq!(items[3].to_string(), "-2");
        assert!(!items[4].is_integer() && !items[5].is_integer());
        assert!(items[6].is_integer());
        assert_eq!(f64::try_from(items[7].clone()).unwrap(), f64::INFINITY);
        assert!(matches!(string(br#""plain""#), Ok(Cow::Borrowed("plain"))));
        assert_eq!(string(br#""a\tb""#).unwrap(), "a\tb");
        assert!(string(br#""a" "#).is_err());
        assert_eq!(loads("[1, {\"b\": 2}]").map(|v| v.to_string()), Some("[1, {'b': 2}]".into()));
        assert!(loads("{\"a\": ").is_none());
        assert!(loads("").is_none());
    }

    #[test]
    fn agrees_with_serde_json() {
        let docs = [
            r#"{"model":"m","messages":[{"role":"user","content":"hi \"there\"\n\u0001"}],"n":[1,-2,3],"t":true,"f":false,"z":null}"#,
            r#"[[],{},[{}],"",{"":""}]"#,
            r#"  {"nested": {"a": [1, {"b": [null, "\u00e9\u4e2d"]}]}}  "#,
        ];
        let style = JsonStyle {
            sort_keys: true,
            separators: Some((",".into(), ":".into())),
            ..JsonStyle::default()
        };
        for doc in docs {
            let ours = dumps(&parse(doc.as_bytes()).unwrap(), &style).unwrap();
            let theirs: serde_json::Value = serde_json::from_str(doc).unwrap();
            assert_eq!(ours, serde_json::to_string(&theirs).unwrap(), "{doc}");
        }
        for bad in ["", "{", "[1,]", "{\"a\" 1}", "tru", "\"\\x\"", "[1] 2"] {
            assert!(parse(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
