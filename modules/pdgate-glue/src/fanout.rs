//! Several subrequests of one request at once, each with a body and headers
//! of its own — what the E/P/D encoder stage needs (one encoder request per
//! media item, all in flight together).
//!
//! Its subrequests are [`crate::subrequest::Mode::Fanout`] ones, with
//! nginx's `NGX_HTTP_SUBREQUEST_BACKGROUND` flag (the flag the mirror module
//! uses): a background subrequest never becomes the connection's active request
//! and is not queued in the parent's `postponed` list, so any number of them
//! run side by side, and the main request can answer (an error) while some
//! are still running; they then finish on their own and are ignored. nginx
//! does not wake the parent when a background subrequest ends: the post
//! handler calls [`wake`] once it has decided.

use std::ffi::c_void;

use ngx::ffi::{
    ngx_http_block_reading, ngx_http_core_loc_conf_t, ngx_http_core_module, ngx_http_post_request,
    ngx_http_request_t, ngx_http_test_reading, ngx_list_init, ngx_list_part_t, ngx_list_push,
    ngx_list_t, ngx_str_t, ngx_table_elt_t, NGX_OK,
};

use crate::headers::pool_str;

/// Gives subrequest `sr` a header list of its own: a copy of the one it
/// shares with its parent, without any header named `lowcase` and with
/// `name: value` appended. The parent's headers are not touched.
///
/// (`ngx_http_subrequest` copies `headers_in` by value, so the list's parts
/// are the parent's: pushing to it, or editing a value in place, would
/// change the parent's request too.)
///
/// # Safety
/// `sr` must be a live subrequest that has not started running.
pub unsafe fn own_header_in(
    sr: *mut ngx_http_request_t,
    name: &'static str,
    lowcase: &'static str,
    value: &[u8],
) -> Result<(), crate::NgxError> {
    // SAFETY: the old list's parts live in the (shared) request pool and are
    // only read; the new list is fresh pool memory, every pushed element is
    // fully written before nginx can read it; static strings outlive the
    // request and the value is copied into the pool.
    unsafe {
        let value = pool_str(sr, value).ok_or(crate::NgxError)?;
        let old: ngx_list_t = (*sr).headers_in.headers;
        let mut count = 0;
        let mut part = &old.part as *const ngx_list_part_t;
        while !part.is_null() {
            count += (*part).nelts;
            part = (*part).next;
        }
        let list: *mut ngx_list_t = &mut (*sr).headers_in.headers;
        if ngx_list_init(list, (*sr).pool, count + 1, std::mem::size_of::<ngx_table_elt_t>())
            != NGX_OK as isize
        {
            return Err(crate::NgxError);
        }
        let mut part = &old.part as *const ngx_list_part_t;
        while !part.is_null() {
            let elts = (*part).elts as *const ngx_table_elt_t;
            for i in 0..(*part).nelts {
                let h = elts.add(i);
                if (*h).hash == 0
                    || crate::conf::str_bytes(&(*h).key).eq_ignore_ascii_case(lowcase.as_bytes())
                {
                    continue;
                }
                let dst = ngx_list_push(list) as *mut ngx_table_elt_t;
                if dst.is_null() {
                    return Err(crate::NgxError);
                }
                std::ptr::copy_nonoverlapping(h, dst, 1);
                (*dst).next = std::ptr::null_mut();
            }
            part = (*part).next;
        }
        let h = ngx_list_push(list) as *mut ngx_table_elt_t;
        if h.is_null() {
            return Err(crate::NgxError);
        }
        std::ptr::write_bytes(h, 0, 1);
        (*h).hash = 1;
        (*h).key = ngx_str_t { len: name.len(), data: name.as_ptr() as *mut u8 };
        (*h).value = value;
        (*h).lowcase_key = lowcase.as_ptr() as *mut u8;
    }
    Ok(())
}

/// Posts `r` so that its `write_event_handler` runs once the current event
/// is handled (`ngx_http_post_request`): how a post-subrequest handler wakes
/// the main request after a background subrequest.
///
/// # Safety
/// `r` must be a live request.
pub unsafe fn wake(r: *mut ngx_http_request_t) -> Result<(), crate::NgxError> {
    // SAFETY: r is live; nginx allocates the posting from its pool.
    let rc = unsafe { ngx_http_post_request(r, std::ptr::null_mut()) };
    if rc == NGX_OK as isize {
        Ok(())
    } else {
        Err(crate::NgxError)
    }
}

/// Watches the client connection of main request `r` while only background
/// subrequests run: nginx's upstream module watches the connection for its
/// active request only, so without this a client that leaves goes unnoticed
/// until the next leg. `ngx_http_test_reading` (what nginx itself installs
/// for such waits) ends the request as 499 when the client closes, and
/// nginx then terminates the subrequests with it.
///
/// # Safety
/// `r` must be a live main request whose body has been read.
pub unsafe fn watch_client(r: *mut ngx_http_request_t) {
    // SAFETY: r is live; the handler is nginx's own.
    unsafe { (*r).read_event_handler = Some(ngx_http_test_reading) }
}

/// Stops [`watch_client`]: back to nginx's default after a body was read.
///
/// # Safety
/// `r` must be a live main request.
pub unsafe fn unwatch_client(r: *mut ngx_http_request_t) {
    // SAFETY: r is live; the handler is nginx's own.
    unsafe { (*r).read_event_handler = Some(ngx_http_block_reading) }
}

/// Stops a subrequest's upstream request now (closing its connection, so
/// the server sees the client go away) and ends the subrequest without
/// calling its post handler: what `ngx_http_terminate_request` does to the
/// upstream requests of a dying request, through the same cleanup handler
/// (`ngx_http_upstream_cleanup`). Returns false when the subrequest has no
/// running upstream request (it has not started yet, or has finished).
///
/// # Safety
/// `sr` must be a subrequest of a live request, still running.
pub unsafe fn abort(sr: *mut ngx_http_request_t) -> bool {
    // SAFETY: `u->cleanup` points at the handler slot of the request's
    // cleanup entry while the upstream request runs, and is NULL once it is
    // finalized (ngx_http_upstream_finalize_request clears both).
    unsafe {
        let u = (*sr).upstream;
        if u.is_null() || (*u).cleanup.is_null() {
            return false;
        }
        let Some(handler) = *(*u).cleanup else { return false };
        handler(sr as *mut c_void);
        true
    }
}

/// The `subrequest_output_buffer_size` of the location a subrequest runs in.
///
/// # Safety
/// `sr` must be a live request.
pub unsafe fn output_buffer_size(sr: *mut ngx_http_request_t) -> usize {
    // SAFETY: loc_conf holds every HTTP module's location conf, the core
    // module's at its ctx_index.
    unsafe {
        let clcf = *(*sr).loc_conf.add((*std::ptr::addr_of!(ngx_http_core_module)).ctx_index)
            as *const ngx_http_core_loc_conf_t;
        if clcf.is_null() {
            0
        } else {
            (*clcf).subrequest_output_buffer_size
        }
    }
}
