//! nginx's upstream round robin, as pdgate reads it: [`PeersRead`], the
//! read lock on a peer list shared by the workers (`zone`). Also the former
//! home of the balancer framework, kept as a path for callers outside the
//! balancer crates (the P/D module's metrics page); new code uses
//! [`crate::balancer`].

use std::ptr::null_mut;

use ngx::ffi::ngx_http_upstream_rr_peers_t;

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
