//! The one way pdgate starts a subrequest: a leg of a P/D request, with a
//! body of its own (what `ngx::http::Request::subrequest` cannot do: it is
//! header-only, auth_request style) and its own `Content-Length`.

use std::ffi::c_void;

use ngx::ffi::{
    ngx_chain_t, ngx_http_post_subrequest_pt, ngx_http_post_subrequest_t, ngx_http_request_body_t,
    ngx_http_request_t, ngx_http_subrequest, ngx_palloc, ngx_pcalloc, ngx_str_t,
    NGX_HTTP_SUBREQUEST_BACKGROUND, NGX_HTTP_SUBREQUEST_IN_MEMORY, NGX_HTTP_SUBREQUEST_WAITED,
    NGX_OK,
};

use crate::headers::pool_str;

/// How a subrequest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The parent waits for it (auth_request style) and is woken when it is
    /// done; its answer is then in `sr->out` (in memory, up to
    /// `subrequest_output_buffer_size`). The prefill leg of a sequential flow.
    Waited,
    /// Beside the parent (mirror style): the parent goes on at once and may
    /// even answer the client first; the connection stays open until the
    /// subrequest is done, as nginx counts it in `r->main->count`. Only the
    /// answer's status is kept (`header_only`, as mirror does): the upstream
    /// is finalized when the header arrives, so an answer larger than
    /// `subrequest_output_buffer_size` cannot wedge the subrequest (an
    /// in-memory background subrequest whose capture overflows is never
    /// finalized by nginx 1.28). The prefill leg of `pd_together`.
    Background,
    /// Beside the parent, any number at once, each answer kept in memory;
    /// nginx does not wake the parent when one ends (the post handler
    /// decides, see [`crate::fanout::wake`]). The encoder fan-out.
    Fanout,
}

/// Starts a subrequest of `r` to `uri` (with `r`'s query string and
/// method) whose request body is `body` of `len` bytes. `handler(sr, data,
/// rc)` runs when it finishes. The subrequest shares the parent's header
/// list (so `X-Request-Id` goes along; see [`crate::fanout::own_header_in`]
/// for one of its own) but gets its own body and `Content-Length`: the proxy
/// module derives the upstream `Content-Length` from `content_length_n`, so
/// the client's header bytes are never edited.
///
/// # Safety
/// `r` must be a live main request whose body has been read; `body` must be
/// a chain living as long as the request; `data` must stay valid until the
/// handler has run (as long as the request's pool, for [`Mode::Fanout`]).
pub unsafe fn start(
    r: *mut ngx_http_request_t,
    uri: &[u8],
    body: *mut ngx_chain_t,
    len: usize,
    mode: Mode,
    handler: ngx_http_post_subrequest_pt,
    data: *mut c_void,
) -> Result<*mut ngx_http_request_t, crate::NgxError> {
    // SAFETY: all allocations are from the live request pool; the subrequest
    // pointer is checked before use; the fields written are the ones the
    // mirror and SSI modules set on their subrequests.
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
        let flags = match mode {
            Mode::Waited => NGX_HTTP_SUBREQUEST_WAITED | NGX_HTTP_SUBREQUEST_IN_MEMORY,
            Mode::Background => NGX_HTTP_SUBREQUEST_BACKGROUND,
            Mode::Fanout => NGX_HTTP_SUBREQUEST_BACKGROUND | NGX_HTTP_SUBREQUEST_IN_MEMORY,
        };
        let mut sr: *mut ngx_http_request_t = std::ptr::null_mut();
        let args: *mut ngx_str_t = &mut (*r).args;
        let rc = ngx_http_subrequest(r, &mut uri, args, &mut sr, ps, flags as usize);
        if rc != NGX_OK as isize || sr.is_null() {
            return Err(crate::NgxError);
        }
        if mode == Mode::Background {
            (*sr).set_header_only(1);
        }
        (*sr).method = (*r).method;
        (*sr).method_name = (*r).method_name;
        (*rb).bufs = body;
        (*sr).request_body = rb;
        (*sr).headers_in.content_length_n = len as i64;
        Ok(sr)
    }
}
