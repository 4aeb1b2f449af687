//! The `dynamic_bucket` directive's arguments:
//!
//! ```nginx
//! dynamic_bucket $variable zone=name:size [alpha=a] [window=n] upstream1 upstream2 ...;
//! ```
//!
//! Errors read like nginx's own; the glue prints them after
//! `"dynamic_bucket" directive`.

use std::fmt;

use super::{Params, MAX_BUCKETS};

/// Weight of the newest window unless `alpha=` says otherwise.
pub const DEFAULT_ALPHA: f64 = 0.1;
/// Requests per window unless `window=` says otherwise.
pub const DEFAULT_WINDOW: u64 = 32;
/// Smallest zone, as nginx requires of its own zones (8 pages of 4 KiB).
pub const MIN_ZONE_SIZE: usize = 8 * 4096;

/// A parsed `dynamic_bucket` directive.
#[derive(Debug, Clone, PartialEq)]
pub struct BucketConf {
    /// The variable's name, without `$`.
    pub variable: Vec<u8>,
    pub zone: Vec<u8>,
    pub zone_size: usize,
    pub params: Params,
    /// One upstream name per bucket, shortest lengths first.
    pub upstreams: Vec<Vec<u8>>,
}

/// An argument that does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BucketConfError {
    InvalidVariable(String),
    InvalidParameter(String),
    DuplicateParameter(&'static str),
    InvalidAlpha(String),
    InvalidWindow(String),
    InvalidZone(String),
    InvalidZoneSize(String),
    ZoneTooSmall(String),
    NoZone,
    TooFewUpstreams,
    TooManyUpstreams,
}

impl fmt::Display for BucketConfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use BucketConfError::*;
        match self {
            InvalidVariable(v) => write!(f, "invalid variable name \"{v}\""),
            InvalidParameter(v) => write!(f, "invalid parameter \"{v}\""),
            DuplicateParameter(p) => write!(f, "has a duplicate \"{p}\" parameter"),
            InvalidAlpha(v) => {
                write!(f, "invalid alpha \"{v}\", it must be a number greater than 0 and at most 1")
            }
            InvalidWindow(v) => {
                write!(f, "invalid window \"{v}\", it must be a positive number of requests")
            }
            InvalidZone(v) => write!(f, "invalid zone \"{v}\", it must be \"zone=name:size\""),
            InvalidZoneSize(v) => write!(f, "invalid zone size \"{v}\""),
            ZoneTooSmall(v) => write!(f, "zone \"{v}\" is too small, it must be at least 32k"),
            NoZone => f.write_str("must have \"zone\" parameter"),
            TooFewUpstreams => f.write_str("needs at least 2 upstreams, one per bucket"),
            TooManyUpstreams => write!(f, "takes at most {MAX_BUCKETS} upstreams"),
        }
    }
}

impl std::error::Error for BucketConfError {}

fn text(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

/// A size as nginx writes it (`ngx_parse_size`): digits, optionally
/// followed by `k`/`K` or `m`/`M` (or `g`/`G`).
pub fn parse_size(v: &[u8]) -> Option<usize> {
    let (digits, unit) = match v.last()? {
        b'k' | b'K' => (&v[..v.len() - 1], 1usize << 10),
        b'm' | b'M' => (&v[..v.len() - 1], 1 << 20),
        b'g' | b'G' => (&v[..v.len() - 1], 1 << 30),
        _ => (v, 1),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse::<usize>().ok()?.checked_mul(unit)
}

/// Parses the arguments after the directive name.
pub fn parse(args: &[&[u8]]) -> Result<BucketConf, BucketConfError> {
    use BucketConfError::*;
    let (var, rest) = args.split_first().ok_or(InvalidVariable(String::new()))?;
    let name = var.strip_prefix(b"$").unwrap_or_default();
    if name.is_empty()
        || !name.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'_')
        || !var.starts_with(b"$")
    {
        return Err(InvalidVariable(text(var)));
    }
    let mut zone: Option<(Vec<u8>, usize)> = None;
    let mut alpha: Option<f64> = None;
    let mut window: Option<u64> = None;
    let mut upstreams = Vec::new();
    for &a in rest {
        if let Some(v) = a.strip_prefix(b"zone=") {
            if zone.is_some() {
                return Err(DuplicateParameter("zone"));
            }
            let colon = v.iter().rposition(|&c| c == b':').ok_or(InvalidZone(text(a)))?;
            let (name, size) = (&v[..colon], &v[colon + 1..]);
            if name.is_empty() {
                return Err(InvalidZone(text(a)));
            }
            let size = parse_size(size).ok_or(InvalidZoneSize(text(size)))?;
            if size < MIN_ZONE_SIZE {
                return Err(ZoneTooSmall(text(name)));
            }
            zone = Some((name.to_vec(), size));
        } else if let Some(v) = a.strip_prefix(b"alpha=") {
            if alpha.is_some() {
                return Err(DuplicateParameter("alpha"));
            }
            let x = std::str::from_utf8(v).ok().and_then(|s| s.parse::<f64>().ok());
            match x {
                Some(x) if x > 0.0 && x <= 1.0 => alpha = Some(x),
                _ => return Err(InvalidAlpha(text(v))),
            }
        } else if let Some(v) = a.strip_prefix(b"window=") {
            if window.is_some() {
                return Err(DuplicateParameter("window"));
            }
            let n = std::str::from_utf8(v).ok().and_then(|s| s.parse::<u64>().ok());
            match n {
                Some(n) if n > 0 => window = Some(n),
                _ => return Err(InvalidWindow(text(v))),
            }
        } else if a.is_empty() || a.contains(&b'=') || a.starts_with(b"$") {
            return Err(InvalidParameter(text(a)));
        } else {
            upstreams.push(a.to_vec());
        }
    }
    let (zone, zone_size) = zone.ok_or(NoZone)?;
    if upstreams.len() < 2 {
        return Err(TooFewUpstreams);
    }
    if upstreams.len() > MAX_BUCKETS {
        return Err(TooManyUpstreams);
    }
    Ok(BucketConf {
        variable: name.to_vec(),
        zone,
        zone_size,
        params: Params {
            buckets: upstreams.len(),
            alpha: alpha.unwrap_or(DEFAULT_ALPHA),
            window: window.unwrap_or(DEFAULT_WINDOW),
        },
        upstreams,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(line: &str) -> Result<BucketConf, String> {
        let args: Vec<&[u8]> = line.split_whitespace().map(str::as_bytes).collect();
        parse(&args).map_err(|e| e.to_string())
    }

    #[test]
    fn full_and_default_forms() {
        let c = p("$prefill_bucket zone=len:64k alpha=0.25 window=8 short mid long").unwrap();
        assert_eq!(c.variable, b"prefill_bucket");
        assert_eq!((c.zone.as_slice(), c.zone_size), (&b"len"[..], 65536));
        assert_eq!(c.params, Params { buckets: 3, alpha: 0.25, window: 8 });
        assert_eq!(c.upstreams, vec![b"short".to_vec(), b"mid".to_vec(), b"long".to_vec()]);
        let c = p("$b a zone=z:1m b").unwrap();
        assert_eq!(c.params, Params { buckets: 2, alpha: DEFAULT_ALPHA, window: DEFAULT_WINDOW });
        assert_eq!(c.zone_size, 1 << 20);
        assert_eq!(p("$b zone=z:32k alpha=1 a b").unwrap().params.alpha, 1.0);
    }

    #[test]
    fn errors_read_like_nginx() {
        let cases = [
            ("b zone=z:64k a b", "invalid variable name \"b\""),
            ("$ zone=z:64k a b", "invalid variable name \"$\""),
            ("$b zone=z:64k bogus=1 a b", "invalid parameter \"bogus=1\""),
            ("$b zone=z:64k $c a b", "invalid parameter \"$c\""),
            (
                "$b zone=z:64k alpha=0 a b",
                "invalid alpha \"0\", it must be a number greater than 0 and at most 1",
            ),
            (
                "$b zone=z:64k alpha=1.5 a b",
                "invalid alpha \"1.5\", it must be a number greater than 0 and at most 1",
            ),
            (
                "$b zone=z:64k alpha=x a b",
                "invalid alpha \"x\", it must be a number greater than 0 and at most 1",
            ),
            ("$b zone=z:64k alpha=0.1 alpha=0.2 a b", "has a duplicate \"alpha\" parameter"),
            (
                "$b zone=z:64k window=0 a b",
                "invalid window \"0\", it must be a positive number of requests",
            ),
            ("$b zone=z a b", "invalid zone \"zone=z\", it must be \"zone=name:size\""),
            ("$b zone=:64k a b", "invalid zone \"zone=:64k\", it must be \"zone=name:size\""),
            ("$b zone=z:64q a b", "invalid zone size \"64q\""),
            ("$b zone=z:16k a b", "zone \"z\" is too small, it must be at least 32k"),
            ("$b a b", "must have \"zone\" parameter"),
            ("$b zone=z:64k a", "needs at least 2 upstreams, one per bucket"),
            ("$b zone=z:64k a b c d e f g h i j k l m n o p q", "takes at most 16 upstreams"),
        ];
        for (line, want) in cases {
            assert_eq!(p(line).unwrap_err(), want, "{line}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size(b"32768"), Some(32768));
        assert_eq!(parse_size(b"64K"), Some(65536));
        assert_eq!(parse_size(b"2m"), Some(2 << 20));
        assert_eq!(parse_size(b"k"), None);
        assert_eq!(parse_size(b""), None);
        assert_eq!(parse_size(b"-1"), None);
    }
}
