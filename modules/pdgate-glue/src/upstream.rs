//! Upstream balancers on top of nginx's round robin, with their counters in
//! a shared zone.
//!
//! A balancer module turns itself on per `upstream {}` with
//! [`enable`], and in its postconfiguration calls [`install`] (through
//! [`balancer_hooks!`]), which wraps each enabled upstream's `peer.init` —
//! whatever it is by then: round robin, or the keepalive module's hook
//! around it — so the order of `keepalive` and the balancer directive does
//! not matter and keepalive keeps working.
//!
//! Per try, `get` builds a view of the primary peers (availability judged as
//! `ngx_http_upstream_get_peer` does: tried by this request, `down`,
//! `max_fails`/`fail_timeout`, `max_conns`), asks the policy, and lets the
//! wrapped `get` (round robin, possibly under keepalive, which then reuses a
//! cached connection) take exactly that peer by marking every other one as
//! tried for the duration of the call. The choice is reserved in the shared
//! counters before returning; `free` releases it, once per try, and calls
//! the wrapped `free`, so round robin keeps its failure accounting and a
//! retry never gets a peer already tried.

use std::cell::RefCell;
use std::ffi::{c_char, c_void};
use std::ptr::null_mut;

use ngx::core::NGX_CONF_ERROR;
use ngx::ffi::{
    ngx_command_t, ngx_conf_t, ngx_http_request_t, ngx_http_upstream_init_peer_pt,
    ngx_http_upstream_init_round_robin_peer, ngx_http_upstream_main_conf_t,
    ngx_http_upstream_module, ngx_http_upstream_rr_peer_data_t, ngx_http_upstream_rr_peers_t,
    ngx_http_upstream_srv_conf_t, ngx_int_t, ngx_module_t, ngx_pcalloc, ngx_peer_connection_t,
    ngx_shared_memory_add, ngx_shm_zone_t, ngx_slab_calloc, ngx_slab_pool_t, ngx_str_t, ngx_uint_t,
    NGX_DONE, NGX_ERROR, NGX_HTTP_UPSTREAM_BACKUP, NGX_HTTP_UPSTREAM_CREATE,
    NGX_HTTP_UPSTREAM_DOWN, NGX_HTTP_UPSTREAM_FAIL_TIMEOUT, NGX_HTTP_UPSTREAM_MAX_CONNS,
    NGX_HTTP_UPSTREAM_MAX_FAILS, NGX_HTTP_UPSTREAM_WEIGHT, NGX_LOG_EMERG, NGX_LOG_WARN, NGX_OK,
};
use ngx::http::HttpModuleConfExt;
use ngx::log::DebugMask;
use ngx::{ngx_conf_log_error, ngx_log_debug};
use pdgate_core::balance::pending::{Pending, PendingTable, PENDING_BYTES};
use pdgate_core::balance::prefix::{self, PrefixIndex, ENTRY_BYTES, MAX_BLOCKS};
use pdgate_core::balance::slots::{peer_key, Slot, SlotTable, SLOT_BYTES};
use pdgate_core::balance::{PeerView, PD_SCORE_LOOKAHEAD};
use pdgate_core::tokens::tokens_for_bytes;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::conf::str_bytes;

/// Most primary peers a balancer chooses among; larger upstreams fall back
/// to round robin (with a warning at startup).
pub const MAX_PEERS: usize = 256;

/// Default (and least) size of a balancer's shared zone; `<name>_shm_size`
/// sets another, and a zone too small for the prefix index grows to fit.
pub const ZONE_SIZE: usize = 1 << 20;

/// Slots of a zone: (upstream, peer) identities, all upstreams together.
pub const SLOTS: usize = 2048;

/// Entries of a zone's table of requests in prefill (pd_score_balance).
pub const PENDING: usize = 1024;

/// What a policy knows of the request being placed.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// Estimated tokens of the body this leg sends.
    pub tokens: u64,
    /// The request's cost (see [`Balancer::cost`]).
    pub cost: u64,
    /// The upstream's parameters.
    pub params: &'a Params,
    /// A random number for ties.
    pub tie: u64,
    /// Lengths of the oldest requests now in prefill (pd_score decode).
    pub pending: &'a [u64],
    /// Per peer: leading prompt blocks last placed there (prefix affinity).
    pub affinity: &'a [u32],
}

/// A policy: peers and the request → the chosen index.
pub type Choose = fn(&[PeerView], &Request) -> Option<usize>;

/// `Params::mode` of an upstream whose requests are prefills (their
/// lengths are shared with decode upstreams while they run).
pub const MODE_PREFILL: u8 = 1;
/// `Params::mode` of an upstream whose placement looks ahead over them.
pub const MODE_DECODE: u8 = 2;

/// What a balancer module gives the glue.
#[derive(Debug)]
pub struct Balancer {
    /// The on/off directive's name, for logs.
    pub name: &'static str,
    /// The shared zone's name.
    pub zone: &'static str,
    pub choose: Choose,
    /// The cost a request adds to its peer's `cost` counter (None: 0).
    pub cost: Option<fn(u64, &Params) -> u64>,
    /// Follow answers' `usage.total_tokens` (see [`learn_usage`]).
    pub learn_usage: bool,
    /// Keep a decayed history of placements (length_balance): `int[0]`
    /// placements between decays (default 32), `int[1]` the divisor
    /// (default 2), `float[0]` the weight of a request's tokens (1.0).
    pub history: bool,
    /// Fingerprint prompts into the prefix index (prefix_cache_affinity):
    /// `int[1]` index entries per peer, `int[2]` block bytes.
    pub prefix: bool,
    /// The module (for its shared zone).
    pub module: fn() -> &'static ngx_module_t,
}

/// Numeric parameters of an upstream's balancer, set by directives.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// Up to three whole numbers (e.g. a batch size); `None` when unset.
    pub int: [Option<u64>; 3],
    /// Up to two real numbers (e.g. cost coefficients); `None` when unset.
    pub float: [Option<f64>; 2],
    /// A role word (pd_score_balance): [`MODE_PREFILL`], [`MODE_DECODE`],
    /// or 0.
    pub mode: u8,
}

/// The per-`upstream {}` configuration of a balancer module (its srv conf).
#[derive(Debug)]
pub struct UpstreamConf {
    /// `NGX_CONF_UNSET` (-1), 0 or 1.
    pub enabled: isize,
    pub params: Params,
    zone: *mut ngx_shm_zone_t,
    upstream_name: Vec<u8>,
    saved_init_peer: ngx_http_upstream_init_peer_pt,
    /// Per worker: the slot of each primary peer, built on first use.
    slot_of: RefCell<Vec<usize>>,
}

impl Default for UpstreamConf {
    fn default() -> Self {
        UpstreamConf {
            enabled: -1,
            params: Params { int: [None; 3], float: [None, None], mode: 0 },
            zone: null_mut(),
            upstream_name: Vec::new(),
            saved_init_peer: None,
            slot_of: RefCell::new(Vec::new()),
        }
    }
}

/// The start of a balancer's zone; the slots, the pending table and the
/// prefix index follow, in that order.
#[repr(C)]
struct TableHeader {
    magic: u64,
    slots: u64,
    pending: u64,
    index: u64,
    /// The prefix index's LRU clock.
    clock: AtomicU64,
}

const MAGIC: u64 = 0x7064_6761_7465_0002;

/// Entries of the prefix index a new zone gets (set at postconfiguration;
/// each balancer module has its own copy of this crate's statics).
static INDEX_ENTRIES: AtomicUsize = AtomicUsize::new(0);

/// `<name>_shm_size`, or 0.
static SHM_SIZE: AtomicUsize = AtomicUsize::new(0);

/// Bytes of the zone's layout with `index` prefix-index entries.
fn layout_bytes(index: usize) -> usize {
    std::mem::size_of::<TableHeader>()
        + SLOTS * SLOT_BYTES
        + PENDING * PENDING_BYTES
        + index * ENTRY_BYTES
}

unsafe extern "C" fn zone_init(zone: *mut ngx_shm_zone_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: nginx calls this with the zone it created (its slab pool at
    // shm.addr) and the previous cycle's `data` on reload.
    unsafe {
        if !data.is_null() {
            // Reload: keep the counters (slots are found again by key).
            (*zone).data = data;
            return NGX_OK as ngx_int_t;
        }
        let shpool = (*zone).shm.addr as *mut ngx_slab_pool_t;
        if (*zone).shm.exists != 0 && !(*shpool).data.is_null() {
            (*zone).data = (*shpool).data;
            return NGX_OK as ngx_int_t;
        }
        let index = INDEX_ENTRIES.load(Ordering::Relaxed);
        let h = ngx_slab_calloc(shpool, layout_bytes(index)) as *mut TableHeader;
        if h.is_null() {
            return NGX_ERROR as ngx_int_t;
        }
        (*h).magic = MAGIC;
        (*h).slots = SLOTS as u64;
        (*h).pending = PENDING as u64;
        (*h).index = index as u64;
        (*shpool).data = h as *mut c_void;
        (*zone).data = h as *mut c_void;
    }
    NGX_OK as ngx_int_t
}

/// The zone's structures.
struct Zone<'a> {
    slots: SlotTable<'a>,
    pending: PendingTable<'a>,
    index: PrefixIndex<'a>,
}

fn zone<'a>(zone: *mut ngx_shm_zone_t) -> Option<Zone<'a>> {
    // SAFETY: zone->data is the header zone_init placed in the shared zone
    // (checked by its magic), followed by the arrays it counts, each of
    // 8-byte aligned atomics; the zone lives as long as the cycle.
    unsafe {
        let h = zone.as_ref()?.data as *const TableHeader;
        let h = h.as_ref()?;
        if h.magic != MAGIC {
            return None;
        }
        let slots = (h as *const TableHeader).add(1) as *const Slot;
        let pending = slots.add(h.slots as usize) as *const Pending;
        let index = pending.add(h.pending as usize) as *const prefix::Entry;
        Some(Zone {
            slots: SlotTable::new(std::slice::from_raw_parts(slots, h.slots as usize)),
            pending: PendingTable::new(std::slice::from_raw_parts(pending, h.pending as usize)),
            index: PrefixIndex::new(std::slice::from_raw_parts(index, h.index as usize), &h.clock),
        })
    }
}

fn table<'a>(z: *mut ngx_shm_zone_t) -> Option<SlotTable<'a>> {
    zone(z).map(|z| z.slots)
}

/// Turns the balancer on for the `upstream {}` being parsed: accepts the
/// usual `server` parameters and attaches the module's shared zone.
///
/// # Safety
/// `cf` must be a directive handler's conf in `upstream {}` context.
pub unsafe fn enable(
    cf: *mut ngx_conf_t,
    conf: &mut UpstreamConf,
    module: &ngx_module_t,
    zone_name: &'static str,
) -> Result<(), &'static str> {
    // SAFETY: in upstream context the upstream module's srv conf exists;
    // the zone name is a static string.
    unsafe {
        let uscf = (*cf)
            .http_server_conf_unchecked::<ngx_http_upstream_srv_conf_t>(&*std::ptr::addr_of!(
                ngx_http_upstream_module
            ))
            .ok_or("is not allowed here")?
            .as_ptr();
        (*uscf).flags |= (NGX_HTTP_UPSTREAM_CREATE
            | NGX_HTTP_UPSTREAM_WEIGHT
            | NGX_HTTP_UPSTREAM_MAX_CONNS
            | NGX_HTTP_UPSTREAM_MAX_FAILS
            | NGX_HTTP_UPSTREAM_FAIL_TIMEOUT
            | NGX_HTTP_UPSTREAM_DOWN
            | NGX_HTTP_UPSTREAM_BACKUP) as ngx_uint_t;
        let mut name = ngx_str_t { len: zone_name.len(), data: zone_name.as_ptr() as *mut u8 };
        let zone = ngx_shared_memory_add(cf, &mut name, ZONE_SIZE, module as *const _ as *mut _);
        if zone.is_null() {
            return Err("cannot create its shared zone");
        }
        (*zone).init = Some(zone_init);
        conf.zone = zone;
        conf.upstream_name = str_bytes(&(*uscf).host).to_vec();
    }
    Ok(())
}

/// Wraps `peer.init` of every upstream where `conf_of` says the balancer is
/// on. Call from postconfiguration.
///
/// # Safety
/// `cf` must be the conf of an http postconfiguration callback; `conf_of`
/// must return the module's srv conf of an upstream.
pub unsafe fn install(
    cf: *mut ngx_conf_t,
    balancer: &Balancer,
    conf_of: impl Fn(*mut ngx_http_upstream_srv_conf_t) -> *mut UpstreamConf,
    init_peer: ngx_http_upstream_init_peer_pt,
) -> ngx_int_t {
    // SAFETY: the upstream main conf and its array of upstream confs are
    // complete once http{} is parsed (init_main_conf ran before
    // postconfiguration, so each peer.init is final).
    unsafe {
        let Some(umcf) = (*cf).http_main_conf_unchecked::<ngx_http_upstream_main_conf_t>(
            &*std::ptr::addr_of!(ngx_http_upstream_module),
        ) else {
            return NGX_OK as ngx_int_t;
        };
        let ups: &[*mut ngx_http_upstream_srv_conf_t] = (*umcf.as_ptr()).upstreams.as_slice();
        let mut index = 0usize;
        let mut zone = null_mut();
        for &uscf in ups {
            let conf = conf_of(uscf);
            if conf.is_null() || (*conf).enabled != 1 {
                continue;
            }
            zone = (*conf).zone;
            let peers = (*uscf).peer.data as *mut ngx_http_upstream_rr_peers_t;
            if balancer.prefix && !peers.is_null() {
                let per_peer = (*conf).params.int[1].unwrap_or(pdgate_core::balance::PCA_DICT_SIZE);
                index = index.saturating_add((per_peer as usize).saturating_mul((*peers).number));
            }
        }
        if !zone.is_null() {
            let layout = layout_bytes(index);
            let need = layout + layout / 8 + (64 << 10);
            let size = match SHM_SIZE.load(Ordering::Relaxed) {
                0 => need.max(ZONE_SIZE),
                set if set >= need => set,
                set => {
                    ngx_conf_log_error!(
                        NGX_LOG_EMERG,
                        cf,
                        "\"{}_shm_size\" of {}k is too small, at least {}k are needed ({} prefix index entries)",
                        balancer.name,
                        set >> 10,
                        need.div_ceil(1024),
                        index
                    );
                    return NGX_ERROR as ngx_int_t;
                }
            };
            INDEX_ENTRIES.store(index, Ordering::Relaxed);
            (*zone).shm.size = size;
        }
        for &uscf in ups {
            let conf = conf_of(uscf);
            if conf.is_null() || (*conf).enabled != 1 {
                continue;
            }
            let peers = (*uscf).peer.data as *mut ngx_http_upstream_rr_peers_t;
            if !peers.is_null() && (*peers).number > MAX_PEERS {
                ngx_conf_log_error!(
                    NGX_LOG_WARN,
                    cf,
                    "{} in upstream \"{}\": more than {} servers, using round robin",
                    balancer.name,
                    String::from_utf8_lossy(&(*conf).upstream_name),
                    MAX_PEERS
                );
                continue;
            }
            if (*uscf).peer.init.is_none() {
                ngx_conf_log_error!(NGX_LOG_EMERG, cf, "{}: upstream has no peers", balancer.name);
                return NGX_ERROR as ngx_int_t;
            }
            (*conf).saved_init_peer = (*uscf).peer.init;
            (*uscf).peer.init = init_peer;
        }
    }
    NGX_OK as ngx_int_t
}

/// Whether this worker has warned about an upstream it cannot balance.
static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// First word of every [`PeerData`].
const PEER_DATA_MAGIC: u64 = 0x7064_6761_7465_5044;

/// Per-request, per-upstream state.
#[repr(C)]
struct PeerData {
    magic: u64,
    inner_get: ngx::ffi::ngx_event_get_peer_pt,
    inner_free: ngx::ffi::ngx_event_free_peer_pt,
    inner_set_session: ngx::ffi::ngx_event_set_peer_session_pt,
    inner_save_session: ngx::ffi::ngx_event_save_peer_session_pt,
    inner_data: *mut c_void,
    rrp: *mut ngx_http_upstream_rr_peer_data_t,
    /// Round robin's primary peer list (in the shared zone with `zone`).
    primary: *mut ngx_http_upstream_rr_peers_t,
    conf: *const UpstreamConf,
    balancer: *const Balancer,
    tokens: u64,
    cost: u64,
    /// Slot reserved by the current try, or usize::MAX.
    slot: usize,
    /// The prompt's block keys (prefix affinity), in the request pool.
    keys: *const u64,
    nkeys: usize,
    /// Entry of this request in the pending table, or usize::MAX.
    pending: usize,
    pending_id: u64,
}

/// Round robin's peer data below `data`: `data` itself, or the third field
/// of the keepalive module's peer data (stable since nginx 1.1.4).
///
/// # Safety
/// `data` must be the peer data an init_peer chain over round robin set.
unsafe fn find_rrp(
    data: *mut c_void,
    primary: *mut ngx_http_upstream_rr_peers_t,
) -> *mut ngx_http_upstream_rr_peer_data_t {
    // SAFETY: both candidate structs are at least five words long and were
    // allocated by nginx; we only compare pointers read from them.
    unsafe {
        let rrp = data as *mut ngx_http_upstream_rr_peer_data_t;
        if !rrp.is_null() && (*rrp).peers == primary {
            return rrp;
        }
        let inner = *(data as *mut *mut c_void).add(2) as *mut ngx_http_upstream_rr_peer_data_t;
        if !inner.is_null() && (*inner).peers == primary {
            return inner;
        }
    }
    null_mut()
}

/// The request-time init hook (behind [`balancer_hooks!`]).
///
/// # Safety
/// nginx's init_peer contract: `r` has an upstream, `us` is its conf.
pub unsafe fn init_peer(
    r: *mut ngx_http_request_t,
    us: *mut ngx_http_upstream_srv_conf_t,
    conf: *mut UpstreamConf,
    balancer: &'static Balancer,
) -> ngx_int_t {
    // SAFETY: nginx's contract; allocations are from the request pool.
    unsafe {
        let Some(conf) = conf.as_ref() else { return NGX_ERROR as ngx_int_t };
        let init = conf.saved_init_peer.unwrap_or(ngx_http_upstream_init_round_robin_peer);
        let rc = init(r, us);
        if rc != NGX_OK as ngx_int_t {
            return rc;
        }
        let u = (*r).upstream;
        let pd = ngx_pcalloc((*r).pool, std::mem::size_of::<PeerData>()) as *mut PeerData;
        if pd.is_null() {
            return NGX_ERROR as ngx_int_t;
        }
        let pc = &mut (*u).peer;
        let cl = (*r).headers_in.content_length_n.max(0) as usize;
        // Read now, not at configuration time: with `zone` round robin moves
        // its peers into the shared zone after postconfiguration.
        let primary = (*us).peer.data as *mut ngx_http_upstream_rr_peers_t;
        pd.write(PeerData {
            magic: PEER_DATA_MAGIC,
            inner_get: pc.get,
            inner_free: pc.free,
            inner_set_session: pc.set_session,
            inner_save_session: pc.save_session,
            inner_data: pc.data,
            rrp: find_rrp(pc.data, primary),
            primary,
            conf,
            balancer,
            tokens: tokens_for_bytes(cl),
            cost: balancer.cost.map_or(0, |f| f(tokens_for_bytes(cl), &conf.params)),
            slot: usize::MAX,
            keys: std::ptr::null(),
            nkeys: 0,
            pending: usize::MAX,
            pending_id: 0,
        });
        if balancer.prefix {
            fingerprint(r, &mut *pd, conf);
        }
        if (*pd).rrp.is_null() && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            ngx::ngx_log_error!(
                NGX_LOG_WARN,
                (*(*r).connection).log,
                "{}: upstream \"{}\" is not balanced over round robin's peers (another module wraps them), using round robin",
                balancer.name,
                String::from_utf8_lossy(&conf.upstream_name)
            );
        }
        pc.data = pd as *mut c_void;
        pc.get = Some(get_peer);
        pc.free = Some(free_peer);
        pc.set_session = Some(set_session);
        pc.save_session = Some(save_session);
    }
    NGX_OK as ngx_int_t
}

/// Computes the block keys of the request's prompt (prefix affinity) into
/// the request pool. Bodies without a prompt get none.
///
/// # Safety
/// `r` must be a live request whose body (if any) is read.
unsafe fn fingerprint(r: *mut ngx_http_request_t, pd: &mut PeerData, conf: &UpstreamConf) {
    // SAFETY: the body and the key array live in the request pool, as long
    // as the peer data; the array is word-aligned (ngx_palloc).
    unsafe {
        let Ok(body) = crate::body::bytes(r) else { return };
        let Some(text) = prefix::prompt_bytes(body) else { return };
        let block = conf.params.int[2].unwrap_or(pdgate_core::balance::PCA_BLOCK_SIZE).max(1);
        let n = (text.len() / block as usize).min(MAX_BLOCKS);
        if n == 0 {
            return;
        }
        let keys = ngx::ffi::ngx_palloc((*r).pool, n * 8) as *mut u64;
        if keys.is_null() {
            return;
        }
        let out = std::slice::from_raw_parts_mut(keys, n);
        let seed = peer_key(&conf.upstream_name, b"");
        pd.nkeys = prefix::block_hashes(text, block as usize, seed, out);
        pd.keys = keys;
    }
}

/// length_balance's bookkeeping after a placement on `slot`: the history
/// grows by the request, and every `int[0]` placements on the upstream
/// (counted on its clock slot) all its peers' history is divided by
/// `int[1]`.
fn record_history(
    table: &SlotTable,
    slots: &[usize],
    clock: usize,
    slot: usize,
    pd: &PeerData,
    p: &Params,
) {
    let w = p.float[0].unwrap_or(pdgate_core::balance::LENGTH_REQ_LEN_WEIGHT);
    table.record(slot, pdgate_core::balance::weighted_tokens(pd.tokens, w));
    if clock == usize::MAX {
        return;
    }
    let every = p.int[0].unwrap_or(pdgate_core::balance::LENGTH_MERGE_THRESHOLD).max(1);
    if table.tick(clock).is_multiple_of(every) {
        let by = p.int[1].unwrap_or(pdgate_core::balance::LENGTH_DECAY_FACTOR);
        for &s in slots {
            table.decay(s, by);
        }
    }
}

fn tried(rrp: &ngx_http_upstream_rr_peer_data_t, i: usize) -> bool {
    let bits = usize::BITS as usize;
    // SAFETY: rr allocates `tried` with a bit for each peer of the list.
    unsafe { *rrp.tried.add(i / bits) & (1 << (i % bits)) != 0 }
}

unsafe extern "C" fn get_peer(pc: *mut ngx_peer_connection_t, data: *mut c_void) -> ngx_int_t {
    crate::guard::catch("balancer get", NGX_ERROR as ngx_int_t, || {
        // SAFETY: `data` is our PeerData (set in init_peer).
        unsafe { get(pc, &mut *(data as *mut PeerData)) }
    })
}

unsafe fn get(pc: *mut ngx_peer_connection_t, pd: &mut PeerData) -> ngx_int_t {
    let Some(inner_get) = pd.inner_get else { return NGX_ERROR as ngx_int_t };
    // SAFETY: rrp and conf were set by init_peer from live structures; the
    // peer list is round robin's, walked as ngx_http_upstream_get_peer does.
    unsafe {
        let delegate = |pc| inner_get(pc, pd.inner_data);
        let (Some(rrp), Some(conf)) = (pd.rrp.as_mut(), pd.conf.as_ref()) else {
            return delegate(pc);
        };
        let peers = rrp.peers;
        if peers != pd.primary || peers.is_null() {
            return delegate(pc); // round robin moved on to the backup servers
        }
        let n = (*peers).number;
        let Some(z) = zone(conf.zone) else { return delegate(pc) };
        let table = z.slots;
        let b = &*pd.balancer;
        if n == 0 || n > MAX_PEERS {
            return delegate(pc);
        }
        // Slots of the peers, once per worker.
        {
            // One slot per peer, then (length_balance) the upstream's clock.
            let mut slot_of = conf.slot_of.borrow_mut();
            if slot_of.len() != n + 1 {
                slot_of.clear();
                let mut p = (*peers).peer;
                while !p.is_null() {
                    let key = peer_key(&conf.upstream_name, str_bytes(&(*p).name));
                    slot_of.push(table.find_or_claim(key).unwrap_or(usize::MAX));
                    p = (*p).next;
                }
                let clock = if b.history {
                    table.find_or_claim(peer_key(&conf.upstream_name, b"")).unwrap_or(usize::MAX)
                } else {
                    usize::MAX
                };
                slot_of.push(clock);
            }
        }
        let slot_of = conf.slot_of.borrow();
        let keys: &[u64] =
            if pd.keys.is_null() { &[] } else { std::slice::from_raw_parts(pd.keys, pd.nkeys) };
        // Small pools (the usual case) decide on small stack arrays.
        let decided = if n <= SMALL_POOL {
            decide::<SMALL_POOL>(rrp, peers, n, &z, &slot_of, b, conf, pd, keys)
        } else {
            decide::<MAX_PEERS>(rrp, peers, n, &z, &slot_of, b, conf, pd, keys)
        };
        let Some(Decision { c, view, affinity, npending }) = decided else {
            return delegate(pc);
        };
        // Let the wrapped get take exactly `c`: everything else looks tried.
        let bits = usize::BITS as usize;
        let words = n.div_ceil(bits);
        let mut saved = [0usize; MAX_PEERS / 64 + 1];
        for (w, s) in saved.iter_mut().enumerate().take(words) {
            *s = *rrp.tried.add(w);
            let all = if (w + 1) * bits <= n { usize::MAX } else { (1usize << (n % bits)) - 1 };
            *rrp.tried.add(w) = all & !(if c / bits == w { 1 << (c % bits) } else { 0 });
        }
        let rc = inner_get(pc, pd.inner_data);
        if rrp.peers == peers {
            for (w, s) in saved.iter().enumerate().take(words) {
                let mine = if c / bits == w
                    && (rc == NGX_OK as ngx_int_t || rc == NGX_DONE as ngx_int_t)
                {
                    1 << (c % bits)
                } else {
                    0
                };
                *rrp.tried.add(w) = *s | mine;
            }
        }
        if rc == NGX_OK as ngx_int_t || rc == NGX_DONE as ngx_int_t {
            let slot = slot_of.get(c).copied().unwrap_or(usize::MAX);
            table.acquire(slot, pd.tokens, pd.cost);
            pd.slot = slot;
            if b.history {
                let clock = slot_of.get(n).copied().unwrap_or(usize::MAX);
                record_history(&table, &slot_of[..n], clock, slot, pd, &conf.params);
            }
            if conf.params.mode == MODE_PREFILL && pd.pending == usize::MAX {
                let id = crate::random::with_rng(|r| r.next_u64()).max(1);
                let now = *std::ptr::addr_of!(ngx::ffi::ngx_current_msec) as u64;
                pd.pending = z.pending.add(id, pd.tokens, now, id).unwrap_or(usize::MAX);
                pd.pending_id = id;
            }
            if !keys.is_empty() && slot != usize::MAX {
                z.index.insert(keys, slot);
            }
            ngx_log_debug!(
                mask: DebugMask::Http,
                (*pc).log,
                "{}: peer {} of {} ({}), load {} requests / {} tokens / cost {} / history {}+{}, request {} tokens, {} in prefill, prefix match {} of {} blocks, try {}",
                b.name,
                c,
                n,
                String::from_utf8_lossy((*pc).name.as_ref().map_or(&[][..], |s| str_bytes(s))),
                view.requests,
                view.tokens,
                view.cost,
                view.hist_requests,
                view.hist_tokens,
                pd.tokens,
                npending,
                affinity,
                keys.len(),
                (*pc).tries
            );
        }
        rc
    }
}

/// Pools up to this size decide on small stack arrays.
const SMALL_POOL: usize = 16;

/// Most requests in prefill a decode placement reads (of the table's
/// [`PENDING`]; in table order).
const PENDING_SEEN: usize = 256;

/// What a policy decided, with what the debug line reports.
struct Decision {
    c: usize,
    view: PeerView,
    affinity: u32,
    npending: usize,
}

/// Builds the peers' views (at most `N`), gathers what the policy needs and
/// asks it.
///
/// # Safety
/// `peers` must be round robin's live list of `n ≤ N` primary peers and
/// `rrp` this request's round robin data over it.
#[allow(clippy::too_many_arguments)]
unsafe fn decide<const N: usize>(
    rrp: &ngx_http_upstream_rr_peer_data_t,
    peers: *mut ngx_http_upstream_rr_peers_t,
    n: usize,
    z: &Zone,
    slot_of: &[usize],
    b: &Balancer,
    conf: &UpstreamConf,
    pd: &PeerData,
    keys: &[u64],
) -> Option<Decision> {
    let table = &z.slots;
    // SAFETY: the peer list is round robin's, walked as
    // ngx_http_upstream_get_peer does, for at most n ≤ N entries.
    unsafe {
        let now = ngx::ffi::ngx_time();
        let mut views = [PeerView::default(); N];
        let mut p = (*peers).peer;
        let mut i = 0;
        while !p.is_null() && i < n {
            let peer = &*p;
            let failed = peer.max_fails != 0
                && peer.fails >= peer.max_fails
                && now - peer.checked <= peer.fail_timeout;
            let full = peer.max_conns != 0 && peer.conns >= peer.max_conns;
            let slot = slot_of.get(i).copied().unwrap_or(usize::MAX);
            let (requests, tokens, cost) = table.load(slot);
            let (hist_requests, hist_tokens) = if b.history { table.history(slot) } else { (0, 0) };
            views[i] = PeerView {
                available: !tried(rrp, i) && peer.down == 0 && !failed && !full,
                weight: peer.weight.max(1) as u32,
                requests,
                tokens,
                cost,
                hist_requests,
                hist_tokens,
            };
            p = peer.next;
            i += 1;
        }
        let tie = crate::random::with_rng(|r| r.next_u64());
        // Requests in prefill, for a decode upstream's look-ahead.
        let mut pending = [0u64; PD_SCORE_LOOKAHEAD];
        let mut npending = 0;
        if conf.params.mode == MODE_DECODE {
            let mut scratch = [(0u64, 0u64); PENDING_SEEN];
            npending = z.pending.oldest(&mut pending, &mut scratch);
        }
        // The peer holding the longest prefix of this prompt.
        let mut affinity = [0u32; N];
        if let Some((blocks, slot)) = z.index.longest(keys) {
            if let Some(i) = slot_of.iter().take(n).position(|&s| s == slot) {
                affinity[i] = blocks as u32;
            }
        }
        let req = Request {
            tokens: pd.tokens,
            cost: pd.cost,
            params: &conf.params,
            tie,
            pending: &pending[..npending],
            affinity: &affinity[..n],
        };
        let c = (b.choose)(&views[..n], &req)?;
        Some(Decision { c, view: views[c], affinity: affinity[c], npending })
    }
}

unsafe extern "C" fn free_peer(
    pc: *mut ngx_peer_connection_t,
    data: *mut c_void,
    state: ngx_uint_t,
) {
    crate::guard::catch("balancer free", (), || {
        // SAFETY: `data` is our PeerData.
        unsafe {
            let pd = &mut *(data as *mut PeerData);
            let z = pd.conf.as_ref().and_then(|c| zone(c.zone));
            if pd.slot != usize::MAX {
                if let Some(z) = &z {
                    z.slots.release(pd.slot, pd.tokens, pd.cost);
                }
                pd.slot = usize::MAX;
            }
            if pd.pending != usize::MAX {
                if let Some(z) = &z {
                    z.pending.remove(pd.pending, pd.pending_id);
                }
                pd.pending = usize::MAX;
            }
            if let Some(f) = pd.inner_free {
                f(pc, pd.inner_data, state);
            }
        }
    })
}

unsafe extern "C" fn set_session(pc: *mut ngx_peer_connection_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: `data` is our PeerData; the wrapped hook gets its own data.
    unsafe {
        let pd = &*(data as *mut PeerData);
        match pd.inner_set_session {
            Some(f) => f(pc, pd.inner_data),
            None => NGX_OK as ngx_int_t,
        }
    }
}

unsafe extern "C" fn save_session(pc: *mut ngx_peer_connection_t, data: *mut c_void) {
    // SAFETY: as in set_session.
    unsafe {
        let pd = &*(data as *mut PeerData);
        if let Some(f) = pd.inner_save_session {
            f(pc, pd.inner_data);
        }
    }
}

/// The argument of a one-argument directive.
///
/// # Safety
/// `cf` must be a directive handler's conf.
unsafe fn arg<'a>(cf: *mut ngx_conf_t) -> &'a [u8] {
    // SAFETY: forwarded.
    unsafe { crate::conf::args(cf).get(1).map(|a| str_bytes(a)).unwrap_or(&[]) }
}

/// `<balancer> on|off;` — `cmd->post` points at the module's [`Balancer`].
///
/// # Safety
/// nginx's directive handler contract, with `conf` this module's
/// [`UpstreamConf`].
pub unsafe extern "C" fn cmd_flag(
    cf: *mut ngx_conf_t,
    cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    crate::guard::catch("balancer directive", NGX_CONF_ERROR, || {
        // SAFETY: as documented.
        unsafe {
            match pdgate_core::conf::parse_flag(arg(cf)) {
                Ok(on) => set_enabled(cf, cmd, conf, on),
                Err(e) => crate::conf::error(cf, &e.to_string()),
            }
        }
    })
}

/// Turns the balancer on or off for the upstream being parsed, once.
///
/// # Safety
/// As [`cmd_flag`].
unsafe fn set_enabled(
    cf: *mut ngx_conf_t,
    cmd: *mut ngx_command_t,
    conf: *mut c_void,
    on: bool,
) -> *mut c_char {
    // SAFETY: as documented.
    unsafe {
        let c = &mut *(conf as *mut UpstreamConf);
        let Some(b) = ((*cmd).post as *const Balancer).as_ref() else { return NGX_CONF_ERROR };
        if c.enabled != -1 {
            return crate::conf::error(cf, "is duplicate");
        }
        c.enabled = isize::from(on);
        if on {
            if let Err(e) = enable(cf, c, (b.module)(), b.zone) {
                return crate::conf::error(cf, e);
            }
        }
        crate::conf::OK
    }
}

/// `<balancer>` with no argument, `on` or `off` (length_balance's form;
/// the bare directive turns it on, as in the original).
///
/// # Safety
/// As [`cmd_flag`].
pub unsafe extern "C" fn cmd_flag_or_bare(
    cf: *mut ngx_conf_t,
    cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: as documented.
    unsafe {
        if crate::conf::args(cf).len() == 1 {
            return set_enabled(cf, cmd, conf, true);
        }
        cmd_flag(cf, cmd, conf)
    }
}

/// `<balancer> prefill|decode|off;` (pd_score_balance's role word).
///
/// # Safety
/// As [`cmd_flag`].
pub unsafe extern "C" fn cmd_mode(
    cf: *mut ngx_conf_t,
    cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    crate::guard::catch("balancer directive", NGX_CONF_ERROR, || {
        // SAFETY: as documented.
        unsafe {
            let mode = match arg(cf) {
                b"prefill" => MODE_PREFILL,
                b"decode" => MODE_DECODE,
                b"off" => 0,
                v => {
                    return crate::conf::error(
                        cf,
                        &format!(
                            "invalid value \"{}\", it must be \"prefill\", \"decode\" or \"off\"",
                            String::from_utf8_lossy(v)
                        ),
                    )
                }
            };
            let rc = set_enabled(cf, cmd, conf, mode != 0);
            if rc.is_null() {
                (*(conf as *mut UpstreamConf)).params.mode = mode;
            }
            rc
        }
    })
}

/// `<balancer>_shm_size SIZE;` at http level: the size of the module's
/// shared zone (the default fits, and a prefix index grows it to fit).
///
/// # Safety
/// nginx's directive handler contract (http main context).
pub unsafe extern "C" fn cmd_shm_size(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    _conf: *mut c_void,
) -> *mut c_char {
    crate::guard::catch("balancer directive", NGX_CONF_ERROR, || {
        // SAFETY: as documented.
        unsafe {
            if SHM_SIZE.load(Ordering::Relaxed) != 0 {
                return crate::conf::error(cf, "is duplicate");
            }
            let v = arg(cf);
            match pdgate_core::conf::parse_size(v) {
                Some(n) if n >= 64 << 10 => {
                    SHM_SIZE.store(n, Ordering::Relaxed);
                    crate::conf::OK
                }
                Some(_) => crate::conf::error(
                    cf,
                    &format!(
                        "size \"{}\" is too small, the least is 64k",
                        String::from_utf8_lossy(v)
                    ),
                ),
                None => crate::conf::error(
                    cf,
                    &format!("invalid size \"{}\"", String::from_utf8_lossy(v)),
                ),
            }
        }
    })
}

/// Forgets this module's http-level settings (preconfiguration: a reload
/// parses the configuration again in the same process).
pub fn reset_main_settings() {
    SHM_SIZE.store(0, Ordering::Relaxed);
    INDEX_ENTRIES.store(0, Ordering::Relaxed);
}

/// An http-level directive of a balancer module (`<name>_shm_size`).
pub const fn main_command(
    name: &'static std::ffi::CStr,
    set: unsafe extern "C" fn(*mut ngx_conf_t, *mut ngx_command_t, *mut c_void) -> *mut c_char,
) -> ngx_command_t {
    ngx_command_t {
        name: ngx_str_t { len: name.count_bytes(), data: name.as_ptr() as *mut u8 },
        type_: (ngx::ffi::NGX_HTTP_MAIN_CONF | ngx::ffi::NGX_CONF_TAKE1) as ngx_uint_t,
        set: Some(set),
        conf: ngx::ffi::NGX_HTTP_MAIN_CONF_OFFSET as ngx_uint_t,
        offset: 0,
        post: null_mut(),
    }
}

/// `<balancer>_<name> N;` — a positive whole number into
/// `params.int[cmd->offset]`.
///
/// # Safety
/// As [`cmd_flag`].
pub unsafe extern "C" fn cmd_int(
    cf: *mut ngx_conf_t,
    cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    crate::guard::catch("balancer directive", NGX_CONF_ERROR, || {
        // SAFETY: as documented.
        unsafe {
            let c = &mut *(conf as *mut UpstreamConf);
            let Some(slot) = c.params.int.get_mut((*cmd).offset) else { return NGX_CONF_ERROR };
            if slot.is_some() {
                return crate::conf::error(cf, "is duplicate");
            }
            let v = arg(cf);
            match std::str::from_utf8(v).ok().and_then(|s| s.parse::<u64>().ok()) {
                Some(n) if n > 0 => {
                    *slot = Some(n);
                    crate::conf::OK
                }
                _ => crate::conf::error(
                    cf,
                    &format!(
                        "invalid value \"{}\", it must be a positive number",
                        String::from_utf8_lossy(v)
                    ),
                ),
            }
        }
    })
}

/// `<balancer>_<name> X;` — a non-negative real number into
/// `params.float[cmd->offset]`.
///
/// # Safety
/// As [`cmd_flag`].
pub unsafe extern "C" fn cmd_float(
    cf: *mut ngx_conf_t,
    cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    crate::guard::catch("balancer directive", NGX_CONF_ERROR, || {
        // SAFETY: as documented.
        unsafe {
            let c = &mut *(conf as *mut UpstreamConf);
            let Some(slot) = c.params.float.get_mut((*cmd).offset) else { return NGX_CONF_ERROR };
            if slot.is_some() {
                return crate::conf::error(cf, "is duplicate");
            }
            let v = arg(cf);
            match std::str::from_utf8(v).ok().and_then(|s| s.parse::<f64>().ok()) {
                Some(x) if x.is_finite() && x >= 0.0 => {
                    *slot = Some(x);
                    crate::conf::OK
                }
                _ => crate::conf::error(
                    cf,
                    &format!(
                        "invalid value \"{}\", it must be a non-negative number",
                        String::from_utf8_lossy(v)
                    ),
                ),
            }
        }
    })
}

/// Learns from an answer what its request now holds on the engine: when a
/// piece of the answer of a request this balancer placed reports
/// `usage.total_tokens` larger than what is counted, the difference is
/// added to the peer's tokens in flight (and released with the rest when
/// the request ends). Call from a body filter; `in_` is the chain passing.
///
/// # Safety
/// `r` must be a live request and `in_` a valid chain (or NULL).
pub unsafe fn learn_usage(
    r: *mut ngx_http_request_t,
    in_: *mut ngx::ffi::ngx_chain_t,
    balancer: &Balancer,
) {
    // SAFETY: every peer data nginx's balancers allocate is at least a
    // word long, so reading the first word is in bounds; ours starts with
    // a magic word and names its balancer (a static, compared by address).
    // Buffers are read, not changed.
    unsafe {
        let Some(u) = (*r).upstream.as_ref() else { return };
        if u.peer.data.is_null() || *(u.peer.data as *const u64) != PEER_DATA_MAGIC {
            return;
        }
        let pd = &mut *(u.peer.data as *mut PeerData);
        if !std::ptr::eq(pd.balancer, balancer) {
            return;
        }
        if pd.slot == usize::MAX {
            return;
        }
        let Some(table) = pd.conf.as_ref().and_then(|c| table(c.zone)) else { return };
        let mut cl = in_;
        while let Some(link) = cl.as_ref() {
            if let Some(b) = link.buf.as_ref() {
                if b.in_file() == 0 && !b.pos.is_null() && b.last > b.pos {
                    let len = b.last.offset_from(b.pos) as usize;
                    let bytes = std::slice::from_raw_parts(b.pos, len);
                    if let Some(total) = pdgate_core::balance::usage_total_tokens(bytes) {
                        if total > pd.tokens {
                            table.add_tokens(pd.slot, total - pd.tokens);
                            pd.tokens = total;
                        }
                    }
                }
            }
            cl = link.next;
        }
    }
}

/// The balancer's counters as text, one line per peer of every upstream
/// that uses it: `upstream peer requests tokens cost total`. Served by the
/// `<balancer>_status` location directive (see [`balancer_module!`]).
///
/// # Safety
/// `r` must be a live request; `conf_of` as for [`install`].
pub unsafe fn status_text(
    r: *mut ngx_http_request_t,
    balancer: &Balancer,
    conf_of: impl Fn(*mut ngx_http_upstream_srv_conf_t) -> *mut UpstreamConf,
) -> String {
    let mut out = format!(
        "# {} upstream peer requests tokens cost total{}\n",
        balancer.name,
        if balancer.history { " hist_requests hist_tokens" } else { "" }
    );
    let mut modes = false;
    let mut zone_seen = null_mut();
    // SAFETY: the upstream main conf lives as long as the cycle; peer lists
    // are round robin's (read without its lock: a status snapshot).
    unsafe {
        let idx = (*std::ptr::addr_of!(ngx_http_upstream_module)).ctx_index;
        let umcf = *(*r).main_conf.add(idx) as *mut ngx_http_upstream_main_conf_t;
        let Some(umcf) = umcf.as_ref() else { return out };
        let ups: &[*mut ngx_http_upstream_srv_conf_t] = umcf.upstreams.as_slice();
        for &us in ups {
            let Some(conf) = conf_of(us).as_ref() else { continue };
            if conf.enabled != 1 {
                continue;
            }
            let Some(table) = table(conf.zone) else { continue };
            modes |= conf.params.mode != 0;
            zone_seen = conf.zone;
            let mut p = ((*us).peer.data as *mut ngx_http_upstream_rr_peers_t)
                .as_ref()
                .map_or(null_mut(), |peers| peers.peer);
            while let Some(peer) = p.as_ref() {
                let key = peer_key(&conf.upstream_name, str_bytes(&peer.name));
                let (requests, tokens, cost, total) = match table.find(key) {
                    Some(i) => {
                        let (a, b, c) = table.load(i);
                        (a, b, c, table.total(i))
                    }
                    None => (0, 0, 0, 0),
                };
                out.push_str(&format!(
                    "{} {} {requests} {tokens} {cost} {total}",
                    String::from_utf8_lossy(&conf.upstream_name),
                    String::from_utf8_lossy(str_bytes(&peer.name)),
                ));
                if balancer.history {
                    let (r, t) = table.find(key).map_or((0, 0), |i| table.history(i));
                    out.push_str(&format!(" {r} {t}"));
                }
                out.push('\n');
                p = peer.next;
            }
        }
        if let Some(z) = zone(zone_seen) {
            if modes {
                out.push_str(&format!("# in prefill {}\n", z.pending.len()));
            }
            if balancer.prefix {
                out.push_str(&format!("# prefix index entries {}\n", z.index.used()));
            }
        }
    }
    out
}

/// Every pdgate balancer's in-flight counters, whichever module (`.so`)
/// owns them: calls `f(balancer, upstream, peer, requests, tokens)` for
/// each primary peer of each upstream that has a slot in a balancer zone
/// of the running cycle. Zones are recognised by name (`pdgate_<balancer>`),
/// by the header magic and by a layout that fits the zone, so this works
/// across modules built from this crate without sharing any static.
///
/// # Safety
/// `r` must be a live request.
pub unsafe fn for_each_peer_gauge(
    r: *mut ngx_http_request_t,
    mut f: impl FnMut(&str, &[u8], &[u8], u64, u64),
) {
    // SAFETY: ngx_cycle is the running cycle in a worker; its shared memory
    // list and the zones in it live as long as the cycle. A zone's data is
    // only read as a TableHeader when the zone is big enough for one and
    // more (checked before `zone()` reads it); peer lists as in status_text.
    unsafe {
        let cycle = *std::ptr::addr_of!(ngx::ffi::ngx_cycle);
        let Some(cycle) = cycle.as_ref() else { return };
        let idx = (*std::ptr::addr_of!(ngx_http_upstream_module)).ctx_index;
        let umcf = *(*r).main_conf.add(idx) as *mut ngx_http_upstream_main_conf_t;
        let Some(umcf) = umcf.as_ref() else { return };
        let ups: &[*mut ngx_http_upstream_srv_conf_t] = umcf.upstreams.as_slice();
        let mut part: *const ngx::ffi::ngx_list_part_t = &cycle.shared_memory.part;
        while let Some(p) = part.as_ref() {
            let zones = p.elts as *mut ngx_shm_zone_t;
            for i in 0..p.nelts {
                let z = zones.add(i);
                let name = str_bytes(&(*z).shm.name);
                let Some(balancer) = name.strip_prefix(b"pdgate_") else { continue };
                let Ok(balancer) = std::str::from_utf8(balancer) else { continue };
                let h = (*z).data as *const TableHeader;
                let shm_start = (*z).shm.addr as usize;
                let shm_end = shm_start.saturating_add((*z).shm.size);
                let h_at = h as usize;
                if h.is_null()
                    || h_at < shm_start
                    || h_at.saturating_add(std::mem::size_of::<TableHeader>()) > shm_end
                    || (*h).magic != MAGIC
                {
                    continue;
                }
                let bytes = std::mem::size_of::<TableHeader>()
                    + ((*h).slots as usize).saturating_mul(SLOT_BYTES)
                    + ((*h).pending as usize).saturating_mul(PENDING_BYTES)
                    + ((*h).index as usize).saturating_mul(ENTRY_BYTES);
                if h_at.saturating_add(bytes) > shm_end {
                    continue;
                }
                let Some(table) = table(z) else { continue };
                for &us in ups {
                    let up = str_bytes(&(*us).host);
                    let mut peer = ((*us).peer.data as *mut ngx_http_upstream_rr_peers_t)
                        .as_ref()
                        .map_or(null_mut(), |peers| peers.peer);
                    while let Some(pe) = peer.as_ref() {
                        let pname = str_bytes(&pe.name);
                        if let Some(slot) = table.find(peer_key(up, pname)) {
                            let (requests, tokens, _) = table.load(slot);
                            f(balancer, up, pname, requests, tokens);
                        }
                        peer = pe.next;
                    }
                }
            }
            part = p.next;
        }
    }
}

/// A location-context, no-argument directive of a balancer module (its
/// `_status` directive); `set` installs the content handler.
pub const fn location_command(
    name: &'static std::ffi::CStr,
    set: unsafe extern "C" fn(*mut ngx_conf_t, *mut ngx_command_t, *mut c_void) -> *mut c_char,
) -> ngx_command_t {
    ngx_command_t {
        name: ngx_str_t { len: name.count_bytes(), data: name.as_ptr() as *mut u8 },
        type_: (ngx::ffi::NGX_HTTP_LOC_CONF | ngx::ffi::NGX_CONF_NOARGS) as ngx_uint_t,
        set: Some(set),
        conf: ngx::ffi::NGX_HTTP_LOC_CONF_OFFSET as ngx_uint_t,
        offset: 0,
        post: null_mut(),
    }
}

/// Sets the content handler of the location being parsed.
///
/// # Safety
/// `cf` must be a location-context directive handler's conf.
pub unsafe fn set_content_handler(
    cf: *mut ngx_conf_t,
    handler: ngx::ffi::ngx_http_handler_pt,
) -> *mut c_char {
    // SAFETY: in location context the core module's loc conf exists.
    unsafe {
        match (*cf).http_location_conf_unchecked::<ngx::ffi::ngx_http_core_loc_conf_t>(
            &*std::ptr::addr_of!(ngx::ffi::ngx_http_core_module),
        ) {
            Some(clcf) => {
                (*clcf.as_ptr()).handler = handler;
                crate::conf::OK
            }
            None => NGX_CONF_ERROR,
        }
    }
}

/// An upstream-context directive of a balancer module: `set` is one of
/// [`cmd_flag`], [`cmd_int`], [`cmd_float`]; `offset` picks the float slot;
/// `post` is the module's [`Balancer`].
pub const fn command(
    name: &'static std::ffi::CStr,
    takes: u32,
    set: unsafe extern "C" fn(*mut ngx_conf_t, *mut ngx_command_t, *mut c_void) -> *mut c_char,
    offset: usize,
    balancer: &'static Balancer,
) -> ngx_command_t {
    ngx_command_t {
        // nginx compares directive names with strcmp: keep the NUL.
        name: ngx_str_t { len: name.count_bytes(), data: name.as_ptr() as *mut u8 },
        type_: (ngx::ffi::NGX_HTTP_UPS_CONF | takes) as ngx_uint_t,
        set: Some(set),
        conf: ngx::ffi::NGX_HTTP_SRV_CONF_OFFSET as ngx_uint_t,
        offset,
        post: balancer as *const Balancer as *mut c_void,
    }
}

/// Declares a balancer module's `init_peer` and postconfiguration hooks:
/// `balancer_hooks!(init_peer_fn, postconf_fn, ngx_module_static, BALANCER)`.
#[macro_export]
macro_rules! balancer_hooks {
    ($init_peer:ident, $postconf:ident, $module:ident, $balancer:expr) => {
        unsafe fn __pdgate_conf_of(
            us: *mut $crate::ffi::ngx_http_upstream_srv_conf_t,
        ) -> *mut $crate::upstream::UpstreamConf {
            // SAFETY: srv_conf of an `upstream {}` block has a slot per HTTP
            // module, this module's holding an UpstreamConf; implicit
            // upstreams (`proxy_pass http://address`) have none.
            unsafe {
                if us.is_null() || (*us).srv_conf.is_null() {
                    return ::std::ptr::null_mut();
                }
                let idx = (*::std::ptr::addr_of!($module)).ctx_index;
                *(*us).srv_conf.add(idx) as *mut $crate::upstream::UpstreamConf
            }
        }

        unsafe extern "C" fn $init_peer(
            r: *mut $crate::ffi::ngx_http_request_t,
            us: *mut $crate::ffi::ngx_http_upstream_srv_conf_t,
        ) -> $crate::ffi::ngx_int_t {
            $crate::guard::catch(
                "balancer init",
                $crate::ffi::NGX_ERROR as $crate::ffi::ngx_int_t,
                || {
                    // SAFETY: nginx's init_peer contract.
                    unsafe { $crate::upstream::init_peer(r, us, __pdgate_conf_of(us), &$balancer) }
                },
            )
        }

        static mut __PDGATE_NEXT_BODY_FILTER: $crate::ffi::ngx_http_output_body_filter_pt = None;

        unsafe extern "C" fn __pdgate_body_filter(
            r: *mut $crate::ffi::ngx_http_request_t,
            in_: *mut $crate::ffi::ngx_chain_t,
        ) -> $crate::ffi::ngx_int_t {
            $crate::guard::catch("balancer body filter", (), || {
                // SAFETY: nginx's body filter contract.
                unsafe { $crate::upstream::learn_usage(r, in_, &$balancer) }
            });
            // SAFETY: the next filter was saved at postconfiguration.
            unsafe {
                match *::std::ptr::addr_of!(__PDGATE_NEXT_BODY_FILTER) {
                    Some(next) => next(r, in_),
                    None => $crate::ffi::NGX_OK as $crate::ffi::ngx_int_t,
                }
            }
        }

        unsafe extern "C" fn $postconf(cf: *mut $crate::ffi::ngx_conf_t) -> $crate::ffi::ngx_int_t {
            $crate::guard::catch(
                "balancer postconfiguration",
                $crate::ffi::NGX_ERROR as $crate::ffi::ngx_int_t,
                || {
                    // SAFETY: nginx's postconfiguration contract; the body
                    // filter chain is only changed here, single-threaded.
                    unsafe {
                        if $balancer.learn_usage {
                            *::std::ptr::addr_of_mut!(__PDGATE_NEXT_BODY_FILTER) =
                                $crate::ffi::ngx_http_top_body_filter;
                            $crate::ffi::ngx_http_top_body_filter = Some(__pdgate_body_filter);
                        }
                        $crate::upstream::install(
                            cf,
                            &$balancer,
                            |us| __pdgate_conf_of(us),
                            Some($init_peer),
                        )
                    }
                },
            )
        }
    };
}

/// Everything a balancer module crate exports, from its [`Balancer`] static
/// and its directives:
///
/// ```ignore
/// pdgate_glue::balancer_module!(ngx_http_upstream_x_module, BALANCER, status: c"x_status", [
///     command(c"x", NGX_CONF_FLAG, cmd_flag, 0, &BALANCER),
///     command(c"x_batch_size", NGX_CONF_TAKE1, cmd_int, 0, &BALANCER),
/// ]);
/// ```
#[macro_export]
macro_rules! balancer_module {
    ($module:ident, $balancer:ident, status: $status:literal, [$($cmd:expr),* $(,)?]) => {
        struct Module;

        impl $crate::ngx::http::HttpModule for Module {
            fn module() -> &'static $crate::ffi::ngx_module_t {
                // SAFETY: the module static is only written by nginx while loading.
                unsafe { &*::std::ptr::addr_of!($module) }
            }
        }

        // SAFETY: ServerConf is the type create_srv_conf allocates here.
        unsafe impl $crate::ngx::http::HttpModuleServerConf for Module {
            type ServerConf = $crate::upstream::UpstreamConf;
        }

        fn __pdgate_module() -> &'static $crate::ffi::ngx_module_t {
            <Module as $crate::ngx::http::HttpModule>::module()
        }

        $crate::balancer_hooks!(__pdgate_init_peer, __pdgate_postconfiguration, $module, $balancer);

        unsafe extern "C" fn __pdgate_preconfiguration(
            _cf: *mut $crate::ffi::ngx_conf_t,
        ) -> $crate::ffi::ngx_int_t {
            $crate::upstream::reset_main_settings();
            $crate::ffi::NGX_OK as $crate::ffi::ngx_int_t
        }

        static __PDGATE_CTX: $crate::ffi::ngx_http_module_t = $crate::ffi::ngx_http_module_t {
            preconfiguration: Some(__pdgate_preconfiguration),
            postconfiguration: Some(__pdgate_postconfiguration),
            create_main_conf: None,
            init_main_conf: None,
            create_srv_conf: Some(<Module as $crate::ngx::http::HttpModule>::create_srv_conf),
            // Upstream blocks are not merged.
            merge_srv_conf: None,
            create_loc_conf: None,
            merge_loc_conf: None,
        };

        unsafe extern "C" fn __pdgate_status_handler(
            r: *mut $crate::ffi::ngx_http_request_t,
        ) -> $crate::ffi::ngx_int_t {
            $crate::guard::catch("balancer status", $crate::ffi::NGX_ERROR as $crate::ffi::ngx_int_t, || {
                // SAFETY: nginx calls content handlers with a live request.
                unsafe {
                    let rc = $crate::ffi::ngx_http_discard_request_body(r);
                    if rc != $crate::ffi::NGX_OK as $crate::ffi::ngx_int_t {
                        return rc;
                    }
                    let text = $crate::upstream::status_text(r, &$balancer, |us| __pdgate_conf_of(us));
                    $crate::response::send(r, 200, b"text/plain", text.as_bytes())
                }
            })
        }

        unsafe extern "C" fn __pdgate_cmd_status(
            cf: *mut $crate::ffi::ngx_conf_t,
            _cmd: *mut $crate::ffi::ngx_command_t,
            _conf: *mut ::std::ffi::c_void,
        ) -> *mut ::std::ffi::c_char {
            // SAFETY: nginx's directive handler contract (location context).
            unsafe { $crate::upstream::set_content_handler(cf, Some(__pdgate_status_handler)) }
        }

        static mut __PDGATE_COMMANDS: [$crate::ffi::ngx_command_t; [$(stringify!($cmd)),*].len() + 2] = [
            $($cmd,)*
            $crate::upstream::location_command($status, __pdgate_cmd_status),
            $crate::ffi::ngx_command_t::empty(),
        ];

        #[no_mangle]
        #[allow(non_upper_case_globals)]
        pub static mut $module: $crate::ffi::ngx_module_t = $crate::ffi::ngx_module_t {
            ctx: ::std::ptr::addr_of!(__PDGATE_CTX) as *mut ::std::ffi::c_void,
            commands: ::std::ptr::addr_of_mut!(__PDGATE_COMMANDS) as *mut $crate::ffi::ngx_command_t,
            type_: $crate::ffi::NGX_HTTP_MODULE as $crate::ffi::ngx_uint_t,
            ..$crate::ffi::ngx_module_t::default()
        };

        $crate::ngx::ngx_modules!($module);
    };
}
