//! Python's text forms, for templates written against Python's Jinja2.
//!
//! - [`repr`]: what Jinja2 prints for `{{ value }}` when the value is not a
//!   string (`str()` of a list or dict is its `repr`: `['a', 1]`, `{'k': None}`),
//!   and the float form Python uses (`1e-05`, `1e+16`, `2.0`).
//! - [`dumps`]: `json.dumps` with the options HF's `tojson` filter exposes
//!   (`ensure_ascii=False` by default, `", "`/`": "` separators, `indent`,
//!   `sort_keys`), which differs from minijinja's built-in `tojson` (compact,
//!   HTML-escaped).
//! - [`strftime`]: `datetime.strftime` for `strftime_now`, in UTC.

use minijinja::value::{Value, ValueKind};
use minijinja::{Error, ErrorKind};

/// Deepest container nesting printed; a template can build deeper values
/// (`{% set x = [x] %}` in a loop) and must not overflow the stack.
pub(crate) const MAX_NESTING: usize = 256;

fn too_deep() -> Error {
    Error::new(ErrorKind::InvalidOperation, "value nested too deeply to print")
}

/// Appends Python's `repr(v)`.
pub(crate) fn repr(out: &mut String, v: &Value) -> Result<(), Error> {
    repr_at(out, v, 0)
}

fn repr_at(out: &mut String, v: &Value, depth: usize) -> Result<(), Error> {
    if depth > MAX_NESTING {
        return Err(too_deep());
    }
    match v.kind() {
        ValueKind::Undefined => out.push_str("Undefined"),
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if v.is_true() { "True" } else { "False" }),
        ValueKind::Number => number(out, v, false),
        ValueKind::String => str_repr(out, v.as_str().unwrap_or_default()),
        ValueKind::Map => {
            out.push('{');
            for (n, (k, item)) in pairs(v).enumerate() {
                if n > 0 {
                    out.push_str(", ");
                }
                repr_at(out, &k, depth + 1)?;
                out.push_str(": ");
                repr_at(out, &item, depth + 1)?;
            }
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let tuple = v.is_tuple();
            out.push(if tuple { '(' } else { '[' });
            let mut n = 0;
            for item in v.try_iter()? {
                if n > 0 {
                    out.push_str(", ");
                }
                repr_at(out, &item, depth + 1)?;
                n += 1;
            }
            if tuple && n == 1 {
                out.push(',');
            }
            out.push(if tuple { ')' } else { ']' });
        }
        _ => out.push_str(&v.to_string()),
    }
    Ok(())
}

/// The (key, value) pairs of a map value, in its own order.
fn pairs(v: &Value) -> impl Iterator<Item = (Value, Value)> + '_ {
    v.as_object().and_then(|o| o.try_iter_pairs()).into_iter().flatten()
}

/// An int as is, a float as Python prints it (`repr` or JSON form).
fn number(out: &mut String, v: &Value, json: bool) {
    if v.is_integer() {
        out.push_str(&v.to_string());
    } else {
        float(out, f64::try_from(v.clone()).unwrap_or(f64::NAN), json);
    }
}

/// Python's shortest round-trip float form: positional for exponents in
/// -4..16, else `d.ddde+XX`; `.0` on whole numbers. JSON spells the
/// non-finite values `NaN`/`Infinity`.
pub(crate) fn float(out: &mut String, f: f64, json: bool) {
    if f.is_nan() {
        out.push_str(if json { "NaN" } else { "nan" });
        return;
    }
    if f.is_infinite() {
        if f < 0.0 {
            out.push('-');
        }
        out.push_str(if json { "Infinity" } else { "inf" });
        return;
    }
    if f.is_sign_negative() {
        out.push('-');
    }
    if f == 0.0 {
        out.push_str("0.0");
        return;
    }
    // `{:e}` gives the shortest digits that round-trip, like Python's repr.
    let sci = format!("{:e}", f.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let int_len = exp as usize + 1;
            if digits.len() > int_len {
                out.push_str(&digits[..int_len]);
                out.push('.');
                out.push_str(&digits[int_len..]);
            } else {
                out.push_str(&digits);
                out.push_str(&"0".repeat(int_len - digits.len()));
                out.push_str(".0");
            }
        } else {
            out.push_str("0.");
            out.push_str(&"0".repeat((-exp - 1) as usize));
            out.push_str(&digits);
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        out.push('e');
        out.push(if exp < 0 { '-' } else { '+' });
        out.push_str(&format!("{:02}", exp.unsigned_abs()));
    }
}

/// Python's `repr(str)`: single quotes unless the text has `'` and no `"`;
/// non-printable characters escaped. "Printable" follows Python's
/// `str.isprintable` for the control, separator, format and private-use
/// ranges text can plausibly contain (not the full Unicode table).
pub(crate) fn str_repr(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if !printable(c) => {
                let n = c as u32;
                let esc = if n < 0x100 {
                    format!("\\x{n:02x}")
                } else if n < 0x10000 {
                    format!("\\u{n:04x}")
                } else {
                    format!("\\U{n:08x}")
                };
                out.push_str(&esc);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

fn printable(c: char) -> bool {
    !matches!(c as u32,
        0x00..=0x1f | 0x7f..=0xa0 | 0xad | 0x600..=0x605 | 0x61c | 0x6dd | 0x70f
        | 0x1680 | 0x180e | 0x2000..=0x200f | 0x2028..=0x202f | 0x205f..=0x2064
        | 0x2066..=0x206f | 0x3000 | 0xe000..=0xf8ff | 0xfeff | 0xfff9..=0xfffb
        | 0xe0001 | 0xe0020..=0xe007f | 0xf0000..)
}

/// `json.dumps` options, as HF's `tojson(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)` passes them.
#[derive(Debug, Clone, Default)]
pub(crate) struct JsonStyle {
    pub ensure_ascii: bool,
    /// `None`: one line. `Some(unit)`: newline and `unit` per level.
    pub indent: Option<String>,
    /// `(item, key)` separators; `None` takes Python's defaults, which
    /// depend on `indent`.
    pub separators: Option<(String, String)>,
    pub sort_keys: bool,
}

/// Python's `json.dumps(v, ...)` of a template value.
pub(crate) fn dumps(v: &Value, style: &JsonStyle) -> Result<String, Error> {
    let (item, key) = match &style.separators {
        Some((i, k)) => (i.as_str(), k.as_str()),
        None if style.indent.is_some() => (",", ": "),
        None => (", ", ": "),
    };
    let mut w = JsonWriter { out: String::new(), style, item, key };
    w.value(v, 0)?;
    Ok(w.out)
}

struct JsonWriter<'a> {
    out: String,
    style: &'a JsonStyle,
    item: &'a str,
    key: &'a str,
}

impl JsonWriter<'_> {
    fn newline(&mut self, level: usize) {
        if let Some(unit) = &self.style.indent {
            self.out.push('\n');
            for _ in 0..level {
                self.out.push_str(unit);
            }
        }
    }

    fn value(&mut self, v: &Value, depth: usize) -> Result<(), Error> {
        if depth > MAX_NESTING {
            return Err(too_deep());
        }
        match v.kind() {
            ValueKind::None => self.out.push_str("null"),
            ValueKind::Bool => self.out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => number(&mut self.out, v, true),
            ValueKind::String => self.string(v.as_str().unwrap_or_default()),
            ValueKind::Map => {
                let mut entries: Vec<(String, Value)> = Vec::new();
                for (k, item) in pairs(v) {
                    entries.push((self.key_text(&k)?, item));
                }
                if self.style.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                if entries.is_empty() {
                    self.out.push_str("{}");
                    return Ok(());
                }
                self.out.push('{');
                for (n, (k, item)) in entries.iter().enumerate() {
                    if n > 0 {
                        self.out.push_str(self.item);
                    }
                    self.newline(depth + 1);
                    self.string(k);
                    self.out.push_str(self.key);
                    self.value(item, depth + 1)?;
                }
                self.newline(depth);
                self.out.push('}');
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let mut n = 0;
                self.out.push('[');
                for item in v.try_iter()? {
                    if n > 0 {
                        self.out.push_str(self.item);
                    }
                    self.newline(depth + 1);
                    self.value(&item, depth + 1)?;
                    n += 1;
                }
                if n > 0 {
                    self.newline(depth);
                }
                self.out.push(']');
            }
            kind => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("object of type {kind} is not JSON serializable"),
                ))
            }
        }
        Ok(())
    }

    /// Python converts str, int, float, bool and None keys to strings.
    fn key_text(&self, k: &Value) -> Result<String, Error> {
        Ok(match k.kind() {
            ValueKind::String => k.as_str().unwrap_or_default().to_owned(),
            ValueKind::Number => {
                let mut s = String::new();
                number(&mut s, k, true);
                s
            }
            ValueKind::Bool => (if k.is_true() { "true" } else { "false" }).to_owned(),
            ValueKind::None => "null".to_owned(),
            kind => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("keys must be str, int, float, bool or None, not {kind}"),
                ))
            }
        })
    }

    fn string(&mut self, s: &str) {
        let out = &mut self.out;
        out.reserve(s.len() + 2);
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c if self.style.ensure_ascii && !c.is_ascii() => {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{u:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

const DAYS: [&str; 7] =
    ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// `time.strftime(fmt)` at `unix` seconds, UTC, C locale. Covers the
/// directives chat templates use (`%d %b %Y`, `%Y-%m-%d`, `%H:%M`...);
/// an unknown directive is copied through, as glibc does.
pub(crate) fn strftime(fmt: &str, unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (secs / 3600, secs / 60 % 60, secs % 60);
    let weekday = (days + 4).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let before = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = before[m as usize - 1] + d + i64::from(leap && m > 2);
    let month = MONTHS[m as usize - 1];
    let day = DAYS[weekday];
    let mut out = String::with_capacity(fmt.len() + 16);
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let piece = match chars.next() {
            Some('Y') => y.to_string(),
            Some('y') => format!("{:02}", y.rem_euclid(100)),
            Some('m') => format!("{m:02}"),
            Some('d') => format!("{d:02}"),
            Some('e') => format!("{d:>2}"),
            Some('j') => format!("{yday:03}"),
            Some('H') => format!("{hh:02}"),
            Some('I') => format!("{:02}", if hh % 12 == 0 { 12 } else { hh % 12 }),
            Some('M') => format!("{mm:02}"),
            Some('S') => format!("{ss:02}"),
            Some('p') => (if hh < 12 { "AM" } else { "PM" }).to_owned(),
            Some('B') => month.to_owned(),
            Some('b' | 'h') => month[..3].to_owned(),
            Some('A') => day.to_owned(),
            Some('a') => day[..3].to_owned(),
            Some('w') => weekday.to_string(),
            Some('Z') => "UTC".to_owned(),
            Some('z') => "+0000".to_owned(),
            Some('%') => "%".to_owned(),
            Some(other) => format!("%{other}"),
            None => "%".to_owned(),
        };
        out.push_str(&piece);
    }
    out
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (the
/// proleptic Gregorian "civil from days" algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenize::value;

    fn py_float(f: f64) -> String {
        let mut s = String::new();
        float(&mut s, f, false);
        s
    }

    #[test]
    fn floats_print_like_python_repr() {
        let cases = [
            (1e-05, "1e-05"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (123456789012345678.0, "1.2345678901234568e+17"),
            (0.1, "0.1"),
            (1.5, "1.5"),
            (100.0, "100.0"),
            (1e15, "1000000000000000.0"),
            (-2.5e-7, "-2.5e-07"),
            (1e100, "1e+100"),
            (5e-324, "5e-324"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (-0.0, "-0.0"),
            (12345.678, "12345.678"),
            (9999999999999998.0, "9999999999999998.0"),
            (f64::INFINITY, "inf"),
        ];
        for (f, want) in cases {
            assert_eq!(py_float(f), want, "{f:e}");
        }
        let mut s = String::new();
        float(&mut s, f64::NEG_INFINITY, true);
        assert_eq!(s, "-Infinity");
    }

    #[test]
    fn strings_print_like_python_repr() {
        let cases = [
            ("abc", "'abc'"),
            ("it's", "\"it's\""),
            ("say \"hi\"", "'say \"hi\"'"),
            ("both ' and \"", "'both \\' and \"'"),
            ("a\nb\tc", "'a\\nb\\tc'"),
            ("\x01\x7f\u{85}", "'\\x01\\x7f\\x85'"),
            ("é", "'é'"),
            ("\u{200b}", "'\\u200b'"),
            ("\\", "'\\\\'"),
            ("😀", "'😀'"),
            ("\u{e000}", "'\\ue000'"),
        ];
        for (s, want) in cases {
            let mut out = String::new();
            str_repr(&mut out, s);
            assert_eq!(out, want, "{s:?}");
        }
    }

    fn dumps_of(json: &str, style: &JsonStyle) -> String {
        dumps(&value::parse(json.as_bytes()).unwrap(), style).unwrap()
    }

    #[test]
    fn dumps_matches_python_json() {
        let indent2 = JsonStyle { indent: Some("  ".into()), ..JsonStyle::default() };
        assert_eq!(
            dumps_of(r#"{"a": [], "b": {}, "c": [1, {"d": null}]}"#, &indent2),
            "{\n  \"a\": [],\n  \"b\": {},\n  \"c\": [\n    1,\n    {\n      \"d\": null\n    }\n  ]\n}"
        );
        assert_eq!(
            dumps_of(r#"{"z": 1, "a": [true, 1.0, "x\u0001\u007f\"\\é"]}"#, &JsonStyle::default()),
            "{\"z\": 1, \"a\": [true, 1.0, \"x\\u0001\u{7f}\\\"\\\\é\"]}"
        );
        let compact = JsonStyle {
            ensure_ascii: true,
            sort_keys: true,
            separators: Some((",".into(), ":".into())),
            ..JsonStyle::default()
        };
        assert_eq!(dumps_of(r#"{"z": 1, "a": "😀"}"#, &compact), r#"{"a":"\ud83d\ude00","z":1}"#);
        let tab = JsonStyle { indent: Some("\t".into()), ..JsonStyle::default() };
        assert_eq!(dumps_of("[1,[2,[]]]", &tab), "[\n\t1,\n\t[\n\t\t2,\n\t\t[]\n\t]\n]");
        // Too deep for the printer is an error, not a stack overflow.
        let deep = "[".repeat(100) + &"]".repeat(100);
        let mut v = value::parse(deep.as_bytes()).unwrap();
        for _ in 0..3 {
            v = minijinja::Value::from(vec![v.clone(), v]);
        }
        assert!(dumps(&v, &JsonStyle::default()).is_ok());
        let mut v = minijinja::Value::from(1);
        for _ in 0..MAX_NESTING + 2 {
            v = minijinja::Value::from(vec![v]);
        }
        assert!(dumps(&v, &JsonStyle::default()).is_err());
        assert!(repr(&mut String::new(), &v).is_err());
    }

    #[test]
    fn strftime_in_utc() {
        let t = 1_709_210_096; // 2024-02-29 12:34:56 UTC, a Thursday
        assert_eq!(
            strftime("%d %b %Y|%Y-%m-%d %H:%M:%S|%a %A %B %j %I %p %y %w %%|%e|%Q", t),
            "29 Feb 2024|2024-02-29 12:34:56|Thu Thursday February 060 12 PM 24 4 %|29|%Q"
        );
        assert_eq!(strftime("%Y-%m-%d %a", -86_400 * 365), "1969-01-01 Wed");
        assert_eq!(strftime("%Y-%m-%d %H:%M %a %j", 0), "1970-01-01 00:00 Thu 001");
        assert_eq!(strftime("%Y-%m-%d %j", 951_782_400), "2000-02-29 060");
        assert_eq!(strftime("%Y-%m-%d %j", 978_220_800), "2000-12-31 366");
    }
}
