//! Request ids (UUID v4) and W3C trace context ids.
//!
//! Ids come from a per-worker xoshiro256** generator seeded from the OS
//! (the glue passes the seed), so generating one costs a few nanoseconds and
//! no system call. Uniqueness, not secrecy, is what a request id needs.

/// xoshiro256** (Blackman & Vigna), seeded through splitmix64.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator from a 64-bit seed (any value, zero included).
    pub fn new(seed: u64) -> Rng {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Rng { s: [next(), next(), next(), next()] }
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_into(bytes: &[u8], out: &mut [u8]) {
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 15)];
    }
}

/// Length of a textual UUID.
pub const UUID_LEN: usize = 36;

/// A random (version 4, RFC 9562 variant) UUID in lowercase text form.
pub fn uuid_v4(rng: &mut Rng) -> [u8; UUID_LEN] {
    let mut b = [0u8; 16];
    rng.fill(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut out = [b'-'; UUID_LEN];
    hex_into(&b[0..4], &mut out[0..8]);
    hex_into(&b[4..6], &mut out[9..13]);
    hex_into(&b[6..8], &mut out[14..18]);
    hex_into(&b[8..10], &mut out[19..23]);
    hex_into(&b[10..16], &mut out[24..36]);
    out
}

/// Length of a W3C `traceparent` value.
pub const TRACEPARENT_LEN: usize = 55;

/// A new sampled W3C `traceparent`: `00-<32 hex trace id>-<16 hex span id>-01`.
/// Neither id is ever all zeros (the spec forbids it).
pub fn traceparent(rng: &mut Rng) -> [u8; TRACEPARENT_LEN] {
    let mut ids = [0u8; 24];
    loop {
        rng.fill(&mut ids);
        if ids[..16].iter().any(|&b| b != 0) && ids[16..].iter().any(|&b| b != 0) {
            break;
        }
    }
    let mut out = [b'-'; TRACEPARENT_LEN];
    out[0..2].copy_from_slice(b"00");
    hex_into(&ids[..16], &mut out[3..35]);
    hex_into(&ids[16..], &mut out[36..52]);
    out[53..55].copy_from_slice(b"01");
    out
}

/// The longest client `X-Request-Id` kept, in bytes.
pub const CLIENT_ID_MAX_LEN: usize = 128;

/// Why a client's `X-Request-Id` is replaced by a generated one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientIdReject {
    /// The header came more than once (this many times).
    Repeated(usize),
    /// Longer than [`CLIENT_ID_MAX_LEN`] (this many bytes).
    TooLong(usize),
    /// Empty value.
    Empty,
    /// A byte outside `[A-Za-z0-9._:-]` at this offset.
    BadByte(usize),
}

impl std::fmt::Display for ClientIdReject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientIdReject::Repeated(n) => write!(f, "sent {n} times"),
            ClientIdReject::TooLong(n) => {
                write!(f, "{n} bytes long (at most {CLIENT_ID_MAX_LEN})")
            }
            ClientIdReject::Empty => f.write_str("empty"),
            ClientIdReject::BadByte(at) => {
                write!(f, "a byte outside [A-Za-z0-9._:-] at offset {at}")
            }
        }
    }
}

/// Whether a byte may appear in a kept client id: `[A-Za-z0-9._:-]`.
pub fn is_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-')
}

/// Checks the client's `X-Request-Id` values (every header of that name, in
/// arrival order): `Ok` when there is exactly one, 1 to
/// [`CLIENT_ID_MAX_LEN`] bytes of `[A-Za-z0-9._:-]`, else why it is replaced.
/// Called with no value, it has nothing to reject (`Ok`).
pub fn check_client_id(values: &[&[u8]]) -> Result<(), ClientIdReject> {
    let v = match values {
        [] => return Ok(()),
        [v] => v,
        _ => return Err(ClientIdReject::Repeated(values.len())),
    };
    if v.is_empty() {
        return Err(ClientIdReject::Empty);
    }
    if v.len() > CLIENT_ID_MAX_LEN {
        return Err(ClientIdReject::TooLong(v.len()));
    }
    match v.iter().position(|&b| !is_id_byte(b)) {
        Some(at) => Err(ClientIdReject::BadByte(at)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn client_ids() {
        let long = [b'a'; CLIENT_ID_MAX_LEN + 1];
        let max = [b'Z'; CLIENT_ID_MAX_LEN];
        type Case<'a> = (&'a [&'a [u8]], Result<(), ClientIdReject>);
        let cases: &[Case] = &[
            (&[], Ok(())),
            (&[b"abc-123"], Ok(())),
            (&[b"req_1.2:3-X"], Ok(())),
            (&[b"e265ea48-60c7-44cc-83f9-4c17113c75e1"], Ok(())),
            (&[&max], Ok(())),
            (&[&long], Err(ClientIdReject::TooLong(CLIENT_ID_MAX_LEN + 1))),
            (&[b""], Err(ClientIdReject::Empty)),
            (&[b"a b"], Err(ClientIdReject::BadByte(1))),
            (&[b"id\"x"], Err(ClientIdReject::BadByte(2))),
            (&[b"\xff"], Err(ClientIdReject::BadByte(0))),
            (&[b"a/b"], Err(ClientIdReject::BadByte(1))),
            (&[b"a", b"a"], Err(ClientIdReject::Repeated(2))),
            (&[b"a", b"b", b"c"], Err(ClientIdReject::Repeated(3))),
        ];
        for (values, want) in cases {
            assert_eq!(check_client_id(values), *want, "{values:?}");
        }
    }

    #[test]
    fn client_id_reasons_read_like_nginx() {
        assert_eq!(ClientIdReject::Repeated(2).to_string(), "sent 2 times");
        assert_eq!(ClientIdReject::TooLong(200).to_string(), "200 bytes long (at most 128)");
        assert_eq!(
            ClientIdReject::BadByte(3).to_string(),
            "a byte outside [A-Za-z0-9._:-] at offset 3"
        );
    }

    #[test]
    fn uuid_format() {
        let mut rng = Rng::new(42);
        let mut seen = HashSet::new();
        for _ in 0..10_000 {
            let u = uuid_v4(&mut rng);
            let s = std::str::from_utf8(&u).unwrap();
            assert_eq!(s.len(), 36);
            for (i, c) in s.chars().enumerate() {
                if [8, 13, 18, 23].contains(&i) {
                    assert_eq!(c, '-');
                } else {
                    assert!(c.is_ascii_hexdigit() && !c.is_ascii_uppercase(), "{s}");
                }
            }
            assert_eq!(&s[14..15], "4");
            assert!("89ab".contains(&s[19..20]), "{s}");
            assert!(seen.insert(s.to_owned()));
        }
    }

    #[test]
    fn seeds_differ_and_repeat() {
        assert_eq!(uuid_v4(&mut Rng::new(7)), uuid_v4(&mut Rng::new(7)));
        assert_ne!(uuid_v4(&mut Rng::new(7)), uuid_v4(&mut Rng::new(8)));
        // Known first output of splitmix-seeded xoshiro256** for seed 0 is stable.
        let mut a = Rng::new(0);
        let first = a.next_u64();
        assert_eq!(Rng::new(0).next_u64(), first);
        assert_ne!(first, 0);
    }

    #[test]
    fn traceparent_format() {
        let mut rng = Rng::new(1);
        let t = traceparent(&mut rng);
        let s = std::str::from_utf8(&t).unwrap();
        let parts: Vec<_> = s.split('-').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!(parts[0], "00");
        assert_eq!(parts[1].len(), 32);
        assert_eq!(parts[2].len(), 16);
        assert_eq!(parts[3], "01");
        assert!(parts[1].bytes().all(|c| HEX.contains(&c)));
        assert_ne!(parts[1], "0".repeat(32));
    }
}
