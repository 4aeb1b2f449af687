//! The shared index of which engine holds which KV blocks, fed by the
//! engines' KV events (`pd_kv_events`) and read by every balancer of every
//! worker.
//!
//! **Layout** (one zone per upstream, [`KvHeader`] then two tables):
//! - the *index*: `key → engine mask` slots ([`Slot`]), where `key` is
//!   pdgate's block key (the low 64 bits of the block's chained hash, see
//!   [`super::hash`]) and bit `e` of the mask says engine `e` of the
//!   header's engine table holds the block;
//! - the *map*: `engine block hash → pdgate digest` slots ([`MapSlot`]),
//!   read and written by the subscriber alone: engines name their blocks
//!   with their own hashes (Python pickle, a random seed: nothing pdgate can
//!   reproduce in general), so the subscriber re-derives pdgate's digests
//!   from each event's token ids, chained from the digest it mapped the
//!   event's parent to, and finds a removed block's key through the map.
//!
//! **Concurrency.** One writer (the subscriber, in the worker holding the
//! health lease) and any number of readers; every word is an atomic and
//! nothing is locked, so a worker that dies mid-update leaves at worst one
//! slot with a stale bit — a routing hint off by one block, never a
//! blocked reader. Both tables are open-addressed with a bounded probe
//! [`WINDOW`]; a key is placed at the first slot of its window that is
//! free or holds no engine, and when the window is full the oldest-placed
//! way (round-robin per window) is evicted and counted. Slots never become
//! free again except through [`KvIndex::clear_all`], so a lookup stops at
//! the first free slot. A reader racing the writer's reuse of a slot reads
//! the key again after its mask and ignores a slot whose key changed.

use std::sync::atomic::{AtomicU64, Ordering};

use super::hash::Digest;

/// Engines one index can tell apart (bits of a mask).
pub const MAX_ENGINES: usize = 64;

/// Slots probed for a key.
pub const WINDOW: usize = 32;

/// The default number of index (and map) slots of a zone.
pub const DEFAULT_BLOCKS: usize = 1 << 18;

const MAGIC: u64 = 0x7064_6b76_6964_7831; // "pdkvidx1"

/// Per engine (one bit of the masks): who it is and how its event stream
/// goes. Written by the subscriber, read by status pages and balancers.
#[repr(C)]
#[derive(Debug, Default)]
pub struct EngineKv {
    /// The engine's peer key (`balance::slots::peer_key` of upstream and
    /// address); 0 while the bit is free.
    pub peer: AtomicU64,
    /// The sequence number the next live batch should carry (0: none seen
    /// yet). Kept over a change of subscriber (lease) and over reloads, so
    /// the next subscriber asks the engine to replay what it missed.
    pub next_seq: AtomicU64,
    /// Blocks the engine holds, as its events say (stored − removed).
    pub blocks: AtomicU64,
    /// Batches applied (live and replayed).
    pub batches: AtomicU64,
    /// Batches recovered through the replay socket.
    pub replayed: AtomicU64,
    /// Batches known lost (a gap the replay could not fill).
    pub lost: AtomicU64,
    /// Times the engine's sequence restarted (an engine restart).
    pub restarts: AtomicU64,
    /// Stored blocks whose parent was unknown (not indexed).
    pub orphans: AtomicU64,
    /// Batches that did not decode.
    pub bad: AtomicU64,
    /// Milliseconds (pdgate's clock) of the last batch; 0: never.
    pub last_ms: AtomicU64,
    /// 1 while the subscriber holds a connection to the engine.
    pub connected: AtomicU64,
}

/// What the status page and the metrics page show of an engine's stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvSnapshot {
    pub connected: bool,
    pub blocks: u64,
    pub batches: u64,
    pub replayed: u64,
    pub lost: u64,
    pub restarts: u64,
    pub orphans: u64,
    pub bad: u64,
    pub next_seq: u64,
    /// Milliseconds since the last batch (`None`: never).
    pub age_ms: Option<u64>,
}

impl EngineKv {
    pub fn snapshot(&self, now_ms: u64) -> KvSnapshot {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let last = r(&self.last_ms);
        KvSnapshot {
            connected: r(&self.connected) != 0,
            blocks: r(&self.blocks),
            batches: r(&self.batches),
            replayed: r(&self.replayed),
            lost: r(&self.lost),
            restarts: r(&self.restarts),
            orphans: r(&self.orphans),
            bad: r(&self.bad),
            next_seq: r(&self.next_seq),
            age_ms: (last != 0).then(|| now_ms.saturating_sub(last)),
        }
    }
}

impl KvSnapshot {
    /// The status page's words for it.
    pub fn status_text(&self) -> String {
        format!(
            "kv_events {} blocks {} batches {} (replayed {}, lost {}) restarts {} orphans {} bad {} next_seq {} last {}",
            if self.connected { "subscribed" } else { "idle" },
            self.blocks,
            self.batches,
            self.replayed,
            self.lost,
            self.restarts,
            self.orphans,
            self.bad,
            self.next_seq,
            self.age_ms.map_or_else(|| "never".to_owned(), |ms| format!("{}.{:03}s ago", ms / 1000, ms % 1000)),
        )
    }
}

/// The zone's header: magic, geometry, the engine table and counters.
#[repr(C)]
#[derive(Debug)]
pub struct KvHeader {
    magic: AtomicU64,
    /// Slots of each table (a power of two).
    pub capacity: AtomicU64,
    /// Fingerprint of the block hashing (algorithm, seed, block size) the
    /// subscriber keys blocks with; requests hashed otherwise are not
    /// matched (see [`hashing_fingerprint`]).
    pub hashing: AtomicU64,
    /// Index slots evicted to make room.
    pub evicted: AtomicU64,
    /// Map slots evicted to make room.
    pub map_evicted: AtomicU64,
    /// Round-robin cursor of evictions.
    cursor: AtomicU64,
    pub engines: [EngineKv; MAX_ENGINES],
}

impl Default for KvHeader {
    fn default() -> Self {
        KvHeader {
            magic: AtomicU64::new(0),
            capacity: AtomicU64::new(0),
            hashing: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            map_evicted: AtomicU64::new(0),
            cursor: AtomicU64::new(0),
            engines: std::array::from_fn(|_| EngineKv::default()),
        }
    }
}

/// One index slot.
#[repr(C)]
#[derive(Debug, Default)]
pub struct Slot {
    pub key: AtomicU64,
    pub mask: AtomicU64,
}

/// One map slot: an engine's block hash (low 64 bits) and pdgate's digest
/// of the same block.
#[repr(C)]
#[derive(Debug, Default)]
pub struct MapSlot {
    pub engine: AtomicU64,
    pub digest: [AtomicU64; 4],
    /// Digest length in bytes; 0: free.
    pub len: AtomicU64,
}

/// Bytes a zone of `capacity` slots needs (header and both tables).
pub fn zone_bytes(capacity: usize) -> usize {
    std::mem::size_of::<KvHeader>()
        + capacity * (std::mem::size_of::<Slot>() + std::mem::size_of::<MapSlot>())
}

/// The fingerprint of a block hashing: `algo` name, `seed` and
/// `block_size`; never 0.
pub fn hashing_fingerprint(algo: &str, seed: &str, block_size: usize) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in algo.bytes().chain([0]).chain(seed.bytes()).chain([0]).chain(block_size.to_le_bytes())
    {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h.max(1)
}

/// A view of one zone (in shared memory, or in a test's vectors).
#[derive(Debug, Clone, Copy)]
pub struct KvIndex<'a> {
    pub header: &'a KvHeader,
    slots: &'a [Slot],
    map: &'a [MapSlot],
}

/// How a live batch's sequence number relates to the engine's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqCheck {
    /// The next one: apply it.
    InOrder,
    /// The first batch pdgate sees of this engine.
    First,
    /// Batches `from..seq` were missed: replay them first.
    Gap { from: u64 },
    /// The engine restarted (its sequence went back): forget its blocks,
    /// then apply.
    Restart,
}

impl<'a> KvIndex<'a> {
    /// A view over `slots` and `map` (equal lengths, a power of two) under
    /// `header`; `None` when the geometry does not fit.
    pub fn new(header: &'a KvHeader, slots: &'a [Slot], map: &'a [MapSlot]) -> Option<Self> {
        let n = slots.len();
        (n >= WINDOW && n.is_power_of_two() && map.len() == n).then_some(KvIndex {
            header,
            slots,
            map,
        })
    }

    /// Claims all-zero memory for this layout (recording its capacity and
    /// hashing), or recognises a zone of the same geometry; false when the
    /// memory holds something else (another layout or capacity).
    pub fn attach(&self, hashing: u64) -> bool {
        let h = self.header;
        if !crate::shm::attach(&h.magic, MAGIC) {
            return false;
        }
        let n = self.slots.len() as u64;
        match h.capacity.compare_exchange(0, n, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {}
            Err(c) if c == n => {}
            Err(_) => return false,
        }
        if h.hashing.swap(hashing, Ordering::AcqRel) != hashing {
            // Another hashing than the zone's blocks were keyed with: the
            // keys mean nothing now.
            self.clear_all();
        }
        true
    }

    /// Whether the header is this layout (for readers).
    pub fn is_attached(&self) -> bool {
        crate::shm::holds(&self.header.magic, MAGIC)
    }

    fn home(&self, key: u64) -> usize {
        // Fibonacci hashing: keys are hashes already, but engines' integer
        // hashes need not be well spread in their low bits.
        let shift = 64 - self.slots.len().trailing_zeros();
        (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> shift) as usize
    }

    fn window(&self, key: u64) -> impl Iterator<Item = usize> {
        let (home, mask) = (self.home(key), self.slots.len() - 1);
        (0..WINDOW).map(move |i| (home + i) & mask)
    }

    /// The engines holding the block `key` (a mask; 0: none known).
    pub fn lookup(&self, key: u64) -> u64 {
        if key == 0 {
            return 0;
        }
        for i in self.window(key) {
            let s = &self.slots[i];
            let k = s.key.load(Ordering::Acquire);
            if k == 0 {
                return 0;
            }
            if k == key {
                let m = s.mask.load(Ordering::Acquire);
                return if s.key.load(Ordering::Acquire) == key { m } else { 0 };
            }
        }
        0
    }

    /// Engine `bit` holds block `key` (writer).
    pub fn store(&self, bit: usize, key: u64) {
        if key == 0 || bit >= MAX_ENGINES {
            return;
        }
        let b = 1u64 << bit;
        let mut spare = None;
        for i in self.window(key) {
            let s = &self.slots[i];
            let k = s.key.load(Ordering::Acquire);
            if k == key {
                let before = s.mask.fetch_or(b, Ordering::AcqRel);
                if before & b == 0 {
                    self.header.engines[bit].blocks.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
            if k == 0 {
                spare.get_or_insert(i);
                break;
            }
            if spare.is_none() && s.mask.load(Ordering::Acquire) == 0 {
                spare = Some(i);
            }
        }
        let i = spare.unwrap_or_else(|| {
            // The window is full of blocks some engine holds: evict one.
            let c = self.header.cursor.fetch_add(1, Ordering::Relaxed) as usize;
            let i = (self.home(key) + c % WINDOW) & (self.slots.len() - 1);
            self.header.evicted.fetch_add(1, Ordering::Relaxed);
            self.forget_slot(i);
            i
        });
        let s = &self.slots[i];
        // Mask first (0: readers ignore the slot), then the key, then the
        // bit: a reader never sees the new key with the old mask.
        s.mask.store(0, Ordering::Release);
        s.key.store(key, Ordering::Release);
        s.mask.store(b, Ordering::Release);
        self.header.engines[bit].blocks.fetch_add(1, Ordering::Relaxed);
    }

    /// Drops slot `i`'s engines (their block counts) before reuse.
    fn forget_slot(&self, i: usize) {
        let m = self.slots[i].mask.swap(0, Ordering::AcqRel);
        for e in bits(m) {
            dec(&self.header.engines[e].blocks);
        }
    }

    /// Engine `bit` no longer holds block `key` (writer).
    pub fn remove(&self, bit: usize, key: u64) {
        if key == 0 || bit >= MAX_ENGINES {
            return;
        }
        let b = 1u64 << bit;
        for i in self.window(key) {
            let s = &self.slots[i];
            match s.key.load(Ordering::Acquire) {
                0 => return,
                k if k == key => {
                    if s.mask.fetch_and(!b, Ordering::AcqRel) & b != 0 {
                        dec(&self.header.engines[bit].blocks);
                    }
                    return;
                }
                _ => {}
            }
        }
    }

    /// Engine `bit` holds nothing (`AllBlocksCleared`, a restart, a lost
    /// stream): a sweep of the whole index (writer; rare).
    pub fn clear_engine(&self, bit: usize) {
        if bit >= MAX_ENGINES {
            return;
        }
        let b = 1u64 << bit;
        for s in self.slots {
            if s.mask.load(Ordering::Relaxed) & b != 0 {
                s.mask.fetch_and(!b, Ordering::AcqRel);
            }
        }
        self.header.engines[bit].blocks.store(0, Ordering::Relaxed);
    }

    /// Empties both tables (a change of hashing).
    pub fn clear_all(&self) {
        for s in self.slots {
            s.mask.store(0, Ordering::Release);
            s.key.store(0, Ordering::Release);
        }
        for m in self.map {
            m.len.store(0, Ordering::Release);
            m.engine.store(0, Ordering::Release);
        }
        for e in &self.header.engines {
            e.blocks.store(0, Ordering::Relaxed);
        }
    }

    /// For each engine bit, how many leading blocks of `keys` it holds
    /// (a block counts only after all the blocks before it, as an engine's
    /// prefix cache hits); returns the longest such run.
    pub fn prefix_match(&self, keys: &[u64], out: &mut [u32; MAX_ENGINES]) -> u32 {
        self.prefix_match_iter(keys.iter().copied(), out)
    }

    /// [`KvIndex::prefix_match`] over keys as they come (e.g. decoded from
    /// `$pd_tokenized`).
    pub fn prefix_match_iter(
        &self,
        keys: impl IntoIterator<Item = u64>,
        out: &mut [u32; MAX_ENGINES],
    ) -> u32 {
        *out = [0; MAX_ENGINES];
        let mut alive = u64::MAX;
        let mut n = 0u32;
        for k in keys {
            let now = alive & self.lookup(k);
            for e in bits(alive & !now) {
                out[e] = n;
            }
            alive = now;
            if alive == 0 {
                return n;
            }
            n += 1;
        }
        for e in bits(alive) {
            out[e] = n;
        }
        n
    }

    // --- engines ----------------------------------------------------------------

    /// The bit of the engine with peer key `peer`, if it has one.
    pub fn engine_bit(&self, peer: u64) -> Option<usize> {
        if peer == 0 {
            return None;
        }
        self.header.engines.iter().position(|e| e.peer.load(Ordering::Acquire) == peer)
    }

    /// The engine's bit, claimed if it has none (writer); `None` when all
    /// [`MAX_ENGINES`] are taken.
    pub fn claim_engine(&self, peer: u64) -> Option<usize> {
        if let Some(b) = self.engine_bit(peer) {
            return Some(b);
        }
        let free = self.header.engines.iter().position(|e| e.peer.load(Ordering::Acquire) == 0)?;
        let e = &self.header.engines[free];
        e.next_seq.store(0, Ordering::Relaxed);
        e.blocks.store(0, Ordering::Relaxed);
        e.peer.store(peer, Ordering::Release);
        Some(free)
    }

    /// Gives up the bits of engines not in `keep` (peers gone from the
    /// upstream), clearing their blocks (writer).
    pub fn release_engines_except(&self, keep: &[u64]) {
        for (bit, e) in self.header.engines.iter().enumerate() {
            let p = e.peer.load(Ordering::Acquire);
            if p != 0 && !keep.contains(&p) {
                self.clear_engine(bit);
                e.peer.store(0, Ordering::Release);
            }
        }
    }

    /// Where live batch `seq` of engine `bit` stands (and records it as the
    /// last seen: the next expected is `seq + 1`).
    pub fn check_seq(&self, bit: usize, seq: u64) -> SeqCheck {
        let e = &self.header.engines[bit.min(MAX_ENGINES - 1)];
        let next = e.next_seq.swap(seq.saturating_add(1), Ordering::AcqRel);
        if next == 0 {
            SeqCheck::First
        } else if seq == next {
            SeqCheck::InOrder
        } else if seq > next {
            SeqCheck::Gap { from: next }
        } else {
            SeqCheck::Restart
        }
    }

    // --- the map (subscriber only) ---------------------------------------------

    fn map_window(&self, engine_hash: u64) -> impl Iterator<Item = usize> {
        let (home, mask) = (self.home(engine_hash.rotate_left(17)), self.map.len() - 1);
        (0..WINDOW).map(move |i| (home + i) & mask)
    }

    /// pdgate's digest of the engine block named `engine_hash`.
    pub fn map_get(&self, engine_hash: u64) -> Option<Digest> {
        for i in self.map_window(engine_hash) {
            let m = &self.map[i];
            let len = m.len.load(Ordering::Acquire) as usize;
            if len == 0 {
                return None;
            }
            if m.engine.load(Ordering::Acquire) == engine_hash {
                let mut bytes = [0u8; 32];
                for (w, chunk) in m.digest.iter().zip(bytes.chunks_exact_mut(8)) {
                    chunk.copy_from_slice(&w.load(Ordering::Relaxed).to_be_bytes());
                }
                return Digest::from_slice(&bytes[..len.min(32)]);
            }
        }
        None
    }

    /// Remembers that the engine's block `engine_hash` is pdgate's `digest`.
    pub fn map_put(&self, engine_hash: u64, digest: &Digest) {
        let mut at = None;
        for i in self.map_window(engine_hash) {
            let m = &self.map[i];
            if m.len.load(Ordering::Acquire) == 0 || m.engine.load(Ordering::Acquire) == engine_hash
            {
                at = Some(i);
                break;
            }
        }
        let i = at.unwrap_or_else(|| {
            let c = self.header.cursor.fetch_add(1, Ordering::Relaxed) as usize;
            self.header.map_evicted.fetch_add(1, Ordering::Relaxed);
            (self.home(engine_hash.rotate_left(17)) + c % WINDOW) & (self.map.len() - 1)
        });
        let m = &self.map[i];
        let bytes = digest.as_bytes();
        let mut padded = [0u8; 32];
        padded[..bytes.len()].copy_from_slice(bytes);
        for (w, chunk) in m.digest.iter().zip(padded.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            w.store(u64::from_be_bytes(b), Ordering::Relaxed);
        }
        m.engine.store(engine_hash, Ordering::Release);
        m.len.store(bytes.len() as u64, Ordering::Release);
    }
}

/// The set bits of `m`, lowest first.
fn bits(mut m: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        (m != 0).then(|| {
            let b = m.trailing_zeros() as usize;
            m &= m - 1;
            b
        })
    })
}

fn dec(a: &AtomicU64) {
    let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(1)));
}

#[cfg(test)]
#[path = "index_tests.rs"]
pub(crate) mod tests;
