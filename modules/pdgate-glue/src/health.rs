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
use std::ffi::{c_char, c_void};
use std::ptr::{addr_of, addr_of_mut, null_mut};
use std::time::Instant;

use ngx::ffi::{
    ngx_add_timer, ngx_close_connection, ngx_conf_t, ngx_connection_t, ngx_cycle_t, ngx_del_timer,
    ngx_event_connect_peer, ngx_event_get_peer, ngx_event_t, ngx_handle_read_event,
    ngx_handle_write_event, ngx_http_conf_ctx_t, ngx_http_module, ngx_http_upstream_main_conf_t,
    ngx_http_upstream_module, ngx_http_upstream_rr_peer_t, ngx_http_upstream_rr_peers_t,
    ngx_http_upstream_server_t, ngx_http_upstream_srv_conf_t, ngx_inet_set_port, ngx_int_t,
    ngx_log_t, ngx_module_t, ngx_msec_t, ngx_pcalloc, ngx_peer_connection_t, ngx_str_t, ngx_uint_t,
    sockaddr, NGX_AGAIN, NGX_ERROR, NGX_HTTP_UPSTREAM_CREATE, NGX_LOG_CRIT, NGX_LOG_NOTICE,
    NGX_LOG_WARN, NGX_OK, NGX_PROCESS_SINGLE, NGX_PROCESS_WORKER,
};
use pdgate_core::balance::slots::peer_key;
use pdgate_core::health::{
    status_line, CheckConf, HealthRow, HealthZone, Outcome, Snapshot, Status, StatusLine,
};

use crate::conf::str_bytes;

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

/// A probe in flight: owned by its connection (`c->data`), freed by
/// [`finish`].
struct Probe {
    pc: ngx_peer_connection_t,
    uscf: *mut ngx_http_upstream_srv_conf_t,
    addr: libc::sockaddr_storage,
    name: ngx_str_t,
    peer: Vec<u8>,
    upstream: Vec<u8>,
    request: Vec<u8>,
    sent: usize,
    answer: [u8; ANSWER_BYTES],
    len: usize,
    key: u64,
    row: *const HealthRow,
    conf: CheckConf,
    started: Instant,
    /// The request went out (a failure after it is not a refusal).
    connected: bool,
}

fn start_probe(t: Target, quiet: *mut ngx_log_t) {
    INFLIGHT.with(|f| f.borrow_mut().insert(t.key));
    let request = t.conf.request(&t.peer);
    let pr = Box::new(Probe {
        // SAFETY: all-zero bytes are a valid (empty) peer connection.
        pc: unsafe { std::mem::zeroed() },
        uscf: t.uscf,
        addr: t.addr,
        name: ngx_str_t { len: 0, data: null_mut() },
        peer: t.peer,
        upstream: t.upstream,
        request,
        sent: 0,
        answer: [0; ANSWER_BYTES],
        len: 0,
        key: t.key,
        row: t.row,
        conf: t.conf,
        started: Instant::now(),
        connected: false,
    });
    let raw = Box::into_raw(pr);
    // SAFETY: the Probe is boxed (its fields do not move) and outlives the
    // connection: finish() closes the connection before freeing it.
    unsafe {
        let p = &mut *raw;
        p.name = ngx_str_t { len: p.peer.len(), data: p.peer.as_mut_ptr() };
        if let Some(port) = p.conf.port {
            ngx_inet_set_port(addr_of_mut!(p.addr) as *mut sockaddr, port);
        }
        p.pc.sockaddr = addr_of_mut!(p.addr) as *mut sockaddr;
        p.pc.socklen = t.socklen;
        p.pc.name = &mut p.name;
        p.pc.get = Some(ngx_event_get_peer);
        p.pc.log = quiet;
        let rc = ngx_event_connect_peer(&mut (*raw).pc);
        if rc == NGX_ERROR as ngx_int_t || (*raw).pc.connection.is_null() {
            // NGX_DECLINED: connect() failed at once (refused).
            let outcome =
                if rc == NGX_ERROR as ngx_int_t { Outcome::Closed } else { Outcome::Refused };
            finish(raw, outcome);
            return;
        }
        let c = (*raw).pc.connection;
        (*c).data = raw as *mut c_void;
        (*(*c).read).handler = Some(on_read);
        (*(*c).write).handler = Some(on_write);
        ngx_add_timer((*c).write, (*raw).conf.timeout_ms as ngx_msec_t);
        if rc != NGX_AGAIN as ngx_int_t {
            on_write((*c).write);
        }
    }
}

unsafe extern "C" fn noop(_ev: *mut ngx_event_t) {}

unsafe extern "C" fn on_write(wev: *mut ngx_event_t) {
    crate::guard::catch("pd_health_check probe", (), || {
        // SAFETY: a probe connection's event: data is the connection, whose
        // data is the live Probe; send/recv are the connection's own.
        unsafe {
            let c = (*wev).data as *mut ngx_connection_t;
            let pr = (*c).data as *mut Probe;
            if (*wev).timedout() != 0 {
                finish(pr, Outcome::TimedOut);
                return;
            }
            let Some(send) = (*c).send else {
                finish(pr, Outcome::Closed);
                return;
            };
            let p = &mut *pr;
            while p.sent < p.request.len() {
                let n = send(c, p.request.as_mut_ptr().add(p.sent), p.request.len() - p.sent);
                if n == NGX_AGAIN as isize {
                    if ngx_handle_write_event(wev, 0) != NGX_OK as ngx_int_t {
                        finish(pr, Outcome::Closed);
                    }
                    return;
                }
                if n <= 0 {
                    finish(pr, if p.connected { Outcome::Closed } else { Outcome::Refused });
                    return;
                }
                p.sent += n as usize;
            }
            p.connected = true;
            (*wev).handler = Some(noop);
            if (*wev).timer_set() != 0 {
                ngx_del_timer(wev);
            }
            let spent = p.started.elapsed().as_millis() as u64;
            let left = p.conf.timeout_ms.saturating_sub(spent).max(1);
            let rev = (*c).read;
            ngx_add_timer(rev, left as ngx_msec_t);
            if ngx_handle_read_event(rev, 0) != NGX_OK as ngx_int_t {
                finish(pr, Outcome::Closed);
                return;
            }
            if (*rev).ready() != 0 {
                on_read(rev);
            }
        }
    })
}

unsafe extern "C" fn on_read(rev: *mut ngx_event_t) {
    crate::guard::catch("pd_health_check probe", (), || {
        // SAFETY: as on_write.
        unsafe {
            let c = (*rev).data as *mut ngx_connection_t;
            let pr = (*c).data as *mut Probe;
            if (*rev).timedout() != 0 {
                finish(pr, Outcome::TimedOut);
                return;
            }
            if !(*pr).connected {
                // An answer before the request went out: wait for write.
                return;
            }
            let Some(recv) = (*c).recv else {
                finish(pr, Outcome::Closed);
                return;
            };
            let p = &mut *pr;
            loop {
                let room = ANSWER_BYTES - p.len;
                let n = recv(c, p.answer.as_mut_ptr().add(p.len), room);
                if n == NGX_AGAIN as isize {
                    if ngx_handle_read_event(rev, 0) != NGX_OK as ngx_int_t {
                        finish(pr, Outcome::Closed);
                    }
                    return;
                }
                if n == 0 {
                    finish(pr, if p.len == 0 { Outcome::Closed } else { Outcome::Garbage });
                    return;
                }
                if n < 0 {
                    finish(pr, Outcome::Closed);
                    return;
                }
                p.len += n as usize;
                match status_line(&p.answer[..p.len]) {
                    StatusLine::Code(s) => return finish(pr, Outcome::Status(s)),
                    StatusLine::Invalid => return finish(pr, Outcome::Garbage),
                    StatusLine::Partial if p.len == ANSWER_BYTES => {
                        return finish(pr, Outcome::Garbage)
                    }
                    StatusLine::Partial => {}
                }
            }
        }
    })
}

/// Ends a probe: closes its connection, records the outcome, logs a change
/// of status and frees the probe.
///
/// # Safety
/// `pr` must be a probe from [`start_probe`], not finished yet.
unsafe fn finish(pr: *mut Probe, outcome: Outcome) {
    // SAFETY: as documented: the box is this probe's, handed over by
    // start_probe; its connection (if any) is open and ours; the row lives
    // in the zone, as long as the cycle.
    unsafe {
        let p = Box::from_raw(pr);
        if !p.pc.connection.is_null() {
            ngx_close_connection(p.pc.connection);
        }
        INFLIGHT.with(|f| f.borrow_mut().remove(&p.key));
        let latency = p.started.elapsed().as_micros() as u64;
        let Some(row) = p.row.as_ref() else { return };
        let change = row.record(outcome, crate::observe::now_ms(), latency, &p.conf);
        if change.is_some() {
            apply_now(p.uscf);
        }
        if let Some(ch) = change {
            let log = (**addr_of!(ngx::ffi::ngx_cycle)).log;
            let (level, why) = if ch.to == Status::Up {
                (
                    NGX_LOG_NOTICE,
                    format!("{} after {} good probes", outcome.describe(), p.conf.passes),
                )
            } else {
                (NGX_LOG_WARN, outcome.describe())
            };
            ngx::ngx_log_error!(
                level,
                log,
                "pd_health_check: upstream \"{}\" peer {} is {} ({}), was {}",
                String::from_utf8_lossy(&p.upstream),
                String::from_utf8_lossy(&p.peer),
                ch.to.name(),
                why,
                ch.from.name()
            );
        }
    }
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

/// The text of a `pd_health_status` page: the prober, then one line per
/// checked peer.
pub fn status_text() -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "prober pid {}", prober_pid());
    for (u, p, snap) in snapshot() {
        let (u, p) = (String::from_utf8_lossy(&u), String::from_utf8_lossy(&p));
        match snap {
            None => {
                let _ = writeln!(s, "upstream {u} peer {p} down (configured)");
            }
            Some(x) => {
                let _ = writeln!(
                    s,
                    "upstream {u} peer {p} {} eligible={} probes={} bad={} last=\"{}\" checked_ago_ms={} latency_us={}",
                    x.status.name(),
                    u8::from(x.eligible),
                    x.probes,
                    x.bad,
                    x.last.map_or_else(|| "none".to_owned(), Outcome::describe),
                    x.checked_ago_ms.map_or_else(|| "-".to_owned(), |a| a.to_string()),
                    x.latency_us
                );
            }
        }
    }
    s
}

/// Whether each upstream of `names` (all checked ones when empty) has a
/// peer that may take traffic; the first that has none, named, otherwise.
pub fn readiness(names: &[Vec<u8>]) -> Result<(), String> {
    let snap = snapshot();
    let mut wanted: Vec<Vec<u8>> = names.to_vec();
    if wanted.is_empty() {
        for (u, _, _) in &snap {
            if !wanted.contains(u) {
                wanted.push(u.clone());
            }
        }
    }
    for w in &wanted {
        let ok = snap.iter().any(|(u, _, s)| u == w && s.is_some_and(|s| s.eligible));
        if !ok {
            return Err(format!(
                "no healthy server in upstream \"{}\"",
                String::from_utf8_lossy(w)
            ));
        }
    }
    Ok(())
}

/// `pd_health_ready [upstream …]`'s location settings.
#[derive(Debug, Default)]
pub struct ReadyConf {
    pub upstreams: Vec<Vec<u8>>,
}

/// Upstreams named by `pd_health_ready` in this configuration, with where,
/// checked at postconfiguration (this module copy's own list).
static READY_NAMES: std::sync::Mutex<Vec<(Vec<u8>, String)>> = std::sync::Mutex::new(Vec::new());

/// Forgets the previous configuration's names (preconfiguration).
pub fn reset() {
    if let Ok(mut v) = READY_NAMES.lock() {
        v.clear();
    }
}

/// `pd_health_ready [upstream …];` in a location.
///
/// # Safety
/// nginx's directive handler contract; `conf` is this module's location
/// conf.
pub unsafe fn cmd_ready(cf: *mut ngx_conf_t, conf: *mut ReadyConf) -> *mut c_char {
    // SAFETY: as documented.
    unsafe {
        let Some(conf) = conf.as_mut() else { return ngx::core::NGX_CONF_ERROR };
        let place = crate::conf::place(cf);
        for a in crate::conf::args(cf).iter().skip(1) {
            let name = str_bytes(a).to_vec();
            if let Ok(mut v) = READY_NAMES.lock() {
                v.push((name.clone(), place.clone()));
            }
            conf.upstreams.push(name);
        }
    }
    crate::conf::OK
}

/// Postconfiguration: every upstream `pd_health_ready` names must exist and
/// have `pd_health_check`.
///
/// # Safety
/// nginx's postconfiguration contract; `module` is the health module.
pub unsafe fn check_ready_names(cf: *mut ngx_conf_t, module: &ngx_module_t) -> ngx_int_t {
    let names = READY_NAMES.lock().map(|v| v.clone()).unwrap_or_default();
    if names.is_empty() {
        return NGX_OK as ngx_int_t;
    }
    // SAFETY: as documented; the upstream main conf and its blocks live as
    // long as the configuration.
    unsafe {
        let ctx = (*cf).ctx as *mut ngx_http_conf_ctx_t;
        let umcf = *(*ctx).main_conf.add((*addr_of!(ngx_http_upstream_module)).ctx_index)
            as *mut ngx_http_upstream_main_conf_t;
        let mut checked: Vec<&[u8]> = Vec::new();
        if let Some(umcf) = umcf.as_ref() {
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
                if hc.as_ref().is_some_and(|h| h.check.is_some()) {
                    checked.push(str_bytes(&u.host));
                }
            }
        }
        for (name, place) in names {
            if !checked.contains(&name.as_slice()) {
                ngx::ngx_log_error!(
                    ngx::ffi::NGX_LOG_EMERG,
                    (*cf).log,
                    "pd_health_ready: upstream \"{}\" has no pd_health_check in {}",
                    String::from_utf8_lossy(&name),
                    place
                );
                return NGX_ERROR as ngx_int_t;
            }
        }
    }
    NGX_OK as ngx_int_t
}

/// The health module: `pd_health_check` (upstream), `pd_health_status` and
/// `pd_health_ready` (location), its `init_process`. The expansion holds
/// the `unsafe`, so the module crate can `#![forbid(unsafe_code)]`.
#[macro_export]
macro_rules! health_module {
    ($module:ident) => {
        struct Module;

        impl $crate::ngx::http::HttpModule for Module {
            fn module() -> &'static $crate::ffi::ngx_module_t {
                // SAFETY: the module static is only written by nginx while loading.
                unsafe { &*::std::ptr::addr_of!($module) }
            }
        }

        // SAFETY: ServerConf is the type create_srv_conf allocates here.
        unsafe impl $crate::ngx::http::HttpModuleServerConf for Module {
            type ServerConf = $crate::health::UpstreamHealth;
        }

        // SAFETY: LocationConf is the type create_loc_conf allocates here.
        unsafe impl $crate::ngx::http::HttpModuleLocationConf for Module {
            type LocationConf = $crate::health::ReadyConf;
        }

        unsafe extern "C" fn __pdgate_preconfiguration(
            _cf: *mut $crate::ffi::ngx_conf_t,
        ) -> $crate::ffi::ngx_int_t {
            $crate::health::reset();
            $crate::ffi::NGX_OK as $crate::ffi::ngx_int_t
        }

        unsafe extern "C" fn __pdgate_postconfiguration(
            cf: *mut $crate::ffi::ngx_conf_t,
        ) -> $crate::ffi::ngx_int_t {
            $crate::guard::catch(
                "pd_health postconfiguration",
                $crate::ffi::NGX_ERROR as $crate::ffi::ngx_int_t,
                || {
                    // SAFETY: nginx's postconfiguration contract.
                    unsafe {
                        $crate::health::check_ready_names(
                            cf,
                            <Module as $crate::ngx::http::HttpModule>::module(),
                        )
                    }
                },
            )
        }

        static __PDGATE_CTX: $crate::ffi::ngx_http_module_t = $crate::ffi::ngx_http_module_t {
            preconfiguration: Some(__pdgate_preconfiguration),
            postconfiguration: Some(__pdgate_postconfiguration),
            create_main_conf: None,
            init_main_conf: None,
            create_srv_conf: Some(<Module as $crate::ngx::http::HttpModule>::create_srv_conf),
            merge_srv_conf: None,
            create_loc_conf: Some(<Module as $crate::ngx::http::HttpModule>::create_loc_conf),
            merge_loc_conf: None,
        };

        unsafe extern "C" fn __pdgate_cmd_check(
            cf: *mut $crate::ffi::ngx_conf_t,
            _cmd: *mut $crate::ffi::ngx_command_t,
            conf: *mut ::std::ffi::c_void,
        ) -> *mut ::std::ffi::c_char {
            $crate::guard::catch("pd_health_check", $crate::ngx::core::NGX_CONF_ERROR, || {
                // SAFETY: nginx's directive handler contract; the server
                // conf offset selects this module's UpstreamHealth.
                unsafe {
                    $crate::health::cmd_check(
                        cf,
                        conf as *mut $crate::health::UpstreamHealth,
                        <Module as $crate::ngx::http::HttpModule>::module(),
                    )
                }
            })
        }

        unsafe extern "C" fn __pdgate_cmd_ready(
            cf: *mut $crate::ffi::ngx_conf_t,
            _cmd: *mut $crate::ffi::ngx_command_t,
            conf: *mut ::std::ffi::c_void,
        ) -> *mut ::std::ffi::c_char {
            $crate::guard::catch("pd_health_ready", $crate::ngx::core::NGX_CONF_ERROR, || {
                // SAFETY: nginx's directive handler contract (location conf).
                unsafe {
                    let rc = $crate::health::cmd_ready(cf, conf as *mut $crate::health::ReadyConf);
                    if !rc.is_null() {
                        return rc;
                    }
                    $crate::conf::set_content_handler(cf, Some(__pdgate_ready_handler))
                }
            })
        }

        unsafe extern "C" fn __pdgate_cmd_status(
            cf: *mut $crate::ffi::ngx_conf_t,
            _cmd: *mut $crate::ffi::ngx_command_t,
            _conf: *mut ::std::ffi::c_void,
        ) -> *mut ::std::ffi::c_char {
            // SAFETY: nginx's directive handler contract (location context).
            unsafe { $crate::conf::set_content_handler(cf, Some(__pdgate_status_handler)) }
        }

        unsafe extern "C" fn __pdgate_status_handler(
            r: *mut $crate::ffi::ngx_http_request_t,
        ) -> $crate::ffi::ngx_int_t {
            $crate::guard::catch(
                "pd_health_status",
                $crate::ffi::NGX_ERROR as $crate::ffi::ngx_int_t,
                || {
                    // SAFETY: nginx calls content handlers with a live request.
                    unsafe {
                        let rc = $crate::ffi::ngx_http_discard_request_body(r);
                        if rc != $crate::ffi::NGX_OK as $crate::ffi::ngx_int_t {
                            return rc;
                        }
                        let text = $crate::health::status_text();
                        $crate::response::send(r, 200, b"text/plain", text.as_bytes())
                    }
                },
            )
        }

        unsafe extern "C" fn __pdgate_ready_handler(
            r: *mut $crate::ffi::ngx_http_request_t,
        ) -> $crate::ffi::ngx_int_t {
            $crate::guard::catch(
                "pd_health_ready",
                $crate::ffi::NGX_ERROR as $crate::ffi::ngx_int_t,
                || {
                    // SAFETY: nginx calls content handlers with a live request;
                    // its loc_conf has this module's ReadyConf at ctx_index.
                    unsafe {
                        let rc = $crate::ffi::ngx_http_discard_request_body(r);
                        if rc != $crate::ffi::NGX_OK as $crate::ffi::ngx_int_t {
                            return rc;
                        }
                        let idx = <Module as $crate::ngx::http::HttpModule>::module().ctx_index;
                        let lc = *(*r).loc_conf.add(idx) as *const $crate::health::ReadyConf;
                        let names = lc.as_ref().map(|c| c.upstreams.as_slice()).unwrap_or(&[]);
                        match $crate::health::readiness(names) {
                            Ok(()) => $crate::response::send(
                                r,
                                200,
                                b"application/json",
                                b"{\"status\":\"ready\"}\n",
                            ),
                            Err(msg) => {
                                let body = $crate::core::error::error_body(503, &msg);
                                $crate::response::send(r, 503, b"application/json", &body)
                            }
                        }
                    }
                },
            )
        }

        unsafe extern "C" fn __pdgate_init_process(
            cycle: *mut $crate::ffi::ngx_cycle_t,
        ) -> $crate::ffi::ngx_int_t {
            $crate::guard::catch(
                "pd_health init_process",
                $crate::ffi::NGX_OK as $crate::ffi::ngx_int_t,
                || {
                    // SAFETY: nginx's init_process contract.
                    unsafe {
                        $crate::health::init_process(
                            cycle,
                            <Module as $crate::ngx::http::HttpModule>::module(),
                        )
                    }
                },
            )
        }

        static mut __PDGATE_COMMANDS: [$crate::ffi::ngx_command_t; 4] = [
            $crate::ffi::ngx_command_t {
                name: $crate::conf::name(c"pd_health_check"),
                type_: ($crate::ffi::NGX_HTTP_UPS_CONF | $crate::ffi::NGX_CONF_ANY)
                    as $crate::ffi::ngx_uint_t,
                set: Some(__pdgate_cmd_check),
                conf: $crate::ffi::NGX_HTTP_SRV_CONF_OFFSET as $crate::ffi::ngx_uint_t,
                offset: 0,
                post: ::std::ptr::null_mut(),
            },
            $crate::ffi::ngx_command_t {
                name: $crate::conf::name(c"pd_health_status"),
                type_: ($crate::ffi::NGX_HTTP_LOC_CONF | $crate::ffi::NGX_CONF_NOARGS)
                    as $crate::ffi::ngx_uint_t,
                set: Some(__pdgate_cmd_status),
                conf: $crate::ffi::NGX_HTTP_LOC_CONF_OFFSET as $crate::ffi::ngx_uint_t,
                offset: 0,
                post: ::std::ptr::null_mut(),
            },
            $crate::ffi::ngx_command_t {
                name: $crate::conf::name(c"pd_health_ready"),
                type_: ($crate::ffi::NGX_HTTP_LOC_CONF | $crate::ffi::NGX_CONF_ANY)
                    as $crate::ffi::ngx_uint_t,
                set: Some(__pdgate_cmd_ready),
                conf: $crate::ffi::NGX_HTTP_LOC_CONF_OFFSET as $crate::ffi::ngx_uint_t,
                offset: 0,
                post: ::std::ptr::null_mut(),
            },
            $crate::ffi::ngx_command_t::empty(),
        ];

        #[no_mangle]
        #[allow(non_upper_case_globals)]
        pub static mut $module: $crate::ffi::ngx_module_t = $crate::ffi::ngx_module_t {
            ctx: ::std::ptr::addr_of!(__PDGATE_CTX) as *mut ::std::ffi::c_void,
            commands: ::std::ptr::addr_of_mut!(__PDGATE_COMMANDS)
                as *mut $crate::ffi::ngx_command_t,
            type_: $crate::ffi::NGX_HTTP_MODULE as $crate::ffi::ngx_uint_t,
            init_process: Some(__pdgate_init_process),
            ..$crate::ffi::ngx_module_t::default()
        };

        $crate::ngx::ngx_modules!($module);
    };
}
