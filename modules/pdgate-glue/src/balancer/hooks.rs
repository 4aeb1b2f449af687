//! The balancer's hooks: wrapping `peer.init` at postconfiguration
//! ([`install`]), and per request `init` ([`init_peer`]), `get` and `free`.

use std::ffi::c_void;
use std::ptr::null_mut;

use ngx::ffi::{
    ngx_conf_t, ngx_http_request_t, ngx_http_upstream_init_peer_pt,
    ngx_http_upstream_init_round_robin_peer, ngx_http_upstream_main_conf_t,
    ngx_http_upstream_module, ngx_http_upstream_rr_peer_data_t, ngx_http_upstream_rr_peers_t,
    ngx_http_upstream_srv_conf_t, ngx_int_t, ngx_pcalloc, ngx_peer_connection_t, ngx_uint_t,
    NGX_DONE, NGX_ERROR, NGX_LOG_EMERG, NGX_LOG_WARN, NGX_OK,
};
use ngx::http::HttpModuleConfExt;
use ngx::log::DebugMask;
use ngx::{ngx_conf_log_error, ngx_log_debug};
use pdgate_core::balance::policy::{Held, Inputs, Placement, Shared, Upstream};
use pdgate_core::balance::prefix::{self, MAX_BLOCKS};
use pdgate_core::balance::slots::peer_key;
use pdgate_core::balance::{blend_engine, PeerView, PD_SCORE_LOOKAHEAD};
use pdgate_core::engine::EngineRow;
use pdgate_core::kv::prompt::Head;
use pdgate_core::tokens::tokens_for_bytes;

use super::{zone, Balancer, Request, UpstreamConf, MAX_PEERS};
use crate::conf::str_bytes;

/// Wraps `peer.init` of every upstream where `conf_of` says the balancer is
/// on, and sizes the zone for them. Call from postconfiguration.
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
            let Some(conf) = conf_of(uscf).as_ref() else { continue };
            if conf.enabled != 1 {
                continue;
            }
            zone = conf.zone;
            if let Some(peers) = ((*uscf).peer.data as *mut ngx_http_upstream_rr_peers_t).as_ref() {
                let n = balancer.state.index_entries(&conf.params, peers.number);
                index = index.saturating_add(n);
            }
        }
        if !zone.is_null() {
            if let Err(need) = zone::size(zone, index) {
                ngx_conf_log_error!(
                    NGX_LOG_EMERG,
                    cf,
                    "\"{}_shm_size\" of {}k is too small, at least {}k are needed ({} prefix index entries)",
                    balancer.name,
                    zone::SHM_SIZE.load(std::sync::atomic::Ordering::Relaxed) >> 10,
                    need.div_ceil(1024),
                    index
                );
                return NGX_ERROR as ngx_int_t;
            }
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
pub(super) const PEER_DATA_MAGIC: u64 = 0x7064_6761_7465_5044;

/// Per-request, per-upstream state.
#[repr(C)]
pub(super) struct PeerData {
    magic: u64,
    inner_get: ngx::ffi::ngx_event_get_peer_pt,
    inner_free: ngx::ffi::ngx_event_free_peer_pt,
    inner_set_session: ngx::ffi::ngx_event_set_peer_session_pt,
    inner_save_session: ngx::ffi::ngx_event_save_peer_session_pt,
    inner_data: *mut c_void,
    rrp: *mut ngx_http_upstream_rr_peer_data_t,
    /// Round robin's primary peer list (in the shared zone with `zone`).
    primary: *mut ngx_http_upstream_rr_peers_t,
    pub(super) conf: *const UpstreamConf,
    pub(super) balancer: *const Balancer,
    pub(super) tokens: u64,
    cost: u64,
    /// Slot reserved by the current try, or usize::MAX.
    pub(super) slot: usize,
    /// The prompt's block keys (prefix affinity), in the request pool.
    keys: *const u64,
    nkeys: usize,
    /// The prompt's keys as the engines' KV index names blocks (from
    /// `$pd_tokenized`), in the request pool, with their hashing's
    /// fingerprint and block size.
    tok_keys: *const u64,
    ntok: usize,
    hashing: u64,
    block_tokens: u64,
    /// What the try holds in the policy's state.
    held: Held,
    /// The answer's `usage` so far (see [`super::usage`]).
    pub(super) usage: pdgate_core::metrics::UsageScanner,
    /// The current try's engine row (counts it placed, then ended), or
    /// null.
    engine: *const EngineRow,
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

/// The request-time init hook (behind [`balancer_hooks!`](crate::balancer_hooks)).
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
        let tokenized = tokenized(r);
        let tokens = tokenized.as_ref().map_or_else(|| tokens_for_bytes(cl), |t| t.tokens);
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
            tokens,
            cost: balancer.cost.map_or(0, |f| f(tokens, &conf.params)),
            slot: usize::MAX,
            keys: std::ptr::null(),
            nkeys: 0,
            tok_keys: tokenized.as_ref().map_or(std::ptr::null(), |t| t.keys.as_ptr()),
            ntok: tokenized.as_ref().map_or(0, |t| t.keys.len()),
            hashing: tokenized.as_ref().map_or(0, |t| t.hashing),
            block_tokens: tokenized.as_ref().map_or(0, |t| t.block_size),
            held: Held::default(),
            usage: Default::default(),
            engine: std::ptr::null(),
        });
        if balancer.state.needs().prompt_blocks {
            fingerprint(r, &mut *pd, conf, balancer.state.block_size(&conf.params));
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

/// The prompt as the P/D module's `pd_tokenizer` saw it
/// (`$pd_tokenized`): its tokens, and its block keys copied into the
/// request pool (aligned words).
struct TokenizedView {
    tokens: u64,
    hashing: u64,
    block_size: u64,
    keys: &'static [u64],
}

/// `$pd_tokenized` of `r`'s main request, when a location tokenized it.
///
/// # Safety
/// `r` must be a live request.
unsafe fn tokenized(r: *mut ngx_http_request_t) -> Option<TokenizedView> {
    // SAFETY: as documented; the copy lives in the request pool.
    unsafe {
        let bytes = crate::tokenize::variable_of(r)?;
        let (head, keys) = pdgate_core::kv::prompt::PromptKeys::decode(bytes)?;
        let Head { hashing, tokens, block_size } = head;
        let n = keys.len();
        let at = if n == 0 {
            std::ptr::NonNull::<u64>::dangling().as_ptr()
        } else {
            ngx::ffi::ngx_palloc((*r).pool, n * 8) as *mut u64
        };
        if at.is_null() {
            return None;
        }
        let out = std::slice::from_raw_parts_mut(at, n);
        for (o, k) in out.iter_mut().zip(keys) {
            *o = k;
        }
        Some(TokenizedView { tokens, hashing, block_size, keys: out })
    }
}

/// Computes the block keys of the request's prompt into the request pool:
/// its token blocks' keys when it was tokenized (salted with the
/// upstream), else its text's. Bodies without a prompt get none.
///
/// # Safety
/// `r` must be a live request whose body (if any) is read.
unsafe fn fingerprint(
    r: *mut ngx_http_request_t,
    pd: &mut PeerData,
    conf: &UpstreamConf,
    block: usize,
) {
    // SAFETY: the body and the key array live in the request pool, as long
    // as the peer data; the array is word-aligned (ngx_palloc).
    unsafe {
        let seed = peer_key(&conf.upstream_name, b"");
        if pd.ntok > 0 {
            let keys = ngx::ffi::ngx_palloc((*r).pool, pd.ntok.min(MAX_BLOCKS) * 8) as *mut u64;
            if keys.is_null() {
                return;
            }
            let out = std::slice::from_raw_parts_mut(keys, pd.ntok.min(MAX_BLOCKS));
            for (o, k) in out.iter_mut().zip(std::slice::from_raw_parts(pd.tok_keys, pd.ntok)) {
                *o = (k ^ seed).max(1);
            }
            pd.keys = keys;
            pd.nkeys = out.len();
            return;
        }
        let Ok(body) = crate::body::bytes(r) else { return };
        let Some(text) = prefix::prompt_bytes(body) else { return };
        let block = block.max(1);
        let n = (text.len() / block).min(MAX_BLOCKS);
        if n == 0 {
            return;
        }
        let keys = ngx::ffi::ngx_palloc((*r).pool, n * 8) as *mut u64;
        if keys.is_null() {
            return;
        }
        let out = std::slice::from_raw_parts_mut(keys, n);
        pd.nkeys = prefix::block_hashes(text, block, seed, out);
        pd.keys = keys;
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
        // With `zone` the list is shared: `server … resolve` may add,
        // remove or swap peers in any worker. Round robin counts each
        // change in `*config`; a request whose round robin view is older
        // is round robin's to refuse ("busy"), and the list is read under
        // its read lock, let go before the wrapped get takes the write lock.
        let generation = (*peers).config.as_ref().copied().unwrap_or(0);
        if !(*peers).config.is_null() && rrp.config != generation {
            return delegate(pc);
        }
        let Some(z) = zone::shared(conf.zone) else { return delegate(pc) };
        let b = &*pd.balancer;
        // Every return below drops the guard before the wrapped get runs.
        let guard = crate::upstream::PeersRead::lock(peers);
        let n = (*peers).number;
        if n == 0 || n > MAX_PEERS {
            drop(guard);
            return delegate(pc);
        }
        // Slots of the peers, once per worker and again after any change
        // of the list (keyed by each peer's address, so a peer swapped for
        // another at the same count gets the other's slot): one per peer,
        // then the upstream's clock (for a state that needs one).
        {
            let mut slot_of = conf.slot_of.borrow_mut();
            if slot_of.len() != n + 1 || conf.slot_gen.get() != generation {
                conf.slot_gen.set(generation);
                slot_of.clear();
                let mut p = (*peers).peer;
                while !p.is_null() {
                    let key = peer_key(&conf.upstream_name, str_bytes(&(*p).name));
                    slot_of.push(z.slots.find_or_claim(key).unwrap_or(usize::MAX));
                    p = (*p).next;
                }
                let clock = if b.state.needs().clock {
                    z.slots.find_or_claim(peer_key(&conf.upstream_name, b"")).unwrap_or(usize::MAX)
                } else {
                    usize::MAX
                };
                slot_of.push(clock);
            }
        }
        let now_ms = *std::ptr::addr_of!(ngx::ffi::ngx_current_msec) as u64;
        engine_rows(conf, peers, n, generation, now_ms);
        let engine_of = conf.engine_of.borrow();
        let slot_of = conf.slot_of.borrow();
        let keys: &[u64] =
            if pd.keys.is_null() { &[] } else { std::slice::from_raw_parts(pd.keys, pd.nkeys) };
        let up = Upstream {
            params: &conf.params,
            peer_slots: slot_of.get(..n).unwrap_or(&[]),
            clock: slot_of.get(n).copied().unwrap_or(usize::MAX),
            keys,
        };
        // Small pools (the usual case) decide on small stack arrays.
        let decided = if n <= SMALL_POOL {
            decide::<SMALL_POOL>(rrp, peers, &z, &up, &engine_of, now_ms, b, pd)
        } else {
            decide::<MAX_PEERS>(rrp, peers, &z, &up, &engine_of, now_ms, b, pd)
        };
        drop(guard);
        let Some(Decision { c, view, affinity, npending, block_tokens }) = decided else {
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
        let took = rc == NGX_OK as ngx_int_t || rc == NGX_DONE as ngx_int_t;
        if rrp.peers == peers {
            for (w, s) in saved.iter().enumerate().take(words) {
                let mine = if c / bits == w && took { 1 << (c % bits) } else { 0 };
                *rrp.tried.add(w) = *s | mine;
            }
        }
        if took {
            let slot = up.peer_slots.get(c).copied().unwrap_or(usize::MAX);
            if block_tokens > 0 {
                // A precise placement counts what the engine will compute.
                pd.cost =
                    pdgate_core::balance::uncached(pd.tokens, u64::from(affinity) * block_tokens);
            }
            z.slots.acquire(slot, pd.tokens, pd.cost);
            pd.slot = slot;
            if let Some(e) = engine_of.get(c).and_then(|e| e.as_ref()) {
                e.placed();
                pd.engine = e;
            }
            let placed = Placement {
                upstream: up,
                slot,
                tokens: pd.tokens,
                now_ms,
                id: crate::random::with_rng(|r| r.next_u64()).max(1),
            };
            b.state.record(&z, &placed, &mut pd.held);
            b.state.decay(&z, &placed);
            ngx_log_debug!(
                mask: DebugMask::Http,
                (*pc).log,
                "{}: peer {} of {} ({}), load {} requests / {} tokens / cost {} / history {}+{}, engine fresh {} waiting {} pressured {} rate {} tok/s, request {} tokens, {} in prefill, prefix match {} of {} blocks, try {}",
                b.name,
                c,
                n,
                String::from_utf8_lossy((*pc).name.as_ref().map_or(&[][..], |s| str_bytes(s))),
                view.requests,
                view.tokens,
                view.cost,
                view.hist_requests,
                view.hist_tokens,
                view.engine.fresh,
                view.engine.waiting,
                view.engine.pressured,
                view.engine.rate_tps,
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

/// Brings `conf.engine_of` up to date for the upstream's `n` peers: after
/// a change of the list, and once a second while a peer has no scraped
/// engine row (the prober claims and fills rows on its own time; without
/// `pd_engine_metrics` this costs a lookup per peer per second).
///
/// # Safety
/// `peers` must be round robin's live list, held under its read lock.
unsafe fn engine_rows(
    conf: &UpstreamConf,
    peers: *mut ngx_http_upstream_rr_peers_t,
    n: usize,
    generation: usize,
    now_ms: u64,
) {
    let mut engine_of = conf.engine_of.borrow_mut();
    let changed = engine_of.len() != n || conf.engine_gen.get() != generation;
    let retry = engine_of.iter().any(|e| e.is_null()) && now_ms >= conf.engine_retry_ms.get();
    if !changed && !retry {
        return;
    }
    conf.engine_gen.set(generation);
    conf.engine_retry_ms.set(now_ms + 1000);
    engine_of.clear();
    // SAFETY: as documented.
    unsafe {
        let mut p = (*peers).peer;
        while !p.is_null() && engine_of.len() < n {
            let row = crate::health::engine_row(&conf.upstream_name, str_bytes(&(*p).name));
            engine_of.push(row.map_or(std::ptr::null(), |r| r as *const EngineRow));
            p = (*p).next;
        }
    }
}

/// Pools up to this size decide on small stack arrays.
const SMALL_POOL: usize = 16;

/// What a policy decided, with what the debug line reports.
struct Decision {
    c: usize,
    view: PeerView,
    affinity: u32,
    npending: usize,
    /// Tokens per block of `affinity` when the engines' KV index decided
    /// (0: not used).
    block_tokens: u64,
}

/// Builds the views of the upstream's `n ≤ N` peers (`up.peer_slots`),
/// lets the policy's state add what it reads, and asks the policy.
///
/// # Safety
/// `peers` must be round robin's live list of the primary peers and `rrp`
/// this request's round robin data over it.
#[allow(clippy::too_many_arguments)]
unsafe fn decide<const N: usize>(
    rrp: &ngx_http_upstream_rr_peer_data_t,
    peers: *mut ngx_http_upstream_rr_peers_t,
    z: &Shared,
    up: &Upstream,
    engines: &[*const EngineRow],
    now_ms: u64,
    b: &Balancer,
    pd: &PeerData,
) -> Option<Decision> {
    let n = up.peer_slots.len().min(N);
    let mut views = [PeerView::default(); N];
    // SAFETY: the peer list is round robin's, walked as
    // ngx_http_upstream_get_peer does, for at most n ≤ N entries.
    unsafe {
        let now = ngx::ffi::ngx_time();
        let mut p = (*peers).peer;
        let mut i = 0;
        while !p.is_null() && i < n {
            let peer = &*p;
            let failed = peer.max_fails != 0
                && peer.fails >= peer.max_fails
                && now - peer.checked <= peer.fail_timeout;
            let full = peer.max_conns != 0 && peer.conns >= peer.max_conns;
            let (requests, tokens, cost) = z.slots.load(up.peer_slots[i]);
            views[i] = PeerView {
                available: !tried(rrp, i) && peer.down == 0 && !failed && !full,
                weight: peer.weight.max(1) as u32,
                requests,
                tokens,
                cost,
                hist_requests: 0,
                hist_tokens: 0,
                engine: Default::default(),
            };
            // The engine's own view, when it is scraped: rows live in the
            // health zone as long as the cycle.
            if let Some(e) = engines.get(i).and_then(|e| e.as_ref()) {
                views[i].engine = e.view(now_ms);
                blend_engine(&mut views[i], pd.tokens);
            }
            p = peer.next;
            i += 1;
        }
    }
    let tie = crate::random::with_rng(|r| r.next_u64());
    let mut affinity = [0u32; N];
    let mut inputs =
        Inputs { pending: [0; PD_SCORE_LOOKAHEAD], npending: 0, affinity: &mut affinity[..n] };
    b.state.observe(z, up, &mut views[..n], &mut inputs);
    let block_tokens = if b.state.needs().prompt_blocks {
        // SAFETY: as this function's contract: the live list, read-locked,
        // with n peers.
        unsafe { engines_hold(peers, n, pd, inputs.affinity) }
    } else {
        0
    };
    let npending = inputs.npending.min(PD_SCORE_LOOKAHEAD);
    let req = Request {
        tokens: pd.tokens,
        cost: pd.cost,
        params: up.params,
        tie,
        pending: &inputs.pending[..npending],
        affinity: inputs.affinity,
        block_tokens,
    };
    let c = (b.choose)(&views[..n], &req)?;
    let view = *views.get(c)?;
    Some(Decision {
        c,
        view,
        affinity: req.affinity.get(c).copied().unwrap_or(0),
        npending,
        block_tokens,
    })
}

/// With the engines' KV index of the upstream (`pd_kv_events`) and a
/// prompt keyed the same way: each peer's affinity becomes the leading
/// blocks of the prompt its engine holds (or the placements' affinity when
/// longer: a prompt placed there is cached once its prefill ends); returns the tokens per block
/// (0: the index is not used, the affinity stays the placements').
///
/// # Safety
/// `peers` must be round robin's live list, held under its read lock,
/// with at least `n` peers.
unsafe fn engines_hold(
    peers: *mut ngx_http_upstream_rr_peers_t,
    n: usize,
    pd: &PeerData,
    affinity: &mut [u32],
) -> u64 {
    if pd.ntok == 0 || pd.block_tokens == 0 {
        return 0;
    }
    // SAFETY: conf was set by init_peer; tok_keys is the pool copy.
    let (conf, keys) = unsafe {
        let Some(conf) = pd.conf.as_ref() else { return 0 };
        (conf, std::slice::from_raw_parts(pd.tok_keys, pd.ntok))
    };
    let head = Head { hashing: pd.hashing, tokens: pd.tokens, block_size: pd.block_tokens };
    let Some(h) = crate::kv::holdings(&conf.upstream_name, &head, keys.iter().copied()) else {
        return 0;
    };
    // SAFETY: as documented: the list walked for at most n peers.
    unsafe {
        let mut p = (*peers).peer;
        let mut i = 0;
        while !p.is_null() && i < n.min(affinity.len()) {
            // What the engine reports holding, or what this proxy placed
            // there since (its prefill may not have stored it yet): both
            // count the same token blocks.
            affinity[i] = affinity[i].max(h.blocks_of(str_bytes(&(*p).name)));
            p = (*p).next;
            i += 1;
        }
    }
    pd.block_tokens
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
            let z = pd.conf.as_ref().and_then(|c| zone::shared(c.zone));
            if pd.slot != usize::MAX {
                if let Some(z) = &z {
                    z.slots.release(pd.slot, pd.tokens, pd.cost);
                }
                pd.slot = usize::MAX;
            }
            if let (Some(z), Some(b)) = (&z, pd.balancer.as_ref()) {
                b.state.release(z, &mut pd.held);
            }
            if let Some(e) = pd.engine.as_ref() {
                e.ended();
                pd.engine = std::ptr::null();
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
