//! Parsing of directive arguments. Errors read like nginx's own
//! (`invalid value "%s" in "%s" directive, it must be "on" or "off"`).

use std::fmt;

/// A directive argument that does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfError {
    /// A flag that is neither `on` nor `off`.
    NotAFlag { value: String },
    /// A URI prefix that does not start with `/`.
    NotAnAbsolutePrefix { value: String },
    /// A prefix of just `/`, which would send the prefill to the location itself.
    RootPrefix,
    /// An unknown keyword among the allowed ones.
    NotOneOf { value: String, allowed: &'static [&'static str] },
}

impl fmt::Display for ConfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfError::NotAFlag { value } => {
                write!(f, "invalid value \"{value}\", it must be \"on\" or \"off\"")
            }
            ConfError::NotAnAbsolutePrefix { value } => {
                write!(f, "invalid prefix \"{value}\", it must start with \"/\"")
            }
            ConfError::RootPrefix => f.write_str("the prefix must not be \"/\""),
            ConfError::NotOneOf { value, allowed } => {
                write!(f, "invalid value \"{value}\", it must be one of: {}", allowed.join(", "))
            }
        }
    }
}

impl std::error::Error for ConfError {}

/// `on` / `off`, case-insensitive like nginx's `ngx_conf_set_flag_slot`.
pub fn parse_flag(value: &[u8]) -> Result<bool, ConfError> {
    if value.eq_ignore_ascii_case(b"on") {
        Ok(true)
    } else if value.eq_ignore_ascii_case(b"off") {
        Ok(false)
    } else {
        Err(ConfError::NotAFlag { value: String::from_utf8_lossy(value).into_owned() })
    }
}

/// A size as nginx writes it: a number of bytes, or kilobytes (`k`/`K`),
/// megabytes (`m`/`M`) or gigabytes (`g`/`G`). `None` if malformed or
/// overflowing.
pub fn parse_size(value: &[u8]) -> Option<usize> {
    let (digits, shift) = match value.last()? {
        b'k' | b'K' => (&value[..value.len() - 1], 10),
        b'm' | b'M' => (&value[..value.len() - 1], 20),
        b'g' | b'G' => (&value[..value.len() - 1], 30),
        _ => (value, 0),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: usize = std::str::from_utf8(digits).ok()?.parse().ok()?;
    n.checked_mul(1usize << shift)
}

/// A `prefill` URI prefix: absolute, trailing slashes removed (the request
/// URI already starts with one). `off` or the empty string disable the module.
pub fn parse_prefix(value: &[u8]) -> Result<Option<Vec<u8>>, ConfError> {
    if value.is_empty() || value == b"off" {
        return Ok(None);
    }
    if value[0] != b'/' {
        return Err(ConfError::NotAnAbsolutePrefix {
            value: String::from_utf8_lossy(value).into_owned(),
        });
    }
    let mut v = value.to_vec();
    while v.len() > 1 && v.ends_with(b"/") {
        v.pop();
    }
    if v == b"/" {
        return Err(ConfError::RootPrefix);
    }
    Ok(Some(v))
}

/// Walks `name=value` parameters (`pd_health_check`, `pd_engine_metrics`,
/// `pd_hold`): `f(name, value)` sets one and returns `Ok(false)` for a name
/// it does not know. An argument without `=`, an unknown name and a name
/// given twice are refused with nginx-style messages.
pub fn parameters<'a>(
    args: &[&'a [u8]],
    mut f: impl FnMut(&'a [u8], &'a [u8]) -> Result<bool, String>,
) -> Result<(), String> {
    let mut seen: Vec<&[u8]> = Vec::new();
    for &arg in args {
        let Some(eq) = arg.iter().position(|&b| b == b'=') else {
            return Err(invalid(arg, ""));
        };
        let (name, value) = (&arg[..eq], &arg[eq + 1..]);
        if seen.contains(&name) {
            return Err(format!("duplicate parameter \"{}\"", String::from_utf8_lossy(name)));
        }
        seen.push(name);
        if !f(name, value)? {
            return Err(invalid(arg, ""));
        }
    }
    Ok(())
}

/// `invalid parameter "<arg>"<why>`.
pub fn invalid(arg: &[u8], why: &str) -> String {
    format!("invalid parameter \"{}\"{why}", String::from_utf8_lossy(arg))
}

/// [`invalid`] for parameter `name` of value `value`.
pub fn invalid_value(name: &[u8], value: &[u8], why: &str) -> String {
    let mut arg = name.to_vec();
    arg.push(b'=');
    arg.extend_from_slice(value);
    invalid(&arg, why)
}

/// Why a time parameter was refused.
pub const POSITIVE_TIME: &str = ", it must be a positive time such as 500ms or 2s";
/// Why a path parameter was refused.
pub const A_PATH: &str = ", it must be a path starting with \"/\" without spaces";
/// Why a port parameter was refused.
pub const A_PORT: &str = ", it must be a port from 1 to 65535";

/// A positive time (`500ms`, `2s`, nginx's units), in ms.
pub fn positive_ms(v: &[u8]) -> Option<u64> {
    crate::balance::fails::parse_duration_ms(v).filter(|&ms| ms > 0)
}

/// A request path: starts with `/`, visible ASCII, at most 1 KB.
pub fn path(v: &[u8]) -> Option<Vec<u8>> {
    let ok = v.first() == Some(&b'/') && v.len() <= 1024 && v.iter().all(|b| b.is_ascii_graphic());
    ok.then(|| v.to_vec())
}

/// A TCP port, 1 to 65535.
pub fn port(v: &[u8]) -> Option<u16> {
    std::str::from_utf8(v).ok()?.parse::<u16>().ok().filter(|&p| p > 0)
}

/// A number from `min` to `max`.
pub fn number(v: &[u8], min: u64, max: u64) -> Option<u64> {
    std::str::from_utf8(v).ok()?.parse::<u64>().ok().filter(|n| (min..=max).contains(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags() {
        assert_eq!(parse_flag(b"on"), Ok(true));
        assert_eq!(parse_flag(b"OFF"), Ok(false));
        let e = parse_flag(b"1").unwrap_err();
        assert_eq!(e.to_string(), "invalid value \"1\", it must be \"on\" or \"off\"");
    }

    #[test]
    fn prefixes() {
        assert_eq!(parse_prefix(b"/prefill_internal"), Ok(Some(b"/prefill_internal".to_vec())));
        assert_eq!(parse_prefix(b"/prefill_internal/"), Ok(Some(b"/prefill_internal".to_vec())));
        assert_eq!(parse_prefix(b"/"), Err(ConfError::RootPrefix));
        assert_eq!(parse_prefix(b"off"), Ok(None));
        assert_eq!(parse_prefix(b""), Ok(None));
        assert!(parse_prefix(b"prefill").unwrap_err().to_string().contains("must start with"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size(b"4096"), Some(4096));
        assert_eq!(parse_size(b"64k"), Some(64 << 10));
        assert_eq!(parse_size(b"2M"), Some(2 << 20));
        assert_eq!(parse_size(b"1g"), Some(1 << 30));
        for bad in [&b""[..], b"k", b"-1k", b"1.5m", b"12x", b"99999999999999999999g"] {
            assert_eq!(parse_size(bad), None, "{:?}", bad);
        }
    }

    #[test]
    fn parameters_are_walked_once_each() {
        let mut got = Vec::new();
        let r = parameters(&[b"a=1", b"b=/x"], |n, v| {
            got.push((n.to_vec(), v.to_vec()));
            Ok(n != b"zz")
        });
        assert_eq!(r, Ok(()));
        assert_eq!(got.len(), 2);
        assert_eq!(parameters(&[b"a"], |_, _| Ok(true)), Err("invalid parameter \"a\"".into()));
        assert_eq!(
            parameters(&[b"zz=1"], |n, _| Ok(n != b"zz")),
            Err("invalid parameter \"zz=1\"".into())
        );
        assert_eq!(
            parameters(&[b"a=1", b"a=2"], |_, _| Ok(true)),
            Err("duplicate parameter \"a\"".into())
        );
        assert_eq!(
            invalid_value(b"t", b"0", POSITIVE_TIME),
            "invalid parameter \"t=0\", it must be a positive time such as 500ms or 2s"
        );
        assert_eq!((positive_ms(b"2s"), positive_ms(b"0")), (Some(2000), None));
        assert_eq!((path(b"/m"), path(b"m"), path(b"/a b")), (Some(b"/m".to_vec()), None, None));
        assert_eq!((port(b"80"), port(b"0"), port(b"x")), (Some(80), None, None));
        assert_eq!((number(b"5", 1, 9), number(b"0", 1, 9)), (Some(5), None));
    }
}
