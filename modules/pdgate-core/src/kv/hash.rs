//! vLLM's chained prefix-cache block hash, reproduced outside Python, so the
//! keys pdgate computes for a prompt are the keys vLLM publishes in its KV
//! cache events ([`super::events`]).
//!
//! What vLLM does (`vllm/v1/core/kv_cache_utils.py` @ `001cabc1`, functions
//! `init_none_hash`, `hash_block_tokens`, `get_request_block_hasher`,
//! `maybe_convert_block_hash`; `vllm/utils/hashing.py` @ `ac621345` for
//! `sha256_cbor`, and the later copy that adds `xxhash_cbor`):
//!
//! - Only **full** blocks of `block_size` tokens are hashed; a partial last
//!   block has no hash.
//! - `hash(block i) = H((parent, tuple(tokens of block i), extra_keys))`, where
//!   `parent` is the hash of block i-1, or `NONE_HASH` for the first block, and
//!   `extra_keys` is `None` unless the request has a LoRA adapter (its name),
//!   multimodal items, a `cache_salt` (first block only) or prompt embeddings.
//! - `H` is `--prefix-caching-hash-algo`. Only two are reproducible here:
//!   `sha256_cbor` = SHA-256 of `cbor2.dumps(x, canonical=True)` (32 bytes) and
//!   `xxhash_cbor` = XXH3-128 of the same bytes (16 bytes, big-endian as
//!   `xxhash.xxh3_128_digest` gives them). The pickle-based `sha256` and
//!   `xxhash`, and the old `builtin` (Python's `hash()`), depend on Python's
//!   pickle bytes or per-process hash randomisation: [`HashAlgo::parse`]
//!   rejects them.
//! - `NONE_HASH = H(PYTHONHASHSEED)`, the seed as a CBOR text string, when the
//!   variable is set; otherwise 32 random bytes per process, and then nobody
//!   outside that process can reproduce any hash. Every engine must run with
//!   the same `PYTHONHASHSEED` as the seed configured here.
//! - The 64-bit key (events with `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`, llm-d,
//!   our shared index) is the digest's last 8 bytes read big-endian ([`key64`]).
//!
//! The CBOR is written by hand (a 3-array of a byte string, an array of
//! unsigned ints in their shortest form, and null or an array of text
//! strings) straight into the hasher through a small stack buffer: hashing a
//! prompt allocates nothing but the caller's output vector.
//!
//! Golden values: the unit tests pin digests printed by
//! `scripts/vllm-block-hash.py` (cbor2 6.3.0, xxhash 4.1.0 from PyPI, the
//! functions above restated), run as `python3 scripts/vllm-block-hash.py`;
//! the script makes its own virtualenv when cbor2/xxhash are missing.

use sha2::{Digest as _, Sha256};
use std::fmt;
use xxhash_rust::xxh3::Xxh3Default;

/// A reproducible `--prefix-caching-hash-algo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HashAlgo {
    /// `sha256_cbor`: SHA-256 of canonical CBOR, 32-byte digests.
    Sha256Cbor,
    /// `xxhash_cbor`: XXH3-128 of canonical CBOR, 16-byte digests.
    XxhashCbor,
}

impl HashAlgo {
    /// The vLLM name (`sha256_cbor`, `xxhash_cbor`); `None` for any other,
    /// including vLLM's pickle-based `sha256`/`xxhash` and `builtin`, whose
    /// hashes cannot be reproduced outside the engine's Python process.
    pub fn parse(name: &[u8]) -> Option<Self> {
        match name {
            b"sha256_cbor" => Some(HashAlgo::Sha256Cbor),
            b"xxhash_cbor" => Some(HashAlgo::XxhashCbor),
            _ => None,
        }
    }

    /// The vLLM name.
    pub fn name(self) -> &'static str {
        match self {
            HashAlgo::Sha256Cbor => "sha256_cbor",
            HashAlgo::XxhashCbor => "xxhash_cbor",
        }
    }

    /// Length of its digests in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            HashAlgo::Sha256Cbor => 32,
            HashAlgo::XxhashCbor => 16,
        }
    }
}

/// vLLM's `BlockHash`: the raw digest bytes (32 for SHA-256, 16 for XXH3-128;
/// up to 32 from an event). Bytes past `len` are always zero, so the derived
/// equality and hash see only the digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest {
    bytes: [u8; 32],
    len: u8,
}

impl Digest {
    /// The largest digest kept (SHA-256).
    pub const MAX: usize = 32;

    /// A digest from 1 to 32 raw bytes; `None` for an empty or longer slice.
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        if b.is_empty() || b.len() > Self::MAX {
            return None;
        }
        let mut bytes = [0u8; 32];
        bytes[..b.len()].copy_from_slice(b);
        Some(Digest { bytes, len: b.len() as u8 })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// Always false: a digest has at least one byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.as_bytes() {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// The 64-bit key of a digest: `maybe_convert_block_hash`, i.e.
/// `int.from_bytes(digest, "big") & (2**64 - 1)`, the last 8 bytes read
/// big-endian (a shorter digest is zero-extended).
pub fn key64(d: &Digest) -> u64 {
    key64_bytes(d.as_bytes())
}

/// [`key64`] of raw hash bytes of any length (an event may carry more than
/// a digest holds).
pub fn key64_bytes(b: &[u8]) -> u64 {
    b[b.len().saturating_sub(8)..].iter().fold(0u64, |k, &x| (k << 8) | u64::from(x))
}

/// vLLM's `NONE_HASH` when `PYTHONHASHSEED` is `seed`: the hash of the seed
/// string (CBOR text string), the parent of every first block.
pub fn none_hash(algo: HashAlgo, seed: &str) -> Digest {
    let mut s = Sink::new(algo);
    s.head(3, seed.len() as u64);
    s.put(seed.as_bytes());
    s.finish()
}

/// `hash_block_tokens(H, parent, tokens, extra_keys)`: the hash of the CBOR
/// 3-array `[parent bytes, [token ids], extra]`, where `extra` is null when
/// `extra` is empty (vLLM passes `None` then) and otherwise the tuple of text
/// strings, in vLLM's order: the LoRA name, then the `cache_salt` (first block
/// only). Multimodal and prompt-embedding keys are not supported.
pub fn hash_block(algo: HashAlgo, parent: &Digest, tokens: &[u32], extra: &[&str]) -> Digest {
    let mut s = Sink::new(algo);
    s.put(&[0x83]);
    s.head(2, parent.len() as u64);
    s.put(parent.as_bytes());
    s.head(4, tokens.len() as u64);
    for &t in tokens {
        s.head(0, u64::from(t));
    }
    if extra.is_empty() {
        s.put(&[0xf6]);
    } else {
        s.head(4, extra.len() as u64);
        for e in extra {
            s.head(3, e.len() as u64);
            s.put(e.as_bytes());
        }
    }
    s.finish()
}

/// The hashes of a prompt's full blocks, as one engine configuration
/// (`--prefix-caching-hash-algo`, `--block-size`, `PYTHONHASHSEED`) makes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHasher {
    algo: HashAlgo,
    block_size: usize,
    root: Digest,
}

impl BlockHasher {
    /// A hasher for `block_size`-token blocks whose chains start at
    /// `none_hash(algo, seed)`. A block size of 0 yields no blocks.
    pub fn new(algo: HashAlgo, block_size: usize, seed: &str) -> Self {
        BlockHasher { algo, block_size, root: none_hash(algo, seed) }
    }

    pub fn algo(&self) -> HashAlgo {
        self.algo
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// `NONE_HASH`, the parent of every first block.
    pub fn root(&self) -> &Digest {
        &self.root
    }

    /// The 64-bit keys ([`key64`]) of the first `max_blocks` full blocks of
    /// `tokens`, chained from the root, into `out` (cleared first).
    pub fn keys(&self, tokens: &[u32], max_blocks: usize, out: &mut Vec<u64>) {
        out.clear();
        if self.block_size == 0 {
            return;
        }
        let mut parent = self.root;
        for block in tokens.chunks_exact(self.block_size).take(max_blocks) {
            parent = hash_block(self.algo, &parent, block, &[]);
            out.push(key64(&parent));
        }
    }

    /// The digests of every full block of `tokens`, chained from `parent`
    /// (the root when `None`), into `out` (cleared first): re-derives a
    /// `BlockStored` event's hashes from its `token_ids` and
    /// `parent_block_hash`.
    pub fn chain(&self, parent: Option<&Digest>, tokens: &[u32], out: &mut Vec<Digest>) {
        out.clear();
        if self.block_size == 0 {
            return;
        }
        let mut parent = *parent.unwrap_or(&self.root);
        for block in tokens.chunks_exact(self.block_size) {
            parent = hash_block(self.algo, &parent, block, &[]);
            out.push(parent);
        }
    }
}

/// The running hash, fed through a stack buffer so that one token (up to
/// five CBOR bytes) is not one call into the hasher.
struct Sink {
    state: State,
    buf: [u8; 128],
    n: usize,
}

// On the stack for one hash only, so the size difference does not matter.
#[allow(clippy::large_enum_variant)]
enum State {
    Sha(Sha256),
    Xx(Xxh3Default),
}

impl Sink {
    fn new(algo: HashAlgo) -> Self {
        let state = match algo {
            HashAlgo::Sha256Cbor => State::Sha(Sha256::new()),
            HashAlgo::XxhashCbor => State::Xx(Xxh3Default::new()),
        };
        Sink { state, buf: [0; 128], n: 0 }
    }

    fn flush(&mut self) {
        let data = &self.buf[..self.n];
        match &mut self.state {
            State::Sha(h) => h.update(data),
            State::Xx(h) => h.update(data),
        }
        self.n = 0;
    }

    fn put(&mut self, b: &[u8]) {
        if self.n + b.len() > self.buf.len() {
            self.flush();
            if b.len() > self.buf.len() {
                match &mut self.state {
                    State::Sha(h) => h.update(b),
                    State::Xx(h) => h.update(b),
                }
                return;
            }
        }
        self.buf[self.n..self.n + b.len()].copy_from_slice(b);
        self.n += b.len();
    }

    /// A CBOR head: major type and argument in its shortest form (RFC 8949
    /// §4.2.1, what `canonical=True` writes).
    fn head(&mut self, major: u8, v: u64) {
        let m = major << 5;
        if v < 24 {
            self.put(&[m | v as u8]);
        } else if v <= 0xff {
            self.put(&[m | 24, v as u8]);
        } else if v <= 0xffff {
            let b = (v as u16).to_be_bytes();
            self.put(&[m | 25, b[0], b[1]]);
        } else if v <= 0xffff_ffff {
            let b = (v as u32).to_be_bytes();
            self.put(&[m | 26, b[0], b[1], b[2], b[3]]);
        } else {
            self.put(&[m | 27]);
            self.put(&v.to_be_bytes());
        }
    }

    fn finish(mut self) -> Digest {
        self.flush();
        let mut bytes = [0u8; 32];
        let len = match self.state {
            State::Sha(h) => {
                bytes.copy_from_slice(&h.finalize());
                32
            }
            State::Xx(h) => {
                bytes[..16].copy_from_slice(&h.digest128().to_be_bytes());
                16
            }
        };
        Digest { bytes, len }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(d: &Digest) -> String {
        format!("{d:?}")
    }

    /// The output of `python3 scripts/vllm-block-hash.py` (see the module doc).
    const GOLDEN: &str = "\
sha256_cbor none seed=0 4e1195df020de59e0d65a33a4279f1183e7ae4e5d980e309f8b55adff2e61c3e
sha256_cbor none seed=42 9fa6eb003f14425eb9c8e6baacfbcaab26257357b829c7bfa74ffcc4f31c1780
sha256_cbor small16 block=0 8ff561c403a9b67e51c54927e9f5fe6cd4a4e9b2d36656f332783bfa9dcd89ef key64=0x32783bfa9dcd89ef
sha256_cbor small16 block=1 94193e5ade40ce4c6cf53ff94742da603afdb220394d8c2d0788ed929908050e key64=0x0788ed929908050e
sha256_cbor wide4 block=0 5ac4de16a383d7facf87bb28932c0da3555772b20f450b27d5ebaf17c2767603 key64=0xd5ebaf17c2767603
sha256_cbor wide4 block=1 e5f136d72546daa684d344c24dc3574c90003fc1a07f2aaa650eacc4369bf19c key64=0x650eacc4369bf19c
sha256_cbor wide4 block=2 48c0adea6c5b0d30a57c2cccf0da77c7017aecedfe5a1de1ecfa6877468ccd19 key64=0xecfa6877468ccd19
sha256_cbor long32 block=0 d9fbaf12d78963b6cb7c98e4d2002bc0897374e59bc8568c87c10f7f24e8a9ba key64=0x87c10f7f24e8a9ba
sha256_cbor extra4 block=0 dbcbfbecddb7a2d6b1f0bf5f0df8adc23adcd05dceb15221766eb797923614a3 key64=0x766eb797923614a3
sha256_cbor extra4 block=1 81f02177c501e8404201ae1bf08c8fcba0bad642c790f9a17b2273aadd5bfe62 key64=0x7b2273aadd5bfe62
xxhash_cbor none seed=0 1ebe36576dcb573f26b99533a20aaeca
xxhash_cbor none seed=42 a9d2e63407fce1a26c9dc9d7fa2d7caf
xxhash_cbor small16 block=0 e63e233de3dac3535a9265e5a691aa71 key64=0x5a9265e5a691aa71
xxhash_cbor small16 block=1 a398251243f197cc164f4ab020ae53d0 key64=0x164f4ab020ae53d0
xxhash_cbor wide4 block=0 4caad0d1d9c5cbaa0a15710f35771c2d key64=0x0a15710f35771c2d
xxhash_cbor wide4 block=1 c4eccf142c7c1cc3c456018cd98521c2 key64=0xc456018cd98521c2
xxhash_cbor wide4 block=2 569a69d32cbfaf87c24991018962a7db key64=0xc24991018962a7db
xxhash_cbor long32 block=0 1a907ec743facf39a1239e508f37878e key64=0xa1239e508f37878e
xxhash_cbor extra4 block=0 6abefbe0f0a9556dbbfe5b91f9fc7c4e key64=0xbbfe5b91f9fc7c4e
xxhash_cbor extra4 block=1 ce7b4938a50a28247c4cce35c9e2bdbc key64=0x7c4cce35c9e2bdbc
";

    const WIDE: [u32; 13] =
        [1, 23, 24, 255, 256, 65535, 65536, 128255, 4294967295, 0, 151643, 100000, 7];

    /// The script's cases: seed, block size, tokens, per-block extra keys.
    fn case(name: &str) -> (&'static str, usize, Vec<u32>, Vec<Vec<&'static str>>) {
        match name {
            // 2 blocks, 4 tokens left over; ints below and above 24.
            "small16" => ("0", 16, (10..46).collect(), vec![]),
            // 3 blocks, 1 left over; every CBOR int width.
            "wide4" => ("42", 4, WIDE.to_vec(), vec![]),
            // An array head with a 1-byte length (0x98 0x20).
            "long32" => ("0", 32, (1000..1032).collect(), vec![]),
            // A LoRA name on both blocks, a cache_salt on the first.
            "extra4" => ("0", 4, (1..9).collect(), vec![vec!["lora-a", "salt-1"], vec!["lora-a"]]),
            _ => panic!("case {name}"),
        }
    }

    #[test]
    fn golden_values() {
        for line in GOLDEN.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            let algo = HashAlgo::parse(f[0].as_bytes()).unwrap();
            if f[1] == "none" {
                let d = none_hash(algo, f[2].trim_start_matches("seed="));
                assert_eq!((hex(&d), d.len()), (f[3].to_owned(), algo.digest_len()), "{line}");
                continue;
            }
            let (seed, bs, tokens, extras) = case(f[1]);
            let i: usize = f[2].trim_start_matches("block=").parse().unwrap();
            let hasher = BlockHasher::new(algo, bs, seed);
            let mut parent = *hasher.root();
            for (j, block) in tokens.chunks_exact(bs).enumerate().take(i + 1) {
                let extra: &[&str] = extras.get(j).map_or(&[], Vec::as_slice);
                parent = hash_block(algo, &parent, block, extra);
            }
            assert_eq!(hex(&parent), f[3], "{line}");
            assert_eq!(format!("key64={:#018x}", key64(&parent)), f[4], "{line}");
            if extras.is_empty() {
                let (mut chain, mut keys) = (Vec::new(), Vec::new());
                hasher.chain(None, &tokens, &mut chain);
                hasher.keys(&tokens, usize::MAX, &mut keys);
                assert_eq!((chain[i], keys[i]), (parent, key64(&parent)), "{line}");
                assert_eq!((chain.len(), keys.len()), (tokens.len() / bs, tokens.len() / bs));
            }
        }
    }

    #[test]
    fn key64_is_the_low_64_bits() {
        // The script's key64 column for the first sha256_cbor and xxhash_cbor blocks.
        let h = BlockHasher::new(HashAlgo::Sha256Cbor, 16, "0");
        let mut keys = Vec::new();
        h.keys(&(10..46).collect::<Vec<_>>(), usize::MAX, &mut keys);
        assert_eq!(keys, [0x32783bfa9dcd89ef, 0x0788ed929908050e]);
        let h = BlockHasher::new(HashAlgo::XxhashCbor, 4, "42");
        h.keys(&WIDE, usize::MAX, &mut keys);
        assert_eq!(keys, [0x0a15710f35771c2d, 0xc456018cd98521c2, 0xc24991018962a7db]);
        // Shorter digests (from events) are zero-extended.
        assert_eq!(key64(&Digest::from_slice(&[1, 2]).unwrap()), 0x0102);
    }

    #[test]
    fn only_full_blocks_and_max_blocks() {
        let h = BlockHasher::new(HashAlgo::Sha256Cbor, 4, "0");
        let mut keys = Vec::new();
        h.keys(&[1, 2, 3], usize::MAX, &mut keys);
        assert!(keys.is_empty(), "a partial block has no hash");
        h.keys(&(0..11).collect::<Vec<_>>(), usize::MAX, &mut keys);
        assert_eq!(keys.len(), 2);
        let two = keys.clone();
        h.keys(&(0..11).collect::<Vec<_>>(), 1, &mut keys);
        assert_eq!(keys, two[..1]);
        let zero = BlockHasher::new(HashAlgo::Sha256Cbor, 0, "0");
        zero.keys(&[1, 2, 3], usize::MAX, &mut keys);
        assert!(keys.is_empty());
    }

    #[test]
    fn chain_continues_from_a_parent() {
        // Block 1 of a chain from block 0's digest equals block 1 of the whole.
        for algo in [HashAlgo::Sha256Cbor, HashAlgo::XxhashCbor] {
            let h = BlockHasher::new(algo, 4, "42");
            let mut whole = Vec::new();
            h.chain(None, &WIDE, &mut whole);
            let mut rest = Vec::new();
            h.chain(Some(&whole[0]), &WIDE[4..], &mut rest);
            assert_eq!(rest[..], whole[1..]);
        }
    }

    #[test]
    fn long_inputs_pass_the_buffer() {
        // Past the 128-byte stack buffer: a long seed and a 64-token block
        // (5 bytes each) hash as their one-call equivalents.
        let seed = "s".repeat(300);
        let mut cbor = vec![0x79, 0x01, 0x2c];
        cbor.extend_from_slice(seed.as_bytes());
        let d = none_hash(HashAlgo::Sha256Cbor, &seed);
        assert_eq!(d.as_bytes(), &Sha256::digest(&cbor)[..]);
        let tokens: Vec<u32> = (0..64).map(|i| 70_000 + i).collect();
        let parent = Digest::from_slice(&[7; 32]).unwrap();
        let mut cbor = vec![0x83, 0x58, 0x20];
        cbor.extend_from_slice(&[7; 32]);
        cbor.extend_from_slice(&[0x98, 64]);
        for t in &tokens {
            cbor.push(0x1a);
            cbor.extend_from_slice(&t.to_be_bytes());
        }
        cbor.push(0xf6);
        let d = hash_block(HashAlgo::XxhashCbor, &parent, &tokens, &[]);
        assert_eq!(d.as_bytes(), xxhash_rust::xxh3::xxh3_128(&cbor).to_be_bytes());
    }

    #[test]
    fn algo_names() {
        for a in [HashAlgo::Sha256Cbor, HashAlgo::XxhashCbor] {
            assert_eq!(HashAlgo::parse(a.name().as_bytes()), Some(a));
        }
        for bad in [&b"sha256"[..], b"xxhash", b"builtin", b"", b"SHA256_CBOR"] {
            assert_eq!(HashAlgo::parse(bad), None);
        }
    }

    #[test]
    fn digest_bounds() {
        assert!(Digest::from_slice(&[]).is_none());
        assert!(Digest::from_slice(&[0; 33]).is_none());
        let d = Digest::from_slice(&[0xab; 32]).unwrap();
        assert_eq!((d.len(), d.is_empty()), (32, false));
        assert_ne!(Digest::from_slice(&[0, 1]), Digest::from_slice(&[0, 1, 0]));
    }
}
