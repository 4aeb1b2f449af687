//! Sending a complete response from a module (errors, pass-through bodies).

use ngx::ffi::{
    ngx_alloc_chain_link, ngx_buf_t, ngx_http_finalize_request, ngx_http_output_filter,
    ngx_http_request_t, ngx_http_send_header, ngx_int_t, ngx_pcalloc, ngx_str_t, NGX_ERROR, NGX_OK,
};

use crate::headers::pool_str;

/// Sends `status` with `body` of type `content_type` and returns what the
/// output filter returned, for the caller to finalize the request with
/// (`ngx_http_finalize_request(r, rc)`).
///
/// # Safety
/// `r` must be a live request that has not sent its header yet.
pub unsafe fn send(
    r: *mut ngx_http_request_t,
    status: u16,
    content_type: &[u8],
    body: &[u8],
) -> ngx_int_t {
    // SAFETY: r is live; every pointer stored in headers_out or the chain is
    // a fresh pool allocation that lives as long as the request.
    unsafe {
        let Some(ct) = pool_str(r, content_type) else { return NGX_ERROR as ngx_int_t };
        let ho = &mut (*r).headers_out;
        ho.status = usize::from(status);
        ho.content_type = ct;
        ho.content_type_len = ct.len;
        ho.content_type_lowcase = std::ptr::null_mut();
        ho.content_length_n = body.len() as i64;
        if !ho.content_length.is_null() {
            (*ho.content_length).hash = 0;
            ho.content_length = std::ptr::null_mut();
        }
        if (*r).header_only() != 0 || body.is_empty() {
            (*r).set_header_only(1);
        }
        let rc = ngx_http_send_header(r);
        if rc == NGX_ERROR as ngx_int_t || rc > NGX_OK as ngx_int_t || (*r).header_only() != 0 {
            return rc;
        }
        let Some(data) = pool_str(r, body) else { return NGX_ERROR as ngx_int_t };
        let b = ngx_pcalloc((*r).pool, std::mem::size_of::<ngx_buf_t>()) as *mut ngx_buf_t;
        let cl = ngx_alloc_chain_link((*r).pool);
        if b.is_null() || cl.is_null() {
            return NGX_ERROR as ngx_int_t;
        }
        (*b).start = data.data;
        (*b).pos = data.data;
        (*b).last = data.data.add(data.len);
        (*b).end = (*b).last;
        (*b).set_memory(1);
        (*b).set_last_buf(if std::ptr::eq(r, (*r).main) { 1 } else { 0 });
        (*b).set_last_in_chain(1);
        (*cl).buf = b;
        (*cl).next = std::ptr::null_mut();
        ngx_http_output_filter(r, cl)
    }
}

/// Sends an OpenAI-style JSON error and finalizes the request.
///
/// # Safety
/// `r` must be a live main request that has not sent its header yet, and
/// the caller must not touch it afterwards.
pub unsafe fn finish_with_error(r: *mut ngx_http_request_t, status: u16, message: &str) {
    let body = pdgate_core::error::error_body(status, message);
    // SAFETY: forwarded from the caller's guarantees.
    unsafe {
        let rc = send(r, status, b"application/json", &body);
        ngx_http_finalize_request(r, rc);
    }
}

/// An `ngx_str_t` as bytes (empty when unset).
pub fn str_of(s: &ngx_str_t) -> &[u8] {
    if s.len == 0 || s.data.is_null() {
        return &[];
    }
    // SAFETY: nginx keeps `len` valid bytes at `data` for a set ngx_str_t.
    unsafe { std::slice::from_raw_parts(s.data, s.len) }
}
