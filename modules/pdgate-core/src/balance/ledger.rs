//! Who holds what: a per-process ledger beside a slot table, so that what a
//! process that died (SIGKILL, OOM killer) still held in the shared
//! counters is given back instead of being counted for good.
//!
//! The ledger is a fixed array of [`Row`]s, `#[repr(C)]` atomics only (all
//! zero is an empty ledger). A process claims a row by a compare-and-swap of
//! its [`Owner`] word (pid and start time) into a free row, the first time
//! it reserves something in the table; from then on every
//! [`SlotTable::acquire`](super::slots::SlotTable::acquire),
//! [`release`](super::slots::SlotTable::release) and
//! [`add_tokens`](super::slots::SlotTable::add_tokens) also updates the
//! caller's entry for that slot (requests, tokens, cost). Only the owner
//! writes its row while it lives, so entries need no compare-and-swap.
//!
//! The calling process is named once by the glue ([`set_current`]); the
//! row of each ledger it uses is then remembered per thread (an nginx
//! worker has one), so no caller passes anything.
//!
//! [`Ledger::reclaim`] looks for rows whose owner is dead (the liveness
//! test is the caller's: `kill(pid, 0)` and `/proc/<pid>/stat`'s start
//! time, in the glue), takes such a row by writing its own name into the
//! row's `reclaimer` word, subtracts every entry from its slot (never below
//! zero), drops the owner's pending-table entries, clears the row and frees
//! it. A reclaimer that dies half way is itself seen dead and replaced.
//!
//! Orderings chosen so that a process killed between two steps errs on the
//! side that heals itself: an acquire writes the ledger before the slot and
//! a release the slot before the ledger, so a death in between makes the
//! reclaim take off at most one request too many, and a counter taken too
//! low returns to exactly zero once the peer's other requests end (the
//! slots never go below zero). The other order would leak that request for
//! good.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use super::pending::PendingTable;
use super::slots::SlotTable;

/// Entries of a row: distinct slots one process holds something on at
/// once. Beyond that, reservations are counted but not recorded (the row's
/// `unrecorded` counter) and cannot be reclaimed.
pub const ROW_ENTRIES: usize = 64;

/// What one process holds on one slot.
#[repr(C)]
#[derive(Debug, Default)]
pub struct Entry {
    /// The slot's index + 1; 0 while never used. An entry whose counters
    /// are all zero may be reused for another slot.
    slot: AtomicU64,
    requests: AtomicU64,
    tokens: AtomicU64,
    cost: AtomicU64,
}

/// One process's row.
#[repr(C)]
#[derive(Debug)]
pub struct Row {
    /// The owner's [`Owner`] word; 0 while free.
    owner: AtomicU64,
    /// The [`Owner`] word of the process reclaiming this row, or 0.
    reclaimer: AtomicU64,
    /// Reservations made while every entry was taken (not reclaimable).
    unrecorded: AtomicU64,
    _spare: AtomicU64,
    entries: [Entry; ROW_ENTRIES],
}

impl Default for Row {
    fn default() -> Self {
        Row {
            owner: AtomicU64::new(0),
            reclaimer: AtomicU64::new(0),
            unrecorded: AtomicU64::new(0),
            _spare: AtomicU64::new(0),
            entries: std::array::from_fn(|_| Entry::default()),
        }
    }
}

/// Bytes per row.
pub const ROW_BYTES: usize = std::mem::size_of::<Row>();

/// A process's name in a ledger: its pid and its start time (clock ticks
/// since boot, `/proc/<pid>/stat` field 22), so that a pid the kernel gave
/// to a new process is not taken for the dead one. Packed in one word: pid
/// in bits 0–21 (Linux pids are below 2^22), start time in bits 22–62.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner(u64);

const PID_BITS: u32 = 22;
const START_BITS: u32 = 41;

impl Owner {
    /// `None` for pid 0 or a pid of 2^22 or more; a start time beyond 41
    /// bits (ages at 100 Hz) keeps its low bits.
    pub fn new(pid: u32, start: u64) -> Option<Owner> {
        if pid == 0 || pid >= 1 << PID_BITS {
            return None;
        }
        let start = start & ((1 << START_BITS) - 1);
        Some(Owner(u64::from(pid) | start << PID_BITS))
    }

    /// The owner a ledger word names (0 and out-of-layout words: none).
    pub fn from_word(w: u64) -> Option<Owner> {
        let pid = (w & ((1 << PID_BITS) - 1)) as u32;
        (pid != 0 && w >> 63 == 0).then_some(Owner(w))
    }

    pub fn pid(self) -> u32 {
        (self.0 & ((1 << PID_BITS) - 1)) as u32
    }

    /// The start time as stored (its low 41 bits); 0 when unknown.
    pub fn start(self) -> u64 {
        self.0 >> PID_BITS
    }

    /// Whether a process started at `start` (unmasked) is this owner's.
    pub fn started_at(self, start: u64) -> bool {
        self.start() == start & ((1 << START_BITS) - 1)
    }

    pub fn word(self) -> u64 {
        self.0
    }
}

/// The state (`R`, `S`, `Z`, …) and start time of a process, from the text
/// of its `/proc/<pid>/stat` (the command name may hold spaces and
/// parentheses: fields are counted after the last `)`).
pub fn parse_proc_stat(text: &str) -> Option<(char, u64)> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    // Fields 3.. follow the state (field 3); the start time is field 22.
    let start = fields.nth(22 - 4)?.parse().ok()?;
    Some((state, start))
}

/// What a reclaim gave back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reclaimed {
    /// Rows of dead processes freed.
    pub rows: u64,
    pub requests: u64,
    pub tokens: u64,
    pub cost: u64,
    /// Pending-table entries dropped.
    pub pending: u64,
    /// Reservations the dead processes made without a free entry (not
    /// given back).
    pub unrecorded: u64,
}

impl Reclaimed {
    fn add(&mut self, o: &Reclaimed) {
        self.rows += o.rows;
        self.requests += o.requests;
        self.tokens += o.tokens;
        self.cost += o.cost;
        self.pending += o.pending;
        self.unrecorded += o.unrecorded;
    }
}

/// Ledgers whose row this thread remembers.
const CACHED: usize = 4;

thread_local! {
    /// The calling process's [`Owner`] word (0: not named, nothing is
    /// recorded). Per thread so that tests can play several processes.
    static CURRENT: Cell<u64> = const { Cell::new(0) };
    /// (ledger address, row index) of the rows this thread owns.
    static ROWS: Cell<[(usize, usize); CACHED]> = const { Cell::new([(0, 0); CACHED]) };
}

/// Names the calling process (the glue, in each new worker; `None`
/// forgets it). Remembered rows are forgotten.
pub fn set_current(owner: Option<Owner>) {
    CURRENT.with(|c| c.set(owner.map_or(0, Owner::word)));
    ROWS.with(|r| r.set([(0, 0); CACHED]));
}

/// The calling process's name, if the glue set one.
pub fn current() -> Option<Owner> {
    Owner::from_word(CURRENT.with(Cell::get))
}

/// A view of a ledger (in shared memory, or in a test's vector).
#[derive(Debug, Clone, Copy)]
pub struct Ledger<'a> {
    rows: &'a [Row],
}

impl<'a> Ledger<'a> {
    pub fn new(rows: &'a [Row]) -> Self {
        Ledger { rows }
    }

    /// The calling process's row ([`current`]), claimed on first use;
    /// `None` when the process is not named or every row is taken.
    pub fn mine(&self) -> Option<&'a Row> {
        let me = current()?;
        let at = self.rows.as_ptr() as usize;
        let cached = ROWS.with(Cell::get);
        if let Some(&(_, i)) = cached.iter().find(|(a, _)| *a == at) {
            if let Some(row) = self.rows.get(i) {
                if row.owner.load(Ordering::Relaxed) == me.word() {
                    return Some(row);
                }
            }
        }
        let i = self.claim(me)?;
        ROWS.with(|r| {
            let mut c = r.get();
            let k = c.iter().position(|(a, _)| *a == at || *a == 0).unwrap_or(at % CACHED);
            c[k] = (at, i);
            r.set(c);
        });
        self.rows.get(i)
    }

    /// The row `owner` holds, or a free one it claims.
    fn claim(&self, owner: Owner) -> Option<usize> {
        let w = owner.word();
        if let Some(i) = self.rows.iter().position(|r| r.owner.load(Ordering::Acquire) == w) {
            return Some(i);
        }
        self.rows.iter().position(|r| {
            r.owner.load(Ordering::Relaxed) == 0
                && r.owner.compare_exchange(0, w, Ordering::AcqRel, Ordering::Relaxed).is_ok()
        })
    }

    /// Rows in all.
    pub fn rows(&self) -> usize {
        self.rows.len()
    }

    /// Rows claimed (status pages, tests).
    pub fn rows_in_use(&self) -> usize {
        self.rows.iter().filter(|r| r.owner.load(Ordering::Relaxed) != 0).count()
    }

    /// What `owner`'s row holds in all: requests, tokens, cost (tests).
    pub fn held_by(&self, owner: Owner) -> (u64, u64, u64) {
        self.rows
            .iter()
            .filter(|r| r.owner.load(Ordering::Acquire) == owner.word())
            .flat_map(|r| r.entries.iter())
            .fold((0, 0, 0), |(a, b, c), e| {
                let (r, t, k) = e.load();
                (a + r, b + t, c + k)
            })
    }

    /// Gives back what dead processes held: every row whose owner is
    /// neither `me` nor `alive`, and that no live process is reclaiming
    /// already, is subtracted from `slots`, its owner's `pending` entries
    /// are dropped, and the row is freed. `each` hears of every row freed.
    pub fn reclaim(
        &self,
        me: Owner,
        slots: &SlotTable,
        pending: Option<&PendingTable>,
        alive: &mut dyn FnMut(Owner) -> bool,
        each: &mut dyn FnMut(Owner, &Reclaimed),
    ) -> Reclaimed {
        let mut all = Reclaimed::default();
        for row in self.rows {
            let w = row.owner.load(Ordering::Acquire);
            let Some(owner) = Owner::from_word(w) else { continue };
            if owner == me || alive(owner) {
                continue;
            }
            // Take the row: no other reclaimer, or a dead one.
            let r = row.reclaimer.load(Ordering::Acquire);
            if let Some(other) = Owner::from_word(r) {
                if other == me || alive(other) {
                    continue;
                }
            }
            if row
                .reclaimer
                .compare_exchange(r, me.word(), Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                continue;
            }
            // A reclaimer that finished frees the owner before the
            // reclaimer word: a row freed (and maybe claimed again) since
            // we looked is not ours to clear.
            if row.owner.load(Ordering::Acquire) != w {
                let _ = row.reclaimer.compare_exchange(
                    me.word(),
                    0,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                );
                continue;
            }
            let mut got = Reclaimed { rows: 1, ..Reclaimed::default() };
            for e in &row.entries {
                let key = e.slot.load(Ordering::Acquire);
                if key == 0 {
                    continue;
                }
                let (requests, tokens, cost) = e.load();
                // Subtract first, clear after: dying in between makes the
                // next reclaimer subtract again (too low heals, see above).
                slots.take_off((key - 1) as usize, requests, tokens, cost);
                got.requests += requests;
                got.tokens += tokens;
                got.cost += cost;
                for c in [&e.requests, &e.tokens, &e.cost, &e.slot] {
                    c.store(0, Ordering::Relaxed);
                }
            }
            if let Some(p) = pending {
                got.pending = p.drop_owner(w) as u64;
            }
            got.unrecorded = row.unrecorded.swap(0, Ordering::Relaxed);
            let _ = row.owner.compare_exchange(w, 0, Ordering::AcqRel, Ordering::Relaxed);
            let _ =
                row.reclaimer.compare_exchange(me.word(), 0, Ordering::AcqRel, Ordering::Relaxed);
            each(owner, &got);
            all.add(&got);
        }
        all
    }
}

impl Entry {
    fn load(&self) -> (u64, u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.tokens.load(Ordering::Relaxed),
            self.cost.load(Ordering::Relaxed),
        )
    }

    fn is_idle(&self) -> bool {
        self.load() == (0, 0, 0)
    }
}

impl Row {
    /// The entry of `slot`, or with `insert` a new one (a never-used entry,
    /// or an idle one of another slot). Open addressing from `slot`'s home,
    /// linear probing; entries never go back to never-used while the row
    /// is owned, so probe chains stay whole.
    fn entry(&self, slot: usize, insert: bool) -> Option<&Entry> {
        let key = slot as u64 + 1;
        let n = self.entries.len();
        let home = slot % n;
        let mut idle: Option<&Entry> = None;
        for step in 0..n {
            let e = &self.entries[(home + step) % n];
            match e.slot.load(Ordering::Relaxed) {
                k if k == key => return Some(e),
                0 => {
                    if !insert {
                        return None;
                    }
                    let e = idle.unwrap_or(e);
                    e.slot.store(key, Ordering::Relaxed);
                    return Some(e);
                }
                _ if insert && idle.is_none() && e.is_idle() => idle = Some(e),
                _ => {}
            }
        }
        let e = idle?;
        e.slot.store(key, Ordering::Relaxed);
        Some(e)
    }

    /// Records a reservation on `slot`.
    pub(crate) fn add(&self, slot: usize, requests: u64, tokens: u64, cost: u64) {
        match self.entry(slot, true) {
            Some(e) => {
                e.requests.fetch_add(requests, Ordering::Relaxed);
                e.tokens.fetch_add(tokens, Ordering::Relaxed);
                e.cost.fetch_add(cost, Ordering::Relaxed);
            }
            None => {
                self.unrecorded.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Records a release on `slot` (never below zero: a reservation made
    /// before the row was claimed was never recorded).
    pub(crate) fn sub(&self, slot: usize, requests: u64, tokens: u64, cost: u64) {
        if let Some(e) = self.entry(slot, false) {
            for (c, by) in [(&e.requests, requests), (&e.tokens, tokens), (&e.cost, cost)] {
                c.store(c.load(Ordering::Relaxed).saturating_sub(by), Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::pending::Pending;
    use super::super::slots::Slot;
    use super::*;
    use crate::request_id::Rng;

    fn slots(n: usize) -> Vec<Slot> {
        (0..n).map(|_| Slot::default()).collect()
    }

    fn rows(n: usize) -> Vec<Row> {
        (0..n).map(|_| Row::default()).collect()
    }

    fn owner(pid: u32) -> Owner {
        Owner::new(pid, 1000 + u64::from(pid)).unwrap()
    }

    #[test]
    fn owner_words_round_trip() {
        let o = Owner::new(4_194_303, (1 << 41) + 77).unwrap();
        assert_eq!((o.pid(), o.start()), (4_194_303, 77));
        assert!(o.started_at((1 << 41) + 77) && !o.started_at(78));
        assert_eq!(Owner::from_word(o.word()), Some(o));
        assert_eq!(Owner::new(0, 5), None);
        assert_eq!(Owner::new(1 << 22, 5), None);
        assert_eq!(Owner::from_word(0), None);
        assert_eq!(Owner::from_word(1 << 63 | 5), None);
        assert_eq!(Owner::from_word(1 << 30), None, "no pid");
    }

    #[test]
    fn proc_stat_gives_state_and_start_time() {
        let stat = "4242 (nginx: worker (x)) S 4241 4241 4241 0 -1 4194624 338 0 0 0 0 0 0 0 \
                    20 0 1 0 987654 25309184 1107 18446744073709551615 1 1 0 0 0 0 0 4096 \
                    134301188 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(parse_proc_stat(stat), Some(('S', 987_654)));
        assert_eq!(parse_proc_stat("1 (z) Z 0"), None);
        assert_eq!(parse_proc_stat("garbage"), None);
    }

    /// Several threads, each playing a process with its own name, reserve
    /// and release at random on a shared table; then some of them "die"
    /// holding what they hold. A reclaim by a survivor leaves exactly the
    /// survivors' reservations in the slots.
    #[test]
    fn reclaim_leaves_exactly_what_the_living_hold() {
        let s = slots(16);
        let r = rows(8);
        let p: Vec<Pending> = (0..64).map(|_| Pending::default()).collect();
        let t = SlotTable::with_ledger(&s, Ledger::new(&r));
        let pt = PendingTable::new(&p);
        // Per thread: what it still holds at the end.
        let held: Vec<Vec<(usize, u64, u64)>> = std::thread::scope(|sc| {
            let hs: Vec<_> = (1..=6u32)
                .map(|pid| {
                    sc.spawn(move || {
                        set_current(Some(owner(pid)));
                        let mut rng = Rng::new(u64::from(pid));
                        let mut held: Vec<(usize, u64, u64)> = Vec::new();
                        for k in 0..20_000u64 {
                            if held.is_empty() || !rng.next_u64().is_multiple_of(3) {
                                let i = (rng.next_u64() % 16) as usize;
                                let tok = rng.next_u64() % 5000;
                                let cost = rng.next_u64() % 1000;
                                t.acquire(i, tok, cost);
                                if k % 7 == 0 {
                                    t.add_tokens(i, 10);
                                    held.push((i, tok + 10, cost));
                                } else {
                                    held.push((i, tok, cost));
                                }
                            } else {
                                let j = (rng.next_u64() as usize) % held.len();
                                let (i, tok, cost) = held.swap_remove(j);
                                t.release(i, tok, cost);
                            }
                        }
                        pt.add(u64::from(pid) << 8 | 1, 100, 1, u64::from(pid));
                        held
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(r.iter().filter(|r| r.owner.load(Ordering::Relaxed) != 0).count(), 6);
        assert_eq!(pt.len(), 6);
        // Processes 2, 3 and 5 die; 1 reclaims.
        let dead = [2u32, 3, 5];
        let ledger = t.ledger().unwrap();
        let mut heard = Vec::new();
        let got = ledger.reclaim(
            owner(1),
            &t,
            Some(&pt),
            &mut |o| !dead.contains(&o.pid()),
            &mut |o, g| heard.push((o.pid(), g.requests)),
        );
        heard.sort_unstable();
        assert_eq!(heard.iter().map(|h| h.0).collect::<Vec<_>>(), dead);
        assert_eq!((got.rows, got.pending, got.unrecorded), (3, 3, 0));
        let want_dead: u64 = dead.iter().map(|&d| held[d as usize - 1].len() as u64).sum();
        assert_eq!(got.requests, want_dead);
        for i in 0..16 {
            let mut want = (0, 0, 0);
            for (pid, h) in (1..=6u32).zip(&held) {
                if dead.contains(&pid) {
                    continue;
                }
                for &(j, tok, cost) in h {
                    if j == i {
                        want = (want.0 + 1, want.1 + tok, want.2 + cost);
                    }
                }
            }
            assert_eq!(t.load(i), want, "slot {i}");
        }
        assert_eq!(ledger.rows_in_use(), 3);
        assert_eq!(pt.len(), 3);
        // The survivors release everything: all zero, and a second
        // reclaim finds nothing.
        for (pid, h) in (1..=6u32).zip(&held) {
            if dead.contains(&pid) {
                continue;
            }
            set_current(Some(owner(pid)));
            for &(i, tok, cost) in h {
                t.release(i, tok, cost);
            }
            assert_eq!(ledger.held_by(owner(pid)), (0, 0, 0));
        }
        assert!((0..16).all(|i| t.load(i) == (0, 0, 0)));
        let again = ledger.reclaim(owner(1), &t, None, &mut |_| false, &mut |_, _| {});
        assert_eq!(again, Reclaimed { rows: 2, ..Reclaimed::default() }, "4 and 6, idle");
        set_current(None);
    }

    /// Processes die at random points while the others keep reserving and
    /// releasing on the same slots and a reclaimer sweeps all along; once
    /// the survivors release what they hold, every counter is zero and
    /// only the survivors (and the reclaimer) hold rows.
    /// A reservation a test thread holds: slot, tokens, cost, pending entry.
    type Held = (usize, u64, u64, Option<(usize, u64)>);

    #[test]
    fn dying_while_others_work_and_a_sweeper_runs() {
        use std::sync::atomic::AtomicBool;
        for seed in 0..8u64 {
            let s = slots(8);
            let r = rows(12);
            let p: Vec<Pending> = (0..256).map(|_| Pending::default()).collect();
            let t = SlotTable::with_ledger(&s, Ledger::new(&r));
            let pt = PendingTable::new(&p);
            let dead: Vec<AtomicBool> = (0..=8).map(|_| AtomicBool::new(false)).collect();
            let done = AtomicBool::new(false);
            let (dead, done) = (&dead, &done);
            std::thread::scope(|sc| {
                let sweeper = sc.spawn(move || {
                    set_current(Some(owner(100)));
                    let ledger = t.ledger().unwrap();
                    let mut got = Reclaimed::default();
                    while !done.load(Ordering::Acquire) {
                        let g = ledger.reclaim(
                            owner(100),
                            &t,
                            Some(&pt),
                            &mut |o| {
                                o.pid() == 100 || !dead[o.pid() as usize].load(Ordering::Acquire)
                            },
                            &mut |_, _| {},
                        );
                        got.add(&g);
                        std::thread::yield_now();
                    }
                    got
                });
                let workers: Vec<_> = (1..=8u32)
                    .map(|pid| {
                        sc.spawn(move || {
                            set_current(Some(owner(pid)));
                            let mut rng = Rng::new(seed * 100 + u64::from(pid));
                            // Odd pids die after a random number of steps.
                            let steps = if pid % 2 == 1 { rng.next_u64() % 20_000 } else { 20_000 };
                            let mut held: Vec<Held> = Vec::new();
                            for k in 0..steps {
                                if held.is_empty() || !rng.next_u64().is_multiple_of(3) {
                                    let i = (rng.next_u64() % 8) as usize;
                                    let tok = rng.next_u64() % 1000;
                                    t.acquire(i, tok, 3);
                                    let id = u64::from(pid) << 32 | (k + 1);
                                    let pe = pt.add(id, 1 + tok, k, id).map(|e| (e, id));
                                    held.push((i, tok, 3, pe));
                                } else {
                                    let j = (rng.next_u64() as usize) % held.len();
                                    let (i, tok, cost, pe) = held.swap_remove(j);
                                    t.release(i, tok, cost);
                                    if let Some((e, id)) = pe {
                                        pt.remove(e, id);
                                    }
                                }
                            }
                            if pid % 2 == 1 {
                                dead[pid as usize].store(true, Ordering::Release);
                                return;
                            }
                            for (i, tok, cost, pe) in held {
                                t.release(i, tok, cost);
                                if let Some((e, id)) = pe {
                                    pt.remove(e, id);
                                }
                            }
                        })
                    })
                    .collect();
                for w in workers {
                    w.join().unwrap();
                }
                // One last sweep after every death, then stop.
                std::thread::sleep(std::time::Duration::from_millis(5));
                done.store(true, Ordering::Release);
                sweeper.join().unwrap();
            });
            let ledger = t.ledger().unwrap();
            ledger.reclaim(owner(100), &t, Some(&pt), &mut |o| o.pid() % 2 == 0, &mut |_, _| {});
            for i in 0..8 {
                assert_eq!(t.load(i), (0, 0, 0), "seed {seed}, slot {i}");
            }
            assert_eq!(pt.len(), 0, "seed {seed}");
            // Survivors 2, 4, 6, 8 keep their (idle) rows; the sweeper
            // never reserved.
            assert_eq!(ledger.rows_in_use(), 4, "seed {seed}");
        }
        set_current(None);
    }

    /// Several reclaimers at once, each seeing every other process dead:
    /// every dead row is given back exactly once.
    #[test]
    fn concurrent_reclaimers_give_back_once() {
        let s = slots(4);
        let r = rows(16);
        let t = SlotTable::with_ledger(&s, Ledger::new(&r));
        for pid in 10..20u32 {
            set_current(Some(owner(pid)));
            for i in 0..4 {
                t.acquire(i, 100, 1);
            }
        }
        // Two more requests per slot held by the reclaimers themselves.
        for pid in 1..=2u32 {
            set_current(Some(owner(pid)));
            for i in 0..4 {
                t.acquire(i, 100, 1);
            }
        }
        set_current(None);
        let ledger = t.ledger().unwrap();
        let total: u64 = std::thread::scope(|sc| {
            let hs: Vec<_> = (1..=2u32)
                .map(|me| {
                    sc.spawn(move || {
                        ledger
                            .reclaim(owner(me), &t, None, &mut |o| o.pid() <= 2, &mut |_, _| {})
                            .requests
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(total, 40);
        for i in 0..4 {
            assert_eq!(t.load(i), (2, 200, 2));
        }
        assert_eq!(ledger.rows_in_use(), 2);
    }

    #[test]
    fn a_reclaimer_that_died_is_replaced() {
        let s = slots(2);
        let r = rows(2);
        let t = SlotTable::with_ledger(&s, Ledger::new(&r));
        set_current(Some(owner(7)));
        t.acquire(1, 50, 0);
        set_current(None);
        // Process 8 took the row to reclaim it and died.
        r[0].reclaimer.store(owner(8).word(), Ordering::Relaxed);
        let ledger = t.ledger().unwrap();
        let live = |o: Owner| o.pid() == 9;
        let got = ledger.reclaim(owner(9), &t, None, &mut { live }, &mut |_, _| {});
        assert_eq!((got.rows, got.requests, got.tokens), (1, 1, 50));
        assert_eq!(t.load(1), (0, 0, 0));
        assert_eq!(r[0].reclaimer.load(Ordering::Relaxed), 0);
        // A live reclaimer's row is left alone.
        set_current(Some(owner(7)));
        t.acquire(0, 5, 0);
        set_current(None);
        r[0].reclaimer.store(owner(9).word(), Ordering::Relaxed);
        let got = ledger.reclaim(owner(10), &t, None, &mut |o| o.pid() >= 9, &mut |_, _| {});
        assert_eq!(got.rows, 0);
        assert_eq!(t.load(0), (1, 5, 0));
    }

    #[test]
    fn full_rows_and_unnamed_processes_still_count() {
        let s = slots(ROW_ENTRIES + 2);
        let r = rows(1);
        let t = SlotTable::with_ledger(&s, Ledger::new(&r));
        set_current(None);
        t.acquire(0, 1, 1); // not named: counted, not recorded
        assert_eq!(t.load(0), (1, 1, 1));
        set_current(Some(owner(3)));
        for i in 0..ROW_ENTRIES + 2 {
            t.acquire(i, 1, 0);
        }
        assert_eq!(r[0].unrecorded.load(Ordering::Relaxed), 2);
        // Another process finds no row: counted, not recorded.
        set_current(Some(owner(4)));
        t.acquire(1, 1, 0);
        assert_eq!(t.load(1), (2, 2, 0));
        // Released entries are reused for other slots.
        set_current(Some(owner(3)));
        t.release(5, 1, 0);
        t.acquire(ROW_ENTRIES + 1, 1, 0);
        assert_eq!(r[0].unrecorded.load(Ordering::Relaxed), 2);
        let ledger = t.ledger().unwrap();
        let got = ledger.reclaim(owner(4), &t, None, &mut |_| false, &mut |_, _| {});
        assert_eq!((got.requests, got.unrecorded), (ROW_ENTRIES as u64, 2));
        // What stays: the unnamed one, process 4's, the two unrecorded.
        assert_eq!(t.load(0), (1, 1, 1));
        assert_eq!(t.load(1), (1, 1, 0));
        assert_eq!(t.load(ROW_ENTRIES), (1, 1, 0));
        assert_eq!(t.load(ROW_ENTRIES + 1), (1, 1, 0));
        set_current(None);
    }

    #[test]
    fn a_freed_row_is_claimed_again_empty() {
        let s = slots(2);
        let r = rows(1);
        let t = SlotTable::with_ledger(&s, Ledger::new(&r));
        set_current(Some(owner(5)));
        t.acquire(0, 10, 0);
        set_current(None);
        let ledger = t.ledger().unwrap();
        ledger.reclaim(owner(6), &t, None, &mut |_| false, &mut |_, _| {});
        set_current(Some(owner(6)));
        t.acquire(1, 3, 0);
        assert_eq!(ledger.held_by(owner(6)), (1, 3, 0));
        t.release(1, 3, 0);
        assert_eq!(t.load(0), (0, 0, 0));
        assert_eq!(t.load(1), (0, 0, 0));
        set_current(None);
    }
}
