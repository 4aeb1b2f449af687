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

mod conf;
pub use conf::{HoldConf, HoldConfError, DEFAULT_AGING_TPS};

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

/// Which waiting request a release takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    /// The oldest.
    #[default]
    Fifo,
    /// The shortest prompt, less `aging_tps` tokens for every second it
    /// waited (so a long prompt is not passed over for ever).
    Spf { aging_tps: u64 },
}

/// The caps of a gate's pools (requests in flight, whole pool) and how its
/// queue is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub prefill: u64,
    pub decode: u64,
    /// Tickets waiting at most (≤ [`QUEUE_MAX`]).
    pub queue: u64,
    pub order: Order,
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
    /// When it was released (ms), for the wake-up delay.
    released_ms: AtomicU64,
    /// Its prompt's tokens (shortest-prompt-first).
    tokens: AtomicU64,
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
    /// Its name for the metrics (up to 64 bytes, zero-padded).
    name: [AtomicU64; 8],
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
    /// Wake-ups of released tickets: count and the sum of their delays
    /// (ms from the release to the holder's resume).
    wakes: AtomicU64,
    wake_sum_ms: AtomicU64,
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
    pub wakes: u64,
    pub wake_sum_ms: u64,
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

    /// Names the gate (the first 64 bytes of `name`).
    pub fn set_name(&self, name: &[u8]) {
        for (i, w) in self.name.iter().enumerate() {
            let mut b = [0u8; 8];
            for (j, x) in b.iter_mut().enumerate() {
                *x = name.get(i * 8 + j).copied().unwrap_or(0);
            }
            w.store(u64::from_le_bytes(b), Ordering::Relaxed);
        }
    }

    pub fn name(&self) -> Vec<u8> {
        let mut out: Vec<u8> =
            self.name.iter().flat_map(|w| w.load(Ordering::Relaxed).to_le_bytes()).collect();
        while out.last() == Some(&0) {
            out.pop();
        }
        out
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
    pub fn admit(&self, caps: &Caps, owner: u64, tokens: u64, now_ms: u64) -> Admission {
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
        tk.tokens.store(tokens, Ordering::Relaxed);
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
        match caps.order {
            Order::Fifo => self.pump_fifo(caps, now_ms),
            Order::Spf { aging_tps } => self.pump_spf(caps, now_ms, aging_tps),
        }
    }

    /// Releases ticket `seq` (its word `w`) if room can be reserved for it:
    /// `Some(true)` released, `Some(false)` cancelled meanwhile (the room
    /// went back), `None` no room.
    fn release(&self, caps: &Caps, seq: u64, w: u64, now_ms: u64) -> Option<bool> {
        let tk = &self.tickets[(seq % QUEUE_MAX as u64) as usize];
        let owner = tk.owner.load(Ordering::Relaxed);
        if !self.reserve(caps, owner) {
            return None;
        }
        tk.released_ms.store(now_ms, Ordering::Relaxed);
        let released = tk
            .word
            .compare_exchange(w, word(seq, RELEASED), Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if released {
            self.released.fetch_add(1, Ordering::Relaxed);
            self.wait_observed(now_ms.saturating_sub(tk.since_ms.load(Ordering::Relaxed)));
        } else {
            self.give_back(Room { prefill: 1, decode: 1 }, owner);
        }
        Some(released)
    }

    /// Moves the head past the resolved tickets at its front.
    fn advance(&self) {
        loop {
            let (h, t) = (self.head.load(Ordering::Acquire), self.tail.load(Ordering::Acquire));
            if h >= t {
                return;
            }
            let w = self.tickets[(h % QUEUE_MAX as u64) as usize].word.load(Ordering::Acquire);
            if w >> 2 != h || w == 0 || w & 3 == WAITING {
                return;
            }
            let _ = self.head.compare_exchange(h, h + 1, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    /// Shortest prompt first, with aging: releases the waiting ticket of
    /// least `tokens − aging_tps × waited seconds` while there is room.
    fn pump_spf(&self, caps: &Caps, now_ms: u64, aging_tps: u64) -> usize {
        let mut n = 0;
        loop {
            self.advance();
            let (h, t) = (self.head.load(Ordering::Acquire), self.tail.load(Ordering::Acquire));
            let mut best: Option<(i128, u64, u64)> = None;
            for seq in h..t {
                let tk = &self.tickets[(seq % QUEUE_MAX as u64) as usize];
                let w = tk.word.load(Ordering::Acquire);
                if w >> 2 != seq || w & 3 != WAITING {
                    continue;
                }
                let waited = now_ms.saturating_sub(tk.since_ms.load(Ordering::Relaxed));
                let score = i128::from(tk.tokens.load(Ordering::Relaxed))
                    - i128::from(aging_tps) * i128::from(waited) / 1000;
                if best.is_none_or(|(b, _, _)| score < b) {
                    best = Some((score, seq, w));
                }
            }
            let Some((_, seq, w)) = best else { return n };
            match self.release(caps, seq, w, now_ms) {
                None => return n,
                Some(true) => n += 1,
                Some(false) => {}
            }
        }
    }

    fn pump_fifo(&self, caps: &Caps, now_ms: u64) -> usize {
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
                match self.release(caps, h, w, now_ms) {
                    None => return n,
                    Some(true) => n += 1,
                    // Cancelled meanwhile: the room went back.
                    Some(false) => {}
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

    /// The holder of released ticket `seq` resumed its request at `now_ms`:
    /// counts the delay since the release (a worker other than the
    /// holder's may have released it). Returns it (ms).
    pub fn woke(&self, seq: u64, now_ms: u64) -> u64 {
        let tk = &self.tickets[(seq % QUEUE_MAX as u64) as usize];
        let d = now_ms.saturating_sub(tk.released_ms.load(Ordering::Relaxed));
        self.wakes.fetch_add(1, Ordering::Relaxed);
        self.wake_sum_ms.fetch_add(d, Ordering::Relaxed);
        d
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
            wakes: self.wakes.load(Ordering::Relaxed),
            wake_sum_ms: self.wake_sum_ms.load(Ordering::Relaxed),
        }
    }
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            key: AtomicU64::new(0),
            name: std::array::from_fn(|_| AtomicU64::new(0)),
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
            wakes: AtomicU64::new(0),
            wake_sum_ms: AtomicU64::new(0),
            waits: std::array::from_fn(|_| AtomicU64::new(0)),
            owners: std::array::from_fn(|_| OwnerRow::default()),
            tickets: std::array::from_fn(|_| Ticket::default()),
        }
    }
}

/// Gates of a [`HoldZone`]: locations with `pd_hold` at once.
pub const GATES: usize = 16;

const ZONE_MAGIC: u64 = 0x7064_6761_7465_4f01;

/// The shared zone of `pd_hold`: one gate per location, found by key.
#[repr(C)]
pub struct HoldZone {
    magic: AtomicU64,
    gates: [Gate; GATES],
}

impl HoldZone {
    /// Claims all-zero memory or recognises a zone of this layout.
    pub fn attach(&self) -> bool {
        crate::shm::attach(&self.magic, ZONE_MAGIC)
    }

    pub fn is_attached(&self) -> bool {
        crate::shm::holds(&self.magic, ZONE_MAGIC)
    }

    /// The gate of `key` (claimed when new); `None` when every gate is
    /// taken by another key.
    pub fn gate(&self, key: u64) -> Option<&Gate> {
        let key = key.max(1);
        let start = (key % GATES as u64) as usize;
        (0..GATES).map(|k| &self.gates[(start + k) % GATES]).find(|g| g.claim(key))
    }

    /// Every gate in use.
    pub fn gates(&self) -> impl Iterator<Item = &Gate> {
        self.gates.iter().filter(|g| g.key() != 0)
    }
}

/// Appends the gates' gauges, counters and wait histograms (Prometheus
/// text) to `o`: one series per gate, labelled with its location.
pub fn render(o: &mut String, gates: &[(Vec<u8>, GateStats)]) {
    use std::fmt::Write;
    if gates.is_empty() {
        return;
    }
    let label = |o: &mut String, name: &[u8]| {
        o.push_str("{location=\"");
        crate::metrics::label(o, name);
        o.push('"');
    };
    type Pick = fn(&GateStats) -> u64;
    let series: [(&str, &str, &str, Pick); 8] = [
        ("pdgate_hold_waiting", "gauge", "Requests held in the proxy now.", |s| s.waiting),
        (
            "pdgate_hold_prefill_reserved",
            "gauge",
            "Prefill room reserved by admitted requests.",
            |s| s.prefill,
        ),
        (
            "pdgate_hold_decode_reserved",
            "gauge",
            "Decode room reserved by admitted requests.",
            |s| s.decode,
        ),
        ("pdgate_hold_admitted_total", "counter", "Requests admitted without waiting.", |s| {
            s.admitted
        }),
        ("pdgate_hold_released_total", "counter", "Held requests released to the engines.", |s| {
            s.released
        }),
        (
            "pdgate_hold_rejected_full_total",
            "counter",
            "Requests refused: the queue was full.",
            |s| s.full,
        ),
        (
            "pdgate_hold_timed_out_total",
            "counter",
            "Held requests answered after their timeout.",
            |s| s.timed_out,
        ),
        ("pdgate_hold_client_gone_total", "counter", "Held requests whose client left.", |s| {
            s.left
        }),
    ];
    for (name, kind, help, pick) in series {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (g, s) in gates {
            o.push_str(name);
            label(o, g);
            let _ = writeln!(o, "}} {}", pick(s));
        }
    }
    let name = "pdgate_hold_wake_delay_seconds";
    let _ = writeln!(
        o,
        "# HELP {name} From a held request's release (by any worker) to its resume.\n# TYPE {name} summary"
    );
    for (g, s) in gates {
        let _ = write!(o, "{name}_sum");
        label(o, g);
        let _ = writeln!(o, "}} {}.{:03}", s.wake_sum_ms / 1000, s.wake_sum_ms % 1000);
        let _ = write!(o, "{name}_count");
        label(o, g);
        let _ = writeln!(o, "}} {}", s.wakes);
    }
    let name = "pdgate_hold_wait_seconds";
    let _ =
        writeln!(o, "# HELP {name} How long released requests waited.\n# TYPE {name} histogram");
    for (g, s) in gates {
        for (i, b) in WAIT_BOUNDS_MS.iter().enumerate() {
            let _ = write!(o, "{name}_bucket");
            label(o, g);
            let _ = writeln!(o, ",le=\"{}.{:03}\"}} {}", b / 1000, b % 1000, s.waits[i]);
        }
        let _ = write!(o, "{name}_bucket");
        label(o, g);
        let _ = writeln!(o, ",le=\"+Inf\"}} {}", s.waits[WAIT_BOUNDS_MS.len()]);
        let _ = write!(o, "{name}_sum");
        label(o, g);
        let _ = writeln!(o, "}} {}.{:03}", s.wait_sum_ms / 1000, s.wait_sum_ms % 1000);
        let _ = write!(o, "{name}_count");
        label(o, g);
        let _ = writeln!(o, "}} {}", s.waits[WAIT_BOUNDS_MS.len()]);
    }
}

#[cfg(test)]
mod tests;
