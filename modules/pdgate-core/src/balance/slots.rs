//! The shared-memory counters of a balancer: a fixed table of slots, one per
//! (upstream, peer) identity, that every worker updates with atomics.
//!
//! The table is plain `#[repr(C)]` atomics so it can live in an nginx
//! shared zone and survive `nginx -s reload` (a slot is found again by its
//! key; peers new to the reloaded configuration claim free slots). Nothing
//! here locks, allocates or panics.
//!
//! A table may come with a [`Ledger`] (per-process records of what each
//! process holds, so that a dead worker's share can be given back): then
//! [`acquire`](SlotTable::acquire), [`release`](SlotTable::release) and
//! [`add_tokens`](SlotTable::add_tokens) update the calling process's row
//! as well; callers pass nothing more.

use std::sync::atomic::{AtomicU64, Ordering};

use super::ledger::{Ledger, Row};

/// One (upstream, peer) identity's counters.
#[repr(C)]
#[derive(Debug, Default)]
pub struct Slot {
    /// [`peer_key`] of the owner; 0 while free.
    pub key: AtomicU64,
    /// Requests in flight.
    pub requests: AtomicU64,
    /// Estimated tokens in flight.
    pub tokens: AtomicU64,
    /// Requests ever placed (for status pages and tests).
    pub total: AtomicU64,
    /// Policy-defined cost in flight (e.g. greedy_timeout's expected work).
    pub cost: AtomicU64,
    /// Requests placed, decayed now and then (length_balance's history).
    pub hist_requests: AtomicU64,
    /// Tokens placed, decayed with `hist_requests`.
    pub hist_tokens: AtomicU64,
}

/// Bytes per slot.
pub const SLOT_BYTES: usize = std::mem::size_of::<Slot>();

/// The identity of a peer of an upstream: FNV-1a of both names, never 0.
pub fn peer_key(upstream: &[u8], peer: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in upstream.iter().chain([0u8].iter()).chain(peer.iter()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h.max(1)
}

/// A view of a slot table (in shared memory, or in a test's vector).
#[derive(Debug, Clone, Copy)]
pub struct SlotTable<'a> {
    slots: &'a [Slot],
    ledger: Option<Ledger<'a>>,
}

impl<'a> SlotTable<'a> {
    /// A table without a ledger (nothing is reclaimed).
    pub fn new(slots: &'a [Slot]) -> Self {
        SlotTable { slots, ledger: None }
    }

    /// A table whose reservations are recorded per process in `ledger`.
    pub fn with_ledger(slots: &'a [Slot], ledger: Ledger<'a>) -> Self {
        SlotTable { slots, ledger: Some(ledger) }
    }

    /// Its ledger, if it has one.
    pub fn ledger(&self) -> Option<Ledger<'a>> {
        self.ledger
    }

    /// The calling process's ledger row, if recorded.
    fn mine(&self) -> Option<&'a Row> {
        self.ledger.as_ref().and_then(Ledger::mine)
    }

    /// The slot of `key` if it has one (read only: status pages must not
    /// claim slots).
    pub fn find(&self, key: u64) -> Option<usize> {
        let n = self.slots.len();
        if n == 0 {
            return None;
        }
        let start = (key % n as u64) as usize;
        (0..n).map(|step| (start + step) % n).find_map(|i| {
            match self.slots[i].key.load(Ordering::Acquire) {
                k if k == key => Some(Some(i)),
                0 => Some(None),
                _ => None,
            }
        })?
    }

    /// The slot of `key`, claiming a free one if it has none (open
    /// addressing, linear probing). `None` when the table is full.
    pub fn find_or_claim(&self, key: u64) -> Option<usize> {
        let n = self.slots.len();
        if n == 0 {
            return None;
        }
        let start = (key % n as u64) as usize;
        for step in 0..n {
            let i = (start + step) % n;
            let k = &self.slots[i].key;
            match k.load(Ordering::Acquire) {
                0 => match k.compare_exchange(0, key, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => return Some(i),
                    Err(other) if other == key => return Some(i),
                    Err(_) => continue,
                },
                other if other == key => return Some(i),
                _ => continue,
            }
        }
        None
    }

    /// Counters of slot `i`: requests, tokens and cost in flight (zeros for
    /// an index out of range).
    pub fn load(&self, i: usize) -> (u64, u64, u64) {
        match self.slots.get(i) {
            Some(s) => (
                s.requests.load(Ordering::Relaxed),
                s.tokens.load(Ordering::Relaxed),
                s.cost.load(Ordering::Relaxed),
            ),
            None => (0, 0, 0),
        }
    }

    /// Adds `tokens` to slot `i`'s tokens in flight (what a request holds
    /// grew while it ran).
    pub fn add_tokens(&self, i: usize, tokens: u64) {
        if let Some(s) = self.slots.get(i) {
            if let Some(row) = self.mine() {
                row.add(i, 0, tokens, 0);
            }
            s.tokens.fetch_add(tokens, Ordering::Relaxed);
        }
    }

    /// Slot `i`'s request and token counters as bare atomics, for a slot
    /// keyed to hold other state (e.g. [`super::fails::FailWindow`]).
    pub fn atomics(&self, i: usize) -> Option<(&'a AtomicU64, &'a AtomicU64)> {
        self.slots.get(i).map(|s| (&s.requests, &s.tokens))
    }

    /// Requests ever placed on slot `i`.
    pub fn total(&self, i: usize) -> u64 {
        self.slots.get(i).map_or(0, |s| s.total.load(Ordering::Relaxed))
    }

    /// Places a request of `tokens` and `cost` on slot `i`.
    /// The ledger is written first (see [`super::ledger`] on orderings).
    pub fn acquire(&self, i: usize, tokens: u64, cost: u64) {
        if let Some(s) = self.slots.get(i) {
            if let Some(row) = self.mine() {
                row.add(i, 1, tokens, cost);
            }
            s.requests.fetch_add(1, Ordering::Relaxed);
            s.tokens.fetch_add(tokens, Ordering::Relaxed);
            s.cost.fetch_add(cost, Ordering::Relaxed);
            s.total.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Adds a placed request of `tokens` to slot `i`'s decayed history.
    pub fn record(&self, i: usize, tokens: u64) {
        if let Some(s) = self.slots.get(i) {
            s.hist_requests.fetch_add(1, Ordering::Relaxed);
            s.hist_tokens.fetch_add(tokens, Ordering::Relaxed);
        }
    }

    /// Slot `i`'s decayed history: requests and tokens.
    pub fn history(&self, i: usize) -> (u64, u64) {
        match self.slots.get(i) {
            Some(s) => {
                (s.hist_requests.load(Ordering::Relaxed), s.hist_tokens.load(Ordering::Relaxed))
            }
            None => (0, 0),
        }
    }

    /// Divides slot `i`'s history by `by` (at least 1), atomically per
    /// counter so concurrent [`record`](Self::record)s are never lost.
    pub fn decay(&self, i: usize, by: u64) {
        if let Some(s) = self.slots.get(i) {
            let by = by.max(1);
            for c in [&s.hist_requests, &s.hist_tokens] {
                let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v / by));
            }
        }
    }

    /// Counts one event on slot `i` (used as a per-upstream clock) and
    /// returns the new count.
    pub fn tick(&self, i: usize) -> u64 {
        self.slots.get(i).map_or(0, |s| s.total.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Takes a request of `tokens` and `cost` off slot `i`; never below zero
    /// (a slot reused after a reload may see frees it never counted). The
    /// slot is written before the ledger.
    pub fn release(&self, i: usize, tokens: u64, cost: u64) {
        self.take_off(i, 1, tokens, cost);
        if let Some(row) = self.mine() {
            row.sub(i, 1, tokens, cost);
        }
    }

    /// Takes `requests`, `tokens` and `cost` off slot `i`, never below
    /// zero, without touching the ledger.
    pub(crate) fn take_off(&self, i: usize, requests: u64, tokens: u64, cost: u64) {
        if let Some(s) = self.slots.get(i) {
            let dec = |by: u64| move |v: u64| Some(v.saturating_sub(by));
            let _ = s.requests.fetch_update(Ordering::Relaxed, Ordering::Relaxed, dec(requests));
            let _ = s.tokens.fetch_update(Ordering::Relaxed, Ordering::Relaxed, dec(tokens));
            let _ = s.cost.fetch_update(Ordering::Relaxed, Ordering::Relaxed, dec(cost));
        }
    }
}

/// A shared zone holding nothing but a slot table and its ledger (a
/// module's own in-flight counters, e.g. the SGLang mode's server lists):
/// all-zero memory is an empty table; [`attach`](Self::attach) claims it.
#[repr(C)]
#[derive(Debug)]
pub struct SlotZone {
    magic: AtomicU64,
    slots: [Slot; SLOT_ZONE_SLOTS],
    ledger: [Row; SLOT_ZONE_ROWS],
}

/// Slots of a [`SlotZone`].
pub const SLOT_ZONE_SLOTS: usize = 1024;

/// Ledger rows of a [`SlotZone`]: processes using it at once (workers, and
/// during a reload the old ones still finishing).
pub const SLOT_ZONE_ROWS: usize = 64;

const SLOT_ZONE_MAGIC: u64 = 0x7064_6761_7465_0c03;

impl SlotZone {
    /// Claims all-zero memory or recognises a zone of this layout.
    pub fn attach(&self) -> bool {
        crate::shm::attach(&self.magic, SLOT_ZONE_MAGIC)
    }

    /// Whether it holds this layout (without claiming all-zero memory).
    pub fn is_attached(&self) -> bool {
        crate::shm::holds(&self.magic, SLOT_ZONE_MAGIC)
    }

    /// Its slot table, recording in its ledger.
    pub fn table(&self) -> SlotTable<'_> {
        SlotTable::with_ledger(&self.slots, Ledger::new(&self.ledger))
    }
}

impl Default for SlotZone {
    fn default() -> Self {
        SlotZone {
            magic: AtomicU64::new(0),
            slots: std::array::from_fn(|_| Slot::default()),
            ledger: std::array::from_fn(|_| Row::default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request_id::Rng;

    fn table(n: usize) -> Vec<Slot> {
        (0..n).map(|_| Slot::default()).collect()
    }

    #[test]
    fn claim_and_find_again() {
        let v = table(4);
        let t = SlotTable::new(&v);
        let a = t.find_or_claim(peer_key(b"up", b"10.0.0.1:80")).unwrap();
        let b = t.find_or_claim(peer_key(b"up", b"10.0.0.2:80")).unwrap();
        assert_ne!(a, b);
        assert_eq!(t.find_or_claim(peer_key(b"up", b"10.0.0.1:80")), Some(a));
        assert_eq!(t.find(peer_key(b"up", b"10.0.0.1:80")), Some(a));
        assert_eq!(t.find(peer_key(b"up", b"unseen")), None);
        // Two upstreams never share a slot for the same address.
        let c = t.find_or_claim(peer_key(b"other", b"10.0.0.1:80")).unwrap();
        assert!(c != a && c != b);
        t.find_or_claim(peer_key(b"x", b"y")).unwrap();
        assert_eq!(t.find_or_claim(peer_key(b"full", b"z")), None);
        assert_eq!(SlotTable::new(&[]).find_or_claim(1), None);
    }

    #[test]
    fn release_never_goes_below_zero() {
        let v = table(1);
        let t = SlotTable::new(&v);
        t.release(0, 50, 5);
        assert_eq!(t.load(0), (0, 0, 0));
        t.acquire(0, 30, 7);
        assert_eq!(t.load(0), (1, 30, 7));
        t.release(0, 50, 9);
        assert_eq!(t.load(0), (0, 0, 0));
        t.acquire(9, 1, 1); // out of range: ignored
    }

    #[test]
    fn history_decays_without_losing_records() {
        let v = table(2);
        let t = SlotTable::new(&v);
        for _ in 0..10 {
            t.record(0, 100);
        }
        assert_eq!(t.history(0), (10, 1000));
        t.decay(0, 2);
        assert_eq!(t.history(0), (5, 500));
        t.decay(0, 0); // treated as 1
        assert_eq!(t.history(0), (5, 500));
        assert_eq!(t.history(1), (0, 0));
        assert_eq!((t.tick(1), t.tick(1)), (1, 2));
        // Concurrent records and decays: the records after the last decay
        // are all there.
        std::thread::scope(|s| {
            s.spawn(|| (0..10_000).for_each(|_| t.record(1, 3)));
            s.spawn(|| (0..100).for_each(|_| t.decay(1, 2)));
        });
        for _ in 0..7 {
            t.record(1, 3);
        }
        t.decay(1, 1 << 40);
        assert_eq!(t.history(1), (0, 0));
        for _ in 0..7 {
            t.record(1, 3);
        }
        assert_eq!(t.history(1), (7, 21));
    }

    /// Any interleaving of picks and frees, on several threads, returns
    /// every counter to zero.
    #[test]
    fn any_interleaving_returns_to_zero() {
        let v = table(8);
        let t = SlotTable::new(&v);
        std::thread::scope(|s| {
            for seed in 0..4u64 {
                s.spawn(move || {
                    let mut rng = Rng::new(seed);
                    let mut held: Vec<(usize, u64, u64)> = Vec::new();
                    for _ in 0..20_000 {
                        if held.is_empty() || !rng.next_u64().is_multiple_of(3) {
                            let i = (rng.next_u64() % 8) as usize;
                            let tok = rng.next_u64() % 5000;
                            let cost = rng.next_u64() % 100_000;
                            t.acquire(i, tok, cost);
                            held.push((i, tok, cost));
                        } else {
                            let k = (rng.next_u64() as usize) % held.len();
                            let (i, tok, cost) = held.swap_remove(k);
                            t.release(i, tok, cost);
                        }
                    }
                    for (i, tok, cost) in held {
                        t.release(i, tok, cost);
                    }
                });
            }
        });
        for i in 0..8 {
            assert_eq!(t.load(i), (0, 0, 0));
        }
        assert!(v.iter().map(|s| s.total.load(Ordering::Relaxed)).sum::<u64>() > 40_000);
    }

    #[test]
    fn slot_zone_attaches_once_per_layout() {
        let z = Box::<SlotZone>::default();
        assert!(z.attach());
        assert!(z.attach(), "a reload finds its own layout again");
        let t = z.table();
        let i = t.find_or_claim(peer_key(b"up", b"a")).unwrap();
        t.acquire(i, 5, 0);
        assert_eq!(z.table().load(i), (1, 5, 0));
        z.magic.store(1, Ordering::Relaxed);
        assert!(!z.attach(), "another layout is not taken for this one");
    }
}
