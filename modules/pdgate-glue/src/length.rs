//! The length of a request's body, for length-based decisions.

use ngx::ffi::ngx_http_request_t;

/// Bytes of the client's request body, read from the main request (so a
/// subrequest gets its client's length, not that of its own body): its
/// `Content-Length`, or for a chunked body the bytes received once it has
/// been read whole. `None` when unknown (no body, or a chunked body still
/// being read).
///
/// With `prefill`, the main request's length becomes the decode body's once
/// the prefill answered; before that (when the prefill leg is sent) it is
/// the client's.
///
/// # Safety
/// `r` must be a live request.
pub unsafe fn client_body_bytes(r: *mut ngx_http_request_t) -> Option<usize> {
    // SAFETY: r and its main request are live; request_body is NULL or the
    // main request's body state.
    unsafe {
        let m = (*r).main.as_ref()?;
        let n = m.headers_in.content_length_n;
        if m.headers_in.chunked() != 0 {
            // content_length_n counts what the chunked filter has decoded
            // so far; rest is 0 once the last chunk was parsed.
            let rb = m.request_body.as_ref()?;
            if rb.rest != 0 {
                return None;
            }
        }
        usize::try_from(n).ok()
    }
}
