//! The requests now in prefill, shared by every worker: what
//! pd_score_balance's decode placement looks ahead over.
//!
//! A fixed `#[repr(C)]` table of entries, each owned by one request from
//! its prefill's start to its end: an id (0 while free), its length in
//! tokens and its start time. Claiming is a compare-and-swap on the id;
//! nothing locks, allocates or panics. A reader may see an entry being
//! filled in with a length of 0 for an instant: it then counts for nothing.
//!
//! Each entry also names the process that added it (its ledger
//! [`Owner`](super::ledger::Owner) word), so that the entries of a process
//! that died are dropped by [`PendingTable::drop_owner`] when its ledger
//! row is reclaimed.

use std::sync::atomic::{AtomicU64, Ordering};

use super::ledger;

/// One request in prefill.
#[repr(C)]
#[derive(Debug, Default)]
pub struct Pending {
    /// The owner's id; 0 while free.
    pub id: AtomicU64,
    /// Its estimated length in tokens.
    pub tokens: AtomicU64,
    /// When its prefill started (ms, any monotonic clock shared by workers).
    pub since: AtomicU64,
    /// The adding process's ledger owner word (0: unknown, or the entry
    /// is being freed).
    pub owner: AtomicU64,
}

/// Bytes per entry.
pub const PENDING_BYTES: usize = std::mem::size_of::<Pending>();

/// A view of a pending table (in shared memory, or in a test's vector).
#[derive(Debug, Clone, Copy)]
pub struct PendingTable<'a> {
    entries: &'a [Pending],
}

impl<'a> PendingTable<'a> {
    pub fn new(entries: &'a [Pending]) -> Self {
        PendingTable { entries }
    }

    /// Records a request `id` (non-zero) of `tokens` started at `since`,
    /// probing from `hint`; its entry, or `None` when the table is full
    /// (the request is then simply not looked ahead over). The entry is
    /// owned by the calling process ([`ledger::current`]).
    pub fn add(&self, id: u64, tokens: u64, since: u64, hint: u64) -> Option<usize> {
        let n = self.entries.len();
        if n == 0 || id == 0 {
            return None;
        }
        let start = (hint % n as u64) as usize;
        for step in 0..n {
            let i = (start + step) % n;
            let e = &self.entries[i];
            if e.id.load(Ordering::Relaxed) == 0
                && e.id.compare_exchange(0, id, Ordering::AcqRel, Ordering::Relaxed).is_ok()
            {
                e.tokens.store(tokens, Ordering::Relaxed);
                let owner = ledger::current().map_or(0, ledger::Owner::word);
                e.owner.store(owner, Ordering::Relaxed);
                e.since.store(since, Ordering::Release);
                return Some(i);
            }
        }
        None
    }

    /// Frees entry `i` if `id` still owns it.
    pub fn remove(&self, i: usize, id: u64) {
        if let Some(e) = self.entries.get(i) {
            if e.id.load(Ordering::Acquire) == id {
                e.tokens.store(0, Ordering::Relaxed);
                e.owner.store(0, Ordering::Relaxed);
                let _ = e.id.compare_exchange(id, 0, Ordering::AcqRel, Ordering::Relaxed);
            }
        }
    }

    /// Frees every entry the process of ledger word `owner` (non-zero)
    /// added; how many. Only the one reclaimer of that process's row calls
    /// this, and a dead process adds nothing, so an entry seen with that
    /// owner stays its until freed here (a freed entry's owner is cleared
    /// before its id, and a new entry is named after its id is claimed).
    pub fn drop_owner(&self, owner: u64) -> usize {
        if owner == 0 {
            return 0;
        }
        let mut n = 0;
        for e in self.entries {
            let id = e.id.load(Ordering::Acquire);
            if id != 0 && e.owner.load(Ordering::Acquire) == owner {
                e.tokens.store(0, Ordering::Relaxed);
                e.owner.store(0, Ordering::Relaxed);
                if e.id.compare_exchange(id, 0, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                    n += 1;
                }
            }
        }
        n
    }

    /// The lengths of the oldest requests in prefill, at most `out.len()`,
    /// oldest first; `scratch` holds (since, tokens) pairs while sorting
    /// (entries beyond its length are not seen). Returns how many were
    /// written.
    pub fn oldest(&self, out: &mut [u64], scratch: &mut [(u64, u64)]) -> usize {
        let mut n = 0;
        for e in self.entries {
            if n == scratch.len() {
                break;
            }
            if e.id.load(Ordering::Acquire) != 0 {
                let tokens = e.tokens.load(Ordering::Relaxed);
                if tokens > 0 {
                    scratch[n] = (e.since.load(Ordering::Relaxed), tokens);
                    n += 1;
                }
            }
        }
        let seen = &mut scratch[..n];
        let k = out.len().min(n);
        if k == 0 {
            return 0;
        }
        if k < n {
            seen.select_nth_unstable(k - 1);
        }
        seen[..k].sort_unstable();
        for (o, (_, t)) in out.iter_mut().zip(seen[..k].iter()) {
            *o = *t;
        }
        k
    }

    /// Entries in use (status pages, tests).
    pub fn len(&self) -> usize {
        self.entries.iter().filter(|e| e.id.load(Ordering::Relaxed) != 0).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request_id::Rng;

    fn table(n: usize) -> Vec<Pending> {
        (0..n).map(|_| Pending::default()).collect()
    }

    #[test]
    fn oldest_first_and_bounded() {
        let v = table(8);
        let t = PendingTable::new(&v);
        let a = t.add(11, 100, 30, 0).unwrap();
        t.add(12, 200, 10, 0).unwrap();
        t.add(13, 300, 20, 5).unwrap();
        let mut out = [0u64; 2];
        let mut scratch = [(0u64, 0u64); 16];
        assert_eq!(t.oldest(&mut out, &mut scratch), 2);
        assert_eq!(out, [200, 300]);
        t.remove(a, 99); // not its owner: kept
        assert_eq!(t.len(), 3);
        t.remove(a, 11);
        assert_eq!(t.len(), 2);
        let mut out = [0u64; 8];
        assert_eq!(t.oldest(&mut out, &mut scratch), 2);
        assert_eq!(&out[..2], &[200, 300]);
        assert_eq!(t.add(0, 1, 1, 1), None);
    }

    #[test]
    fn a_dead_owners_entries_are_dropped() {
        use super::super::ledger::{set_current, Owner};
        let v = table(8);
        let t = PendingTable::new(&v);
        let a = Owner::new(10, 1).unwrap();
        let b = Owner::new(11, 1).unwrap();
        set_current(Some(a));
        t.add(1, 5, 1, 0).unwrap();
        let gone = t.add(2, 5, 1, 0).unwrap();
        t.remove(gone, 2);
        t.add(3, 5, 1, 0).unwrap();
        set_current(Some(b));
        t.add(4, 5, 1, 0).unwrap();
        set_current(None);
        t.add(5, 5, 1, 0).unwrap(); // unnamed: never dropped
        assert_eq!(t.drop_owner(a.word()), 2);
        assert_eq!(t.drop_owner(a.word()), 0);
        assert_eq!(t.drop_owner(0), 0);
        assert_eq!(t.len(), 2);
        assert_eq!(t.drop_owner(b.word()), 1);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn full_table_refuses() {
        let v = table(2);
        let t = PendingTable::new(&v);
        assert!(t.add(1, 1, 1, 7).is_some());
        assert!(t.add(2, 1, 1, 7).is_some());
        assert_eq!(t.add(3, 1, 1, 7), None);
        assert_eq!(PendingTable::new(&[]).add(1, 1, 1, 1), None);
    }

    /// Any interleaving of adds and removes on several threads leaves the
    /// table empty.
    #[test]
    fn any_interleaving_empties() {
        let v = table(64);
        let t = PendingTable::new(&v);
        std::thread::scope(|s| {
            for seed in 1..5u64 {
                s.spawn(move || {
                    let mut rng = Rng::new(seed);
                    let mut held = Vec::new();
                    for k in 0..20_000u64 {
                        if held.is_empty() || !rng.next_u64().is_multiple_of(3) {
                            let id = (seed << 32) | (k + 1);
                            if let Some(i) = t.add(id, 1 + k % 50, k, rng.next_u64()) {
                                held.push((i, id));
                            }
                        } else {
                            let j = (rng.next_u64() as usize) % held.len();
                            let (i, id) = held.swap_remove(j);
                            t.remove(i, id);
                        }
                    }
                    for (i, id) in held {
                        t.remove(i, id);
                    }
                });
            }
        });
        assert!(t.is_empty());
    }
}
