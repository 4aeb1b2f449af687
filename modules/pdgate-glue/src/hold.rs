//! Holding P/D requests in the proxy (`pd_hold`): the gates of
//! pdgate-core's [`hold`](pdgate_core::hold) in the shared zone
//! `pdgate_hold` (one per pair of pools, shared by every location and
//! worker that sends to them), and each worker's list of the requests it
//! holds, polled by one timer while the list is not empty.
//!
//! A request whose ticket was released (by this worker or another, when
//! room freed up) is resumed at the next poll; one that waited its
//! `timeout` is answered; one whose client left is finalized by nginx and
//! drops out of the list with its context ([`forget`]).

use std::cell::RefCell;
use std::ptr::addr_of;

use ngx::ffi::{
    ngx_add_timer, ngx_event_t, ngx_http_request_t, ngx_http_run_posted_requests, ngx_module_t,
    ngx_msec_t,
};
use pdgate_core::hold::{Admission, Caps, Gate, HoldConf, HoldZone, Room, TicketState};

use crate::http::{Conf, ConfError};

/// The zone's name.
pub const ZONE_NAME: &[u8] = b"pdgate_hold";

/// Milliseconds between two polls of a worker's held requests.
pub const POLL_MS: u64 = 2;

/// A location's `pd_hold`: its settings and its gate's key and name.
#[derive(Debug, Clone)]
pub struct Hold {
    pub conf: HoldConf,
    key: u64,
    name: Vec<u8>,
    /// The directive's name (`pd_hold`, or the SGLang module's
    /// `prefill_refactor_hold`), for messages.
    directive: String,
}

/// The zone's size.
pub fn zone_size() -> usize {
    (std::mem::size_of::<HoldZone>() + (64 << 10)).div_ceil(4096) * 4096
}

/// `pd_hold prefill=<upstream>[:N] decode=<upstream>[:N] [queue=N]
/// [timeout=time] [status=429|503] [retry_after=N]`: parses it into
/// `slot` and declares the zone. Both P/D modules declare it, so its tag
/// is one they share: nginx's core http module (nginx refuses a zone
/// declared under two tags).
pub fn directive(cf: &mut Conf, slot: &mut Option<Hold>) -> Result<(), ConfError> {
    if slot.is_some() {
        return Err(ConfError::Directive("is duplicate".into()));
    }
    let conf = HoldConf::parse(&cf.args()).map_err(|e| ConfError::Directive(e.to_string()))?;
    let mut name = conf.prefill_upstream.clone();
    name.push(b'+');
    name.extend_from_slice(&conf.decode_upstream);
    let key = pdgate_core::balance::slots::peer_key(b"pd_hold", &name);
    // SAFETY: the address of nginx's own module object, one for every
    // dynamic module of this nginx; only used as the zone's tag.
    let tag: &ngx_module_t = unsafe { &*addr_of!(ngx::ffi::ngx_http_core_module) };
    cf.add_zone::<HoldZone>(ZONE_NAME, zone_size(), tag).map_err(|_| ConfError::Logged)?;
    let directive = cf.args_name();
    *slot = Some(Hold { conf, key, name, directive });
    Ok(())
}

/// Postconfiguration: both pools of `hold` must be `upstream {}` blocks.
pub fn check(cf: &Conf, hold: &Hold) -> Result<(), String> {
    let blocks = cf.upstream_blocks();
    for u in [&hold.conf.prefill_upstream, &hold.conf.decode_upstream] {
        if !blocks.contains(&u.as_slice()) {
            return Err(format!(
                "\"{}\" names no upstream block \"{}\"",
                hold.directive,
                String::from_utf8_lossy(u)
            ));
        }
    }
    Ok(())
}

fn zone() -> Option<&'static HoldZone> {
    let z = crate::zone::find_in_cycle(ZONE_NAME)?;
    // SAFETY: a zone of this name whose data holds the hold layout (its
    // magic) is the HoldZone a P/D module placed; it lives as long as the
    // cycle.
    unsafe { ((*z).data as *const HoldZone).as_ref() }.filter(|h| h.is_attached())
}

/// `hold`'s gate, named; `None` without the zone or when every gate is
/// taken.
pub fn gate(hold: &Hold) -> Option<&'static Gate> {
    let g = zone()?.gate(hold.key)?;
    if g.name().is_empty() {
        g.set_name(&hold.name);
    }
    Some(g)
}

/// The caps of `hold`'s pools now: their servers that are up (not down by
/// the configuration or the health checks) times the requests each takes.
pub fn caps(hold: &Hold) -> Caps {
    let c = &hold.conf;
    let up = |u: &[u8]| {
        let n = if c.reads_engines() {
            // With max_waiting / kv_full: an engine whose own report says
            // it is full has no room either.
            let now = crate::observe::now_ms();
            crate::upstream::count_up_where(u, |peer| {
                crate::health::engine_row(u, peer).is_none_or(|e| c.engine_has_room(&e.view(now)))
            })
        } else {
            crate::upstream::count_up(u)
        };
        n.unwrap_or(0) as u64
    };
    c.caps(up(&c.prefill_upstream), up(&c.decode_upstream))
}

/// This process's name in the gates' owner rows (the ledgers' name: pid
/// and start time, so a reclaim can tell it died).
pub fn owner() -> u64 {
    crate::reclaim::ensure_named().map_or_else(
        // SAFETY: a plain global nginx sets in each process.
        || u64::try_from(unsafe { ngx::ffi::ngx_pid }).unwrap_or(0).max(1),
        |o| o.word(),
    )
}

/// When this worker last looked for dead owners (ms).
static LAST_SWEEP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// At most once a [`crate::reclaim::PERIOD_MS`] per worker: gives back the
/// room that processes that died (SIGKILL, OOM) held in every gate, and
/// cancels their tickets.
fn sweep() {
    use std::sync::atomic::Ordering;
    let now = crate::observe::now_ms();
    let last = LAST_SWEEP.load(Ordering::Relaxed);
    if now.saturating_sub(last) < crate::reclaim::PERIOD_MS {
        return;
    }
    LAST_SWEEP.store(now, Ordering::Relaxed);
    let Some(z) = zone() else { return };
    for g in z.gates() {
        for o in g.owners() {
            let Some(owner) = pdgate_core::balance::ledger::Owner::from_word(o) else { continue };
            if crate::reclaim::alive(owner) {
                continue;
            }
            let got = g.reclaim(o);
            if got == Room::default() {
                continue;
            }
            // SAFETY: the running cycle's log.
            let log = unsafe { (**addr_of!(ngx::ffi::ngx_cycle)).log };
            ngx::ngx_log_error!(
                ngx::ffi::NGX_LOG_NOTICE,
                log,
                "pd_hold: gave back the room of exited process {} in \"{}\" (prefill {}, decode {})",
                owner.pid(),
                String::from_utf8_lossy(&g.name()),
                got.prefill,
                got.decode
            );
        }
    }
}

/// What a held request is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Its room is reserved: go on.
    Released,
    /// It waited its timeout.
    TimedOut,
}

/// Resumes a held request `r` (the driver's, per protocol).
pub type Resume = unsafe fn(*mut ngx_http_request_t, Wake);

struct Waiter {
    r: *mut ngx_http_request_t,
    hold: *const Hold,
    gate: &'static Gate,
    seq: u64,
    deadline_ms: u64,
    resume: Resume,
}

thread_local! {
    static HELD: RefCell<Vec<Waiter>> = const { RefCell::new(Vec::new()) };
    static TIMER: RefCell<Option<Box<ngx_event_t>>> = const { RefCell::new(None) };
}

/// Admits a request of `tokens` (its prompt, estimated) to `hold`'s gate,
/// or queues it.
pub fn admit(hold: &Hold, gate: &Gate, tokens: u64) -> Admission {
    sweep();
    gate.admit(&caps(hold), owner(), tokens, crate::observe::now_ms())
}

/// Holds `r` with ticket `seq` until it is released or times out; `resume`
/// is called from the poll timer then.
///
/// # Safety
/// `r` must be a live main request that stays in the list until it is
/// resumed or [`forget`] removes it (its context's drop); `hold` must live
/// as long as the configuration.
pub unsafe fn wait(
    r: *mut ngx_http_request_t,
    hold: &Hold,
    gate: &'static Gate,
    seq: u64,
    resume: Resume,
) {
    let deadline_ms = crate::observe::now_ms().saturating_add(hold.conf.timeout_ms);
    HELD.with(|h| h.borrow_mut().push(Waiter { r, hold, gate, seq, deadline_ms, resume }));
    arm();
}

/// Takes `r` out of the list (its context goes away).
pub fn forget(r: *mut ngx_http_request_t) {
    HELD.with(|h| h.borrow_mut().retain(|w| w.r != r));
}

/// Gives back `room` to `gate` and releases what waits there.
pub fn give_back(hold: &Hold, gate: &Gate, room: Room) {
    if room == Room::default() {
        return;
    }
    gate.give_back(room, owner());
    gate.pump(&caps(hold), crate::observe::now_ms());
}

fn arm() {
    TIMER.with(|t| {
        let mut t = t.borrow_mut();
        let ev = t.get_or_insert_with(|| {
            // SAFETY: all-zero bytes are a valid, unarmed event.
            let mut ev: Box<ngx_event_t> = Box::new(unsafe { std::mem::zeroed() });
            ev.handler = Some(poll);
            // SAFETY: the running cycle's log, as long as the worker.
            ev.log = unsafe { (**addr_of!(ngx::ffi::ngx_cycle)).log };
            // Not cancelable: a worker that exits after a reload keeps
            // polling for the requests it still holds (it is armed only
            // while it holds some).
            ev
        });
        if ev.timer_set() == 0 {
            // SAFETY: the boxed event lives as long as the worker (the
            // thread-local keeps it) and is filled in.
            unsafe { ngx_add_timer(&mut **ev, POLL_MS as ngx_msec_t) };
        }
    });
}

unsafe extern "C" fn poll(_ev: *mut ngx_event_t) {
    crate::guard::catch("pd_hold poll", (), || {
        sweep();
        let now = crate::observe::now_ms();
        // Decide first, resume after: a resumed request may finish and
        // drop (forget) right away, which borrows the list again.
        let mut due: Vec<(*mut ngx_http_request_t, Resume, Wake)> = Vec::new();
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            let mut pumped: Vec<*const Gate> = Vec::new();
            h.retain(|w| {
                if !pumped.contains(&(w.gate as *const Gate)) {
                    pumped.push(w.gate);
                    // SAFETY: the location's Hold lives as long as the
                    // configuration the request runs in.
                    w.gate.pump(&caps(unsafe { &*w.hold }), now);
                }
                let wake = match w.gate.poll(w.seq) {
                    TicketState::Waiting if now < w.deadline_ms => return true,
                    TicketState::Waiting => {
                        if w.gate.cancel(w.seq, true) {
                            Wake::TimedOut
                        } else {
                            Wake::Released
                        }
                    }
                    TicketState::Released => Wake::Released,
                    // Cancelled by a reclaim that took this process for dead.
                    TicketState::Gone => Wake::TimedOut,
                };
                due.push((w.r, w.resume, wake));
                false
            });
        });
        for (r, resume, wake) in due {
            // SAFETY: a request in the list is live (its drop takes it out).
            unsafe {
                let c = (*r).connection;
                resume(r, wake);
                ngx_http_run_posted_requests(c);
            }
        }
        if HELD.with(|h| !h.borrow().is_empty()) {
            arm();
        }
    })
}

/// The gates of the running cycle's zone, for `pd_metrics`.
pub fn gate_stats() -> Vec<(Vec<u8>, pdgate_core::hold::GateStats)> {
    zone().map_or_else(Vec::new, |z| z.gates().map(|g| (g.name(), g.stats())).collect())
}
