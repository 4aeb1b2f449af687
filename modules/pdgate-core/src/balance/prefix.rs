//! prefix_cache_affinity's fingerprints and its shared index.
//!
//! **Fingerprint.** The prompt of a request is the raw JSON text of its
//! top-level `messages` (chat) or `prompt` (completions) value — the bytes
//! the engine's prefix cache will see, in order, without decoding them
//! (the same client serialises the same conversation the same way, and a
//! conversation that grows keeps its earlier bytes). That text is cut into
//! blocks of `block` bytes (only whole blocks count, at most
//! [`MAX_BLOCKS`]); block `k`'s key is a hash of everything up to its end,
//! so equal keys mean equal prefixes. (The original took the first
//! `content` anywhere in the body — usually just the system prompt — and
//! gave up on bodies of more than 128 JSON tokens.)
//!
//! **Index.** A fixed table of `(key, peer, stamp)` entries in shared
//! memory, in buckets of [`WAYS`]: a key lives in one bucket; inserting
//! into a full bucket replaces its least recently used entry. Entries are
//! two atomic words, written without locks: a reader racing a writer may
//! see a key with its previous owner for an instant, which costs one
//! cache miss at worst, never a wrong answer about load.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::json::Object;

/// Most blocks of a prompt that are fingerprinted.
pub const MAX_BLOCKS: usize = 256;

/// Entries per bucket.
pub const WAYS: usize = 8;

/// The prompt text of a request body: the raw `messages` or `prompt`
/// value, `None` for bodies that are not a JSON object or have neither.
pub fn prompt_bytes(body: &[u8]) -> Option<&[u8]> {
    let o = Object::parse(body).ok()?;
    o.get("messages").or_else(|| o.get("prompt"))
}

/// The keys of the whole blocks of `text` (see the module doc), salted with
/// `seed` (e.g. the upstream's identity); written to `out`, returns how
/// many. Keys are never 0.
pub fn block_hashes(text: &[u8], block: usize, seed: u64, out: &mut [u64]) -> usize {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let block = block.max(1);
    let mut h = seed ^ 0x6a09_e667_f3bc_c908;
    let mut n = 0;
    for chunk in text.chunks_exact(block).take(out.len().min(MAX_BLOCKS)) {
        let mut words = chunk.chunks_exact(8);
        for w in words.by_ref() {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            h = (h ^ u64::from_le_bytes(b)).wrapping_mul(K).rotate_left(29);
        }
        for &c in words.remainder() {
            h = (h ^ u64::from(c)).wrapping_mul(K).rotate_left(29);
        }
        // Finalise (splitmix64) so near-equal prefixes spread over buckets.
        let mut z = h.wrapping_add(n as u64);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out[n] = (z ^ (z >> 31)).max(1);
        n += 1;
    }
    n
}

/// One index entry.
#[repr(C)]
#[derive(Debug, Default)]
pub struct Entry {
    /// The block key; 0 while free.
    pub key: AtomicU64,
    /// `stamp << 16 | (peer + 1)`: the peer's slot and when it was placed.
    pub val: AtomicU64,
}

/// Bytes per entry.
pub const ENTRY_BYTES: usize = std::mem::size_of::<Entry>();

/// A view of an index (in shared memory, or in a test's vector) with its
/// clock (a counter of insertions, the LRU order).
#[derive(Debug, Clone, Copy)]
pub struct PrefixIndex<'a> {
    entries: &'a [Entry],
    clock: &'a AtomicU64,
}

impl<'a> PrefixIndex<'a> {
    pub fn new(entries: &'a [Entry], clock: &'a AtomicU64) -> Self {
        PrefixIndex { entries, clock }
    }

    fn bucket(&self, key: u64) -> &'a [Entry] {
        let buckets = self.entries.len() / WAYS;
        if buckets == 0 {
            return &[];
        }
        let b = (key % buckets as u64) as usize;
        &self.entries[b * WAYS..(b + 1) * WAYS]
    }

    /// The peer `key` was last placed on.
    pub fn get(&self, key: u64) -> Option<usize> {
        self.bucket(key).iter().find_map(|e| {
            if e.key.load(Ordering::Acquire) != key {
                return None;
            }
            match e.val.load(Ordering::Acquire) & 0xffff {
                0 => None,
                p => Some(p as usize - 1),
            }
        })
    }

    /// The longest prefix of `keys` found, as (blocks, peer). Binary
    /// search: a prefix is inserted with all its shorter prefixes, so
    /// presence is monotone (up to evictions, which only shorten a match).
    pub fn longest(&self, keys: &[u64]) -> Option<(usize, usize)> {
        let (mut lo, mut hi) = (0usize, keys.len());
        let mut best = None;
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.get(keys[mid]) {
                Some(peer) => {
                    best = Some((mid + 1, peer));
                    lo = mid + 1;
                }
                None => hi = mid,
            }
        }
        best
    }

    /// Records that every prefix in `keys` now lives on `peer` (< 65535).
    pub fn insert(&self, keys: &[u64], peer: usize) {
        if peer >= 0xffff {
            return;
        }
        let stamp = self.clock.fetch_add(1, Ordering::Relaxed) + 1;
        let val = (stamp << 16) | (peer as u64 + 1);
        for &key in keys {
            let bucket = self.bucket(key);
            if bucket.is_empty() {
                return;
            }
            if let Some(e) = bucket.iter().find(|e| e.key.load(Ordering::Acquire) == key) {
                e.val.store(val, Ordering::Release);
                continue;
            }
            // The free or least recently used entry.
            let Some(victim) = bucket.iter().min_by_key(|e| {
                if e.key.load(Ordering::Relaxed) == 0 {
                    0
                } else {
                    e.val.load(Ordering::Relaxed) >> 16 | 1
                }
            }) else {
                continue;
            };
            let old = victim.key.load(Ordering::Acquire);
            if victim.key.compare_exchange(old, key, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                victim.val.store(val, Ordering::Release);
            }
        }
    }

    /// Entries in use (status pages, tests).
    pub fn used(&self) -> usize {
        self.entries.iter().filter(|e| e.key.load(Ordering::Relaxed) != 0).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(n: usize) -> (Vec<Entry>, AtomicU64) {
        ((0..n).map(|_| Entry::default()).collect(), AtomicU64::new(0))
    }

    #[test]
    fn prompt_is_the_raw_messages_or_prompt() {
        let chat = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#;
        assert_eq!(prompt_bytes(chat), Some(&br#"[{"role":"user","content":"hi"}]"#[..]));
        assert_eq!(prompt_bytes(br#"{"prompt":"abc"}"#), Some(&br#""abc""#[..]));
        assert_eq!(prompt_bytes(br#"{"model":"m"}"#), None);
        assert_eq!(prompt_bytes(b"not json"), None);
    }

    #[test]
    fn equal_prefixes_equal_keys() {
        let a = b"0123456789abcdefXYZW-tail one";
        let b = b"0123456789abcdefXYZW-tail two, longer";
        let (mut ka, mut kb) = ([0u64; 8], [0u64; 8]);
        assert_eq!(block_hashes(a, 10, 7, &mut ka), 2);
        assert_eq!(block_hashes(b, 10, 7, &mut kb), 3);
        assert_eq!(ka[..2], kb[..2]);
        // Same block, different history: different keys.
        let c = b"XXXXXXXXXXabcdefXYZW";
        let mut kc = [0u64; 8];
        block_hashes(c, 10, 7, &mut kc);
        assert_ne!(kc[1], ka[1]);
        // Another seed (upstream): other keys.
        let mut kd = [0u64; 8];
        block_hashes(a, 10, 8, &mut kd);
        assert_ne!(kd[0], ka[0]);
        // Partial blocks do not count; `out` bounds the count.
        assert_eq!(block_hashes(b"short", 10, 7, &mut kd), 0);
        assert_eq!(block_hashes(b, 1, 7, &mut kd[..3]), 3);
        assert!(ka[..2].iter().all(|&k| k != 0));
    }

    #[test]
    fn longest_prefix_and_its_peer() {
        let (v, clock) = index(64);
        let ix = PrefixIndex::new(&v, &clock);
        let text: Vec<u8> = (0..100u8).collect();
        let mut keys = [0u64; 16];
        let n = block_hashes(&text, 10, 1, &mut keys);
        assert_eq!(n, 10);
        assert_eq!(ix.longest(&keys[..n]), None);
        ix.insert(&keys[..4], 2);
        assert_eq!(ix.longest(&keys[..n]), Some((4, 2)));
        // A longer conversation moves to peer 5: its prefix follows it.
        ix.insert(&keys[..7], 5);
        assert_eq!(ix.longest(&keys[..n]), Some((7, 5)));
        assert_eq!(ix.get(keys[0]), Some(5));
        assert_eq!(ix.used(), 7);
        ix.insert(&keys[..1], 0xffff); // not a slot: ignored
        assert_eq!(ix.get(keys[0]), Some(5));
    }

    #[test]
    fn full_buckets_evict_the_least_recently_used() {
        let (v, clock) = index(WAYS); // one bucket
        let ix = PrefixIndex::new(&v, &clock);
        for k in 1..=WAYS as u64 {
            ix.insert(&[k], k as usize);
        }
        ix.insert(&[1], 1); // touch key 1
        ix.insert(&[100], 9); // evicts key 2, the oldest
        assert_eq!(ix.get(2), None);
        assert_eq!(ix.get(1), Some(1));
        assert_eq!(ix.get(100), Some(9));
        assert_eq!(ix.used(), WAYS);
        let (e, c) = index(0);
        let none = PrefixIndex::new(&e, &c);
        none.insert(&[1], 1);
        assert_eq!(none.longest(&[1]), None);
    }

    #[test]
    fn concurrent_inserts_stay_consistent() {
        let (v, clock) = index(1024);
        let ix = PrefixIndex::new(&v, &clock);
        std::thread::scope(|s| {
            for t in 0..4usize {
                s.spawn(move || {
                    for k in 0..5000u64 {
                        ix.insert(&[1 + (k * 7 + t as u64) % 3000], t);
                    }
                });
            }
        });
        // Every entry names one of the writers.
        for e in &v {
            if e.key.load(Ordering::Relaxed) != 0 {
                let p = e.val.load(Ordering::Relaxed) & 0xffff;
                assert!((1..=4).contains(&p));
            }
        }
        assert!(ix.used() > 500);
    }
}
