//! A waited, in-memory subrequest that carries a body of its own — what the
//! prefill leg needs and `ngx::http::Request::subrequest` cannot do (it is
//! header-only, auth_request style).

use std::ffi::c_void;

use ngx::ffi::{
    ngx_chain_t, ngx_http_post_subrequest_pt, ngx_http_post_subrequest_t, ngx_http_request_body_t,
    ngx_http_request_t, ngx_http_subrequest, ngx_palloc, ngx_pcalloc, ngx_str_t,
    NGX_HTTP_SUBREQUEST_IN_MEMORY, NGX_HTTP_SUBREQUEST_WAITED, NGX_OK,
};

use crate::headers::pool_str;

/// Starts a subrequest of `r` to `uri` (with `r`'s query string and method),
/// whose request body is `body` of `len` bytes; `handler(sr, data, rc)` runs
/// when it finishes and its answer is then in `sr->out`.
///
/// The subrequest shares the parent's header list (so `X-Request-Id` goes
/// along) but gets its own body and `Content-Length`: the proxy module
/// derives the upstream Content-Length from `content_length_n`, so the
/// client's header bytes are never edited.
///
/// # Safety
/// `r` must be a live main request whose body has been read; `body` must be
/// a chain living as long as the request; `data` must stay valid until the
/// handler has run.
pub unsafe fn start(
    r: *mut ngx_http_request_t,
    uri: &[u8],
    body: *mut ngx_chain_t,
    len: usize,
    handler: ngx_http_post_subrequest_pt,
    data: *mut c_void,
) -> Result<*mut ngx_http_request_t, crate::NgxError> {
    // SAFETY: forwarded (the caller's contract is `start_flags`').
    unsafe {
        start_flags(
            r,
            uri,
            body,
            len,
            handler,
            data,
            (NGX_HTTP_SUBREQUEST_WAITED | NGX_HTTP_SUBREQUEST_IN_MEMORY) as usize,
        )
    }
}

/// [`start`] with nginx's subrequest `flags` (e.g. a background,
/// in-memory subrequest for a fan-out).
///
/// # Safety
/// As [`start`].
pub unsafe fn start_flags(
    r: *mut ngx_http_request_t,
    uri: &[u8],
    body: *mut ngx_chain_t,
    len: usize,
    handler: ngx_http_post_subrequest_pt,
    data: *mut c_void,
    flags: usize,
) -> Result<*mut ngx_http_request_t, crate::NgxError> {
    // SAFETY: all allocations are from the live request pool; the subrequest
    // pointer is checked before use; fields written are the ones mirror and
    // SSI modules set on their subrequests.
    unsafe {
        let mut uri = pool_str(r, uri).ok_or(crate::NgxError)?;
        let ps = ngx_palloc((*r).pool, std::mem::size_of::<ngx_http_post_subrequest_t>())
            as *mut ngx_http_post_subrequest_t;
        let rb = ngx_pcalloc((*r).pool, std::mem::size_of::<ngx_http_request_body_t>())
            as *mut ngx_http_request_body_t;
        if ps.is_null() || rb.is_null() {
            return Err(crate::NgxError);
        }
        (*ps).handler = handler;
        (*ps).data = data;
        let mut sr: *mut ngx_http_request_t = std::ptr::null_mut();
        let args: *mut ngx_str_t = &mut (*r).args;
        let rc = ngx_http_subrequest(r, &mut uri, args, &mut sr, ps, flags);
        if rc != NGX_OK as isize || sr.is_null() {
            return Err(crate::NgxError);
        }
        (*sr).method = (*r).method;
        (*sr).method_name = (*r).method_name;
        (*rb).bufs = body;
        (*sr).request_body = rb;
        (*sr).headers_in.content_length_n = len as i64;
        Ok(sr)
    }
}
