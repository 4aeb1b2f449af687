//! The KV index zones of `pd_kv_events` (pdgate-core's
//! [`kv::index`](pdgate_core::kv::index)): one per upstream, named
//! `pdgate_kv:<upstream>`, written by the subscriber
//! ([`crate::health`]'s lease holder) and read by every balancer.

use std::ffi::c_void;

use ngx::ffi::{
    ngx_conf_t, ngx_http_upstream_module, ngx_http_upstream_srv_conf_t, ngx_int_t, ngx_module_t,
    ngx_palloc, ngx_shared_memory_add, ngx_shm_zone_t, ngx_slab_calloc, ngx_slab_pool_t, ngx_str_t,
    NGX_ERROR, NGX_LOG_EMERG, NGX_OK,
};
use ngx::http::HttpModuleConfExt;
use pdgate_core::kv::conf::KvConf;
use pdgate_core::kv::index::{zone_bytes, KvHeader, KvIndex, MapSlot, Slot};
use pdgate_core::kv::prompt::{Head, PromptKeys};

use crate::conf::str_bytes;

/// The zone name's prefix.
pub const ZONE_PREFIX: &[u8] = b"pdgate_kv:";

/// What a zone's init needs: its capacity and hashing (in the zone's
/// `data` until init replaces it with the header).
#[repr(C)]
struct Pending {
    capacity: usize,
    hashing: u64,
}

/// Declares the zone of the `upstream {}` block `cf` is in, for `conf`.
///
/// # Safety
/// `cf` must be a directive handler's conf in `upstream {}` context.
pub unsafe fn declare(
    cf: *mut ngx_conf_t,
    conf: &KvConf,
    module: &ngx_module_t,
) -> Result<(), String> {
    // SAFETY: as documented: the upstream module's srv conf exists there;
    // the zone's name and init data live in the configuration's pool.
    unsafe {
        let uscf = (*cf)
            .http_server_conf_unchecked::<ngx_http_upstream_srv_conf_t>(&*std::ptr::addr_of!(
                ngx_http_upstream_module
            ))
            .ok_or("is not allowed here")?
            .as_ptr();
        let mut name = ZONE_PREFIX.to_vec();
        name.extend_from_slice(str_bytes(&(*uscf).host));
        let pool = (*cf).pool;
        let at = ngx_palloc(pool, name.len()) as *mut u8;
        let pending = ngx_palloc(pool, std::mem::size_of::<Pending>()) as *mut Pending;
        if at.is_null() || pending.is_null() {
            return Err("cannot allocate".into());
        }
        std::ptr::copy_nonoverlapping(name.as_ptr(), at, name.len());
        pending.write(Pending { capacity: conf.blocks, hashing: conf.hashing.fingerprint() });
        let mut s = ngx_str_t { len: name.len(), data: at };
        // The slab pool's own pages and headers, then the layout.
        let size = (zone_bytes(conf.blocks) + zone_bytes(conf.blocks) / 64 + (128 << 10))
            .div_ceil(4096)
            * 4096;
        let zone = ngx_shared_memory_add(cf, &mut s, size, module as *const _ as *mut c_void);
        let z = zone.as_mut().ok_or("cannot create its shared zone")?;
        if z.init.is_some() {
            return Err("is duplicate".into());
        }
        z.init = Some(zone_init);
        z.data = pending as *mut c_void;
    }
    Ok(())
}

unsafe extern "C" fn zone_init(zone: *mut ngx_shm_zone_t, old: *mut c_void) -> ngx_int_t {
    crate::guard::catch("pd_kv_events zone init", NGX_ERROR as ngx_int_t, || {
        // SAFETY: nginx calls this with the zone declare() added (its data
        // the Pending from the configuration's pool) and, on reload, the
        // previous cycle's data (a header this function placed).
        unsafe {
            let Some(p) = ((*zone).data as *const Pending).as_ref() else {
                return NGX_ERROR as ngx_int_t;
            };
            let (capacity, hashing) = (p.capacity, p.hashing);
            let shpool = (*zone).shm.addr as *mut ngx_slab_pool_t;
            let mut h = old as *mut KvHeader;
            if h.is_null() && (*zone).shm.exists != 0 {
                h = (*shpool).data as *mut KvHeader;
            }
            if let Some(v) = view_at(h, capacity) {
                if v.attach(hashing) {
                    (*zone).data = h as *mut c_void;
                    return NGX_OK as ngx_int_t;
                }
            }
            // A new zone (or one of another capacity: nginx gives a zone of
            // another size fresh memory, so this is a first start).
            let h = ngx_slab_calloc(shpool, zone_bytes(capacity)) as *mut KvHeader;
            match view_at(h, capacity) {
                Some(v) if v.attach(hashing) => {
                    (*shpool).data = h as *mut c_void;
                    (*zone).data = h as *mut c_void;
                    NGX_OK as ngx_int_t
                }
                _ => {
                    ngx::ngx_log_error!(
                        NGX_LOG_EMERG,
                        (*zone).shm.log,
                        "zone \"{}\" is too small",
                        String::from_utf8_lossy(str_bytes(&(*zone).shm.name))
                    );
                    NGX_ERROR as ngx_int_t
                }
            }
        }
    })
}

/// The index laid out at `h` with `capacity` slots per table.
///
/// # Safety
/// `h` must be NULL or the start of `zone_bytes(capacity)` bytes of zeroed
/// or index memory, 8-byte aligned, alive as long as the cycle.
unsafe fn view_at(h: *mut KvHeader, capacity: usize) -> Option<KvIndex<'static>> {
    // SAFETY: as documented; the tables follow the header, all 8-byte
    // aligned atomics.
    unsafe {
        let header = h.as_ref()?;
        let slots = h.add(1) as *const Slot;
        let map = slots.add(capacity) as *const MapSlot;
        KvIndex::new(
            header,
            std::slice::from_raw_parts(slots, capacity),
            std::slice::from_raw_parts(map, capacity),
        )
    }
}

/// The running cycle's index of the upstream `name`, if it has
/// `pd_kv_events` (from any module's copy of this crate). Looked up once per
/// cycle and upstream.
pub fn index_of(upstream: &[u8]) -> Option<KvIndex<'static>> {
    use std::cell::RefCell;
    thread_local! {
        static FOUND: RefCell<Vec<(Vec<u8>, usize, usize)>> = const { RefCell::new(Vec::new()) };
    }
    // SAFETY: ngx_cycle is the running cycle of this worker.
    let cycle = unsafe { *std::ptr::addr_of!(ngx::ffi::ngx_cycle) } as usize;
    let cached = FOUND
        .with(|f| f.borrow().iter().find(|(n, at, _)| n == upstream && *at == cycle).map(|e| e.2));
    let zone = match cached {
        Some(z) => z as *mut ngx_shm_zone_t,
        None => {
            let mut name = ZONE_PREFIX.to_vec();
            name.extend_from_slice(upstream);
            let z = crate::zone::find_named(&name).unwrap_or(std::ptr::null_mut());
            FOUND.with(|f| {
                let mut f = f.borrow_mut();
                f.retain(|(_, at, _)| *at == cycle);
                f.push((upstream.to_vec(), cycle, z as usize));
            });
            z
        }
    };
    // SAFETY: a zone of this name was declared by `declare`, its data the
    // header zone_init placed (the capacity read from it, checked against
    // the mapping's size); it lives as long as the cycle.
    unsafe {
        let z = zone.as_ref()?;
        let h = z.data as *mut KvHeader;
        let header = h.as_ref()?;
        let capacity = header.capacity.load(std::sync::atomic::Ordering::Acquire) as usize;
        let start = z.shm.addr as usize;
        if (h as usize) < start
            || (h as usize).saturating_add(zone_bytes(capacity)) > start + z.shm.size
        {
            return None;
        }
        view_at(h, capacity).filter(|v| v.is_attached())
    }
}

/// What the engines of `upstream` hold of a prompt: the leading blocks of
/// its keys each engine holds, by their KV events.
pub struct Holdings<'u> {
    upstream: &'u [u8],
    index: KvIndex<'static>,
    held: [u32; pdgate_core::kv::index::MAX_ENGINES],
    /// Tokens per block.
    pub block_tokens: u64,
}

impl Holdings<'_> {
    /// The leading blocks the engine at `peer` (its address as the upstream
    /// names it) holds.
    pub fn blocks_of(&self, peer: &[u8]) -> u32 {
        let bit = self.index.engine_bit(pdgate_core::balance::slots::peer_key(self.upstream, peer));
        bit.map_or(0, |b| self.held[b])
    }
}

/// The holdings of a prompt of `head` and `keys` (`$pd_tokenized`) among
/// the engines of `upstream`: `None` without `pd_kv_events` there, or when
/// `pd_tokenizer` keyed the prompt with another hashing (logged once per
/// worker).
pub fn holdings<'u>(
    upstream: &'u [u8],
    head: &Head,
    keys: impl IntoIterator<Item = u64>,
) -> Option<Holdings<'u>> {
    let index = index_of(upstream)?;
    if index.header.hashing.load(std::sync::atomic::Ordering::Relaxed) != head.hashing {
        static TOLD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !TOLD.swap(true, std::sync::atomic::Ordering::Relaxed) {
            // SAFETY: the running cycle's log.
            let log = unsafe { (**std::ptr::addr_of!(ngx::ffi::ngx_cycle)).log };
            ngx::ngx_log_error!(
                ngx::ffi::NGX_LOG_WARN,
                log,
                "upstream \"{}\": pd_tokenizer and pd_kv_events hash blocks differently (block_size=, hash=, seed= must match), the engines' KV index is not used",
                String::from_utf8_lossy(upstream)
            );
        }
        return None;
    }
    let mut held = [0u32; pdgate_core::kv::index::MAX_ENGINES];
    index.prefix_match_iter(keys, &mut held);
    Some(Holdings { upstream, index, held, block_tokens: head.block_size })
}

/// For a module choosing among the peers of `upstream` itself (the SGLang
/// mode's prefill list): the tokens of `r`'s prompt each of `peers` holds in
/// its prefix cache ([`holdings`]); `None` without `pd_tokenizer` or
/// `pd_kv_events`.
pub fn cached_tokens(r: &ngx::http::Request, upstream: &[u8], peers: &[&[u8]]) -> Option<Vec<u64>> {
    let r = r as *const ngx::http::Request as *mut ngx::ffi::ngx_http_request_t;
    // SAFETY: a Request is a live ngx_http_request_t (ngx's own cast).
    let raw = unsafe { crate::tokenize::variable_of(r) }?;
    let (head, keys) = PromptKeys::decode(raw)?;
    let h = holdings(upstream, &head, keys)?;
    Some(peers.iter().map(|p| u64::from(h.blocks_of(p)) * h.block_tokens).collect())
}
