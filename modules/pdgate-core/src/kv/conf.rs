//! The settings of `pd_kv_events` (an upstream's engines' KV event
//! streams) and of the block hashing it shares with `pd_tokenizer`.

use super::hash::HashAlgo;
use super::index::{hashing_fingerprint, DEFAULT_BLOCKS, WINDOW};
use crate::conf::{invalid_value, number, parameters, port};

/// How prompts are cut into blocks and the blocks keyed: vLLM's prefix
/// cache hashing, as the engines are configured (`--block-size`,
/// `--prefix-caching-hash-algo`, `PYTHONHASHSEED`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hashing {
    pub algo: HashAlgo,
    /// The hash seed (vLLM's `PYTHONHASHSEED`); its hash is the chain's
    /// root (vLLM's `NONE_HASH`).
    pub seed: String,
    pub block_size: usize,
}

impl Default for Hashing {
    fn default() -> Self {
        Hashing { algo: HashAlgo::Sha256Cbor, seed: "0".into(), block_size: 16 }
    }
}

impl Hashing {
    /// Sets `block_size=`, `hash=` or `seed=`: `Ok(false)` for another
    /// name.
    pub fn set(&mut self, name: &[u8], value: &[u8]) -> Result<bool, String> {
        let bad = |why: &str| invalid_value(name, value, why);
        match name {
            b"block_size" => {
                self.block_size = number(value, 1, 4096)
                    .ok_or_else(|| bad(", it must be a number of tokens from 1 to 4096"))?
                    as usize;
            }
            b"hash" => {
                self.algo = HashAlgo::parse(value).ok_or_else(|| {
                    bad(", it must be \"sha256_cbor\" or \"xxhash_cbor\" (vLLM's pickle-based hashes cannot be reproduced outside Python)")
                })?;
            }
            b"seed" => {
                self.seed = std::str::from_utf8(value)
                    .ok()
                    .filter(|s| s.len() <= 64 && s.bytes().all(|b| b.is_ascii_graphic()))
                    .ok_or_else(|| bad(", it must be PYTHONHASHSEED's value"))?
                    .to_owned();
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Its fingerprint (see [`hashing_fingerprint`]).
    pub fn fingerprint(&self) -> u64 {
        hashing_fingerprint(self.algo.name(), &self.seed, self.block_size)
    }
}

/// A port of every engine: the same number on each host, or the engine's
/// HTTP port plus an offset (`+N`: several engines on one host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortOf {
    Fixed(u16),
    Offset(u16),
}

impl PortOf {
    fn parse(v: &[u8]) -> Option<PortOf> {
        match v.strip_prefix(b"+") {
            Some(off) => crate::conf::number(off, 1, 65534).map(|n| PortOf::Offset(n as u16)),
            None => port(v).map(PortOf::Fixed),
        }
    }

    /// The port of the engine serving HTTP on `http_port` (`None`: beyond
    /// 65535).
    pub fn of(self, http_port: u16) -> Option<u16> {
        match self {
            PortOf::Fixed(p) => Some(p),
            PortOf::Offset(n) => http_port.checked_add(n),
        }
    }
}

/// `pd_kv_events [port=5557|+N] [replay_port=N|+N] [topic=T] [blocks=N]
/// [block_size=16] [hash=sha256_cbor] [seed=0]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvConf {
    /// The engines' PUB port (vLLM `--kv-events-config` `endpoint`).
    pub port: PortOf,
    /// Their replay (ROUTER) port (`replay_endpoint`), if they have one.
    pub replay_port: Option<PortOf>,
    /// The topic subscribed to (`topic`; empty: every message).
    pub topic: Vec<u8>,
    /// Slots of the index and of the map (a power of two).
    pub blocks: usize,
    pub hashing: Hashing,
}

impl Default for KvConf {
    fn default() -> Self {
        KvConf {
            port: PortOf::Fixed(5557),
            replay_port: None,
            topic: Vec::new(),
            blocks: DEFAULT_BLOCKS,
            hashing: Hashing::default(),
        }
    }
}

impl KvConf {
    pub fn parse(args: &[&[u8]]) -> Result<KvConf, String> {
        let mut c = KvConf::default();
        parameters(args, |name, value| {
            if c.hashing.set(name, value)? {
                return Ok(true);
            }
            let bad = |why: &str| invalid_value(name, value, why);
            match name {
                b"port" => c.port = PortOf::parse(value).ok_or_else(|| bad(A_PORT_OF))?,
                b"replay_port" => {
                    c.replay_port = Some(PortOf::parse(value).ok_or_else(|| bad(A_PORT_OF))?)
                }
                b"topic" => {
                    if value.len() > 256 {
                        return Err(bad(", it must be at most 256 bytes"));
                    }
                    c.topic = value.to_vec();
                }
                b"blocks" => {
                    let n = crate::conf::parse_size(value)
                        .filter(|&n| (WINDOW..=1 << 26).contains(&n))
                        .ok_or_else(|| bad(", it must be a number of blocks from 32 to 64m"))?;
                    c.blocks = n.next_power_of_two();
                }
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        Ok(c)
    }
}

const A_PORT_OF: &str =
    ", it must be a port from 1 to 65535, or +N for the engine's own port plus N";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_every_parameter() {
        assert_eq!(KvConf::parse(&[]).unwrap(), KvConf::default());
        let c = KvConf::parse(&[
            b"port=6000",
            b"replay_port=6001",
            b"topic=kv",
            b"blocks=100k",
            b"block_size=32",
            b"hash=xxhash_cbor",
            b"seed=42",
        ])
        .unwrap();
        assert_eq!(
            (c.port, c.replay_port, c.topic.as_slice()),
            (PortOf::Fixed(6000), Some(PortOf::Fixed(6001)), &b"kv"[..])
        );
        assert_eq!(c.blocks, 131_072);
        assert_eq!(
            c.hashing,
            Hashing { algo: HashAlgo::XxhashCbor, seed: "42".into(), block_size: 32 }
        );
        assert_ne!(c.hashing.fingerprint(), Hashing::default().fingerprint());
        let c = KvConf::parse(&[b"port=+1000", b"replay_port=+1001"]).unwrap();
        assert_eq!(
            (c.port.of(8000), c.replay_port.and_then(|p| p.of(8000))),
            (Some(9000), Some(9001))
        );
        assert_eq!(c.port.of(65000), None);
    }

    #[test]
    fn mistakes_are_named() {
        for (arg, says) in [
            (&b"port=0"[..], "invalid parameter \"port=0\", it must be a port"),
            (b"port=+0", "or +N"),
            (b"hash=sha256", "pickle-based"),
            (b"block_size=0", "from 1 to 4096"),
            (b"blocks=8", "from 32 to 64m"),
            (b"seed=a b", "PYTHONHASHSEED"),
            (b"colour=red", "colour"),
        ] {
            let e = KvConf::parse(&[arg]).unwrap_err();
            assert!(e.contains(says), "{e}");
        }
    }
}
