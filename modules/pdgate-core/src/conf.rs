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
}
