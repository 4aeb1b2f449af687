//! nginx's upstream round robin, as pdgate reads it: [`PeersRead`], the
//! read lock on a peer list shared by the workers (`zone`). Also the former
//! home of the balancer framework, kept as a path for callers outside the
//! balancer crates (the P/D module's metrics page); new code uses
//! [`crate::balancer`].

use std::ptr::{addr_of, null_mut};

use ngx::ffi::{
    ngx_cycle_t, ngx_http_conf_ctx_t, ngx_http_module, ngx_http_upstream_main_conf_t,
    ngx_http_upstream_module, ngx_http_upstream_rr_peer_t, ngx_http_upstream_rr_peers_t,
    ngx_http_upstream_srv_conf_t, ngx_module_t, ngx_uint_t, NGX_HTTP_UPSTREAM_CREATE,
};

pub use crate::balancer::for_each_peer_gauge;
pub use crate::conf::set_content_handler;

/// Round robin's read lock on a shared (`zone`) peer list, held while the
/// list is walked; nothing without a zone (one worker's own list).
pub struct PeersRead(*mut ngx_http_upstream_rr_peers_t);

impl PeersRead {
    /// # Safety
    /// `peers` must be a live round robin peer list.
    pub unsafe fn lock(peers: *mut ngx_http_upstream_rr_peers_t) -> PeersRead {
        // SAFETY: as ngx_http_upstream_rr_peers_rlock: the lock word lives
        // beside the list in the zone when shpool is set.
        unsafe {
            if !(*peers).shpool.is_null() {
                ngx::ffi::ngx_rwlock_rlock(&mut (*peers).rwlock);
                return PeersRead(peers);
            }
        }
        PeersRead(null_mut())
    }
}

impl Drop for PeersRead {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the lock `lock` took on this live list.
            unsafe { ngx::ffi::ngx_rwlock_unlock(&mut (*self.0).rwlock) }
        }
    }
}

/// Round robin's write lock on a shared (`zone`) peer list, held while
/// peers are changed (the health checks' `down` flags); nothing without a
/// zone (one worker's own list).
pub struct PeersWrite(*mut ngx_http_upstream_rr_peers_t);

impl PeersWrite {
    /// # Safety
    /// `peers` must be a live round robin peer list.
    pub unsafe fn lock(peers: *mut ngx_http_upstream_rr_peers_t) -> PeersWrite {
        // SAFETY: as ngx_http_upstream_rr_peers_wlock.
        unsafe {
            if !(*peers).shpool.is_null() {
                ngx::ffi::ngx_rwlock_wlock(&mut (*peers).rwlock);
                return PeersWrite(peers);
            }
        }
        PeersWrite(null_mut())
    }
}

impl Drop for PeersWrite {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the lock `lock` took on this live list.
            unsafe { ngx::ffi::ngx_rwlock_unlock(&mut (*self.0).rwlock) }
        }
    }
}

/// The `upstream {}` blocks of an upstream main conf (the implicit
/// upstreams of `proxy_pass http://address` left out).
///
/// # Safety
/// `umcf` must be NULL or a live upstream main conf.
pub unsafe fn blocks(
    umcf: *const ngx_http_upstream_main_conf_t,
) -> Vec<*mut ngx_http_upstream_srv_conf_t> {
    // SAFETY: as documented; its array of blocks lives as long as it.
    unsafe {
        let Some(umcf) = umcf.as_ref() else { return Vec::new() };
        umcf.upstreams
            .as_slice::<*mut ngx_http_upstream_srv_conf_t>()
            .iter()
            .copied()
            .filter(|us| {
                us.as_ref().is_some_and(|u| u.flags & NGX_HTTP_UPSTREAM_CREATE as ngx_uint_t != 0)
            })
            .collect()
    }
}

/// The upstream main conf of `cycle` (a worker's running cycle), NULL when
/// it has no `http {}`.
///
/// # Safety
/// `cycle` must be NULL or a live cycle.
pub unsafe fn cycle_main_conf(cycle: *const ngx_cycle_t) -> *const ngx_http_upstream_main_conf_t {
    // SAFETY: the http configuration context has a main conf slot per http
    // module and lives as long as the cycle.
    unsafe {
        let Some(c) = cycle.as_ref() else { return std::ptr::null() };
        let ctx = *c.conf_ctx.add((*addr_of!(ngx_http_module)).index) as *const ngx_http_conf_ctx_t;
        match ctx.as_ref() {
            Some(ctx) => *ctx.main_conf.add((*addr_of!(ngx_http_upstream_module)).ctx_index)
                as *const ngx_http_upstream_main_conf_t,
            None => std::ptr::null(),
        }
    }
}

/// `module`'s server conf of the upstream block `us` (a `T`, as that
/// module's create_srv_conf allocates it).
///
/// # Safety
/// `us` must be a live upstream block; `module` an http module whose server
/// conf type is `T`.
pub unsafe fn srv_conf<'a, T>(
    us: *const ngx_http_upstream_srv_conf_t,
    module: &ngx_module_t,
) -> Option<&'a T> {
    // SAFETY: as documented; an upstream block has a slot per http module.
    unsafe {
        let u = us.as_ref()?;
        if u.srv_conf.is_null() {
            return None;
        }
        (*u.srv_conf.add(module.ctx_index) as *const T).as_ref()
    }
}

/// Calls `f` with the name of every peer of the upstream block `uscf` (the
/// backup ones too), read under round robin's read lock.
///
/// # Safety
/// `uscf` must be a live upstream block of the running cycle.
pub unsafe fn each_peer_name(uscf: *const ngx_http_upstream_srv_conf_t, mut f: impl FnMut(&[u8])) {
    // SAFETY: as documented; the list lives as long as the cycle and is
    // read under its read lock; names live in the list.
    unsafe {
        let Some(us) = uscf.as_ref() else { return };
        let peers = us.peer.data as *mut ngx_http_upstream_rr_peers_t;
        if peers.is_null() {
            return;
        }
        let _r = PeersRead::lock(peers);
        each_peer(peers, |pe| f(crate::conf::str_bytes(&pe.name)));
    }
}

/// Calls `f` on every peer of `peers`, the backup ones too.
///
/// # Safety
/// `peers` must be a live peer list, held under round robin's lock when it
/// is shared ([`PeersRead`], [`PeersWrite`]).
pub unsafe fn each_peer(
    peers: *mut ngx_http_upstream_rr_peers_t,
    mut f: impl FnMut(&mut ngx_http_upstream_rr_peer_t),
) {
    // SAFETY: as documented; the lists end with NULL.
    unsafe {
        let mut list = peers;
        while let Some(l) = list.as_ref() {
            let mut peer = l.peer;
            while let Some(pe) = peer.as_mut() {
                f(pe);
                peer = pe.next;
            }
            list = l.next;
        }
    }
}

/// The running cycle's `upstream {}` block `name` (NULL: none), looked up
/// once per cycle and name, and remembered.
fn block_named(name: &[u8]) -> *mut ngx_http_upstream_srv_conf_t {
    use std::cell::RefCell;
    thread_local! {
        /// (name, cycle, block) of the names looked up.
        static FOUND: RefCell<Vec<(Vec<u8>, usize, usize)>> = const { RefCell::new(Vec::new()) };
    }
    // SAFETY: the running cycle's blocks live as long as the cycle.
    unsafe {
        let cycle = *addr_of!(ngx::ffi::ngx_cycle);
        let cached = FOUND.with(|f| {
            f.borrow().iter().find(|(n, c, _)| n == name && *c == cycle as usize).map(|e| e.2)
        });
        if let Some(us) = cached {
            return us as *mut ngx_http_upstream_srv_conf_t;
        }
        let us = blocks(cycle_main_conf(cycle))
            .into_iter()
            .find(|&us| crate::conf::str_bytes(&(*us).host) == name)
            .unwrap_or(null_mut());
        FOUND.with(|f| {
            let mut f = f.borrow_mut();
            f.retain(|(n, c, _)| n != name && *c == cycle as usize);
            f.push((name.to_vec(), cycle as usize, us as usize));
        });
        us
    }
}

/// Calls `f` with each primary peer of block `name` (its name, and whether
/// it is `down`) under round robin's read lock; false when no block has
/// that name.
fn each_peer_named(name: &[u8], mut f: impl FnMut(&[u8], bool)) -> bool {
    // SAFETY: the block and its peer list live as long as the cycle; the
    // list is read under its read lock.
    unsafe {
        let Some(us) = block_named(name).as_ref() else { return false };
        let peers = us.peer.data as *mut ngx_http_upstream_rr_peers_t;
        if peers.is_null() {
            return true;
        }
        let _r = PeersRead::lock(peers);
        let mut p = (*peers).peer;
        while let Some(pe) = p.as_ref() {
            f(crate::conf::str_bytes(&pe.name), pe.down != 0);
            p = pe.next;
        }
        true
    }
}

/// A peer of an upstream as a module that picks servers itself sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerName {
    /// `address:port` (for a name resolved by DNS, the address it resolved
    /// to, with the port of its SRV record when it has one).
    pub addr: String,
    /// Round robin's `down`: marked down in the configuration, or by the
    /// health checks.
    pub down: bool,
}

/// The primary peers of the running cycle's `upstream {}` block `name`, as
/// they are now (with `zone` and `server … resolve`, what DNS says);
/// `None` when no block has that name.
pub fn peer_names(name: &[u8]) -> Option<Vec<PeerName>> {
    let mut out = Vec::new();
    let found = each_peer_named(name, |addr, down| {
        out.push(PeerName { addr: String::from_utf8_lossy(addr).into_owned(), down })
    });
    found.then_some(out)
}

/// How many primary peers of block `name` are not `down` now (by the
/// configuration or the health checks); `None` when no block has that name.
pub fn count_up(name: &[u8]) -> Option<usize> {
    count_up_where(name, |_| true)
}

/// [`count_up`] of the peers for which `room(peer name)` is true too.
pub fn count_up_where(name: &[u8], room: impl Fn(&[u8]) -> bool) -> Option<usize> {
    let mut n = 0;
    let found = each_peer_named(name, |peer, down| n += usize::from(!down && room(peer)));
    found.then_some(n)
}
