//! What a module needs to observe requests for metrics and log variables:
//! nginx's clock, a response's final status, the upstream address of a
//! finished (sub)request, the body filter chain, and the pieces of a
//! response as they pass (read in place, never copied).

use ngx::ffi::{
    ngx_chain_t, ngx_http_output_body_filter_pt, ngx_http_request_t, ngx_http_upstream_state_t,
    ngx_pnalloc,
};

/// nginx's cached monotonic clock (`ngx_current_msec`), in ms: updated
/// once per event loop iteration, as `$request_time` is.
pub fn now_ms() -> u64 {
    // SAFETY: a plain word-sized global nginx updates in this same thread
    // (workers are single-threaded); a volatile read like nginx's own.
    unsafe { std::ptr::read_volatile(std::ptr::addr_of!(ngx::ffi::ngx_current_msec)) as u64 }
}

/// The status `$status` logs: `err_status` when set, else the header's.
///
/// # Safety
/// `r` must be a live request.
pub unsafe fn final_status(r: *const ngx_http_request_t) -> u16 {
    // SAFETY: r is live (caller).
    let s = unsafe {
        if (*r).err_status != 0 {
            (*r).err_status
        } else {
            (*r).headers_out.status
        }
    };
    u16::try_from(s).unwrap_or(0)
}

/// Whether the client connection of `r` broke (a failed write or read, a
/// client abort).
///
/// # Safety
/// `r` must be a live request.
pub unsafe fn connection_broken(r: *const ngx_http_request_t) -> bool {
    // SAFETY: r and its connection are live (caller).
    unsafe { (*(*r).connection).error() != 0 }
}

/// The address of the last upstream peer `r` talked to (as the last entry
/// of `$upstream_addr`), empty when none. The bytes are the peer's name,
/// configuration (or upstream zone) memory that outlives the request.
///
/// # Safety
/// `r` must be a live request.
pub unsafe fn upstream_addr<'a>(r: *const ngx_http_request_t) -> &'a [u8] {
    // SAFETY: upstream_states is NULL or an array of states whose `peer`
    // is NULL or a name owned by the peer configuration.
    unsafe {
        let a = (*r).upstream_states;
        if a.is_null() || (*a).nelts == 0 {
            return &[];
        }
        let st = ((*a).elts as *const ngx_http_upstream_state_t).add((*a).nelts - 1);
        match (*st).peer.as_ref() {
            Some(p) => crate::conf::str_bytes(p),
            None => &[],
        }
    }
}

/// Puts `filter` at the top of the body filter chain and returns the
/// filter it must call next. Call once, from postconfiguration.
///
/// # Safety
/// Only from an http postconfiguration callback (single-threaded, while the
/// filter chain is being built).
pub unsafe fn push_body_filter(
    filter: ngx_http_output_body_filter_pt,
) -> ngx_http_output_body_filter_pt {
    // SAFETY: the top-filter static is only written during configuration,
    // which is single-threaded.
    unsafe {
        let next = ngx::ffi::ngx_http_top_body_filter;
        ngx::ffi::ngx_http_top_body_filter = filter;
        next
    }
}

/// One buffer of a chain passing a body filter.
#[derive(Debug, Clone, Copy)]
pub struct Piece<'a> {
    /// Its bytes when in memory (empty for file buffers and flushes).
    pub bytes: &'a [u8],
    /// It carries body data (in memory or in a file).
    pub data: bool,
    /// The main request's last buffer (`last_buf`).
    pub last: bool,
}

/// Calls `f` for every buffer of `chain`, in order, without copying.
///
/// # Safety
/// `chain` must be NULL or a valid chain whose buffers stay untouched
/// during the call.
pub unsafe fn for_each_piece(chain: *const ngx_chain_t, mut f: impl FnMut(Piece<'_>)) {
    // SAFETY: links and buffers are valid per the caller; in-memory bytes
    // lie between pos and last.
    unsafe {
        let mut cl = chain;
        while let Some(link) = cl.as_ref() {
            if let Some(b) = link.buf.as_ref() {
                let in_memory = b.in_file() == 0 && !b.pos.is_null() && b.last > b.pos;
                let bytes: &[u8] = if in_memory {
                    std::slice::from_raw_parts(b.pos, b.last.offset_from(b.pos) as usize)
                } else {
                    &[]
                };
                let data = in_memory || (b.in_file() != 0 && b.file_last > b.file_pos);
                f(Piece { bytes, data, last: b.last_buf() != 0 });
            }
            cl = link.next;
        }
    }
}

/// Calls `f` with the bytes of every in-memory buffer of `chain` that the
/// request owns and may edit in place (a proxied answer's buffers: its
/// upstream's own memory), in order; file and special buffers are skipped.
///
/// # Safety
/// `chain` must be NULL or a valid chain of an upstream's answer passing a
/// body filter (its memory buffers writable), untouched by anyone else
/// during the call.
pub unsafe fn for_each_piece_mut(chain: *const ngx_chain_t, mut f: impl FnMut(&mut [u8])) {
    // SAFETY: links and buffers are valid per the caller; in-memory bytes
    // lie between pos and last, in memory the request's upstream owns.
    unsafe {
        let mut cl = chain;
        while let Some(link) = cl.as_ref() {
            if let Some(b) = link.buf.as_ref() {
                let writable = b.temporary() != 0 || b.memory() != 0;
                if writable && b.in_file() == 0 && !b.pos.is_null() && b.last > b.pos {
                    f(std::slice::from_raw_parts_mut(b.pos, b.last.offset_from(b.pos) as usize));
                }
            }
            cl = link.next;
        }
    }
}

/// Request-pool copy of `text`, for a variable's value.
///
/// # Safety
/// `r` must be a live request.
pub unsafe fn pool_bytes<'a>(r: *mut ngx_http_request_t, text: &[u8]) -> Option<&'a [u8]> {
    // SAFETY: a fresh pool allocation of text.len() bytes, written whole.
    unsafe {
        let p = ngx_pnalloc((*r).pool, text.len().max(1)) as *mut u8;
        if p.is_null() {
            return None;
        }
        std::ptr::copy_nonoverlapping(text.as_ptr(), p, text.len());
        Some(std::slice::from_raw_parts(p, text.len()))
    }
}
