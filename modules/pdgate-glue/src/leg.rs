//! The request-level pieces of a P/D leg: whether its upstream answered
//! in full, cancelling a request's upstream, the decode upstream's
//! capacity, and chaining a header filter. Legs are started by
//! [`crate::subrequest::start`].

use std::ffi::c_void;

use ngx::ffi::{ngx_http_output_header_filter_pt, ngx_http_request_t};

/// Whether `r` has an upstream that has not been finalized yet, and if so
/// whether it already sent the response header to the client.
///
/// # Safety
/// `r` must be a live request.
pub unsafe fn upstream_state(r: *mut ngx_http_request_t) -> Option<bool> {
    // SAFETY: r is live; r->upstream is NULL or the request's upstream,
    // and u->cleanup is NULL once the upstream was finalized.
    unsafe {
        let u = (*r).upstream;
        if u.is_null() || (*u).cleanup.is_null() || (*(*u).cleanup).is_none() {
            return None;
        }
        Some((*u).header_sent() != 0)
    }
}

/// Cancels the upstream of `r` the way nginx does when it terminates a
/// request: runs its cleanup (`ngx_http_upstream_cleanup`), which closes
/// the upstream connection, frees the peer (balancer counters included) and
/// ends with `ngx_http_finalize_request(r, NGX_DONE)`, i.e. drops one
/// reference of `r->main->count`. Returns false when there was nothing to
/// cancel.
///
/// # Safety
/// `r` must be a live request; the caller must hold a reference of
/// `r->main->count` besides the one dropped here, or be done with `r`.
pub unsafe fn cancel_upstream(r: *mut ngx_http_request_t) -> bool {
    // SAFETY: as in upstream_state; the cleanup handler takes the request
    // it was registered with (ngx_http_upstream_init_request).
    unsafe {
        let u = (*r).upstream;
        if u.is_null() || (*u).cleanup.is_null() {
            return false;
        }
        let Some(h) = *(*u).cleanup else { return false };
        h(r as *mut c_void);
        true
    }
}

/// Puts `filter` at the top of the header filter chain and returns the
/// filter it must call next. Call once, from postconfiguration.
///
/// # Safety
/// Only from an http postconfiguration callback (single-threaded, while the
/// filter chain is being built).
pub unsafe fn push_header_filter(
    filter: ngx_http_output_header_filter_pt,
) -> ngx_http_output_header_filter_pt {
    // SAFETY: the top-filter static is only written during configuration,
    // which is single-threaded.
    unsafe {
        let next = ngx::ffi::ngx_http_top_header_filter;
        ngx::ffi::ngx_http_top_header_filter = filter;
        next
    }
}

/// Whether the answer of `r`'s upstream (finished) reached its end: the
/// body's length (`Content-Length`, chunked end) was read in full, or a
/// close-delimited body ended with the connection. False when the upstream
/// broke off after the header (reset, close, read timeout): nginx then
/// finalizes an in-memory subrequest with `rc == 0` all the same.
///
/// # Safety
/// `r` must be a live request.
pub unsafe fn answer_complete(r: *mut ngx_http_request_t) -> bool {
    // SAFETY: r is live; its upstream and pipe, when set, live in its pool
    // and keep their final state after the upstream is finalized.
    unsafe {
        let u = (*r).upstream;
        if u.is_null() {
            return true;
        }
        let p = (*u).pipe;
        if (*u).buffering() != 0 && !p.is_null() {
            // ngx_http_upstream_process_request's own test of a good end.
            (*p).upstream_done() != 0
                || (*p).length == 0
                || ((*p).upstream_eof() != 0 && (*p).length == -1)
        } else {
            (*u).length == 0 || (*u).length == -1
        }
    }
}

/// The proxy module's `ctx_index`, found by name at configuration (nginx
/// may be built without it; then nothing is known of the decode upstream).
static PROXY_CTX_INDEX: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(usize::MAX);

/// Finds `ngx_http_proxy_module` among the cycle's modules. Call from
/// postconfiguration.
///
/// # Safety
/// `cf` must be a live configuration.
pub unsafe fn find_proxy_module(cf: *mut ngx::ffi::ngx_conf_t) {
    // SAFETY: cf->cycle->modules is the array of the cycle's modules,
    // NULL-terminated, each with a NUL-terminated name.
    unsafe {
        let cycle = (*cf).cycle;
        if cycle.is_null() || (*cycle).modules.is_null() {
            return;
        }
        let mut m = (*cycle).modules;
        while !(*m).is_null() {
            let name = (**m).name;
            if !name.is_null()
                && std::ffi::CStr::from_ptr(name).to_bytes() == b"ngx_http_proxy_module"
            {
                PROXY_CTX_INDEX.store((**m).ctx_index, std::sync::atomic::Ordering::Relaxed);
                return;
            }
            m = m.add(1);
        }
    }
}

/// Whether the upstream `r`'s location proxies to (`proxy_pass
/// http://name`) has a peer that can take a request now: not `down`, not
/// inside its `fail_timeout` after `max_fails` (unless it is the only one,
/// as round robin never fails it out), not at `max_conns` (primary or
/// backup peers), as round robin judges them in this worker. `None`
/// when it cannot be known (no proxy_pass, or one with variables).
///
/// # Safety
/// `r` must be a live request.
pub unsafe fn decode_capacity(r: *mut ngx_http_request_t) -> Option<bool> {
    use ngx::ffi::{ngx_http_upstream_conf_t, ngx_http_upstream_rr_peers_t};
    let idx = PROXY_CTX_INDEX.load(std::sync::atomic::Ordering::Relaxed);
    if idx == usize::MAX {
        return None;
    }
    // SAFETY: loc_conf has a slot per HTTP module; the proxy module's
    // location conf begins with its ngx_http_upstream_conf_t (nginx's
    // ngx_http_proxy_loc_conf_t), whose `upstream` is NULL or the upstream
    // block with round robin's peer lists in `peer.data` (every balancer
    // of nginx and pdgate keeps them).
    unsafe {
        let ucf = (*(*r).loc_conf.add(idx)) as *const ngx_http_upstream_conf_t;
        let uscf = ucf.as_ref()?.upstream;
        let uscf = uscf.as_ref()?;
        let mut peers = uscf.peer.data as *mut ngx_http_upstream_rr_peers_t;
        if peers.is_null() {
            return None;
        }
        let now = ngx::ffi::ngx_time();
        while let Some(list) = peers.as_ref() {
            // Under round robin's read lock when the list is shared (zone).
            let _read = crate::upstream::PeersRead::lock(peers);
            // A lone peer is never failed out (round robin's `single`).
            let single = list.single() != 0;
            let mut p = list.peer;
            while let Some(peer) = p.as_ref() {
                let failed = !single
                    && peer.max_fails != 0
                    && peer.fails >= peer.max_fails
                    && now - peer.checked <= peer.fail_timeout;
                let full = peer.max_conns != 0 && peer.conns >= peer.max_conns;
                if peer.down == 0 && !failed && !full {
                    return Some(true);
                }
                p = peer.next;
            }
            peers = list.next;
        }
        Some(false)
    }
}
