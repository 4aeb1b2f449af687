//! Active health checks (`pd_health_check`), run by the health module.
//!
//! Every worker runs a timer ([`TICK_MS`]) that, for each upstream with
//! `pd_health_check`, walks round robin's peers (under its write lock when
//! the list is shared through a `zone`) and sets each peer's `down` flag
//! from the shared table of pdgate-core's [`health`](pdgate_core::health):
//! a peer that is not up (new, still loading, or failing) is skipped by
//! nginx's own balancers and by every pdgate balancer alike. Peers that the
//! configuration marks `down` are left alone.
//!
//! One worker of the whole nginx, the holder of the table's lease, also
//! probes: each peer once per `interval`, over a connection of its own on
//! nginx's event loop (`ngx_event_connect_peer`; no thread, nothing on the
//! request path), an HTTP/1.0 `GET` of the check's `uri`, done as soon as the
//! status line is read. The holder renews the lease on every tick; when it
//! dies or hangs, another worker takes the lease after [`LEASE_TTL_MS`].
//! Connection errors of probes are logged at no level (a down engine would
//! fill the log); a change of a peer's status is logged at `warn` (down) or
//! `notice` (up).

use std::cell::RefCell;
use std::collections::HashSet;
use std::ffi::c_char;
use std::ptr::{addr_of, addr_of_mut, null_mut};

use ngx::ffi::{
    ngx_add_timer, ngx_conf_t, ngx_cycle_t, ngx_event_t, ngx_http_conf_ctx_t, ngx_http_module,
    ngx_http_upstream_main_conf_t, ngx_http_upstream_module, ngx_http_upstream_rr_peer_t,
    ngx_http_upstream_rr_peers_t, ngx_http_upstream_server_t, ngx_http_upstream_srv_conf_t,
    ngx_int_t, ngx_log_t, ngx_module_t, ngx_msec_t, ngx_pcalloc, ngx_uint_t, NGX_ERROR,
    NGX_HTTP_UPSTREAM_CREATE, NGX_LOG_CRIT, NGX_LOG_NOTICE, NGX_LOG_WARN, NGX_OK,
    NGX_PROCESS_SINGLE, NGX_PROCESS_WORKER,
};
use pdgate_core::balance::slots::peer_key;
use pdgate_core::health::{CheckConf, HealthRow, HealthZone, Snapshot};

use crate::conf::str_bytes;

mod pages;
mod probe;

pub use pages::{check_ready_names, cmd_ready, readiness, reset, status_text, ReadyConf};
use probe::start_probe;

/// An upstream's settings in the health module (its server conf).
#[derive(Debug, Default)]
pub struct UpstreamHealth {
    pub check: Option<CheckConf>,
}

/// The table's shared zone.
pub const ZONE_NAME: &[u8] = b"pdgate_health";

/// Milliseconds between two ticks of a worker.
pub const TICK_MS: u64 = 100;

/// A lease not renewed for this long is taken over.
pub const LEASE_TTL_MS: u64 = 2_000;

/// Bytes of an answer read for its status line at most.
const ANSWER_BYTES: usize = 1024;

/// The zone's size: the table, and room for the slab allocator.
pub fn zone_size() -> usize {
    let need = std::mem::size_of::<HealthZone>() + (64 << 10);
    need.div_ceil(4096) * 4096
}

/// `pd_health_check [interval=…] [timeout=…] [fails=…] [passes=…] [uri=…] [port=…]`
/// in an `upstream` block: stores the settings and declares the zone.
///
/// # Safety
/// nginx's directive handler contract; `conf` is this module's server conf
/// of the upstream, `module` the module's static.
pub unsafe fn cmd_check(
    cf: *mut ngx_conf_t,
    conf: *mut UpstreamHealth,
    module: &ngx_module_t,
) -> *mut c_char {
    // SAFETY: as documented; the arguments live in the configuration pool.
    unsafe {
        let Some(conf) = conf.as_mut() else { return ngx::core::NGX_CONF_ERROR };
        if conf.check.is_some() {
            return crate::conf::error(cf, "is duplicate");
        }
        let args = crate::conf::args(cf);
        let params: Vec<&[u8]> = args.iter().skip(1).map(|a| str_bytes(a)).collect();
        match CheckConf::parse(&params) {
            Ok(c) => conf.check = Some(c),
            Err(e) => return crate::conf::error(cf, &e.to_string()),
        }
        match crate::zone::find_or_add::<HealthZone>(cf, ZONE_NAME, zone_size(), module) {
            Ok(_) => crate::conf::OK,
            Err(_) => ngx::core::NGX_CONF_ERROR,
        }
    }
}

/// An upstream this worker checks.
struct Checked {
    uscf: *mut ngx_http_upstream_srv_conf_t,
    name: Vec<u8>,
    conf: CheckConf,
    /// Addresses of servers the configuration marks `down`.
    config_down: Vec<Vec<u8>>,
}

/// A worker's prober state.
struct Prober {
    zone: *const HealthZone,
    upstreams: Vec<Checked>,
    pid: u64,
    /// The log probes' connections write to: the cycle's, above `crit`.
    quiet_log: *mut ngx_log_t,
    /// Told once that the table is full.
    full_logged: bool,
    /// Held the lease at the last tick.
    holder: bool,
}

thread_local! {
    static PROBER: RefCell<Option<Prober>> = const { RefCell::new(None) };
    /// Peers (keys) with a probe in flight from this worker.
    static INFLIGHT: RefCell<HashSet<u64>> = RefCell::new(HashSet::new());
}

/// The health zone of `cycle` declared by `module`, once initialised.
///
/// # Safety
/// `cycle` must be the running cycle.
unsafe fn find_zone(cycle: *mut ngx_cycle_t, module: *const ngx_module_t) -> *const HealthZone {
    // SAFETY: the cycle's list of shared zones lives as long as the cycle;
    // a zone with our tag and name was declared for a HealthZone, whose
    // state its init placed at `data` (attached).
    unsafe {
        let Some(c) = cycle.as_ref() else { return std::ptr::null() };
        let mut part: *const ngx::ffi::ngx_list_part_t = &c.shared_memory.part;
        while let Some(p) = part.as_ref() {
            let zones = p.elts as *mut ngx::ffi::ngx_shm_zone_t;
            for i in 0..p.nelts {
                let z = zones.add(i);
                if (*z).tag as *const ngx_module_t == module
                    && str_bytes(&(*z).shm.name) == ZONE_NAME
                {
                    return (*z).data as *const HealthZone;
                }
            }
            part = p.next;
        }
        std::ptr::null()
    }
}

/// The upstream blocks of `cycle` and this module's settings of each.
///
/// # Safety
/// `cycle` must be the running cycle, `module` the health module.
unsafe fn checked_upstreams(cycle: *mut ngx_cycle_t, module: &ngx_module_t) -> Vec<Checked> {
    let mut out = Vec::new();
    // SAFETY: the http configuration context and the upstream main conf
    // live as long as the cycle; each upstream block has a server conf
    // slot per HTTP module (this module's an UpstreamHealth).
    unsafe {
        let Some(c) = cycle.as_ref() else { return out };
        let ctx = *c.conf_ctx.add((*addr_of!(ngx_http_module)).index) as *mut ngx_http_conf_ctx_t;
        let Some(ctx) = ctx.as_ref() else { return out };
        let umcf = *ctx.main_conf.add((*addr_of!(ngx_http_upstream_module)).ctx_index)
            as *mut ngx_http_upstream_main_conf_t;
        let Some(umcf) = umcf.as_ref() else { return out };
        let ups = std::slice::from_raw_parts(
            umcf.upstreams.elts as *const *mut ngx_http_upstream_srv_conf_t,
            umcf.upstreams.nelts,
        );
        for &us in ups {
            let Some(u) = us.as_ref() else { continue };
            if u.flags & NGX_HTTP_UPSTREAM_CREATE as ngx_uint_t == 0 || u.srv_conf.is_null() {
                continue;
            }
            let hc = *u.srv_conf.add(module.ctx_index) as *const UpstreamHealth;
            let Some(check) = hc.as_ref().and_then(|h| h.check.clone()) else { continue };
            let mut config_down = Vec::new();
            if let Some(servers) = u.servers.as_ref() {
                let list = std::slice::from_raw_parts(
                    servers.elts as *const ngx_http_upstream_server_t,
                    servers.nelts,
                );
                for s in list.iter().filter(|s| s.down != 0) {
                    for a in 0..s.naddrs {
                        config_down.push(str_bytes(&(*s.addrs.add(a)).name).to_vec());
                    }
                }
            }
            out.push(Checked {
                uscf: us,
                name: str_bytes(&u.host).to_vec(),
                conf: check,
                config_down,
            });
        }
    }
    out
}

/// The health module's `init_process`: finds the zone and the checked
/// upstreams, applies the table to the peers at once (a new worker serves
/// nothing before its peers' health is known) and arms the tick.
///
/// # Safety
/// nginx's init_process contract; `module` is the health module's static.
pub unsafe fn init_process(cycle: *mut ngx_cycle_t, module: &ngx_module_t) -> ngx_int_t {
    // SAFETY: plain globals nginx sets in each process before it serves.
    let (pid, process) = unsafe { (ngx::ffi::ngx_pid, ngx::ffi::ngx_process) };
    if process != NGX_PROCESS_WORKER as ngx_uint_t && process != NGX_PROCESS_SINGLE as ngx_uint_t {
        return NGX_OK as ngx_int_t;
    }
    // SAFETY: as documented; allocations from the cycle's pool live as long
    // as this worker; the event is filled in before its timer is added.
    unsafe {
        let zone = find_zone(cycle, module);
        if zone.is_null() {
            return NGX_OK as ngx_int_t;
        }
        let upstreams = checked_upstreams(cycle, module);
        if upstreams.is_empty() {
            return NGX_OK as ngx_int_t;
        }
        let Some(c) = cycle.as_ref() else { return NGX_OK as ngx_int_t };
        let quiet = ngx_pcalloc(c.pool, std::mem::size_of::<ngx_log_t>()) as *mut ngx_log_t;
        let ev = ngx_pcalloc(c.pool, std::mem::size_of::<ngx_event_t>()) as *mut ngx_event_t;
        let (Some(q), Some(e)) = (quiet.as_mut(), ev.as_mut()) else {
            return NGX_ERROR as ngx_int_t;
        };
        *q = *c.log;
        q.log_level = NGX_LOG_CRIT as ngx_uint_t;
        PROBER.with(|p| {
            *p.borrow_mut() = Some(Prober {
                zone,
                upstreams,
                pid: u64::try_from(pid).unwrap_or(0),
                quiet_log: quiet,
                full_logged: false,
                holder: false,
            })
        });
        run_tick();
        e.handler = Some(tick);
        e.log = c.log;
        // A pending tick must not hold up a graceful shutdown.
        e.set_cancelable(1);
        ngx_add_timer(ev, TICK_MS as ngx_msec_t);
    }
    NGX_OK as ngx_int_t
}

unsafe extern "C" fn tick(ev: *mut ngx_event_t) {
    crate::guard::catch("pd_health_check timer", (), || {
        let go_on = run_tick();
        // SAFETY: the event init_process armed, in the cycle's pool.
        unsafe {
            if go_on {
                ngx_add_timer(ev, TICK_MS as ngx_msec_t);
            }
        }
    })
}

fn exiting() -> bool {
    // SAFETY: plain globals of the worker, set by its signal handling.
    unsafe { ngx::ffi::ngx_exiting != 0 || ngx::ffi::ngx_quit != 0 || ngx::ffi::ngx_terminate != 0 }
}

/// A probe to start.
struct Target {
    uscf: *mut ngx_http_upstream_srv_conf_t,
    key: u64,
    row: *const HealthRow,
    addr: libc::sockaddr_storage,
    socklen: ngx::ffi::socklen_t,
    peer: Vec<u8>,
    upstream: Vec<u8>,
    conf: CheckConf,
}

/// One tick: applies the table to the peers and, as the lease holder,
/// starts the probes that are due. False when the worker is exiting.
fn run_tick() -> bool {
    let now = crate::observe::now_ms();
    let mut due = Vec::new();
    let go_on = PROBER.with(|p| {
        let mut p = p.borrow_mut();
        let Some(p) = p.as_mut() else { return false };
        // SAFETY: the zone lives as long as the cycle this worker runs.
        let Some(zone) = (unsafe { p.zone.as_ref() }) else { return false };
        if exiting() {
            zone.lease.release(p.pid);
            return false;
        }
        let holder = zone.lease.claim(p.pid, now, LEASE_TTL_MS);
        if holder && !p.holder {
            // SAFETY: the running cycle's log.
            unsafe {
                ngx::ngx_log_error!(
                    NGX_LOG_NOTICE,
                    (**addr_of!(ngx::ffi::ngx_cycle)).log,
                    "pd_health_check: worker {} probes for every worker",
                    p.pid
                );
            }
        }
        p.holder = holder;
        let table = zone.table();
        let inflight = INFLIGHT.with(|f| f.borrow().clone());
        let mut full = false;
        for u in &p.upstreams {
            let probe = holder.then_some((&inflight, &mut due));
            walk_upstream(u, &table, now, probe, &mut full);
        }
        if full && !p.full_logged {
            p.full_logged = true;
            // SAFETY: the running cycle's log.
            unsafe {
                ngx::ngx_log_error!(
                    NGX_LOG_WARN,
                    (**addr_of!(ngx::ffi::ngx_cycle)).log,
                    "pd_health_check: the health table is full ({} peers), further peers are not checked",
                    pdgate_core::health::ZONE_ROWS
                );
            }
        }
        true
    });
    let quiet = PROBER.with(|p| p.borrow().as_ref().map_or(null_mut(), |p| p.quiet_log));
    for t in due {
        start_probe(t, quiet);
    }
    go_on
}

/// Sets the `down` flag of every peer of `u` from the table (under round
/// robin's write lock when the list is shared) and, with `probe`, adds the
/// peers whose probe is due and not in flight.
fn walk_upstream(
    u: &Checked,
    table: &pdgate_core::health::HealthTable,
    now: u64,
    mut probe: Option<(&HashSet<u64>, &mut Vec<Target>)>,
    full: &mut bool,
) {
    // SAFETY: uscf lives as long as the cycle; round robin's peer list (in
    // the zone when shared) is walked and its `down` flags written under
    // its write lock.
    unsafe {
        let peers = (*u.uscf).peer.data as *mut ngx_http_upstream_rr_peers_t;
        if peers.is_null() {
            return;
        }
        let _w = crate::upstream::PeersWrite::lock(peers);
        let mut list = peers;
        while let Some(l) = list.as_ref() {
            let mut peer = l.peer;
            while let Some(pe) = peer.as_mut() {
                let due = probe.as_mut().map(|(inflight, due)| (&**inflight, &mut **due));
                apply_peer(u, pe, table, now, due, full);
                peer = pe.next;
            }
            list = l.next;
        }
    }
}

/// After a probe changed a peer's health: the peers of its upstream at once
/// (the shared list for every worker when it has a zone), not at the next
/// tick.
fn apply_now(uscf: *mut ngx_http_upstream_srv_conf_t) {
    let now = crate::observe::now_ms();
    PROBER.with(|p| {
        let p = p.borrow();
        let Some(p) = p.as_ref() else { return };
        // SAFETY: the zone lives as long as the cycle.
        let Some(zone) = (unsafe { p.zone.as_ref() }) else { return };
        let mut full = false;
        for u in p.upstreams.iter().filter(|u| u.uscf == uscf) {
            walk_upstream(u, &zone.table(), now, None, &mut full);
        }
    });
}

fn apply_peer(
    u: &Checked,
    pe: &mut ngx_http_upstream_rr_peer_t,
    table: &pdgate_core::health::HealthTable,
    now: u64,
    probe: Option<(&HashSet<u64>, &mut Vec<Target>)>,
    full: &mut bool,
) {
    // SAFETY: the peer's name and address live as long as the peer, which
    // the caller holds under the list's lock.
    let name = unsafe { str_bytes(&pe.name) };
    if u.config_down.iter().any(|d| d == name) {
        return;
    }
    let key = peer_key(&u.name, name);
    let Some(row) = table.find_or_claim(key, now, u.conf.stale_ms()) else {
        *full = true;
        return;
    };
    pe.down = ngx_uint_t::from(!row.eligible(now));
    let Some((inflight, due)) = probe else { return };
    if inflight.contains(&key) {
        return;
    }
    // Due once `interval` passed since the last probe ended, give or take
    // half a tick (ticks, not probes, set the pace: without the half tick a
    // probe that ended just after a tick would wait a whole extra tick).
    let checked = row.checked_ms();
    if checked != 0 && now.saturating_sub(checked) + TICK_MS / 2 < u.conf.interval_ms {
        return;
    }
    let socklen = pe.socklen as usize;
    if pe.sockaddr.is_null()
        || socklen == 0
        || socklen > std::mem::size_of::<libc::sockaddr_storage>()
    {
        return;
    }
    // SAFETY: all-zero bytes are a valid sockaddr_storage; `socklen` bytes
    // of the peer's address are readable and fit in it (checked above).
    let addr = unsafe {
        let mut a: libc::sockaddr_storage = std::mem::zeroed();
        std::ptr::copy_nonoverlapping(
            pe.sockaddr as *const u8,
            addr_of_mut!(a) as *mut u8,
            socklen,
        );
        a
    };
    due.push(Target {
        uscf: u.uscf,
        key,
        row,
        addr,
        socklen: pe.socklen,
        peer: name.to_vec(),
        upstream: u.name.clone(),
        conf: u.conf.clone(),
    });
}

/// Every checked peer of this worker's configuration: upstream, peer and
/// its health now, for status pages and readiness.
pub fn snapshot() -> Vec<(Vec<u8>, Vec<u8>, Option<Snapshot>)> {
    let now = crate::observe::now_ms();
    PROBER.with(|p| {
        let p = p.borrow();
        let Some(p) = p.as_ref() else { return Vec::new() };
        // SAFETY: the zone lives as long as the cycle.
        let Some(zone) = (unsafe { p.zone.as_ref() }) else { return Vec::new() };
        let table = zone.table();
        let mut out = Vec::new();
        for u in &p.upstreams {
            // SAFETY: as in run_tick, read under round robin's read lock.
            unsafe {
                let peers = (*u.uscf).peer.data as *mut ngx_http_upstream_rr_peers_t;
                if peers.is_null() {
                    continue;
                }
                let _r = crate::upstream::PeersRead::lock(peers);
                let mut list = peers;
                while let Some(l) = list.as_ref() {
                    let mut peer = l.peer;
                    while let Some(pe) = peer.as_ref() {
                        let name = str_bytes(&pe.name);
                        let snap = if u.config_down.iter().any(|d| d == name) {
                            None
                        } else {
                            table.find(peer_key(&u.name, name)).map(|r| r.snapshot(now))
                        };
                        out.push((u.name.clone(), name.to_vec(), snap));
                        peer = pe.next;
                    }
                    list = l.next;
                }
            }
        }
        out
    })
}

thread_local! {
    /// The health zone found by name, for the cycle it was found in.
    static BY_NAME: std::cell::Cell<(usize, usize)> = const { std::cell::Cell::new((0, 0)) };
}

/// The running cycle's health zone found by its name, from any module (the
/// health module's own copy of this crate is not the caller's): `None` when
/// the configuration has no health checks.
fn zone_by_name() -> Option<&'static HealthZone> {
    // SAFETY: the running cycle and its list of shared zones live until the
    // next cycle (the cache is keyed by the cycle); a zone of this name
    // whose data holds the health layout (its magic) is a HealthZone.
    unsafe {
        let cycle = *addr_of!(ngx::ffi::ngx_cycle);
        let (cached_cycle, zone) = BY_NAME.with(|c| c.get());
        if cached_cycle == cycle as usize {
            return (zone as *const HealthZone).as_ref();
        }
        let mut found: *const HealthZone = std::ptr::null();
        if let Some(c) = cycle.as_ref() {
            let mut part: *const ngx::ffi::ngx_list_part_t = &c.shared_memory.part;
            'walk: while let Some(p) = part.as_ref() {
                let zones = p.elts as *mut ngx::ffi::ngx_shm_zone_t;
                for i in 0..p.nelts {
                    let z = zones.add(i);
                    if str_bytes(&(*z).shm.name) == ZONE_NAME {
                        let h = (*z).data as *const HealthZone;
                        if h.as_ref().is_some_and(HealthZone::is_attached) {
                            found = h;
                        }
                        break 'walk;
                    }
                }
                part = p.next;
            }
        }
        BY_NAME.with(|c| c.set((cycle as usize, found as usize)));
        found.as_ref()
    }
}

/// Whether `peer` of the health-checked upstream `upstream` may take
/// traffic now (for modules that choose servers themselves, such as the
/// SGLang mode's lists): `None` when it has no health row (not checked).
pub fn peer_eligible(upstream: &[u8], peer: &[u8]) -> Option<bool> {
    let zone = zone_by_name()?;
    let row = zone.table().find(peer_key(upstream, peer))?;
    Some(row.eligible(crate::observe::now_ms()))
}

/// The pid of the worker probing now (0: none).
pub fn prober_pid() -> u64 {
    PROBER.with(|p| {
        p.borrow()
            .as_ref()
            // SAFETY: the zone lives as long as the cycle.
            .and_then(|p| unsafe { p.zone.as_ref() })
            .map_or(0, |z| z.lease.owner())
    })
}
