//! Sending a prepared answer over time: after an optional delay, the
//! header, then the chunks, all at once or one per interval (a test
//! backend's streamed answer). The request is finalized after the last.

use std::ffi::c_void;
use std::ptr::null_mut;

use ngx::ffi::{
    ngx_alloc_chain_link, ngx_buf_t, ngx_event_t, ngx_http_finalize_request,
    ngx_http_output_filter, ngx_http_request_t, ngx_http_run_posted_requests, ngx_http_send_header,
    ngx_int_t, ngx_pcalloc, NGX_ERROR, NGX_OK,
};

use crate::http::{Request, RequestExt};

/// What to send, and when.
#[derive(Debug, Clone)]
pub struct Paced {
    /// The status (0: 200).
    pub status: u16,
    pub content_type: &'static str,
    /// Send `Content-Length` (the chunks' total); otherwise the length is
    /// unknown (chunked transfer).
    pub with_length: bool,
    pub chunks: Vec<Vec<u8>>,
    /// Milliseconds before the header (0: none).
    pub delay_ms: usize,
    /// Milliseconds between chunks (0: all at once).
    pub interval_ms: usize,
}

/// The state of one paced answer, in the request pool.
struct State {
    r: *mut ngx_http_request_t,
    p: Paced,
    next: usize,
    header_sent: bool,
    ev: *mut ngx_event_t,
}

/// Starts sending `p` on `r`, which must hold a reference for it (a body
/// read handler's, or a content handler returning `NGX_DONE`): the request
/// is finalized after the last chunk, or on an error.
pub fn send(r: &mut Request, p: Paced) {
    let raw = r.raw();
    let delay = p.delay_ms;
    let st = State { r: raw, p, next: 0, header_sent: false, ev: null_mut() };
    // SAFETY: `raw` is live (a &mut Request); the state lives in its pool
    // (dropped by a pool cleanup registered before the timer's, so the
    // timer is cancelled first).
    unsafe {
        let Some(st) = crate::pool::alloc_value((*raw).pool, st) else {
            ngx_http_finalize_request(raw, NGX_ERROR as ngx_int_t);
            return;
        };
        if delay > 0 {
            wait(&mut *st, delay);
        } else {
            step(&mut *st);
        }
    }
}

/// Defers the next step by `ms`.
///
/// # Safety
/// `st` must be the pool-owned state of its live request.
unsafe fn wait(st: &mut State, ms: usize) {
    // SAFETY: as documented; the event's data is pointed at the state
    // after `arm` set it to the request.
    unsafe {
        if crate::timer::arm(st.r, &mut st.ev, ms, Some(on_timer)).is_err() {
            ngx_http_finalize_request(st.r, NGX_ERROR as ngx_int_t);
            return;
        }
        (*st.ev).data = st as *mut State as *mut c_void;
    }
}

unsafe extern "C" fn on_timer(ev: *mut ngx_event_t) {
    crate::guard::catch("paced answer timer", (), || {
        // SAFETY: the timer was armed by `wait` with data = a State in a
        // live request's pool (the pool cleanup cancels it otherwise).
        unsafe {
            let Some(st) = ((*ev).data as *mut State).as_mut() else { return };
            let c = (*st.r).connection;
            step(st);
            ngx_http_run_posted_requests(c);
        }
    })
}

/// Sends the header if needed, then chunks: all of them, or one and a timer
/// for the next when an interval is set. Finalizes after the last.
///
/// # Safety
/// `st` must be the pool-owned state of its live request.
unsafe fn step(st: &mut State) {
    let r = st.r;
    // SAFETY: r is live; buffers are pool allocations pointing at chunk
    // memory owned by the state, which the pool keeps until the request ends.
    unsafe {
        if !st.header_sent {
            st.header_sent = true;
            let ho = &mut (*r).headers_out;
            ho.status = usize::from(if st.p.status == 0 { 200 } else { st.p.status });
            let ct = st.p.content_type;
            ho.content_type.len = ct.len();
            ho.content_type.data = ct.as_ptr() as *mut u8;
            ho.content_type_len = ct.len();
            ho.content_length_n = if st.p.with_length {
                st.p.chunks.iter().map(Vec::len).sum::<usize>() as i64
            } else {
                -1
            };
            let rc = ngx_http_send_header(r);
            if rc == NGX_ERROR as ngx_int_t || rc > NGX_OK as ngx_int_t || (*r).header_only() != 0 {
                ngx_http_finalize_request(r, rc);
                return;
            }
        }
        let one_by_one = st.p.interval_ms > 0;
        loop {
            let i = st.next;
            let Some(chunk) = st.p.chunks.get(i) else { break };
            st.next += 1;
            let last = st.next == st.p.chunks.len();
            let b = ngx_pcalloc((*r).pool, std::mem::size_of::<ngx_buf_t>()) as *mut ngx_buf_t;
            let cl = ngx_alloc_chain_link((*r).pool);
            if b.is_null() || cl.is_null() {
                ngx_http_finalize_request(r, NGX_ERROR as ngx_int_t);
                return;
            }
            let p = chunk.as_ptr() as *mut u8;
            (*b).start = p;
            (*b).pos = p;
            (*b).last = p.add(chunk.len());
            (*b).end = (*b).last;
            (*b).set_memory(1);
            (*b).set_flush(1);
            (*b).set_last_buf(u32::from(last));
            (*b).set_last_in_chain(1);
            (*cl).buf = b;
            (*cl).next = null_mut();
            let rc = ngx_http_output_filter(r, cl);
            if rc == NGX_ERROR as ngx_int_t || last {
                ngx_http_finalize_request(r, rc);
                return;
            }
            if one_by_one {
                let ms = st.p.interval_ms;
                wait(st, ms);
                return;
            }
        }
        ngx_http_finalize_request(r, NGX_OK as ngx_int_t);
    }
}
