//! Giving back what dead workers held in the shared counters.
//!
//! pdgate-core's [`ledger`] records, per process, what each worker holds
//! in a slot table; this file names the process (pid and start time, once
//! per process: a fork is seen by nginx's `ngx_pid` changing), tells dead
//! processes from live ones, and runs [`Ledger::reclaim`] over the zones:
//! - a balancer module's `init_process` ([`init_process`], from
//!   [`balancer_module!`](crate::balancer_module)) sweeps its zones at once
//!   — nginx respawns a killed worker right away, after reaping it — and
//!   arms a timer that sweeps again every [`PERIOD_MS`] (a worker killed
//!   while none is respawned: during a graceful reload or shutdown);
//! - a module's own counters zone ([`crate::counters`]) is swept from
//!   [`crate::counters::table`] at most every [`PERIOD_MS`] per worker, so
//!   modules that declare no `init_process` of their own get it too.
//!
//! A process is dead when `kill(pid, 0)` fails with `ESRCH`, or when
//! `/proc/<pid>/stat` shows a zombie or a start time other than the one
//! recorded (the pid went to a new process). Anything unsure counts as
//! alive: taking a live worker's share would undercount its peers.
//!
//! [`ledger`]: pdgate_core::balance::ledger

use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};

use ngx::ffi::{
    ngx_add_timer, ngx_cycle_t, ngx_event_t, ngx_int_t, ngx_log_t, ngx_module_t, ngx_pcalloc,
    ngx_shm_zone_t, NGX_LOG_NOTICE, NGX_LOG_WARN, NGX_OK, NGX_PROCESS_SINGLE, NGX_PROCESS_WORKER,
};
use pdgate_core::balance::ledger::{self, parse_proc_stat, Ledger, Owner, Reclaimed};
use pdgate_core::balance::pending::PendingTable;
use pdgate_core::balance::slots::SlotTable;

/// Milliseconds between two sweeps of a worker.
pub const PERIOD_MS: u64 = 1000;

/// The pid this process was named with (each module's copy of the crate
/// has its own, as it has its own copy of pdgate-core's ledger state).
static NAMED_PID: AtomicU64 = AtomicU64::new(0);

/// When this process last swept (nginx's msec clock), per module copy.
static LAST_SWEEP: AtomicU64 = AtomicU64::new(0);

/// Names the calling process in pdgate-core's ledgers if it is a worker
/// (or a single-process nginx) not named yet; its name.
pub fn ensure_named() -> Option<Owner> {
    // SAFETY: plain globals nginx sets in each process before it serves
    // (ngx_spawn_process sets ngx_pid in the child right after fork).
    let (pid, process) = unsafe { (ngx::ffi::ngx_pid, ngx::ffi::ngx_process) };
    if process != NGX_PROCESS_WORKER as ngx::ffi::ngx_uint_t
        && process != NGX_PROCESS_SINGLE as ngx::ffi::ngx_uint_t
    {
        return None;
    }
    let pid = u32::try_from(pid).ok()?;
    if NAMED_PID.load(Ordering::Relaxed) == u64::from(pid) {
        return ledger::current();
    }
    let start = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|t| parse_proc_stat(&t))
        .map_or(0, |(_, start)| start);
    let owner = Owner::new(pid, start);
    ledger::set_current(owner);
    NAMED_PID.store(u64::from(pid), Ordering::Relaxed);
    owner
}

/// Whether the process `o` names still runs (unsure: yes).
pub fn alive(o: Owner) -> bool {
    let pid = o.pid() as libc::pid_t;
    // SAFETY: signal 0 sends nothing; kill only checks the pid.
    let rc = unsafe { libc::kill(pid, 0) };
    if rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().as_deref().map(parse_proc_stat)
    {
        Some(Some((state, start))) => {
            !matches!(state, 'Z' | 'X' | 'x') && (o.start() == 0 || o.started_at(start))
        }
        _ => true,
    }
}

/// Whether a sweep is due in this process (and, if so, counts it done).
pub fn due() -> bool {
    // SAFETY: nginx's cached clock, a plain global of the worker.
    let now = unsafe { *std::ptr::addr_of!(ngx::ffi::ngx_current_msec) } as u64;
    let last = LAST_SWEEP.load(Ordering::Relaxed);
    if last != 0 && now.wrapping_sub(last) < PERIOD_MS {
        return false;
    }
    LAST_SWEEP.store(now.max(1), Ordering::Relaxed);
    true
}

/// Gives back what dead processes held in `slots` (and `pending`), logging
/// each at notice level with the zone's `name`.
pub fn sweep(
    name: &[u8],
    slots: &SlotTable,
    pending: Option<&PendingTable>,
    log: *mut ngx_log_t,
) -> Reclaimed {
    let (Some(me), Some(ledger)) = (ensure_named(), slots.ledger()) else {
        return Reclaimed::default();
    };
    sweep_ledger(me, name, &ledger, slots, pending, log)
}

fn sweep_ledger(
    me: Owner,
    name: &[u8],
    ledger: &Ledger,
    slots: &SlotTable,
    pending: Option<&PendingTable>,
    log: *mut ngx_log_t,
) -> Reclaimed {
    ledger.reclaim(me, slots, pending, &mut alive, &mut |dead, got| {
        ngx::ngx_log_error!(
            NGX_LOG_NOTICE,
            log,
            "zone \"{}\": process {} is gone, gave back {} requests, {} tokens, cost {}, {} in prefill{}",
            String::from_utf8_lossy(name),
            dead.pid(),
            got.requests,
            got.tokens,
            got.cost,
            got.pending,
            if got.unrecorded > 0 {
                format!(" ({} reservations were not recorded and stay)", got.unrecorded)
            } else {
                String::new()
            }
        );
    })
}

/// Sweeps the zones of the cycle that `module` declared: balancer zones
/// and counters zones. With `claim`, also takes this worker's ledger row
/// in each now, warning when none is free.
///
/// # Safety
/// `cycle` must be the running cycle.
pub unsafe fn sweep_module_zones(
    cycle: *const ngx_cycle_t,
    module: *const ngx_module_t,
    claim: bool,
) {
    // SAFETY: the cycle's list of shared zones and the zones live as long
    // as the cycle; each zone's state is recognised (inside its mapping,
    // with its magic) before it is used.
    unsafe {
        let Some(c) = cycle.as_ref() else { return };
        let log = c.log;
        let mut part: *const ngx::ffi::ngx_list_part_t = &c.shared_memory.part;
        while let Some(p) = part.as_ref() {
            let zones = p.elts as *mut ngx_shm_zone_t;
            for i in 0..p.nelts {
                let z = zones.add(i);
                if (*z).tag as *const ngx_module_t != module {
                    continue;
                }
                let name = crate::conf::str_bytes(&(*z).shm.name);
                let table = if crate::balancer::zone::is_balancer_zone(z) {
                    crate::balancer::zone::shared(z).map(|s| {
                        sweep(name, &s.slots, Some(&s.pending), log);
                        s.slots
                    })
                } else {
                    crate::counters::slot_zone(z).map(|sz| {
                        let t = sz.table();
                        sweep(name, &t, None, log);
                        t
                    })
                };
                if let (true, Some(ledger)) = (claim, table.and_then(|t| t.ledger())) {
                    if ledger.mine().is_none() {
                        ngx::ngx_log_error!(
                            NGX_LOG_WARN,
                            log,
                            "zone \"{}\": all {} ledger rows are taken, what this worker holds is not given back if it dies",
                            String::from_utf8_lossy(name),
                            ledger.rows()
                        );
                    }
                }
            }
            part = p.next;
        }
    }
}

/// A module's `init_process`: names the worker, sweeps the module's zones
/// (a worker respawned for one that was killed gives its share back at
/// once) and arms the periodic sweep.
///
/// # Safety
/// nginx's init_process contract: `cycle` is the running cycle and
/// `module` the module being initialised.
pub unsafe fn init_process(cycle: *mut ngx_cycle_t, module: *const ngx_module_t) -> ngx_int_t {
    // Cache manager and loader processes run init_process too; they
    // reserve nothing and sweep nothing.
    if ensure_named().is_none() {
        return NGX_OK as ngx_int_t;
    }
    // SAFETY: as documented; the event is allocated from the cycle's pool,
    // which lives as long as this worker, and is filled in before the
    // timer is added.
    unsafe {
        sweep_module_zones(cycle, module, true);
        LAST_SWEEP.store(0, Ordering::Relaxed);
        let Some(c) = cycle.as_ref() else { return NGX_OK as ngx_int_t };
        let ev = ngx_pcalloc(c.pool, std::mem::size_of::<ngx_event_t>()) as *mut ngx_event_t;
        if let Some(e) = ev.as_mut() {
            e.handler = Some(tick);
            e.data = module as *mut c_void;
            e.log = c.log;
            // A pending sweep must not hold up a graceful shutdown.
            e.set_cancelable(1);
            ngx_add_timer(ev, PERIOD_MS as ngx::ffi::ngx_msec_t);
        }
    }
    NGX_OK as ngx_int_t
}

unsafe extern "C" fn tick(ev: *mut ngx_event_t) {
    crate::guard::catch("reclaim timer", (), || {
        // SAFETY: the event init_process armed, data = the module; the
        // running cycle is nginx's global; the flags are plain globals.
        unsafe {
            let module = (*ev).data as *const ngx_module_t;
            sweep_module_zones(*std::ptr::addr_of!(ngx::ffi::ngx_cycle), module, false);
            if ngx::ffi::ngx_exiting == 0 && ngx::ffi::ngx_quit == 0 && ngx::ffi::ngx_terminate == 0
            {
                ngx_add_timer(ev, PERIOD_MS as ngx::ffi::ngx_msec_t);
            }
        }
    })
}
