//! One-shot timers owned by a request.

use std::ffi::c_void;

use ngx::ffi::{
    ngx_add_timer, ngx_del_timer, ngx_event_handler_pt, ngx_event_t, ngx_http_request_t,
    ngx_pcalloc, ngx_pool_cleanup_add,
};

unsafe extern "C" fn cancel(data: *mut c_void) {
    let ev = data as *mut ngx_event_t;
    // SAFETY: `data` is the event `arm` allocated in the same pool; the pool
    // runs this cleanup before freeing it, so deleting a pending timer here
    // keeps it from firing on freed memory.
    unsafe {
        if (*ev).timer_set() != 0 {
            ngx_del_timer(ev);
        }
    }
}

/// Arms a timer that calls `handler` with `ev->data == r` after `ms`
/// milliseconds. Reuses `*slot` when set. The timer is cancelled if the
/// request's pool goes away first.
///
/// # Safety
/// `r` must be a live request; `slot` must belong to its pool-owned state.
pub unsafe fn arm(
    r: *mut ngx_http_request_t,
    slot: &mut *mut ngx_event_t,
    ms: usize,
    handler: ngx_event_handler_pt,
) -> Result<(), crate::NgxError> {
    // SAFETY: fresh pool allocations; the event's fields are set before the
    // timer is added, and its cleanup is registered in the same pool.
    unsafe {
        if slot.is_null() {
            let ev = ngx_pcalloc((*r).pool, std::mem::size_of::<ngx_event_t>()) as *mut ngx_event_t;
            let cln = ngx_pool_cleanup_add((*r).pool, 0);
            if ev.is_null() || cln.is_null() {
                return Err(crate::NgxError);
            }
            (*cln).handler = Some(cancel);
            (*cln).data = ev as *mut c_void;
            *slot = ev;
        }
        let ev = *slot;
        (*ev).handler = handler;
        (*ev).data = r as *mut c_void;
        (*ev).log = (*(*r).connection).log;
        ngx_add_timer(ev, ms);
    }
    Ok(())
}
