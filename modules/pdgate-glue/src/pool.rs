//! Values owned by an nginx pool.

use std::ffi::c_void;

use ngx::ffi::{ngx_palloc, ngx_pool_cleanup_add, ngx_pool_t};

unsafe extern "C" fn drop_value<T>(data: *mut c_void) {
    // SAFETY: registered by `alloc_value` for a `T` written at `data`; the
    // pool runs each cleanup once, before freeing its memory.
    unsafe { std::ptr::drop_in_place(data as *mut T) }
}

/// Moves `value` into `pool` and registers its destructor as a pool cleanup
/// (so heap data it owns is freed with the request). `None` when out of
/// memory; the value is then dropped here.
///
/// # Safety
/// `pool` must be live. `T`'s alignment must not exceed nginx's
/// `NGX_ALIGNMENT` (8 on 64-bit).
pub unsafe fn alloc_value<T>(pool: *mut ngx_pool_t, value: T) -> Option<*mut T> {
    const { assert!(std::mem::align_of::<T>() <= 8) };
    // SAFETY: fresh, suitably aligned pool memory of size_of::<T>() bytes;
    // the cleanup is added before the value is written, so a failed add
    // leaves nothing to drop but `value` itself.
    unsafe {
        let cln = ngx_pool_cleanup_add(pool, 0);
        let p = ngx_palloc(pool, std::mem::size_of::<T>()) as *mut T;
        if cln.is_null() || p.is_null() {
            return None;
        }
        std::ptr::write(p, value);
        (*cln).handler = Some(drop_value::<T>);
        (*cln).data = p as *mut c_void;
        Some(p)
    }
}
