//! Holding requests in the proxy (`pd_hold`): a gate per P/D location, in a
//! shared zone, seen by every worker. A request is **admitted** while the
//! location's prefill and decode pools both have room (requests in flight
//! below their caps); otherwise it takes a **ticket** in the gate's FIFO
//! queue and waits, holding no upstream connection and no prefill. The
//! decode's room is reserved at admission, before the prefill runs, so no
//! prefill is spent on a request whose decode would be refused.
//!
//! When room frees up (a prefill leg ends, a request ends) the worker that
//! saw it [`pump`](Gate::pump)s the queue: the oldest waiting tickets are
//! marked released, with their room reserved, from whichever worker; the
//! worker that holds each one sees it at its next poll and resumes the
//! request. A ticket whose request timed out or whose client left is
//! cancelled and skipped.
//!
//! Everything is atomics (`#[repr(C)]`, all zero is an empty gate); a
//! ticket's sequence number and state share one word, so a late cancel
//! cannot touch a later ticket that reused its slot. Counters reserved by a
//! process that died are given back by [`Gate::reclaim`] from the owner
//! rows (each process's own share of the reservations).

use std::sync::atomic::{AtomicU64, Ordering};

/// Tickets a gate's ring holds: the longest queue a `pd_hold` may set.
pub const QUEUE_MAX: usize = 4096;
/// Processes whose reservations a gate records for reclaim.
pub const OWNERS: usize = 64;

const WAITING: u64 = 1;
const RELEASED: u64 = 2;
const CANCELLED: u64 = 3;

fn word(seq: u64, state: u64) -> u64 {
    (seq << 2) | state
}

/// Which pools a reservation holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Room {
    pub prefill: u64,
    pub decode: u64,
}

/// The caps of a gate's pools (requests in flight, whole pool).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub prefill: u64,
    pub decode: u64,
    /// Tickets waiting at most (≤ [`QUEUE_MAX`]).
    pub queue: u64,
}

/// What [`Gate::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Room reserved now.
    Now,
    /// Waiting with this ticket.
    Queued(u64),
    /// The queue is full.
    Full,
}

/// A ticket as its holder sees it when it polls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TicketState {
    Waiting,
    /// Room was reserved for it: go on.
    Released,
    /// Cancelled (or its slot reused: it was cancelled long ago).
    Gone,
}

#[repr(C)]
#[derive(Debug, Default)]
pub struct Ticket {
    /// `seq << 2 | state`; 0: never used.
    word: AtomicU64,
    /// When it was queued (ms), for the wait histogram.
    since_ms: AtomicU64,
    /// Its holder ([`OwnerRow::owner`]'s word), for reclaim.
    owner: AtomicU64,
}

/// One process's share of a gate's reservations.
#[repr(C)]
#[derive(Debug, Default)]
pub struct OwnerRow {
    /// The process's name (nonzero, e.g. pid and start time); 0: free.
    owner: AtomicU64,
    prefill: AtomicU64,
    decode: AtomicU64,
}

/// Bounds of the wait histogram (ms).
pub const WAIT_BOUNDS_MS: [u64; 10] = [1, 5, 10, 50, 100, 500, 1000, 5000, 10000, 60000];

/// A P/D location's gate.
#[repr(C)]
#[derive(Debug)]
pub struct Gate {
    /// The location's identity; 0: a free gate.
    key: AtomicU64,
    prefill: AtomicU64,
    decode: AtomicU64,
    /// First ticket not yet resolved, and the next ticket's number.
    head: AtomicU64,
    tail: AtomicU64,
    // Counters, ever.
    admitted: AtomicU64,
    queued: AtomicU64,
    released: AtomicU64,
    full: AtomicU64,
    timed_out: AtomicU64,
    left: AtomicU64,
    /// Waits of released tickets: per bound of [`WAIT_BOUNDS_MS`], +Inf,
    /// and the sum (ms).
    waits: [AtomicU64; WAIT_BOUNDS_MS.len() + 2],
    owners: [OwnerRow; OWNERS],
    tickets: [Ticket; QUEUE_MAX],
}

/// A gate's figures for `pd_metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GateStats {
    pub prefill: u64,
    pub decode: u64,
    pub waiting: u64,
    pub admitted: u64,
    pub queued: u64,
    pub released: u64,
    pub full: u64,
    pub timed_out: u64,
    pub left: u64,
    /// Cumulative counts per bound of [`WAIT_BOUNDS_MS`], then all.
    pub waits: [u64; WAIT_BOUNDS_MS.len() + 1],
    pub wait_sum_ms: u64,
}

/// Adds `n` to a counter that must not go below zero (a reclaim may have
/// taken it low).
fn sub_floor(a: &AtomicU64, n: u64) {
    let _ = a.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| Some(v.saturating_sub(n)));
}

impl Gate {
    /// The gate's identity (0: free).
    pub fn key(&self) -> u64 {
        self.key.load(Ordering::Acquire)
    }

    /// Claims a free gate for `key`, or recognises it.
    pub fn claim(&self, key: u64) -> bool {
        match self.key.compare_exchange(0, key, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => true,
            Err(k) => k == key,
        }
    }

    fn row(&self, owner: u64) -> Option<&OwnerRow> {
        if owner == 0 {
            return None;
        }
        let start = (owner % OWNERS as u64) as usize;
        for k in 0..OWNERS {
            let r = &self.owners[(start + k) % OWNERS];
            match r.owner.compare_exchange(0, owner, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(r),
                Err(x) if x == owner => return Some(r),
                Err(_) => {}
            }
        }
        None
    }

    /// Reserves room in both pools if both have it (exactly: a CAS each;
    /// the prefill's room is given back when the decode has none).
    fn reserve(&self, caps: &Caps, owner: u64) -> bool {
        let take = |a: &AtomicU64, cap: u64| {
            a.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| (v < cap).then_some(v + 1))
                .is_ok()
        };
        if !take(&self.prefill, caps.prefill) {
            return false;
        }
        if !take(&self.decode, caps.decode) {
            sub_floor(&self.prefill, 1);
            return false;
        }
        if let Some(r) = self.row(owner) {
            r.prefill.fetch_add(1, Ordering::AcqRel);
            r.decode.fetch_add(1, Ordering::AcqRel);
        }
        true
    }

    /// A request arrives: admitted at once when nothing waits and both pools
    /// have room; else queued (FIFO) unless the queue is full.
    pub fn admit(&self, caps: &Caps, owner: u64, now_ms: u64) -> Admission {
        let empty = self.head.load(Ordering::Acquire) == self.tail.load(Ordering::Acquire);
        if empty && self.reserve(caps, owner) {
            self.admitted.fetch_add(1, Ordering::Relaxed);
            return Admission::Now;
        }
        let max = caps.queue.min(QUEUE_MAX as u64);
        let seq = loop {
            let (h, t) = (self.head.load(Ordering::Acquire), self.tail.load(Ordering::Acquire));
            if t.saturating_sub(h) >= max {
                self.full.fetch_add(1, Ordering::Relaxed);
                return Admission::Full;
            }
            if self.tail.compare_exchange(t, t + 1, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                break t;
            }
        };
        let tk = &self.tickets[(seq % QUEUE_MAX as u64) as usize];
        tk.since_ms.store(now_ms, Ordering::Relaxed);
        tk.owner.store(owner, Ordering::Relaxed);
        tk.word.store(word(seq, WAITING), Ordering::Release);
        self.queued.fetch_add(1, Ordering::Relaxed);
        // Room may have freed up while it queued.
        self.pump(caps, now_ms);
        Admission::Queued(seq)
    }

    /// Releases the oldest waiting tickets while both pools have room,
    /// reserving it for each (for their holders); returns how many. Any
    /// worker may call it, whenever room may have freed up.
    pub fn pump(&self, caps: &Caps, now_ms: u64) -> usize {
        let mut n = 0;
        loop {
            let (h, t) = (self.head.load(Ordering::Acquire), self.tail.load(Ordering::Acquire));
            if h >= t {
                return n;
            }
            let tk = &self.tickets[(h % QUEUE_MAX as u64) as usize];
            let w = tk.word.load(Ordering::Acquire);
            if w >> 2 != h || w == 0 {
                // Not written yet by its queuer (it pumps once it is).
                return n;
            }
            if w & 3 == WAITING {
                let owner = tk.owner.load(Ordering::Relaxed);
                if !self.reserve(caps, owner) {
                    return n;
                }
                let released = tk
                    .word
                    .compare_exchange(w, word(h, RELEASED), Ordering::AcqRel, Ordering::Acquire)
                    .is_ok();
                if released {
                    n += 1;
                    self.released.fetch_add(1, Ordering::Relaxed);
                    self.wait_observed(now_ms.saturating_sub(tk.since_ms.load(Ordering::Relaxed)));
                } else {
                    // Cancelled meanwhile: the room goes back.
                    self.give_back(Room { prefill: 1, decode: 1 }, owner);
                }
            }
            let _ = self.head.compare_exchange(h, h + 1, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    fn wait_observed(&self, ms: u64) {
        let i = WAIT_BOUNDS_MS.iter().position(|&b| ms <= b).unwrap_or(WAIT_BOUNDS_MS.len());
        self.waits[i].fetch_add(1, Ordering::Relaxed);
        self.waits[WAIT_BOUNDS_MS.len() + 1].fetch_add(ms, Ordering::Relaxed);
    }

    /// Where ticket `seq` stands.
    pub fn poll(&self, seq: u64) -> TicketState {
        let w = self.tickets[(seq % QUEUE_MAX as u64) as usize].word.load(Ordering::Acquire);
        match (w >> 2 == seq, w & 3) {
            (true, WAITING) => TicketState::Waiting,
            (true, RELEASED) => TicketState::Released,
            _ => TicketState::Gone,
        }
    }

    /// Gives up ticket `seq` (timed out: `timed_out`, else the client
    /// left). False when it had been released already: its room is the
    /// caller's, to go on with or to give back.
    pub fn cancel(&self, seq: u64, timed_out: bool) -> bool {
        let tk = &self.tickets[(seq % QUEUE_MAX as u64) as usize];
        let ok = tk
            .word
            .compare_exchange(
                word(seq, WAITING),
                word(seq, CANCELLED),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        if ok {
            if timed_out {
                self.timed_out.fetch_add(1, Ordering::Relaxed);
            } else {
                self.left.fetch_add(1, Ordering::Relaxed);
            }
        }
        ok
    }

    /// Gives back what a reservation of `owner` held (its prefill ended:
    /// `prefill: 1`; the request ended: what it still holds). Call
    /// [`pump`](Self::pump) after.
    pub fn give_back(&self, room: Room, owner: u64) {
        if let Some(r) = self.row(owner) {
            sub_floor(&r.prefill, room.prefill);
            sub_floor(&r.decode, room.decode);
        }
        sub_floor(&self.prefill, room.prefill);
        sub_floor(&self.decode, room.decode);
    }

    /// Gives back everything `dead` (a process that died) held, and cancels
    /// its waiting tickets; returns the room given back.
    pub fn reclaim(&self, dead: u64) -> Room {
        let mut got = Room::default();
        for r in &self.owners {
            if dead != 0 && r.owner.load(Ordering::Acquire) == dead {
                got.prefill += r.prefill.swap(0, Ordering::AcqRel);
                got.decode += r.decode.swap(0, Ordering::AcqRel);
                r.owner.store(0, Ordering::Release);
            }
        }
        sub_floor(&self.prefill, got.prefill);
        sub_floor(&self.decode, got.decode);
        let (h, t) = (self.head.load(Ordering::Acquire), self.tail.load(Ordering::Acquire));
        for seq in h..t {
            let tk = &self.tickets[(seq % QUEUE_MAX as u64) as usize];
            if tk.owner.load(Ordering::Relaxed) == dead {
                self.cancel(seq, false);
            }
        }
        got
    }

    /// The owners with a row (for a reclaim pass).
    pub fn owners(&self) -> Vec<u64> {
        self.owners.iter().map(|r| r.owner.load(Ordering::Acquire)).filter(|&o| o != 0).collect()
    }

    pub fn stats(&self) -> GateStats {
        let (h, t) = (self.head.load(Ordering::Acquire), self.tail.load(Ordering::Acquire));
        let mut waiting = 0;
        for seq in h..t {
            if self.poll(seq) == TicketState::Waiting {
                waiting += 1;
            }
        }
        let mut waits = [0u64; WAIT_BOUNDS_MS.len() + 1];
        let mut acc = 0;
        for (i, w) in waits.iter_mut().enumerate() {
            acc += self.waits[i].load(Ordering::Relaxed);
            *w = acc;
        }
        GateStats {
            prefill: self.prefill.load(Ordering::Relaxed),
            decode: self.decode.load(Ordering::Relaxed),
            waiting,
            admitted: self.admitted.load(Ordering::Relaxed),
            queued: self.queued.load(Ordering::Relaxed),
            released: self.released.load(Ordering::Relaxed),
            full: self.full.load(Ordering::Relaxed),
            timed_out: self.timed_out.load(Ordering::Relaxed),
            left: self.left.load(Ordering::Relaxed),
            waits,
            wait_sum_ms: self.waits[WAIT_BOUNDS_MS.len() + 1].load(Ordering::Relaxed),
        }
    }
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            key: AtomicU64::new(0),
            prefill: AtomicU64::new(0),
            decode: AtomicU64::new(0),
            head: AtomicU64::new(0),
            tail: AtomicU64::new(0),
            admitted: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            released: AtomicU64::new(0),
            full: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            left: AtomicU64::new(0),
            waits: std::array::from_fn(|_| AtomicU64::new(0)),
            owners: std::array::from_fn(|_| OwnerRow::default()),
            tickets: std::array::from_fn(|_| Ticket::default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPS: Caps = Caps { prefill: 2, decode: 3, queue: 4 };

    fn gate() -> Box<Gate> {
        Box::default()
    }

    #[test]
    fn admits_until_a_pool_is_full_then_queues_then_refuses() {
        let g = gate();
        assert_eq!(g.admit(&CAPS, 7, 0), Admission::Now);
        assert_eq!(g.admit(&CAPS, 7, 0), Admission::Now);
        // The prefill pool (2) is full.
        assert_eq!(g.admit(&CAPS, 7, 10), Admission::Queued(0));
        assert_eq!(g.admit(&CAPS, 8, 10), Admission::Queued(1));
        assert_eq!(g.admit(&CAPS, 8, 10), Admission::Queued(2));
        assert_eq!(g.admit(&CAPS, 8, 10), Admission::Queued(3));
        assert_eq!(g.admit(&CAPS, 8, 10), Admission::Full);
        let s = g.stats();
        assert_eq!((s.prefill, s.decode, s.waiting, s.admitted, s.full), (2, 2, 4, 2, 1));
    }

    #[test]
    fn fifo_release_when_room_frees_and_decode_room_is_reserved_first() {
        let g = gate();
        g.admit(&CAPS, 7, 0);
        g.admit(&CAPS, 7, 0);
        let Admission::Queued(a) = g.admit(&CAPS, 7, 100) else { panic!() };
        let Admission::Queued(b) = g.admit(&CAPS, 7, 100) else { panic!() };
        // A prefill ends: one prefill slot frees, the decode (3) has room.
        g.give_back(Room { prefill: 1, decode: 0 }, 7);
        assert_eq!(g.pump(&CAPS, 150), 1);
        assert_eq!((g.poll(a), g.poll(b)), (TicketState::Released, TicketState::Waiting));
        // Another prefill ends, but the decode pool is now full (3): b waits.
        g.give_back(Room { prefill: 1, decode: 0 }, 7);
        assert_eq!(g.pump(&CAPS, 160), 0);
        assert_eq!(g.poll(b), TicketState::Waiting);
        // A request ends: its decode slot frees, b goes.
        g.give_back(Room { prefill: 0, decode: 1 }, 7);
        assert_eq!(g.pump(&CAPS, 200), 1);
        assert_eq!(g.poll(b), TicketState::Released);
        let s = g.stats();
        assert_eq!((s.released, s.waiting, s.prefill, s.decode), (2, 0, 2, 3));
        assert_eq!(s.wait_sum_ms, 50 + 100);
        assert_eq!(s.waits[4], 2, "both within 100 ms");
        assert_eq!(s.waits[3], 1, "one within 50 ms");
        // New arrivals queue behind nothing now but still find no room.
        assert!(matches!(g.admit(&CAPS, 7, 200), Admission::Queued(_)));
    }

    #[test]
    fn a_cancelled_ticket_is_skipped_and_a_late_cancel_loses() {
        let g = gate();
        g.admit(&CAPS, 7, 0);
        g.admit(&CAPS, 7, 0);
        let Admission::Queued(a) = g.admit(&CAPS, 7, 0) else { panic!() };
        let Admission::Queued(b) = g.admit(&CAPS, 7, 0) else { panic!() };
        assert!(g.cancel(a, true), "timed out while waiting");
        assert_eq!(g.poll(a), TicketState::Gone);
        g.give_back(Room { prefill: 1, decode: 1 }, 7);
        assert_eq!(g.pump(&CAPS, 0), 1);
        assert_eq!(g.poll(b), TicketState::Released, "b, not the cancelled a");
        assert!(!g.cancel(b, false), "released first: the room is the holder's");
        let s = g.stats();
        assert_eq!((s.timed_out, s.left, s.prefill, s.decode), (1, 0, 2, 2));
    }

    #[test]
    fn queued_while_room_exists_is_released_at_once() {
        let g = gate();
        // Something waits (a ticket whose pump has not run), so a new
        // arrival queues even with room; its own pump releases both.
        let caps = Caps { prefill: 1, decode: 1, queue: 8 };
        g.admit(&caps, 7, 0);
        let Admission::Queued(a) = g.admit(&caps, 7, 0) else { panic!() };
        g.give_back(Room { prefill: 1, decode: 1 }, 7);
        let big = Caps { prefill: 5, decode: 5, queue: 8 };
        let Admission::Queued(b) = g.admit(&big, 7, 0) else { panic!() };
        assert_eq!((g.poll(a), g.poll(b)), (TicketState::Released, TicketState::Released));
    }

    #[test]
    fn a_dead_process_gives_back_its_room_and_its_tickets() {
        let g = gate();
        g.admit(&CAPS, 7, 0);
        g.admit(&CAPS, 9, 0);
        let Admission::Queued(mine) = g.admit(&CAPS, 9, 0) else { panic!() };
        let Admission::Queued(other) = g.admit(&CAPS, 7, 0) else { panic!() };
        let got = g.reclaim(9);
        assert_eq!(got, Room { prefill: 1, decode: 1 });
        assert_eq!(g.poll(mine), TicketState::Gone);
        assert_eq!(g.pump(&CAPS, 0), 1);
        assert_eq!(g.poll(other), TicketState::Released);
        assert_eq!(g.owners(), vec![7]);
        let s = g.stats();
        assert_eq!((s.prefill, s.decode), (2, 2));
    }

    #[test]
    fn ring_slots_are_reused_without_confusing_tickets() {
        let g = gate();
        let caps = Caps { prefill: 1, decode: 1, queue: QUEUE_MAX as u64 };
        g.admit(&caps, 7, 0);
        for round in 0..3u64 {
            for k in 0..QUEUE_MAX as u64 {
                let seq = round * QUEUE_MAX as u64 + k;
                assert_eq!(g.admit(&caps, 7, 0), Admission::Queued(seq));
            }
            assert_eq!(g.admit(&caps, 7, 0), Admission::Full);
            // The first half times out; the rest are served one by one.
            for k in 0..QUEUE_MAX as u64 / 2 {
                assert!(g.cancel(round * QUEUE_MAX as u64 + k, true));
            }
            for k in QUEUE_MAX as u64 / 2..QUEUE_MAX as u64 {
                g.give_back(Room { prefill: 1, decode: 1 }, 7);
                assert_eq!(g.pump(&caps, 0), 1);
                assert_eq!(g.poll(round * QUEUE_MAX as u64 + k), TicketState::Released);
            }
            // An old ticket's late cancel does not touch the slot's new one.
            assert!(!g.cancel(round * QUEUE_MAX as u64, false));
        }
    }

    #[test]
    fn concurrent_admissions_never_exceed_the_caps() {
        use std::sync::Arc;
        let g: Arc<Gate> = Arc::from(gate());
        let caps = Caps { prefill: 5, decode: 7, queue: 1000 };
        let threads: Vec<_> = (1..=4u64)
            .map(|owner| {
                let g = g.clone();
                std::thread::spawn(move || {
                    let mut mine = Vec::new();
                    for i in 0..2000u64 {
                        match g.admit(&caps, owner, i) {
                            Admission::Now => mine.push(None),
                            Admission::Queued(s) => mine.push(Some(s)),
                            Admission::Full => {}
                        }
                        let s = g.stats();
                        assert!(s.prefill <= caps.prefill && s.decode <= caps.decode);
                        // Finish the oldest admitted request of this thread.
                        if let Some(pos) = mine.iter().position(|t| match t {
                            None => true,
                            Some(s) => g.poll(*s) == TicketState::Released,
                        }) {
                            mine.remove(pos);
                            g.give_back(Room { prefill: 1, decode: 1 }, owner);
                            g.pump(&caps, i);
                        }
                    }
                    for t in mine {
                        match t {
                            Some(s) if g.cancel(s, false) => {}
                            _ => g.give_back(Room { prefill: 1, decode: 1 }, owner),
                        }
                    }
                    g.pump(&caps, 0);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Every reservation was given back, every ticket resolved.
        let s = g.stats();
        assert_eq!((s.prefill, s.decode, s.waiting), (0, 0, 0), "{s:?}");
        assert_eq!(s.admitted + s.released, s.admitted + s.queued - s.left);
    }
}
