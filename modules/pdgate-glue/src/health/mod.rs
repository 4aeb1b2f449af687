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
//!
//! With `pd_engine_metrics` the same worker also scrapes each peer's
//! Prometheus `/metrics` once per its `interval` and publishes what
//! routing reads in the peer's engine row (pdgate-core's
//! [`engine`](pdgate_core::engine)); every balancer of every worker reads it
//! ([`EngineRows`]).

use std::cell::RefCell;
use std::collections::HashSet;
use std::ptr::{addr_of, addr_of_mut, null_mut};

use ngx::ffi::{
    ngx_add_timer, ngx_cycle_t, ngx_event_t, ngx_http_upstream_main_conf_t,
    ngx_http_upstream_rr_peer_t, ngx_http_upstream_rr_peers_t, ngx_http_upstream_server_t,
    ngx_http_upstream_srv_conf_t, ngx_log_t, ngx_module_t, ngx_msec_t, ngx_pcalloc, ngx_uint_t,
    NGX_LOG_CRIT, NGX_LOG_NOTICE, NGX_LOG_WARN, NGX_PROCESS_SINGLE, NGX_PROCESS_WORKER,
};
use pdgate_core::balance::slots::peer_key;
use pdgate_core::engine::{EngineRow, EngineSnapshot, MetricsConf};
use pdgate_core::health::{CheckConf, HealthRow, HealthZone, PeerHealth, Seen};

use crate::conf::str_bytes;
use crate::http::{Conf, ConfError};
use crate::NgxError;

mod kvsub;
mod pages;
mod probe;

pub use pages::{check_ready_names, readiness, ready_directive, reset, status_text, ReadyConf};
use probe::start_probe;

/// An upstream's settings in the health module (its server conf).
#[derive(Debug, Default)]
pub struct UpstreamHealth {
    pub check: Option<CheckConf>,
    pub metrics: Option<MetricsConf>,
    pub kv: Option<pdgate_core::kv::conf::KvConf>,
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
/// in an `upstream` block: stores the settings in the block's `conf` and
/// declares the zone (once per configuration) for `module`.
pub fn check_directive(
    cf: &mut Conf,
    conf: &mut UpstreamHealth,
    module: &ngx_module_t,
) -> Result<(), ConfError> {
    once(cf, &mut conf.check, |a| CheckConf::parse(a).map_err(|e| e.0), module)
}

/// `pd_engine_metrics [interval=…] [timeout=…] [uri=…] [port=…] [model=…]
/// [kv_high=…]` in an `upstream` block: as [`check_directive`].
pub fn metrics_directive(
    cf: &mut Conf,
    conf: &mut UpstreamHealth,
    module: &ngx_module_t,
) -> Result<(), ConfError> {
    once(cf, &mut conf.metrics, |a| MetricsConf::parse(a).map_err(|e| e.0), module)
}

/// `pd_kv_events [port=…] [replay_port=…] [topic=…] [blocks=…]
/// [block_size=…] [hash=…] [seed=…]` in an `upstream` block: the settings,
/// the health zone (its lease elects the subscriber) and the block's KV
/// index zone.
pub fn kv_directive(
    cf: &mut Conf,
    conf: &mut UpstreamHealth,
    module: &ngx_module_t,
) -> Result<(), ConfError> {
    once(cf, &mut conf.kv, pdgate_core::kv::conf::KvConf::parse, module)?;
    let Some(kv) = conf.kv.as_ref() else { return Ok(()) };
    // SAFETY: a directive handler's conf, in upstream context (the
    // directive is declared for upstream blocks only).
    unsafe { crate::kv::declare(cf.as_ptr(), kv, module) }.map_err(ConfError::Directive)
}

/// A directive set at most once per block: its arguments parsed into
/// `slot`, and the zone declared (`Ok(None)` from `add_zone`: an earlier
/// directive of this configuration declared it).
fn once<T>(
    cf: &mut Conf,
    slot: &mut Option<T>,
    parse: impl FnOnce(&[&[u8]]) -> Result<T, String>,
    module: &ngx_module_t,
) -> Result<(), ConfError> {
    if slot.is_some() {
        return Err(ConfError::Directive("is duplicate".into()));
    }
    *slot = Some(parse(&cf.args()).map_err(ConfError::Directive)?);
    cf.add_zone::<HealthZone>(ZONE_NAME, zone_size(), module).map_err(|_| ConfError::Logged)?;
    Ok(())
}

/// An upstream this worker checks, scrapes, or both.
struct Checked {
    uscf: *mut ngx_http_upstream_srv_conf_t,
    name: Vec<u8>,
    check: Option<CheckConf>,
    metrics: Option<MetricsConf>,
    /// Addresses of servers the configuration marks `down`.
    config_down: Vec<Vec<u8>>,
}

/// A worker's prober state.
struct Prober {
    zone: &'static HealthZone,
    upstreams: Vec<Checked>,
    pid: u64,
    /// The log probes' connections write to: the cycle's, above `crit`.
    quiet_log: *mut ngx_log_t,
    /// Told once that the table is full.
    full_logged: bool,
    /// Held the lease at the last tick.
    holder: bool,
    /// The upstreams with `pd_kv_events`.
    kv: Vec<kvsub::KvUpstream>,
}

thread_local! {
    static PROBER: RefCell<Option<Prober>> = const { RefCell::new(None) };
    /// Peers (keys) with a probe (false) or scrape (true) in flight from
    /// this worker.
    static INFLIGHT: RefCell<Inflight> = RefCell::new(HashSet::new());
}

/// Peers (key, is a scrape) with a probe or scrape in flight.
type Inflight = HashSet<(u64, bool)>;

/// The running cycle's health zone, from whichever module asks (the health
/// module's own copy of this crate or another's): `None` when the
/// configuration has no health checks.
fn shared_zone() -> Option<&'static HealthZone> {
    let z = crate::zone::find_in_cycle(ZONE_NAME)?;
    // SAFETY: a zone of this name whose data holds the health layout (its
    // magic) is the HealthZone the health module placed; it lives as long
    // as the cycle.
    unsafe { ((*z).data as *const HealthZone).as_ref() }.filter(|h| h.is_attached())
}

/// The `upstream {}` blocks of `umcf` with `pd_health_check`, and its
/// settings there.
///
/// # Safety
/// `umcf` must be NULL or a live upstream main conf; `module` the health
/// module.
unsafe fn checked_blocks<'a>(
    umcf: *const ngx_http_upstream_main_conf_t,
    module: &ngx_module_t,
) -> Vec<(*mut ngx_http_upstream_srv_conf_t, &'a CheckConf)> {
    // SAFETY: as documented; the health module's server conf of a block is
    // an UpstreamHealth.
    unsafe {
        crate::upstream::blocks(umcf)
            .into_iter()
            .filter_map(|us| {
                let h = crate::upstream::srv_conf::<UpstreamHealth>(us, module)?;
                Some((us, h.check.as_ref()?))
            })
            .collect()
    }
}

/// The checked or scraped upstreams of `cycle`, as a worker probes them.
///
/// # Safety
/// `cycle` must be the running cycle, `module` the health module.
unsafe fn checked_upstreams(cycle: *mut ngx_cycle_t, module: &ngx_module_t) -> Vec<Checked> {
    // SAFETY: as documented; the blocks and their server lists live as long
    // as the cycle; the health module's server conf of a block is an
    // UpstreamHealth.
    unsafe {
        let umcf = crate::upstream::cycle_main_conf(cycle);
        crate::upstream::blocks(umcf)
            .into_iter()
            .filter_map(|us| {
                let h = crate::upstream::srv_conf::<UpstreamHealth>(us, module)?;
                (h.check.is_some() || h.metrics.is_some()).then_some((us, h))
            })
            .map(|(us, h)| {
                let mut config_down = Vec::new();
                if let Some(servers) = (*us).servers.as_ref() {
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
                Checked {
                    uscf: us,
                    name: str_bytes(&(*us).host).to_vec(),
                    check: h.check.clone(),
                    metrics: h.metrics.clone(),
                    config_down,
                }
            })
            .collect()
    }
}

/// The upstreams of `cycle` with `pd_kv_events`.
///
/// # Safety
/// `cycle` must be the running cycle, `module` the health module.
unsafe fn kv_upstreams(cycle: *mut ngx_cycle_t, module: &ngx_module_t) -> Vec<kvsub::KvUpstream> {
    // SAFETY: as documented; the health module's server conf of a block is
    // an UpstreamHealth.
    unsafe {
        let umcf = crate::upstream::cycle_main_conf(cycle);
        crate::upstream::blocks(umcf)
            .into_iter()
            .filter_map(|us| {
                let h = crate::upstream::srv_conf::<UpstreamHealth>(us, module)?;
                Some(kvsub::KvUpstream {
                    uscf: us,
                    name: str_bytes(&(*us).host).to_vec(),
                    conf: h.kv.clone()?,
                })
            })
            .collect()
    }
}

/// The health module's `init_process` (in each worker): finds the zone and
/// the checked upstreams of the running cycle, applies the table to the
/// peers at once (a new worker serves nothing before its peers' health is
/// known) and arms the tick.
pub fn init_process(module: &ngx_module_t) -> Result<(), NgxError> {
    // SAFETY: plain globals nginx sets in each process before it serves;
    // ngx_cycle is the running cycle.
    let (pid, process, cycle) =
        unsafe { (ngx::ffi::ngx_pid, ngx::ffi::ngx_process, *addr_of!(ngx::ffi::ngx_cycle)) };
    if process != NGX_PROCESS_WORKER as ngx_uint_t && process != NGX_PROCESS_SINGLE as ngx_uint_t {
        return Ok(());
    }
    // SAFETY: as documented; allocations from the cycle's pool live as long
    // as this worker; the event is filled in before its timer is added.
    unsafe {
        let Some(zone) = shared_zone() else { return Ok(()) };
        let upstreams = checked_upstreams(cycle, module);
        let kv = kv_upstreams(cycle, module);
        if upstreams.is_empty() && kv.is_empty() {
            return Ok(());
        }
        let Some(c) = cycle.as_ref() else { return Ok(()) };
        let quiet = ngx_pcalloc(c.pool, std::mem::size_of::<ngx_log_t>()) as *mut ngx_log_t;
        let ev = ngx_pcalloc(c.pool, std::mem::size_of::<ngx_event_t>()) as *mut ngx_event_t;
        let (Some(q), Some(e)) = (quiet.as_mut(), ev.as_mut()) else {
            return Err(NgxError);
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
                kv,
            })
        });
        run_tick();
        e.handler = Some(tick);
        e.log = c.log;
        // A pending tick must not hold up a graceful shutdown.
        e.set_cancelable(1);
        ngx_add_timer(ev, TICK_MS as ngx_msec_t);
    }
    Ok(())
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

/// What a connection to a peer is for.
enum Job {
    /// A health probe: its status line, recorded in the health row.
    Health { row: *const HealthRow, conf: CheckConf },
    /// A scrape: the whole `/metrics` answer, published in the engine row;
    /// `sent` is the row's placed/ended counters when it was sent.
    Metrics { row: *const EngineRow, conf: MetricsConf, sent: (u64, u64) },
}

impl Job {
    /// What the probe or scrape is: interval, timeout, path, port.
    fn probe(&self) -> &pdgate_core::health::Probe {
        match self {
            Job::Health { conf, .. } => &conf.probe,
            Job::Metrics { conf, .. } => &conf.probe,
        }
    }

    fn request(&self, host: &[u8]) -> Vec<u8> {
        match self {
            Job::Health { conf, .. } => conf.request(host),
            Job::Metrics { conf, .. } => conf.request(host),
        }
    }

    fn is_metrics(&self) -> bool {
        matches!(self, Job::Metrics { .. })
    }
}

/// A probe or scrape to start.
struct Target {
    uscf: *mut ngx_http_upstream_srv_conf_t,
    key: u64,
    addr: libc::sockaddr_storage,
    socklen: ngx::ffi::socklen_t,
    peer: Vec<u8>,
    upstream: Vec<u8>,
    job: Job,
}

/// One tick: applies the table to the peers and, as the lease holder,
/// starts the probes that are due. False when the worker is exiting.
fn run_tick() -> bool {
    let now = crate::observe::now_ms();
    let mut due = Vec::new();
    let go_on = PROBER.with(|p| {
        let mut p = p.borrow_mut();
        let Some(p) = p.as_mut() else { return false };
        let zone = p.zone;
        if exiting() {
            kvsub::close_all();
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
        kvsub::tick(holder, &p.kv);
        let inflight = INFLIGHT.with(|f| f.borrow().clone());
        let mut full = false;
        for u in &p.upstreams {
            let probe = holder.then_some((&inflight, &mut due));
            walk_upstream(u, zone, now, probe, &mut full);
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
    zone: &HealthZone,
    now: u64,
    mut probe: Option<(&Inflight, &mut Vec<Target>)>,
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
        crate::upstream::each_peer(peers, |pe| {
            let due = probe.as_mut().map(|(inflight, due)| (&**inflight, &mut **due));
            apply_peer(u, pe, zone, now, due, full);
        });
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
        let zone = p.zone;
        let mut full = false;
        for u in p.upstreams.iter().filter(|u| u.uscf == uscf) {
            walk_upstream(u, zone, now, None, &mut full);
        }
    });
}

fn apply_peer(
    u: &Checked,
    pe: &mut ngx_http_upstream_rr_peer_t,
    zone: &HealthZone,
    now: u64,
    probe: Option<(&Inflight, &mut Vec<Target>)>,
    full: &mut bool,
) {
    // SAFETY: the peer's name and address live as long as the peer, which
    // the caller holds under the list's lock.
    let name = unsafe { str_bytes(&pe.name) };
    if u.config_down.iter().any(|d| d == name) {
        return;
    }
    let key = peer_key(&u.name, name);
    let stale = u.check.as_ref().map_or(0, CheckConf::stale_ms);
    let Some(i) = zone.table().find_or_claim_index(key, now, stale) else {
        *full = true;
        return;
    };
    let (Some(row), Some(engine)) = (zone.table().find(key), zone.engine(i)) else { return };
    if u.check.is_some() {
        pe.down = ngx_uint_t::from(!row.eligible(now));
    }
    let Some((inflight, due)) = probe else { return };
    let mut jobs: Vec<Job> = Vec::new();
    if let Some(conf) = &u.check {
        // Due once `interval` passed since the last probe ended, give or
        // take half a tick (ticks, not probes, set the pace: without the
        // half tick a probe that ended just after a tick would wait a
        // whole extra tick).
        let checked = row.checked_ms();
        let due =
            checked == 0 || now.saturating_sub(checked) + TICK_MS / 2 >= conf.probe.interval_ms;
        if due && !inflight.contains(&(key, false)) {
            jobs.push(Job::Health { row, conf: conf.clone() });
        }
    }
    if let Some(conf) = &u.metrics {
        if !inflight.contains(&(key, true)) && engine.due(now, conf.probe.interval_ms, TICK_MS / 2)
        {
            jobs.push(Job::Metrics { row: engine, conf: conf.clone(), sent: engine.counters() });
        }
    }
    if jobs.is_empty() {
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
    for job in jobs {
        due.push(Target {
            uscf: u.uscf,
            key,
            addr,
            socklen: pe.socklen,
            peer: name.to_vec(),
            upstream: u.name.clone(),
            job,
        });
    }
}

/// Calls `f` with every peer (its name) of this worker's upstreams that
/// `which` selects, read under round robin's read lock.
fn each_prober_peer(
    p: &Prober,
    which: impl Fn(&Checked) -> bool,
    mut f: impl FnMut(&Checked, &[u8]),
) {
    for u in p.upstreams.iter().filter(|u| which(u)) {
        // SAFETY: uscf is a block of the running cycle.
        unsafe { crate::upstream::each_peer_name(u.uscf, |name| f(u, name)) };
    }
}

/// Every checked peer of this worker's configuration: upstream, peer and
/// its health now, for status pages and readiness.
pub fn snapshot() -> Vec<PeerHealth> {
    let now = crate::observe::now_ms();
    PROBER.with(|p| {
        let p = p.borrow();
        let Some(p) = p.as_ref() else { return Vec::new() };
        let table = p.zone.table();
        let mut out = Vec::new();
        each_prober_peer(
            p,
            |u| u.check.is_some(),
            |u, name| {
                let seen = if u.config_down.iter().any(|d| d == name) {
                    Seen::ConfiguredDown
                } else {
                    table
                        .find(peer_key(&u.name, name))
                        .map_or(Seen::Unchecked, |r| Seen::Checked(r.snapshot(now)))
                };
                out.push(PeerHealth { upstream: u.name.clone(), peer: name.to_vec(), seen });
            },
        );
        out
    })
}

/// Whether `peer` of the health-checked upstream `upstream` may take
/// traffic now (for modules that choose servers themselves, such as the
/// SGLang mode's lists): `None` when it has no health row (not checked).
pub fn peer_eligible(upstream: &[u8], peer: &[u8]) -> Option<bool> {
    let zone = shared_zone()?;
    let row = zone.table().find(peer_key(upstream, peer))?;
    Some(row.eligible(crate::observe::now_ms()))
}

/// The engine row of `peer` in `upstream` once it was scraped
/// (`pd_engine_metrics`), for balancers of any module: it lives in the
/// health zone as long as the cycle.
pub fn engine_row(upstream: &[u8], peer: &[u8]) -> Option<&'static EngineRow> {
    let zone = shared_zone()?;
    let i = zone.table().find_index(peer_key(upstream, peer))?;
    zone.engine(i).filter(|e| e.scraped())
}

/// Every scraped peer of this worker's configuration (the prober's list):
/// upstream, peer and what its engine reported, for the status page.
pub fn engine_snapshot() -> Vec<(Vec<u8>, Vec<u8>, EngineSnapshot)> {
    let now = crate::observe::now_ms();
    let mut out = Vec::new();
    PROBER.with(|p| {
        let p = p.borrow();
        let Some(p) = p.as_ref() else { return };
        each_prober_peer(
            p,
            |u| u.metrics.is_some(),
            |u, name| {
                let i = p.zone.table().find_index(peer_key(&u.name, name));
                if let Some(e) = i.and_then(|i| p.zone.engine(i)) {
                    out.push((u.name.clone(), name.to_vec(), e.snapshot(now)));
                }
            },
        );
    });
    out
}

/// Every peer of this worker's `pd_kv_events` upstreams with an engine bit
/// in its index: upstream, peer and its event stream, for the status and
/// metrics pages.
pub fn kv_snapshot() -> Vec<(Vec<u8>, Vec<u8>, pdgate_core::kv::index::KvSnapshot)> {
    let now = crate::observe::now_ms();
    let mut out = Vec::new();
    PROBER.with(|p| {
        let p = p.borrow();
        let Some(p) = p.as_ref() else { return };
        for u in &p.kv {
            let Some(index) = crate::kv::index_of(&u.name) else { continue };
            // SAFETY: uscf is a block of the running cycle.
            unsafe {
                crate::upstream::each_peer_name(u.uscf, |name| {
                    if let Some(b) = index.engine_bit(peer_key(&u.name, name)) {
                        out.push((
                            u.name.clone(),
                            name.to_vec(),
                            index.header.engines[b].snapshot(now),
                        ));
                    }
                });
            }
        }
    });
    out
}

/// Every peer of the running cycle's upstreams that has a row (health
/// checked or scraped), for the `pd_metrics` page of any module.
pub fn peer_states() -> Vec<pdgate_core::engine::PeerState> {
    let Some(zone) = shared_zone() else { return Vec::new() };
    let now = crate::observe::now_ms();
    let table = zone.table();
    let mut out = Vec::new();
    // SAFETY: the running cycle's upstream blocks and round robin's peer
    // lists (read under its read lock) live as long as the cycle.
    unsafe {
        let cycle = *addr_of!(ngx::ffi::ngx_cycle);
        for us in crate::upstream::blocks(crate::upstream::cycle_main_conf(cycle)) {
            let peers = (*us).peer.data as *mut ngx_http_upstream_rr_peers_t;
            if peers.is_null() {
                continue;
            }
            let upstream = str_bytes(&(*us).host);
            let index = crate::kv::index_of(upstream);
            let _r = crate::upstream::PeersRead::lock(peers);
            crate::upstream::each_peer(peers, |pe| {
                let name = str_bytes(&pe.name);
                let key = peer_key(upstream, name);
                let i = table.find_index(key);
                let eligible = table.find(key).filter(|r| r.is_checked()).map(|r| r.eligible(now));
                let engine =
                    i.and_then(|i| zone.engine(i)).filter(|e| e.scraped()).map(|e| e.snapshot(now));
                let kv = index
                    .and_then(|x| x.engine_bit(key).map(|b| x.header.engines[b].snapshot(now)));
                if eligible.is_some() || engine.is_some() || kv.is_some() {
                    out.push(pdgate_core::engine::PeerState {
                        upstream: upstream.to_vec(),
                        peer: name.to_vec(),
                        eligible,
                        engine,
                        kv,
                    });
                }
            });
        }
    }
    out
}

/// The pid of the worker probing now (0: none).
pub fn prober_pid() -> u64 {
    PROBER.with(|p| p.borrow().as_ref().map_or(0, |p| p.zone.lease.owner()))
}
